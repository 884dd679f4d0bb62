"""Conversion throughput (GB/s of source read) and peak memory on a synthetic multi-GB checkpoint.

Writes a random bf16 checkpoint of about `--size-gb` (V2-Lite-like shapes: 64 experts per MoE layer, as many layers
as the size needs) and converts it three ways, each in a fresh process whose peak RSS (`VmHWM` in /proc/self/status;
`ru_maxrss` would include the parent's RSS, which Linux carries over into a child across fork and exec) is compared
with the same process's peak after its imports:

- bf16 → bf16 with a smaller shard budget (pure resharding: read, write),
- bf16 → FP8 official form (128×128 block quantization),
- FP8 → bf16 (block dequantization, the official-release direction).

    python benchmarks/conversion.py --size-gb 2 --max-shard-size 500MB
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import torch

from deepseek_moe import DeepseekMoeConfig
from deepseek_moe.conversion import Checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from synthetic import write_random_checkpoint  # noqa: E402  (a test helper)

CHILD = """
import json, sys, time
from deepseek_moe.conversion import convert_checkpoint
def peak_rss():
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1]) * 1024
baseline = peak_rss()
start = time.perf_counter()
convert_checkpoint(sys.argv[1], sys.argv[2], target=sys.argv[3], dtype=sys.argv[4] or None,
                   max_shard_size=sys.argv[5], progress=False)
print(json.dumps({"seconds": time.perf_counter() - start, "baseline": baseline, "peak": peak_rss()}))
"""


def benchmark_config(size_gb: float) -> DeepseekMoeConfig:
    """V2-Lite-like shapes (hidden 1024, 64 experts of width 512): about 0.2 GB of bf16 experts per MoE layer."""
    moe_layer_bytes = 64 * 3 * 1024 * 512 * 2
    layers = max(1, round(size_gb * 1e9 / moe_layer_bytes))
    return DeepseekMoeConfig.from_preset(
        "tiny-v2-lite",
        vocab_size=32768,
        hidden_size=1024,
        intermediate_size=4096,
        moe_intermediate_size=512,
        num_attention_heads=8,
        n_routed_experts=64,
        num_experts_per_tok=6,
        num_hidden_layers=layers + 1,
    )


def convert(source: Path, output: Path, target: str, dtype: str, max_shard_size: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    command = [sys.executable, "-c", textwrap.dedent(CHILD), str(source), str(output), target, dtype, max_shard_size]
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=2.0, help="source checkpoint size in GB (bf16)")
    parser.add_argument("--max-shard-size", default="500MB", help="output shard budget")
    parser.add_argument("--workdir", help="where to write (default: a temporary directory)")
    args = parser.parse_args()

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="conversion-benchmark-"))
    config = benchmark_config(args.size_gb)
    try:
        size = write_random_checkpoint(workdir / "bf16", config, dtype=torch.bfloat16, max_shard_size="5GB")
        largest = max(info.nbytes for info in Checkpoint.open(workdir / "bf16").tensors.values())
        print(
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
        )
        layers = config.num_hidden_layers
        print(f"source: {size / 1e9:.2f} GB bf16, {layers} layers, largest tensor {largest / 1e6:.0f} MB")
        print("| conversion | source GB | seconds | GB/s | peak RSS − baseline (MB) | baseline (MB) |")
        print("| --- | --- | --- | --- | --- | --- |")
        runs = [
            ("bf16 → bf16, resharded", "bf16", "reshard", "ours", ""),
            ("bf16 → FP8 (quantize)", "bf16", "fp8", "fp8", ""),
            ("FP8 → bf16 (dequantize)", "fp8", "back", "ours", "bf16"),
        ]
        for label, source, output, target, dtype in runs:
            result = convert(workdir / source, workdir / output, target, dtype, args.max_shard_size)
            read = sum(info.nbytes for info in Checkpoint.open(workdir / source).tensors.values())
            extra = (result["peak"] - result["baseline"]) / 1e6
            print(
                f"| {label} | {read / 1e9:.2f} | {result['seconds']:.1f} | {read / 1e9 / result['seconds']:.2f} "
                f"| {extra:.0f} | {result['baseline'] / 1e6:.0f} |"
            )
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
