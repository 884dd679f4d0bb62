"""Every `python` and `bash` snippet of README.md runs, in a directory of stand-ins the README names: `demo-out/` (a
tiny model with the demo's tokenizer and data files), `DeepSeek-V3` (a tiny FP8 checkpoint in DeepSeek's own format,
also standing in for the Hub id `deepseek-ai/DeepSeek-V3`), and a loopback Hub for the upload. `--max-steps N` is
cut to 2. The python snippets run one after another in one process (each in a fresh namespace, as a reader would
paste it), the bash snippets in one bash script; blocks marked `<!-- not run by tests/test_readme.py: why -->` are
the quick start, which `scripts/test.sh` (setup) and `tests/test_demo.py` (the demo) run."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoint_utils import QUANTIZATION_CONFIG, official_config, to_official_fp8, write_sharded
from hub_server import FakeHub
from safetensors.torch import load_file

from deepseek_moe import DeepseekMoeConfig, DeepseekMoeForCausalLM
from deepseek_moe.demo.corpus import function_chats, read_split, train_tokenizer, write_jsonl, write_jsonl_rows

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
NOT_RUN = "<!-- not run by tests/test_readme.py:"
BLOCK = re.compile(r"(?P<marker><!--[^\n]*-->\n)?```(?P<language>python|bash)\n(?P<code>.*?)```", re.DOTALL)
STAND_INS = [("deepseek-ai/DeepSeek-V3", "DeepSeek-V3")]
QUICK_START = ["bash scripts/setup.sh", ".venv/bin/deepseek-moe demo"]


def readme_blocks() -> list[dict[str, str]]:
    return [match.groupdict() for match in BLOCK.finditer(README.read_text())]


def runnable(language: str) -> list[str]:
    """The README's blocks of `language` that the test runs, stand-ins substituted."""
    blocks = []
    for block in readme_blocks():
        if block["language"] != language or (block["marker"] or "").startswith(NOT_RUN):
            continue
        code = re.sub(r"--max-steps \d+", "--max-steps 2", block["code"])
        code = re.sub(r"max_steps=\d+", "max_steps=2", code)
        for name, stand_in in STAND_INS:
            code = code.replace(name, stand_in)
        blocks.append(code)
    return blocks


def write_demo_stand_in(directory: Path) -> None:
    """demo-out/ as the demo leaves it, at test size: data, tokenizer, and a tiny V3 model saved with it."""
    train_files, heldout = read_split(150_000, held_out=False), read_split(30_000, held_out=True)
    (directory / "data").mkdir(parents=True)
    write_jsonl(train_files, directory / "data" / "train.jsonl")
    write_jsonl(heldout, directory / "data" / "heldout.jsonl")
    write_jsonl_rows(function_chats(train_files, 600)[:16], directory / "data" / "chat.jsonl")
    tokenizer = train_tokenizer(train_files, 512, directory / "tokenizer")
    ids = {f"{kind}_token_id": getattr(tokenizer, f"{kind}_token_id") for kind in ("bos", "eos", "pad")}
    torch.manual_seed(0)
    model = DeepseekMoeForCausalLM(DeepseekMoeConfig.from_preset("tiny-v3", vocab_size=len(tokenizer), **ids))
    model.save_pretrained(directory / "model", max_shard_size="300KB")
    tokenizer.save_pretrained(directory / "model")


def write_official_fp8_stand_in(directory: Path, tokenizer_dir: Path) -> None:
    """A tiny V3 checkpoint as DeepSeek ships one: `model_type` deepseek_v3, FP8 weights with 128x128 block scales."""
    config = DeepseekMoeConfig.from_preset("tiny-v3")
    torch.manual_seed(1)
    saved = directory.parent / "v3-saved"
    DeepseekMoeForCausalLM(config).save_pretrained(saved)
    state = {}
    for path in saved.glob("*.safetensors"):
        state.update(load_file(path))
    directory.mkdir()
    official = {**official_config(config), "quantization_config": QUANTIZATION_CONFIG}
    write_sharded(to_official_fp8(state)[0], directory, official)
    for path in tokenizer_dir.iterdir():
        (directory / path.name).write_bytes(path.read_bytes())


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("readme")
    write_demo_stand_in(directory / "demo-out")
    write_official_fp8_stand_in(directory / "DeepSeek-V3", directory / "demo-out" / "tokenizer")
    return directory


def environment(workdir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE"))}
    env.update(
        HF_HOME=str(workdir / ".hf"),
        HF_HUB_OFFLINE="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        OMP_NUM_THREADS="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        **extra,
    )
    return env


def test_readme_blocks_that_are_not_run_are_the_quick_start():
    skipped = [block["code"] for block in readme_blocks() if (block["marker"] or "").startswith(NOT_RUN)]
    commands = [line.split("#")[0].strip() for code in skipped for line in code.splitlines() if line.strip()]
    assert commands == QUICK_START
    assert "bash scripts/test.sh" in README.read_text()  # CI runs this command line


def test_readme_python_snippets_run(workdir):
    blocks = runnable("python")
    assert len(blocks) >= 4
    script = workdir / "readme_python.py"
    script.write_text(
        "import json, sys\n"
        "for index, code in enumerate(json.load(open(sys.argv[1]))):\n"
        "    print(f'--- python block {index + 1}', flush=True)\n"
        "    exec(compile(code, f'README python block {index + 1}', 'exec'), {'__name__': '__main__'})\n"
    )
    (workdir / "readme_python.json").write_text(json.dumps(blocks))
    completed = subprocess.run(
        [sys.executable, str(script), str(workdir / "readme_python.json")],
        cwd=workdir,
        env=environment(workdir),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    assert (workdir / "runs" / "lora" / "adapter" / "adapter_config.json").exists()
    official = json.loads((workdir / "demo-official" / "config.json").read_text())
    assert official["model_type"] == "deepseek_v3" and official["architectures"] == ["DeepseekV3ForCausalLM"]


def test_readme_bash_snippets_run(workdir):
    blocks = runnable("bash")
    assert len(blocks) >= 4
    script = "set -euo pipefail\n" + "\n".join(
        f"echo '--- bash block {index + 1}'\n{code}" for index, code in enumerate(blocks)
    )
    hub = FakeHub()
    try:
        env = environment(workdir, HF_ENDPOINT=hub.endpoint, HF_TOKEN=hub.token, HF_HUB_DISABLE_XET="1")
        env.pop("HF_HUB_OFFLINE")
        completed = subprocess.run(
            ["bash", "-c", script], cwd=workdir, env=env, capture_output=True, text=True, timeout=900
        )
    finally:
        hub.close()
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    assert (workdir / "runs" / "chat-merged" / "config.json").exists()
    assert (workdir / "runs" / "pretrain" / "final" / "config.json").exists()
    assert (workdir / "v3-fp8" / "config.json").exists()
