"""`from_pretrained` wall time and peak memory: ours against transformers' built-in DeepseekV3ForCausalLM on the same
sharded safetensors files (official per-expert layout), bf16 and FP8 (128×128 block scales).

Each load runs in a fresh process (`OMP_NUM_THREADS=1`); the two classes alternate within every round and the table
reports medians. Peak RSS is the child's `VmHWM` minus its own peak after the imports (file pages mapped from the
checkpoint count, for both alike). The built-in reads the FP8 folder through transformers' fine-grained FP8 quantizer
(dequantizing on a machine without a GPU); its dims here are multiples of 128, where that quantizer is right.

    python benchmarks/loading.py --size-gb 1 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from deepseek_moe import DeepseekMoeConfig
from deepseek_moe.conversion import convert_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import builtin_config  # noqa: E402  (test helpers)
from synthetic import write_random_checkpoint  # noqa: E402

CHILD = """
import json, sys, time
import torch
if sys.argv[1] == "ours":
    from deepseek_moe import DeepseekMoeForCausalLM as model_class
else:
    from transformers import DeepseekV3ForCausalLM as model_class

def peak_rss():
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]) * 1024

baseline = peak_rss()
start = time.perf_counter()
model = model_class.from_pretrained(sys.argv[2], dtype=getattr(torch, sys.argv[3]))
seconds = time.perf_counter() - start
dtypes = sorted({str(p.dtype) for p in model.parameters()})
print(json.dumps({"seconds": seconds, "baseline": baseline, "peak": peak_rss(), "dtypes": dtypes}))
"""


def benchmark_config(size_gb: float) -> DeepseekMoeConfig:
    """V3 routing and MLA with V2-Lite-like widths (hidden 1024, 64 experts of width 512): ~0.2 GB bf16 per MoE
    layer; every weight dimension a multiple of 128
    (transformers' CPU FP8 loader rejects V3's real 576-row kv_a_proj_with_mqa: "not divisible by scale grid")."""
    layers = max(1, round(size_gb * 1e9 / (64 * 3 * 1024 * 512 * 2)))
    return DeepseekMoeConfig.from_preset(
        "tiny-v3",
        vocab_size=32768,
        hidden_size=1024,
        intermediate_size=4096,
        moe_intermediate_size=512,
        num_attention_heads=8,
        kv_lora_rank=448,  # + 64 rope rows: 512, whole blocks (the built-in fails on partial ones, e.g. 576)
        q_lora_rank=768,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=64,
        num_experts_per_tok=6,
        n_group=8,
        topk_group=4,
        num_hidden_layers=layers + 1,
        num_nextn_predict_layers=0,
    )


def builtin_folder(ours: Path, folder: Path, config: DeepseekMoeConfig) -> Path:
    """The same tensor files (symlinked) under the built-in's config.json, keeping a FP8 quantization_config."""
    folder.mkdir()
    for path in ours.iterdir():
        if path.suffix == ".safetensors" or path.name.endswith(".index.json"):
            os.symlink(path, folder / path.name)
    builtin_config(config).save_pretrained(folder)
    quantization = json.loads((ours / "config.json").read_text()).get("quantization_config")
    if quantization:
        values = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**values, "quantization_config": quantization}))
    return folder


def load(kind: str, folder: Path, dtype: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    env["TRANSFORMERS_VERBOSITY"] = "error"
    command = [sys.executable, "-c", CHILD, kind, str(folder), dtype]
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode:
        raise RuntimeError(f"{kind} load of {folder} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.0, help="checkpoint size in GB (bf16)")
    parser.add_argument("--rounds", type=int, default=5, help="loads per class and case (alternating)")
    parser.add_argument("--workdir", help="where to write (default: a temporary directory)")
    args = parser.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="loading-benchmark-"))
    config = benchmark_config(args.size_gb)
    try:
        size = write_random_checkpoint(workdir / "bf16", config, dtype=torch.bfloat16, max_shard_size="500MB")
        convert_checkpoint(workdir / "bf16", workdir / "fp8", target="fp8", max_shard_size="500MB", progress=False)
        folders = {
            name: {
                "ours": workdir / name,
                "builtin": builtin_folder(workdir / name, workdir / f"{name}-builtin", config),
            }
            for name in ("bf16", "fp8")
        }
        print(
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
        )
        print(f"checkpoint: {size / 1e9:.2f} GB bf16, {config.num_hidden_layers} layers, 500 MB shards")
        print(f"{args.rounds} rounds, medians; ratio = ours / built-in")
        print("| checkpoint → dtype | ours s | built-in s | time ratio | ours peak MB | built-in peak MB |")
        print("| --- | --- | --- | --- | --- | --- |")
        cases = [("bf16", "bfloat16"), ("bf16", "float32"), ("fp8", "bfloat16")]
        for checkpoint, dtype in cases:
            runs = {"ours": [], "builtin": []}
            for round_index in range(args.rounds):
                order = ("ours", "builtin") if round_index % 2 == 0 else ("builtin", "ours")
                for kind in order:
                    result = load(kind, folders[checkpoint][kind], dtype)
                    if not set(result["dtypes"]) <= {f"torch.{dtype}", "torch.float32"}:
                        raise RuntimeError(f"{kind} loaded {result['dtypes']} for {dtype}")
                    runs[kind].append(result)
            seconds = {k: statistics.median(r["seconds"] for r in v) for k, v in runs.items()}
            peak = {k: statistics.median((r["peak"] - r["baseline"]) / 1e6 for r in v) for k, v in runs.items()}
            print(
                f"| {checkpoint} → {dtype} | {seconds['ours']:.2f} | {seconds['builtin']:.2f} "
                f"| {seconds['ours'] / seconds['builtin']:.2f} | {peak['ours']:.0f} | {peak['builtin']:.0f} |"
            )
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
