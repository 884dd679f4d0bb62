"""Publishing to the Hub, end to end against the in-memory loopback Hub of `hub_server.py`.

The first upload (through `hub_upload.py`) and the download run in subprocesses, so that `HF_ENDPOINT` and
`HF_HUB_DISABLE_XET` are set before huggingface_hub is imported; the other runs use this process with huggingface_hub's
endpoint constants patched, which saves the imports. Nothing can reach the real Hub.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import REMOTE_CODE_LOGITS, file_tree, tiny_model
from hub_server import FakeHub
from huggingface_hub import HfApi, constants

from deepseek_moe import DeepseekMoeConfig, DeepseekMoeForCausalLM
from deepseek_moe.cli import main
from deepseek_moe.hub import staging as staging_module
from deepseek_moe.remote_code import AUTO_MAP, remote_code_files

ROOT = Path(__file__).resolve().parents[1]
PROMPT = [[3, 14, 15, 92, 65, 35, 89, 79]]
REPO = "tester/tiny-v3"


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    server = FakeHub()
    yield server
    server.close()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> tuple[Path, torch.Tensor, dict[str, str]]:
    """A sharded tiny V3 (with an MTP layer) as a training run leaves it, its logits on PROMPT and its file tree
    (`save_pretrained` already writes `auto_map` and the model code)."""
    directory = tmp_path_factory.mktemp("model")
    model = tiny_model(DeepseekMoeConfig.from_preset("tiny-v3")).eval()
    model.save_pretrained(directory, max_shard_size="200KB")
    history = [{"step": step, "loss": 6.0 - 0.2 * step} for step in range(1, 11)]
    (directory / "trainer_state.json").write_text(json.dumps({"global_step": 10, "epoch": 1.0, "log_history": history}))
    (directory / "expert_load_layer1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    (directory / "conversion.json").write_text(json.dumps({"source": "deepseek-ai/DeepSeek-V3", "dtype": "float32"}))
    with torch.no_grad():
        logits = model(torch.tensor(PROMPT)).logits
    return directory, logits, file_tree(directory)


def client_env(hub: FakeHub, home: Path, token: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE", "TRANSFORMERS_OFFLINE"))}
    env.update(
        HF_ENDPOINT=hub.endpoint,
        HF_HUB_DISABLE_XET="1",
        HF_HOME=str(home),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        TRANSFORMERS_VERBOSITY="error",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(ROOT),
    )
    if token:
        env["HF_TOKEN"] = token
    return env


def hub_upload(env: dict[str, str], *args) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "hub_upload.py"), *map(str, args)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def copy_of(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


@pytest.fixture(scope="module")
def uploaded(hub, model_dir, tmp_path_factory) -> subprocess.CompletedProcess:
    env = client_env(hub, tmp_path_factory.mktemp("hf_home"), hub.token)
    result = hub_upload(env, model_dir[0], REPO, "--max-commit-size", "600KB")
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_upload_publishes_weights_remote_code_and_card(hub, model_dir, uploaded) -> None:
    directory = model_dir[0]
    files = hub.files(REPO)
    for path in directory.iterdir():
        if path.name not in ("config.json", "trainer_state.json"):  # the training state is not part of the model
            assert files[path.name] == path.read_bytes(), path.name
    assert "trainer_state.json" not in files
    for code in remote_code_files():
        assert files[code.name] == code.read_bytes()
    assert json.loads(files["config.json"])["auto_map"] == AUTO_MAP
    card = files["README.md"].decode()
    for expected in (
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "license: mit",
        "base_model: deepseek-ai/DeepSeek-V3",
        "- **source**: deepseek-ai/DeepSeek-V3",
        "- custom_code",
        "| experts | 16 routed + 1 shared, 4 routed active per token, expert width 32 |",
        "| attention | MLA, 4 heads, kv_lora_rank 32,",
        "| KV cache | 240 bytes per token in bf16",
        "trust_remote_code=True",
        "Trained for 10 steps",
        "![expert_load_layer1.png](expert_load_layer1.png)",
    ):
        assert expected in card
    # The loss curve is an image when matplotlib is installed, a table otherwise.
    if importlib.util.find_spec("matplotlib"):
        assert "![training loss](loss_curve.png)" in card and files["loss_curve.png"].startswith(b"\x89PNG")
    else:
        assert "| step | training loss |" in card
    # Several commits, weights first: the commit before the last has shards but no config or index yet.
    history = hub.history(REPO)
    assert len(history) >= 4 and history[0].endswith(f"(part {len(history) - 1}/{len(history) - 1})")
    repo = hub.repos[REPO]
    before_last = hub.files(REPO, repo.parents[repo.refs["main"]])
    assert not {"config.json", "model.safetensors.index.json"} & before_last.keys() and any(
        name.endswith(".safetensors") for name in before_last
    )
    # The user's folder is untouched.
    assert file_tree(directory) == model_dir[2]


def test_uploaded_model_loads_where_the_package_is_not_installed(hub, model_dir, uploaded, tmp_path) -> None:
    env = client_env(hub, tmp_path / "hf_home", hub.token)
    command = [sys.executable, "-I", "-c", REMOTE_CODE_LOGITS, REPO, repr(PROMPT), str(tmp_path / "logits.pt")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().startswith("transformers_modules.")
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), model_dir[1], rtol=1e-6, atol=1e-6)


@pytest.fixture
def hub_in_process(hub, monkeypatch, tmp_path) -> FakeHub:
    """This process's huggingface_hub pointed at the loopback Hub, with no token anywhere and no requests recorded
    yet; it saves a subprocess's imports. huggingface_hub reads these settings at import, so they are patched."""
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    hub.requests.clear()
    return hub


