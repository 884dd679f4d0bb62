"""Wall time and peak memory of a whole `deepseek-moe convert` run (a fresh process: imports included) against a
stand-in for DeepSeek's `inference/convert.py` and against the bare imports any such script pays, on the same files.

DeepSeek's script cannot be downloaded here, so the stand-in (`OFFICIAL_STANDIN` below) does what it does for
`--model-parallel 1`, with the same imports (torch, safetensors, tqdm): open every `*.safetensors` file with
`safe_open`, read every tensor except the MTP layers into one dict, `save_file` it as `model0-mp1.safetensors`, copy the
tokenizer files. It leaves out only the official name mapping (string replacements, negligible next to the I/O), so
it is a lower bound for the official script. Ours runs `deepseek-moe convert SRC OUT --to mp --mp 1` (the same
output format, streamed tensor by tensor, with its checks). The floor arm is `import torch, safetensors.torch, tqdm`.

Arms alternate within every round (the machine is shared); each cell is the median over rounds. Peak memory is the
process's maximum resident set (GNU time's %M).

    OMP_NUM_THREADS=1 python benchmarks/convert_command.py --size-gb 0.2 0.6 --rounds 5
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

source, output, mtp_prefix = sys.argv[1:4]
state = {}
for path in tqdm(sorted(glob(os.path.join(source, "*.safetensors"))), disable=True):
    with safe_open(path, framework="pt", device="cpu") as f:
        for name in f.keys():
            if not name.startswith(mtp_prefix):
                state[name] = f.get_tensor(name)
os.makedirs(output, exist_ok=True)
save_file(state, os.path.join(output, "model0-mp1.safetensors"))
for path in glob(os.path.join(source, "*token*")):
    shutil.copyfile(path, os.path.join(output, os.path.basename(path)))
"""


def timed(command: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in MB) of one fresh process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-f", "%M", *command], capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    return seconds, int(result.stderr.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, nargs="+", default=[0.2, 0.6])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    command_line = str(Path(sys.executable).with_name("deepseek-moe"))
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, OMP_NUM_THREADS=1")
    print("| source | arm | seconds (median) | peak RSS MB | seconds of each round |")
    print("| --- | --- | --- | --- | --- |")
    for size_gb in args.size_gb:
        workdir = Path(tempfile.mkdtemp(prefix="convert-command-"))
        try:
            config = benchmark_config(size_gb)
            size = write_random_checkpoint(workdir / "source", config, dtype=torch.bfloat16, max_shard_size="1GB")
            mtp_prefix = f"model.layers.{config.num_hidden_layers}."
            source = str(workdir / "source")
            arms = {  # OUT stands for this run's output directory
                "deepseek-moe convert --to mp": [
                    command_line, "convert", source, "OUT", "--to", "mp", "--mp", "1", "--no-progress"
                ],
                "official convert.py stand-in": [sys.executable, "-c", OFFICIAL_STANDIN, source, "OUT", mtp_prefix],
                "floor: import torch, safetensors, tqdm": [
                    sys.executable, "-c", "import torch, safetensors.torch, tqdm"
                ],
            }  # fmt: skip
            results = {name: [] for name in arms}
            for round_index in range(args.rounds):
                for name, command in arms.items():
                    output = workdir / f"out-{round_index}-{len(results[name])}-{abs(hash(name))}"
                    results[name].append(timed([str(output) if part == "OUT" else part for part in command]))
                    shutil.rmtree(output, ignore_errors=True)
            for name, runs in results.items():
                seconds = [s for s, _ in runs]
                print(
                    f"| {size / 1e9:.2f} GB bf16, {config.num_hidden_layers} layers | {name} | "
                    f"{statistics.median(seconds):.2f} | {max(m for _, m in runs):.0f} | "
                    f"{', '.join(f'{s:.2f}' for s in seconds)} |",
                    flush=True,
                )
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
