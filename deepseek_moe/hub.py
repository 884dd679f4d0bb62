"""Publish a model or LoRA adapter folder to the Hugging Face Hub (`deepseek-moe upload`, `hub_upload.py`).

Everything is checked before the first request that writes: the config loads, the weights are complete against the
model's official key names, the model code is exported as flat remote code and loads in a Python that cannot import
this package, and a model card is written. The user's folder is never modified: a temporary staging folder holds
symlinks to its files plus the generated ones. Large folders go up in several commits (weights first; config, index
and card last, so the repository only looks complete once it is), and a re-run skips the files that are already on
the Hub with the same content.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, ModelCardData, get_token
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils.sha import git_hash, sha_fileobj
from safetensors import SafetensorError, safe_open
from transformers.utils.hub import convert_file_size_to_int

from .conversion.layouts import expected_shapes
from .info import family, summary
from .model.configuration_deepseek_moe import DeepseekMoeConfig
from .remote_code import AUTO_MAP, CONVERSION_RECORD, remote_code_files

WEIGHTS_INDEX = "model.safetensors.index.json"
TRAINER_STATE = "trainer_state.json"
# Not part of a published model: hidden files and caches, training-resume state, and Python files (the model code is
# exported fresh from this package, so stale copies must not shadow it).
SKIPPED = (".*", "__pycache__", "*.pyc", "*.py", "checkpoint-*", "optimizer.pt", "scheduler.pt", "rng_state*.pth")
TAGS = ["deepseek", "moe", "custom_code"]
# The files that make a repository loadable and carded; committed last so it only looks complete once it is.
FINAL_FILES = ("config.json", WEIGHTS_INDEX, "adapter_config.json", "README.md")
# Cards that PEFT (huggingface_hub's template) and transformers' Trainer write on their own carry these; such cards are
# replaced, hand-written ones kept unless --regenerate-card.
TEMPLATE_CARD_MARKERS = (
    "<!-- Provide a quick summary of what the model is/does. -->",
    "<!-- This model card has been generated automatically",
)


class UploadError(ValueError):
    """A problem the user can fix (found before anything is uploaded, or a conflict that a re-run resolves); the
    command line prints it without a traceback and exits with 2."""


@dataclass
class Plan:
    """What would be uploaded: repo paths with their sizes, and the card."""

    kind: str  # "model" or "adapter"
    files: dict[str, int]
    card: str
    card_generated: bool


# ------------------------------------------------------------------------------------------------------ validation


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise UploadError(f"{path} is not valid JSON: {error}") from error


def load_folder_config(model_dir: Path) -> DeepseekMoeConfig:
    try:
        return DeepseekMoeConfig.from_pretrained(model_dir)
    except (ValueError, OSError, TypeError) as error:
        raise UploadError(f"{model_dir / 'config.json'} does not load as a DeepseekMoeConfig: {error}") from error


def safetensors_keys(path: Path) -> set[str]:
    """Tensor names in a safetensors header (the data is not read)."""
    try:
        with safe_open(path, "pt") as file:
            return set(file.keys())
    except SafetensorError as error:
        raise UploadError(f"{path} is not a readable safetensors file: {error}") from error


def stored_weights(model_dir: Path) -> dict[str, str]:
    """Tensor name -> file, from the index or a single `model.safetensors`; every shard must exist and hold what the
    index maps to it (headers only are read)."""
    index = model_dir / WEIGHTS_INDEX
    single = model_dir / "model.safetensors"
    if index.is_file():
        weight_map = read_json(index).get("weight_map", {})
    elif single.is_file():
        weight_map = dict.fromkeys(safetensors_keys(single), single.name)
    else:
        raise UploadError(f"{model_dir} has neither model.safetensors nor {WEIGHTS_INDEX}")
    missing = sorted({file for file in weight_map.values() if not (model_dir / file).is_file()})
    if missing:
        raise UploadError(f"{index} lists weight shards that are not in the folder: {', '.join(missing)}")
    for file in sorted(set(weight_map.values())):
        keys = safetensors_keys(model_dir / file)
        absent = sorted(name for name, shard in weight_map.items() if shard == file and name not in keys)
        if absent:
            raise UploadError(f"{file} lacks {len(absent)} tensors that {WEIGHTS_INDEX} maps to it, e.g. {absent[0]}")
    return weight_map


def check_weights(model_dir: Path, config: DeepseekMoeConfig) -> None:
    required, optional = expected_shapes(config)
    missing = sorted(required.keys() - optional - stored_weights(model_dir).keys())
    if missing:
        raise UploadError(f"{len(missing)} weights are missing from {model_dir}, e.g. {', '.join(missing[:3])}")


# Python source that makes `import deepseek_moe` fail even where the package is installed; run with `python -I` (no
# PYTHONPATH, no user site) it gives the interpreter of a user who does not have this package.
HIDE_PACKAGE = """
import importlib.abc, sys

class HidePackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "deepseek_moe":
            raise ImportError("deepseek_moe is hidden: the model must load as remote code")

sys.meta_path.insert(0, HidePackage())
"""
# The meta device keeps the check free for any model size; keys and remote code are still resolved.
_LOAD_CHECK = (
    HIDE_PACKAGE
    + """
from transformers import AutoModelForCausalLM

model, info = AutoModelForCausalLM.from_pretrained(
    sys.argv[1], trust_remote_code=True, device_map="meta", output_loading_info=True
)
problems = {key: info[key] for key in ("missing_keys", "mismatched_keys") if info.get(key)}
if problems or type(model).__module__.startswith("deepseek_moe"):
    sys.exit(f"loaded as {type(model).__module__}.{type(model).__name__} with {problems}")
"""
)


def check_loads_as_remote_code(staging: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(staging.parent / "modules"), TRANSFORMERS_VERBOSITY="error")
    result = subprocess.run(
        [sys.executable, "-I", "-c", _LOAD_CHECK, str(staging)],
        env=env,
        cwd=staging.parent,
        capture_output=True,
        text=True,
    )
    if result.returncode:
        details = "\n".join((result.stdout + result.stderr).strip().splitlines()[-8:])
        raise UploadError(
            f"the staged folder does not load with AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True) "
            f"where deepseek_moe is not installed:\n{details}"
        )


# --------------------------------------------------------------------------------------------------------- staging


def link_publishable_files(source: Path, staging: Path) -> None:
    """Symlink every file worth publishing into the staging folder; nothing is copied or changed in `source`."""
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if path.is_dir() or any(fnmatch.fnmatch(part, skip) for part in relative.parts for skip in SKIPPED):
            continue
        (staging / relative).parent.mkdir(parents=True, exist_ok=True)
        (staging / relative).symlink_to(path.resolve())


def write_staged(staging: Path, name: str, text: str) -> None:
    """Replace a staged symlink (never its target in the user's folder) with a generated file."""
    (staging / name).unlink(missing_ok=True)
    (staging / name).write_text(text)


def _hub_id(name: str | None) -> str | None:
    """`name` if it looks like a Hub repository id rather than a local path."""
    if name and re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not os.path.exists(name):
        return name
    return None


def stage_model(source: Path, staging: Path, repo_id: str, base_model: str | None, license: str | None) -> str:
    """Validate a model folder, stage it with the remote code and `auto_map`; returns the generated card."""
    config = load_folder_config(source)
    check_weights(source, config)
    link_publishable_files(source, staging)
    config_json = read_json(source / "config.json")
    write_staged(staging, "config.json", json.dumps({**config_json, "auto_map": AUTO_MAP}, indent=2) + "\n")
    for file in remote_code_files():
        write_staged(staging, file.name, file.read_text())
    check_loads_as_remote_code(staging)
    record_path = source / CONVERSION_RECORD
    record = read_json(record_path) if record_path.is_file() else None
    base = base_model or _hub_id((record or {}).get("source")) or _hub_id(config_json.get("_name_or_path"))
    return model_card(staging, repo_id, config, base, license, record)


def stage_adapter(source: Path, staging: Path, repo_id: str, base_model: str | None, license: str | None) -> str:
    """Validate a LoRA adapter folder and stage it; returns the generated card."""
    adapter_config = read_json(source / "adapter_config.json")
    weights = source / "adapter_model.safetensors"
    if not weights.is_file():
        raise UploadError(f"{source} has adapter_config.json but no adapter_model.safetensors")
    with safe_open(weights, "pt") as file:
        if not list(file.keys()):
            raise UploadError(f"{weights} holds no tensors")
    base = base_model or adapter_config.get("base_model_name_or_path")
    if not base:
        raise UploadError("the adapter does not name its base model: pass --base-model")
    link_publishable_files(source, staging)
    return adapter_card(repo_id, adapter_config, base, license)


def folder_kind(source: Path) -> str:
    if (source / "adapter_config.json").is_file():
        return "adapter"
    if (source / "config.json").is_file():
        return "model"
    raise UploadError(f"{source} has neither config.json (a model) nor adapter_config.json (a LoRA adapter)")


def stage(
    source: Path,
    staging: Path,
    repo_id: str,
    base_model: str | None = None,
    license: str | None = None,
    regenerate_card: bool = False,
) -> Plan:
    """Validate `source` and fill `staging` with exactly what will be uploaded."""
    if not source.is_dir():
        raise UploadError(f"{source} is not a directory")
    kind = folder_kind(source)
    staging.mkdir(parents=True)
    stage_folder = stage_adapter if kind == "adapter" else stage_model
    card = stage_folder(source, staging, repo_id, base_model, license)
    existing = (source / "README.md").read_text() if (source / "README.md").is_file() else None
    card_generated = regenerate_card or existing is None or any(m in existing for m in TEMPLATE_CARD_MARKERS)
    if card_generated:
        write_staged(staging, "README.md", card)
    else:
        card = existing
    files = {path.relative_to(staging).as_posix(): path.stat().st_size for path in staging.rglob("*") if path.is_file()}
    return Plan(kind=kind, files=files, card=card, card_generated=card_generated)


# ------------------------------------------------------------------------------------------------------ model card


def _license_metadata(license: str | None, config: DeepseekMoeConfig) -> dict[str, str]:
    """DeepSeek-V3 is MIT-licensed; the earlier models use DeepSeek's own model license."""
    if license:
        return {"license": license}
    if family(config) == "DeepSeek-V3":
        return {"license": "mit"}
    return {
        "license": "other",
        "license_name": "deepseek",
        "license_link": "https://github.com/deepseek-ai/DeepSeek-V2/blob/main/LICENSE-MODEL",
    }


def _architecture_table(config: DeepseekMoeConfig) -> str:
    return "| | |\n| --- | --- |\n" + "\n".join(f"| {label} | {value} |" for label, value in summary(config))


def _training_section(staging: Path) -> str:
    """Loss curve (an image when matplotlib is installed, else a table) and any expert-load plots in the folder."""
    lines = []
    state_path = staging / TRAINER_STATE
    if state_path.is_file():
        state = read_json(state_path)
        losses = [(entry["step"], entry["loss"]) for entry in state.get("log_history", []) if "loss" in entry]
        lines.append(f"Trained for {state.get('global_step', '?')} steps ({state.get('epoch', '?')} epochs).\n")
        if losses:
            lines.append(_loss_curve(staging, losses))
    plots = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*.png") if "expert" in p.name.lower())
    if plots:
        lines.append("Expert load during training:\n")
        lines.extend(f"![{path}]({path})" for path in plots)
    return "\n".join(lines)


def _loss_curve(staging: Path, losses: list[tuple[int, float]]) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        shown = losses[:: max(1, len(losses) // 20)]
        return "| step | training loss |\n| --- | --- |\n" + "\n".join(f"| {s} | {loss:.4f} |" for s, loss in shown)
    figure, axes = plt.subplots(figsize=(6, 3.5))
    axes.plot(*zip(*losses, strict=True))
    axes.set_xlabel("step")
    axes.set_ylabel("training loss")
    figure.tight_layout()
    figure.savefig(staging / "loss_curve.png")
    plt.close(figure)
    return "![training loss](loss_curve.png)"


def model_card(
    staging: Path,
    repo_id: str,
    config: DeepseekMoeConfig,
    base_model: str | None,
    license: str | None,
    record: dict | None,
) -> str:
    """README.md for a model: Hub metadata (the "Use this model" snippets depend on `library_name` and
    `pipeline_tag`), the architecture, how to load it, and the training and conversion history the folder carries."""
    metadata = ModelCardData(
        library_name="transformers",
        pipeline_tag="text-generation",
        base_model=base_model,
        tags=TAGS,
        **_license_metadata(license, config),
    )
    origin = f"Derived from [{base_model}](https://huggingface.co/{base_model}). " if base_model else ""
    attention_modules = (
        ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
        if config.use_mla
        else ["q_proj", "k_proj", "v_proj", "o_proj"]
    )
    sections = [
        f"---\n{metadata.to_yaml()}\n---\n",
        f"# {repo_id.split('/')[-1]}\n",
        f"{origin}A {family(config)}-style mixture-of-experts model packaged with "
        "the `deepseek-moe` library: the model code ships in this repository as remote code, and "
        "the weights use DeepSeek's official per-expert layout.\n",
        "## Architecture\n",
        _architecture_table(config) + "\n",
        "## How to use\n",
        "With transformers >= 5.17 (the model code is downloaded from this repository):\n",
        "```python\nfrom transformers import AutoModelForCausalLM\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True, dtype="auto")\n```\n',
        "With `pip install deepseek-moe`, `import deepseek_moe` registers the same classes and "
        "`trust_remote_code` is not needed.\n",
        _tokenizer_section(staging, repo_id, base_model),
        "### Fine-tuning with PEFT\n",
        "```python\nfrom peft import LoraConfig, get_peft_model\n\n"
        f"model = get_peft_model(model, LoraConfig(r=16, target_modules={json.dumps(attention_modules)}))\n```\n",
        "### vLLM\n",
        "Not tested by this package. vLLM does not know the `deepseek_moe` model type; its transformers backend "
        f"runs the remote code: `vllm serve {repo_id} --trust-remote-code --model-impl transformers`.\n",
    ]
    training = _training_section(staging)
    if training:
        sections += ["## Training\n", training + "\n"]
    if record:
        sections += ["## Conversion\n", "\n".join(f"- **{key}**: {value}" for key, value in record.items()) + "\n"]
    return "\n".join(sections)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _tokenizer_section(staging: Path, repo_id: str, base_model: str | None) -> str:
    """How to prompt the model: with the tokenizer saved beside it, or what to use where there is none."""
    if any((staging / name).exists() for name in TOKENIZER_FILES):
        return (
            "```python\nfrom transformers import AutoTokenizer\n\n"
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")\n'
            'inputs = tokenizer("def fib(n):", return_tensors="pt")\n'
            "print(tokenizer.decode(model.generate(**inputs, max_new_tokens=32)[0]))\n```\n"
        )
    source = f"the tokenizer of [{base_model}](https://huggingface.co/{base_model})" if base_model else "token ids"
    return f"This repository has no tokenizer: prompt it with {source}.\n"


def adapter_card(repo_id: str, adapter_config: dict, base_model: str, license: str | None) -> str:
    """README.md for a LoRA adapter: `library_name: peft` and `base_model` let the Hub link it to its base model."""
    metadata = ModelCardData(
        library_name="peft",
        pipeline_tag="text-generation",
        base_model=base_model,
        license=license,
        tags=["deepseek", "moe", "lora", f"base_model:adapter:{base_model}"],
    )
    targets = adapter_config.get("target_modules") or adapter_config.get("target_parameters")
    return "\n".join(
        [
            f"---\n{metadata.to_yaml()}\n---\n",
            f"# {repo_id.split('/')[-1]}\n",
            f"A {adapter_config.get('peft_type', 'LoRA')} adapter (rank {adapter_config.get('r', '?')}, targets "
            f"{targets}) for [{base_model}](https://huggingface.co/{base_model}).\n",
            "## How to use\n",
            "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
            f'base = AutoModelForCausalLM.from_pretrained("{base_model}", trust_remote_code=True, dtype="auto")\n'
            f'model = PeftModel.from_pretrained(base, "{repo_id}")\n```\n',
        ]
    )


# -------------------------------------------------------------------------------------------------------- upload


def authenticate(token: str | None) -> HfApi:
    """Fail before any work with a clear message when there is no token or the Hub rejects it."""
    token = token or get_token()
    if not token:
        raise UploadError("no Hugging Face token: pass --token, set HF_TOKEN or run `hf auth login`")
    api = HfApi(token=token)
    try:
        user = api.whoami()
    except HfHubHTTPError as error:
        if error.response is not None and error.response.status_code == 401:
            raise UploadError(f"the token was rejected by {api.endpoint} (401 on whoami)") from error
        raise
    print(f"authenticated as {user['name']} on {api.endpoint}")
    return api


def commit_batches(files: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Group files into commits of at most `max_bytes` (a larger file gets its own). Weights go first and the files
    that make a repository loadable (`FINAL_FILES`) together in the last commit, so an interrupted upload never leaves
    a config or index pointing at shards that are not there yet."""
    final = sorted(path for path in files if path in FINAL_FILES)
    rest = sorted(
        (path for path in files if path not in FINAL_FILES), key=lambda p: (not p.endswith(".safetensors"), p)
    )
    batches: list[list[str]] = []
    size = 0
    for path in rest:
        if not batches or size + files[path] > max_bytes:
            batches.append([])
            size = 0
        batches[-1].append(path)
        size += files[path]
    if final and batches and size + sum(files[path] for path in final) <= max_bytes:
        batches[-1] += final
    elif final:
        batches.append(final)
    return batches


def unchanged_on_hub(api: HfApi, repo_id: str, revision: str, staging: Path, files: dict[str, int]) -> set[str]:
    """Files whose content is already at `revision` (git blob sha1 for regular files, sha256 for LFS), so a re-run
    after an interruption only uploads what is missing."""
    remote = {entry.path: entry for entry in api.list_repo_tree(repo_id, revision=revision, recursive=True)}
    same = set()
    for path, size in files.items():
        entry = remote.get(path)
        if not isinstance(entry, RepoFile) or entry.size != size:
            continue
        if entry.lfs is not None:
            with open(staging / path, "rb") as file:
                matches = sha_fileobj(file).hex() == entry.lfs.sha256
        else:
            matches = git_hash((staging / path).read_bytes()) == entry.blob_id
        if matches:
            same.add(path)
    return same


def publish(
    api: HfApi,
    staging: Path,
    plan: Plan,
    repo_id: str,
    private: bool | None,
    revision: str | None,
    create_pr: bool,
    commit_message: str,
    max_commit_bytes: int,
) -> str:
    """Upload the staged files in commits chained by `parent_commit`; returns the URL to show the user."""
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True)
    if revision and not revision.startswith("refs/"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    head = api.repo_info(repo_id, revision=revision).sha
    unchanged = unchanged_on_hub(api, repo_id, head, staging, plan.files)
    todo = {path: size for path, size in plan.files.items() if path not in unchanged}
    if len(todo) < len(plan.files):
        print(f"{len(plan.files) - len(todo)} of {len(plan.files)} files are already on the Hub unchanged: skipped")
    if not todo:
        print("nothing to upload: every file is already on the Hub")
        return str(repo_url)
    batches = commit_batches(todo, max_commit_bytes)
    target, parent, pr_url = revision, head, None
    for number, batch in enumerate(batches, 1):
        message = commit_message if len(batches) == 1 else f"{commit_message} (part {number}/{len(batches)})"
        try:
            info = api.create_commit(
                repo_id,
                [CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(staging / path)) for path in batch],
                commit_message=message,
                revision=target,
                create_pr=create_pr and number == 1,
                parent_commit=parent,
            )
        except HfHubHTTPError as error:
            if error.response is not None and error.response.status_code == 412:
                raise UploadError(
                    f"{target or 'main'} moved during the upload (someone else committed); run again to resume"
                ) from error
            raise
        if create_pr and number == 1:  # later parts go to the pull request's ref
            target, pr_url = info.pr_revision, info.pr_url
        parent = info.oid
        print(
            f"commit {number}/{len(batches)}: {len(batch)} file(s), {sum(todo[p] for p in batch):,} bytes: {info.oid}"
        )
    return pr_url or info.commit_url


def print_plan(plan: Plan, repo_id: str, max_commit_bytes: int) -> None:
    print(f"{plan.kind} folder validated; upload plan for {repo_id}:")
    width = max(len(path) for path in plan.files)
    for path, size in sorted(plan.files.items()):
        print(f"  {path:<{width}}  {size:>15,} bytes")
    batches = commit_batches(plan.files, max_commit_bytes)
    print(f"{len(plan.files)} files, {sum(plan.files.values()):,} bytes, in {len(batches)} commit(s) at most")
    print(f"README.md ({'generated' if plan.card_generated else 'kept from the folder'}):\n{plan.card}")


def upload(
    model_dir: str,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    dry_run: bool = False,
    base_model: str | None = None,
    license: str | None = None,
    regenerate_card: bool = False,
    max_commit_size: str = "20GB",
) -> str | None:
    """Validate, stage and upload `model_dir` to `repo_id`; returns the commit or pull request URL (None for a dry
    run, which sends no request at all)."""
    max_commit_bytes = convert_file_size_to_int(max_commit_size)
    api = None if dry_run else authenticate(token)
    with tempfile.TemporaryDirectory(prefix="deepseek-moe-upload-") as tmp:
        staging = Path(tmp) / "repo"
        plan = stage(Path(model_dir), staging, repo_id, base_model, license, regenerate_card)
        print_plan(plan, repo_id, max_commit_bytes)
        if api is None:
            print("dry run: nothing was sent")
            return None
        message = commit_message or f"Upload {plan.kind} with deepseek-moe"
        url = publish(api, staging, plan, repo_id, private, revision, create_pr, message, max_commit_bytes)
    print(f"done: {url}")
    return url


__all__ = [
    "HIDE_PACKAGE",
    "Plan",
    "UploadError",
    "commit_batches",
    "stage",
    "upload",
]