@pytest.fixture
def without_load_check(monkeypatch) -> None:
    """Skip the remote-code load subprocess (a few seconds each) in tests about what happens after validation; the
    first upload and the refusal test below exercise it."""
    monkeypatch.setattr(staging_module, "check_loads_as_remote_code", lambda staging: None)


def test_rerun_skips_unchanged_files_and_create_pr_leaves_main_alone(
    hub_in_process, without_load_check, model_dir, uploaded, monkeypatch, capsys, tmp_path
) -> None:
    hub, repo = hub_in_process, hub_in_process.repos[REPO]
    directory = copy_of(model_dir[0], tmp_path / "model")
    (directory / "notes.txt").write_text("evaluation notes\n" * 100)
    main_before = repo.refs["main"]
    monkeypatch.setenv("HF_TOKEN", hub.token)
    args = ["--create-pr", "--license", "apache-2.0", "--regenerate-card", "--max-commit-size", "1KB"]
    args += ["--include", "notes.txt"]  # not part of a model: sent only when asked for
    assert main(["upload", str(directory), REPO, *args]) == 0
    output = capsys.readouterr().out
    assert "already on the Hub unchanged: skipped" in output and "/discussions/1" in output
    # Two commits on the pull request's ref, the new file first and the card last, chained; main is untouched.
    assert [ref for ref in repo.refs if ref.startswith("refs/pr/")] == ["refs/pr/1"]
    assert [message[-10:] for message in hub.history(REPO, "refs/pr/1")[:2]] == ["(part 2/2)", "(part 1/2)"]
    assert hub.changed_paths(REPO, "refs/pr/1") == {"README.md"}
    assert hub.changed_paths(REPO, repo.parents[repo.refs["refs/pr/1"]]) == {"notes.txt"}
    assert repo.refs["main"] == main_before
    assert "license: apache-2.0" in hub.files(REPO, "refs/pr/1")["README.md"].decode()
    assert "license: mit" in hub.files(REPO)["README.md"].decode()
    # Continuing the pull request finds everything there already.
    pr_head = repo.refs["refs/pr/1"]
    args = ["--revision", "refs/pr/1", "--license", "apache-2.0", "--regenerate-card"]
    assert main(["upload", str(directory), REPO, *args]) == 0
    assert "nothing to upload" in capsys.readouterr().out and repo.refs["refs/pr/1"] == pr_head


def test_interrupted_upload_resumes_with_what_is_missing(
    hub_in_process, without_load_check, model_dir, monkeypatch, capsys
) -> None:
    hub = hub_in_process
    monkeypatch.setenv("HF_TOKEN", hub.token)
    command = ["upload", str(model_dir[0]), "tester/resumed", "--max-commit-size", "600KB", "--private"]
    hub.commits_before_failure = 2
    assert main(command) == 2
    assert "interrupted" in capsys.readouterr().err
    partial = hub.files("tester/resumed")
    assert hub.repos["tester/resumed"].private
    assert any(name.endswith(".safetensors") for name in partial) and "config.json" not in partial
    interrupted_at = hub.repos["tester/resumed"].refs["main"]
    assert main(command) == 0
    repo, resent = hub.repos["tester/resumed"], set()
    sha = repo.refs["main"]
    while sha != interrupted_at:
        resent |= hub.changed_paths("tester/resumed", sha)
        sha = repo.parents[sha]
    assert resent and not resent & partial.keys()
    published = {path.name for path in model_dir[0].iterdir()} - {"trainer_state.json"} | {"README.md"}
    assert published <= hub.files("tester/resumed").keys()


