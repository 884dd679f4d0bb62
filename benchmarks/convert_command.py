"""Wall time and peak memory of a whole `deepseek-moe convert` run (a fresh process: imports included) against a
stand-in for DeepSeek's `inference/convert.py` and against the bare imports any such script pays, on the same files.

DeepSeek's script cannot be downloaded here, so the stand-in (`OFFICIAL_STANDIN` below) does what it does for
`--model-parallel 1`, with the same imports (torch, safetensors, tqdm): open every `*.safetensors` file with
`safe_open`, read every tensor except the MTP layers into one dict, `save_file` it as `model0-mp1.safetensors`, copy the
tokenizer files. It leaves out only the official name mapping (string replacements, negligible next to the I/O), so
it is a lower bound for the official script. Ours runs `deepseek-moe convert SRC OUT --to mp --mp 1` (the same
output format, streamed tensor by tensor, with its checks). The floor arm is `import torch, safetensors.torch, tqdm`.

Sources (`--sources`), all with the same parameters (`--size-gb` is the bf16 size):
- `bf16`: the arms above, and ours `--to ours` (our own layout, resharded; the tensors keep their bytes too);
- `fp32`: cast to bf16 on the way, ours with `--dtype bf16`; DeepSeek's script has no dtype option, so its stand-in
  casts every floating tensor with `.to(torch.bfloat16)` after reading it;
- `fp8`: DeepSeek's release format (e4m3 weights with 128x128 block scales, made from the bf16 source by our
  `--to fp8`, untimed), which both keep as it is.

Arms alternate within every round (the machine is shared); each cell is the median over rounds. Peak memory is the
process's maximum resident set (GNU time's %M).

    OMP_NUM_THREADS=1 python benchmarks/convert_command.py --size-gb 0.2 2 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conversion import benchmark_config  # noqa: E402  (the sibling benchmark's V2-Lite-like shapes)
from synthetic import write_random_checkpoint  # noqa: E402  (a test helper)

OFFICIAL_STANDIN = """
import os, shutil, sys
from glob import glob
import torch
from safetensors.torch import safe_open, save_file
from tqdm import tqdm

source, output, mtp_prefix, cast = sys.argv[1:5]
state = {}
for path in tqdm(sorted(glob(os.path.join(source, "*.safetensors"))), disable=True):
    with safe_open(path, framework="pt", device="cpu") as f:
        for name in f.keys():
            if not name.startswith(mtp_prefix):
                state[name] = f.get_tensor(name)
                if cast == "bf16" and state[name].is_floating_point():
                    state[name] = state[name].to(torch.bfloat16)
os.makedirs(output, exist_ok=True)
save_file(state, os.path.join(output, "model0-mp1.safetensors"))
for path in glob(os.path.join(source, "*token*")):
    shutil.copyfile(path, os.path.join(output, os.path.basename(path)))
"""


FLOOR = "import torch, safetensors.torch, tqdm"


def timed(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one fresh process, started with no dirty pages waiting to be written back
    (the previous arm's output would otherwise slow this one's writes)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    os.sync()
    start = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-f", "%M", *command], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return seconds, int(result.stderr.strip().splitlines()[-1]) / 1024


def arms(source: str, kind: str, mtp_prefix: str) -> dict[str, list[str]]:
    """Each arm's command line; OUT stands for the round's output directory."""
    ours = [str(Path(sys.executable).with_name("deepseek-moe")), "convert", source, "OUT", "--no-progress"]
    standin = [sys.executable, "-c", OFFICIAL_STANDIN, source, "OUT", mtp_prefix]
    if kind == "fp32":
        return {
            "deepseek-moe convert --to mp --dtype bf16": [*ours, "--to", "mp", "--mp", "1", "--dtype", "bf16"],
            "convert.py stand-in + cast to bf16": [*standin, "bf16"],
        }
    commands = {
        "deepseek-moe convert --to mp": [*ours, "--to", "mp", "--mp", "1"],
        "official convert.py stand-in": [*standin, "none"],
    }
    if kind == "bf16":
        commands["deepseek-moe convert --to ours"] = ours
        commands["floor: import torch, safetensors, tqdm"] = [sys.executable, "-c", FLOOR]
    return commands


def write_sources(workdir: Path, size_gb: float, kinds: list[str]) -> tuple[dict[str, int], str]:
    """The source checkpoints (`bf16` always: the FP8 one is converted from it), their bytes, and the MTP prefix."""
    config = benchmark_config(size_gb)
    sizes = {"bf16": write_random_checkpoint(workdir / "bf16", config, dtype=torch.bfloat16, max_shard_size="1GB")}
    if "fp32" in kinds:
        sizes["fp32"] = write_random_checkpoint(workdir / "fp32", config, dtype=torch.float32, max_shard_size="1GB")
    if "fp8" in kinds:
        from deepseek_moe.conversion import convert_checkpoint

        fp8 = convert_checkpoint(workdir / "bf16", workdir / "fp8", target="fp8", max_shard_size="1GB", progress=False)
        sizes["fp8"] = fp8.total_bytes
    return sizes, f"model.layers.{config.num_hidden_layers}."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, nargs="+", default=[0.2, 2])
    parser.add_argument("--sources", nargs="+", choices=["bf16", "fp32", "fp8"], default=["bf16", "fp32", "fp8"])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, OMP_NUM_THREADS=1")
    print("| source | arm | seconds (median) | peak RSS MB | seconds of each round |")
    print("| --- | --- | --- | --- | --- |")
    for size_gb in args.size_gb:
        workdir = Path(tempfile.mkdtemp(prefix="convert-command-"))
        try:
            sizes, mtp_prefix = write_sources(workdir, size_gb, args.sources)
            layers = benchmark_config(size_gb).num_hidden_layers
            for kind in args.sources:
                commands = arms(str(workdir / kind), kind, mtp_prefix)
                results = {name: [] for name in commands}
                for round_index in range(args.rounds):
                    for index, (name, command) in enumerate(commands.items()):
                        output = workdir / f"out-{kind}-{round_index}-{index}"
                        results[name].append(timed([str(output) if part == "OUT" else part for part in command]))
                        shutil.rmtree(output, ignore_errors=True)
                for name, runs in results.items():
                    seconds = [s for s, _ in runs]
                    print(
                        f"| {sizes[kind] / 1e9:.2f} GB {kind}, {layers} layers | {name} | "
                        f"{statistics.median(seconds):.2f} | {max(m for _, m in runs):.0f} | "
                        f"{', '.join(f'{s:.2f}' for s in seconds)} |",
                        flush=True,
                    )
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
