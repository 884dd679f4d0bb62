"""`deepseek-moe demo --quick` end to end in a subprocess whose HOME, working directory and TMPDIR are empty temporary
directories, so that any write outside --output-dir shows; then its outputs are checked from this process,
recomputing what can be recomputed (reload logits, MTP = greedy, held-out perplexity) instead of trusting the report."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import deepseek_moe  # noqa: F401  (registers the Auto classes)
from deepseek_moe.demo import prepare_output_dir
from deepseek_moe.demo.corpus import is_held_out, stdlib_files
from deepseek_moe.demo.run import remove_previous_outputs
from deepseek_moe.training.data import collate_packed, pack_token_rows

CLI = [sys.executable, "-m", "deepseek_moe.cli"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    home, cwd, tmp, out = (root / name for name in ("home", "cwd", "tmp", "out"))
    for directory in (home, cwd, tmp):
        directory.mkdir()
    env = {**os.environ, "HOME": str(home), "TMPDIR": str(tmp)}
    for name in ("HF_HOME", "HF_DATASETS_CACHE", "MPLCONFIGDIR", "XDG_CACHE_HOME", "TRITON_CACHE_DIR"):
        env.pop(name, None)  # the demo must choose its own, inside the output directory
    completed = subprocess.run(
        [*CLI, "demo", "--quick", "--no-progress", "--output-dir", str(out)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    return {"home": home, "cwd": cwd, "tmp": tmp, "out": out, "summary": summary, "stdout": completed.stdout}


def test_demo_writes_nothing_outside_its_output_directory(demo_run):
    for name in ("home", "cwd", "tmp"):
        assert list(demo_run[name].rglob("*")) == [], f"the demo wrote into {name}"
    out = demo_run["out"]
    for label, relative in demo_run["summary"]["files"].items():
        assert (out / relative).exists(), f"{label}: {relative} listed but missing"
        assert relative in demo_run["stdout"], f"{relative} missing from the printed summary table"


def test_demo_perplexity_falls_and_matches_a_recomputation(demo_run):
    out, summary = demo_run["out"], demo_run["summary"]
    perplexity = summary["perplexity"]
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    # A freshly initialised model is close to uniform over the vocabulary; training must beat it clearly.
    assert perplexity["before"] > 0.5 * len(tokenizer)
    assert perplexity["after"] < 0.5 * perplexity["before"]
    assert summary["training"]["final_loss"] < summary["training"]["first_loss"]

    # Recompute the held-out perplexity of the saved model from the held-out files.
    heldout = [json.loads(line)["text"] for line in (out / "data" / "heldout.jsonl").read_text().splitlines()]
    assert all(is_held_out(path) for path in summary["heldout_files"])
    documents = [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in heldout]
    size = summary["size"]
    rows = list(pack_token_rows(documents, size["seq_length"]))[: size["eval_rows"]]
    batch = collate_packed(rows)
    model = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten())
    assert math.exp(loss.item()) == pytest.approx(perplexity["after"], rel=1e-3)
    # The FP8 export (128x128 block scales) stays close to the full-precision model.
    assert perplexity["FP8 export"] == pytest.approx(perplexity["after"], rel=0.05)


def test_demo_reloaded_model_reproduces_the_trained_logits(demo_run):
    out = demo_run["out"]
    assert demo_run["summary"]["reload_logits_equal"] is True
    assert len(list((out / "model").glob("model-*.safetensors"))) > 1  # sharded
    checks = load_file(out / "checks.safetensors")
    model = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    with torch.no_grad():
        logits = model(input_ids=checks["input_ids"], position_ids=checks["position_ids"]).logits
    torch.testing.assert_close(logits, checks["logits"], rtol=0, atol=0)


def test_demo_mtp_drafting_equals_greedy(demo_run):
    out, summary = demo_run["out"], demo_run["summary"]
    assert summary["mtp_equals_greedy"] is True
    assert all(0.0 <= sample["mtp_acceptance_rate"] <= 1.0 for sample in summary["samples"])
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    model = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    input_ids = tokenizer(summary["samples"][0]["prompt"], return_tensors="pt").input_ids
    options = {"max_new_tokens": 16, "eos_token_id": None}
    greedy = model.generate(input_ids, do_sample=False, **options)
    drafted = model.generate(input_ids, use_mtp=True, **options)
    assert torch.equal(greedy, drafted)


def test_demo_fine_tune_and_exports(demo_run):
    out, summary = demo_run["out"], demo_run["summary"]
    finetune = summary["finetune"]
    assert finetune["heldout_answer_perplexity"]["merged"] < finetune["heldout_answer_perplexity"]["base"]
    assert (out / summary["files"]["LoRA adapter"] / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out / "model-lora-merged")
    base = AutoModelForCausalLM.from_pretrained(out / "model")
    changed = [name for name, p in merged.state_dict().items() if not torch.equal(p, base.state_dict()[name])]
    assert changed, "merging the adapter changed no weight"
    fp8_tensors = {}
    for path in (out / "model-fp8").glob("*.safetensors"):
        fp8_tensors.update(load_file(path))
    assert any(name.endswith("weight_scale_inv") for name in fp8_tensors)
    assert any(tensor.dtype == torch.float8_e4m3fn for tensor in fp8_tensors.values())
    official = json.loads((out / "model-official" / "config.json").read_text())
    assert official["model_type"] == "deepseek_v3" and summary["official_export_max_relative_error"] < 1e-5


def test_demo_plots_are_readable_pngs(demo_run):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.image

    for name in ("loss.png", "expert_load.png", "load_cv.png"):
        path = demo_run["out"] / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    cv = demo_run["summary"]["training"]["late_load_cv"]
    assert cv["bias on"] < cv["bias off"]  # the bias update balances the experts


def test_demo_refuses_a_foreign_output_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("someone's file")
    completed = subprocess.run(
        [*CLI, "demo", "--quick", "--output-dir", str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 2
    assert "not an earlier demo's output" in completed.stderr and len(completed.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_corpus_order_is_fixed_and_the_split_is_by_file():
    files = stdlib_files()
    assert files == stdlib_files()
    assert all("/test/" not in f"/{path}" for path in files)
    heldout = [path for path in files if is_held_out(path)]
    assert 0 < len(heldout) < len(files) // 10


def test_a_rerun_removes_only_what_the_previous_run_listed(tmp_path):
    out = prepare_output_dir(tmp_path / "out")
    (out / "model").mkdir()
    (out / "model" / "model-00009-of-00009.safetensors").write_bytes(b"stale shard")
    (out / ".cache" / "tmp").mkdir(parents=True)
    (out / "notes.txt").write_text("the user's file")
    files = {"model": "model", "caches": ".cache", "outside": "../elsewhere", "missing": "gone.png"}
    (out / "summary.json").write_text(json.dumps({"files": files}))
    (tmp_path / "elsewhere").mkdir()
    assert prepare_output_dir(out) == out  # an earlier demo's directory is reused
    remove_previous_outputs(out)
    assert not (out / "model").exists()
    assert (out / ".cache" / "tmp").is_dir() and (out / "notes.txt").exists() and (tmp_path / "elsewhere").is_dir()