def test_dry_run_sends_nothing(hub_in_process, model_dir, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_TOKEN", hub_in_process.token)
    assert main(["upload", str(model_dir[0]), "tester/dry", "--dry-run"]) == 0
    assert hub_in_process.writes() == []  # it may list the repository, to show what would be deleted
    output = capsys.readouterr().out
    for expected in ("model-00001-of-", "modeling_deepseek_moe.py", "library_name: transformers", "nothing was sent"):
        assert expected in output


def _missing_shard(directory: Path) -> None:
    shard = sorted(directory.glob("model-*.safetensors"))[2]
    shard.unlink()


def _missing_weight(directory: Path) -> None:
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"]["model.layers.2.mlp.experts.5.down_proj.weight"]
    index_path.unlink()
    index_path.write_text(json.dumps(index))


def _corrupt_shard(directory: Path) -> None:
    shard = sorted(directory.glob("model-*.safetensors"))[1]
    shard.unlink()
    shard.write_bytes(b"not a safetensors file")


def _broken_config(directory: Path) -> None:
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").unlink()
    (directory / "config.json").write_text(json.dumps({**config, "topk_method": "top_p"}))


def _absolute_shard(directory: Path) -> None:
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"] = {k: str(directory / v) if v == first else v for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))


REFUSALS = {
    "no_token": (None, None, "no Hugging Face token"),
    "bad_token": ("hf_wrong", None, "token was rejected"),
    "missing_shard": ("ok", _missing_shard, "lists weight shards that are not in the folder: model-00003-of-"),
    "missing_weight": ("ok", _missing_weight, "1 weights are missing"),
    "corrupt_shard": ("ok", _corrupt_shard, "safetensors: not a safetensors file"),
    "broken_config": ("ok", _broken_config, "topk_method"),
    "absolute_shard": ("ok", _absolute_shard, "is not a plain file name in the checkpoint's folder"),
}


@pytest.mark.parametrize(("token", "damage", "message"), REFUSALS.values(), ids=REFUSALS.keys())
def test_refuses_before_uploading(hub_in_process, model_dir, tmp_path, monkeypatch, capsys, token, damage, message):
    directory = copy_of(model_dir[0], tmp_path / "model")
    if damage:
        damage(directory)
    if token:
        monkeypatch.setenv("HF_TOKEN", hub_in_process.token if token == "ok" else token)
    assert main(["upload", str(directory), "tester/refused"]) == 2
    assert message in capsys.readouterr().err
    assert hub_in_process.writes() == [] and "tester/refused" not in hub_in_process.repos


def test_refuses_when_the_staged_code_does_not_load_without_the_package(
    hub_in_process, model_dir, monkeypatch, capsys
) -> None:
    modeling_only = [path for path in remote_code_files() if path.name.startswith("modeling_")]
    monkeypatch.setattr(staging_module, "remote_code_files", lambda: modeling_only)
    monkeypatch.setenv("HF_TOKEN", hub_in_process.token)
    assert main(["upload", str(model_dir[0]), "tester/refused"]) == 2
    error = capsys.readouterr().err
    assert "does not load with AutoModelForCausalLM" in error and "configuration_deepseek_moe" in error
    assert hub_in_process.writes() == []


def test_lora_adapter_uploads_with_a_peft_card(hub_in_process, model_dir, monkeypatch, tmp_path) -> None:
    from peft import LoraConfig, get_peft_model

    model = DeepseekMoeForCausalLM.from_pretrained(model_dir[0])
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_a_proj", "kv_b_proj"]))
    lora.save_pretrained(tmp_path / "adapter")  # PEFT writes its template card: replaced by ours
    monkeypatch.setenv("HF_TOKEN", hub_in_process.token)
    assert main(["upload", str(tmp_path / "adapter"), "tester/tiny-v3-lora", "--base-model", REPO]) == 0
    files = hub_in_process.files("tester/tiny-v3-lora")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= files.keys()
    card = files["README.md"].decode()
    assert "library_name: peft" in card and f"base_model: {REPO}" in card and "PeftModel.from_pretrained" in card


def test_reupload_of_another_layout_leaves_a_repository_that_loads_the_new_model(
    hub_in_process, without_load_check, model_dir, monkeypatch, capsys, tmp_path
) -> None:
    """Sharded first, then a different model in one `model.safetensors` (and back): the stale shards and index (or
    single file), and a stale modeling file, go in the last commit, the dry run lists them, other files stay."""
    hub, repo_id = hub_in_process, "tester/relayout"
    monkeypatch.setenv("HF_TOKEN", hub.token)
    assert main(["upload", str(model_dir[0]), repo_id, "--max-commit-size", "600KB"]) == 0
    shards = {name for name in hub.files(repo_id) if name.startswith("model-")}
    assert len(shards) > 2
    api = HfApi(token=hub.token)
    api.upload_file(path_or_fileobj=b"user notes", path_in_repo="NOTES.md", repo_id=repo_id)
    api.upload_file(path_or_fileobj=b"# stale", path_in_repo="old_modeling.py", repo_id=repo_id)

    single = tmp_path / "single"
    new_model = tiny_model(DeepseekMoeConfig.from_preset("tiny-v3"), seed=11).eval()
    new_model.save_pretrained(single)
    assert main(["upload", str(single), repo_id, "--dry-run"]) == 0
    output = capsys.readouterr().out
    stale = sorted(shards | {"model.safetensors.index.json", "old_modeling.py"})
    assert f"deleted from {repo_id} (they would change what loads): {', '.join(stale)}" in output
    assert main(["upload", str(single), repo_id]) == 0
    files = hub.files(repo_id)
    assert not (set(stale) & files.keys()) and files["NOTES.md"] == b"user notes"
    # One commit: the new weights and card (the config is unchanged: same preset) with the deletions.
    assert hub.changed_paths(repo_id) == set(stale) | {"model.safetensors", "README.md"}
    with torch.no_grad():
        expected = new_model(torch.tensor(PROMPT)).logits
    torch.testing.assert_close(_load_published(files, tmp_path / "snapshot1"), expected, rtol=0, atol=0)

    assert main(["upload", str(model_dir[0]), repo_id, "--delete-stale"]) == 0  # back to shards; NOTES.md goes too
    files = hub.files(repo_id)
    assert "model.safetensors" not in files and "NOTES.md" not in files and shards <= files.keys()
    torch.testing.assert_close(_load_published(files, tmp_path / "snapshot2"), model_dir[1], rtol=0, atol=0)


def _load_published(files: dict[str, bytes], directory: Path) -> torch.Tensor:
    """Logits on PROMPT of the repository's files loaded as a local folder (what a download would give)."""
    directory.mkdir()
    for name, data in files.items():
        (directory / name).write_bytes(data)
    model = DeepseekMoeForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        return model(torch.tensor(PROMPT)).logits


def test_only_the_model_is_sent_junk_pickles_and_outside_symlinks_are_not(
    hub_in_process, without_load_check, model_dir, monkeypatch, capsys, tmp_path
) -> None:
    hub, repo_id = hub_in_process, "tester/clean"
    monkeypatch.setenv("HF_TOKEN", hub.token)
    directory = copy_of(model_dir[0], tmp_path / "model")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("api key")
    (outside / "tokenizer.json").write_text('{"outside": true}')
    junk = {
        "train_data.jsonl": "{}",
        "training_args.bin": "pickle",
        "pytorch_model.bin": "pickle",
        "optimizer.pt": "pickle",
        "checkpoints/checkpoint-10/model.safetensors": "x",
        "runs/events.out.tfevents": "x",
        "wandb/run/log.txt": "x",
        ".env": "HF_TOKEN=hf_secret",
        "old_modeling_deepseek_moe.py": "# stale code",
        "eval/results.json": "{}",
    }
    for name, text in junk.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text)
    (directory / "modeling_deepseek_moe.py").write_text("# a stale copy of the model code")
    (directory / "secret.txt").symlink_to(outside / "secret.txt")
    (directory / "linked_runs").symlink_to(outside, target_is_directory=True)
    (directory / "conversion.json").write_text(json.dumps({"source": str(tmp_path / "private" / "ckpt")}))
    args = ["upload", str(directory), repo_id, "--include", "eval/*", "--include", "*.bin"]
    before = file_tree(directory)
    assert main([*args, "--include", "training_args.bin"]) == 0
    assert file_tree(directory) == before
    files = hub.files(repo_id)
    assert "eval/results.json" in files and "training_args.bin" in files  # named exactly: sent
    sent_junk = set(junk) - {"eval/results.json", "training_args.bin"}
    assert not sent_junk & files.keys() and "secret.txt" not in files and not any("linked_runs" in f for f in files)
    output = capsys.readouterr().out
    assert "not sent (not part of the model; --include PATTERN sends more): " in output
    left_out = output.split("sends more): ")[1].splitlines()[0].split(", ")
    assert {"pytorch_model.bin", "linked_runs (symlink to a folder)", "wandb/ (1 files)"} <= set(left_out)
    assert "modeling_deepseek_moe.py" not in left_out  # sent, fresh from the package
    code = {path.name: path.read_bytes() for path in remote_code_files()}
    assert files["modeling_deepseek_moe.py"] == code["modeling_deepseek_moe.py"]
    # No local path in what is published.
    for name in ("README.md", "conversion.json", "config.json"):
        assert str(tmp_path) not in files[name].decode(), name
    assert json.loads(files["conversion.json"])["source"] == "ckpt"

    (directory / "tokenizer.json").symlink_to(outside / "tokenizer.json")  # a model file linked from outside
    assert main(["upload", str(directory), "tester/refused-link"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "tokenizer.json is a symlink to" in error and "outside" in error
    assert "tester/refused-link" not in hub.repos


def test_dry_run_leaves_the_folder_byte_identical(hub_in_process, without_load_check, model_dir, tmp_path) -> None:
    """The folder holds its own loss_curve.png (the plot a card generates) and a conversion record with a local path:
    validation, staging and the card write neither into it nor through a link to it."""
    directory = copy_of(model_dir[0], tmp_path / "model")
    (directory / "loss_curve.png").write_bytes(b"\x89PNG my own plot")
    (directory / "conversion.json").write_text(json.dumps({"source": str(tmp_path / "ckpt")}))
    (directory / "README.md").write_text("<!-- Provide a quick summary of what the model is/does. -->\ntemplate")
    (directory / "tokenizer.json").symlink_to(directory / "config.json")  # a link inside the folder is fine
    before = file_tree(directory)
    assert main(["upload", str(directory), "tester/dry-identical", "--dry-run"]) == 0
    assert file_tree(directory) == before and hub_in_process.writes() == []


def test_a_server_dying_mid_upload_gives_one_line_and_the_rerun_finishes(
    hub_in_process, without_load_check, model_dir, monkeypatch, capsys
) -> None:
    hub, repo_id = hub_in_process, "tester/died"
    monkeypatch.setenv("HF_TOKEN", hub.token)
    command = ["upload", str(model_dir[0]), repo_id, "--max-commit-size", "600KB"]
    before = file_tree(model_dir[0])
    hub.close()  # down before the upload starts
    try:
        assert main(command) == 2
    finally:
        hub.start()
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "cannot reach" in error and "check the network and re-run" in error
    hub.commits_before_death = 1
    try:
        assert main(command) == 2
    finally:
        hub.start()  # the same port and repositories, as after a network outage
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "failed" in error and "re-run the same command to resume" in error
    assert "config.json" not in hub.files(repo_id)
    assert main(command) == 0
    published = {path.name for path in model_dir[0].iterdir()} - {"trainer_state.json"} | {"README.md"}
    assert published <= hub.files(repo_id).keys() and file_tree(model_dir[0]) == before


def test_card_uses_the_tokenizer_saved_beside_the_model(tmp_path) -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from deepseek_moe.hub.card import model_card

    config = DeepseekMoeConfig.from_preset("tiny-v3")
    without, _ = model_card(tmp_path, tmp_path, REPO, config, "deepseek-ai/DeepSeek-V3", None, None)
    assert "has no tokenizer: prompt it with the tokenizer of [deepseek-ai/DeepSeek-V3]" in without
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE())).save_pretrained(tmp_path)
    card, _ = model_card(tmp_path, tmp_path, REPO, config, None, None, None)
    assert f'AutoTokenizer.from_pretrained("{REPO}")' in card and "has no tokenizer" not in card
