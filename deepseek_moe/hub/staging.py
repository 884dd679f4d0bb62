"""What is published: exactly the model. A temporary staging folder receives the user's files that make up the model
(an allow-list, plus what `--include` names) as symlinks to them, and the generated files (config with `auto_map`,
remote code, card, loss curve, a conversion record without local paths) as new files. Every write into the staging
folder first removes what is there, so nothing is ever written through a link into the user's folder."""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..remote_code import AUTO_MAP, CONVERSION_RECORD, remote_code_files
from .card import adapter_card, hub_id, model_card, publishable_record
from .validate import (
    UploadError,
    check_loads_as_remote_code,
    check_weights,
    load_folder_config,
    read_json,
    tensor_names,
)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
# The model's own files, by name at the folder's root; the weights are added by name from the index.
ALLOWED = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "README.md",
    "*.png",
    CONVERSION_RECORD,
    "adapter_config.json",
    ADAPTER_WEIGHTS,
)
# Pickles run code when loaded: sent only when `--include` names the file itself, not through a wildcard.
PICKLES = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt", "*.joblib", "*.npy", "*.npz")
# Cards that PEFT (huggingface_hub's template) and transformers' Trainer write on their own carry these; such cards are
# replaced, hand-written ones kept unless --regenerate-card.
TEMPLATE_CARD_MARKERS = (
    "<!-- Provide a quick summary of what the model is/does. -->",
    "<!-- This model card has been generated automatically",
)


@dataclass
class Plan:
    """What would be uploaded: repo paths with their sizes, the card, and what the folder holds that is not sent."""

    kind: str  # "model" or "adapter"
    files: dict[str, int]
    card: str
    card_generated: bool
    left_out: list[str] = field(default_factory=list)


def _matches(name: str, patterns: tuple[str, ...] | list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def select_files(source: Path, weights: set[str], include: list[str]) -> tuple[list[str], list[str]]:
    """(files to publish, files left out) as paths relative to `source`. Allowed: the names in `ALLOWED` and the
    weights at the root; anything else only when an `--include` pattern matches its path; pickles only when named
    exactly. A file to publish that is a symlink out of the folder is refused."""
    root = source.resolve()
    sent, left_out = [], []
    for directory, folders, names in os.walk(source):
        here = Path(directory)
        for name in sorted(folders):
            if (here / name).is_symlink():  # not followed: listed, never published
                left_out.append((here / name).relative_to(source).as_posix() + " (symlink to a folder)")
        for name in sorted(names):
            path = here / name
            relative = path.relative_to(source).as_posix()
            named = relative in include
            if _matches(name, PICKLES):
                wanted = named
            else:
                model_file = "/" not in relative and (name in weights or _matches(name, ALLOWED))
                wanted = named or model_file or _matches(relative, include)
            if not wanted:
                left_out.append(relative)
                continue
            target = path.resolve()
            if not target.is_relative_to(root):
                raise UploadError(
                    f"{path} is a symlink to {target}, outside {source}: copy the file into the folder to publish it"
                )
            sent.append(relative)
    return sorted(sent), sorted(left_out)


def link_files(source: Path, staging: Path, files: list[str]) -> None:
    """Symlink the selected files into the staging folder; nothing is copied or changed in `source`."""
    for relative in files:
        (staging / relative).parent.mkdir(parents=True, exist_ok=True)
        (staging / relative).symlink_to((source / relative).resolve())


def write_staged(staging: Path, name: str, content: str | bytes) -> None:
    """Replace a staged symlink (never its target in the user's folder) with a generated file."""
    path = staging / name
    path.unlink(missing_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)


def stage_model(
    source: Path, staging: Path, repo_id: str, base_model: str | None, license: str | None, include: list[str]
) -> tuple[str, list[str]]:
    """Validate a model folder, stage it with the remote code and `auto_map`; returns the generated card and the
    files left out."""
    config = load_folder_config(source)
    weights = check_weights(source, config)
    files, left_out = select_files(source, weights, include)
    code = {file.name for file in remote_code_files()}
    left_out = [name for name in left_out if name not in code]  # staged fresh from this package below
    link_files(source, staging, files)
    config_json = read_json(source / "config.json")
    name_or_path = config_json.pop("_name_or_path", None)
    staged_config = {**config_json, "auto_map": AUTO_MAP}
    if hub_id(name_or_path):
        staged_config["_name_or_path"] = name_or_path
    write_staged(staging, "config.json", json.dumps(staged_config, indent=2) + "\n")
    for file in remote_code_files():
        write_staged(staging, file.name, file.read_text())
    record = None
    if (source / CONVERSION_RECORD).is_file():
        original = read_json(source / CONVERSION_RECORD)
        record = publishable_record(original)
        if record != original:  # a local path taken out
            write_staged(staging, CONVERSION_RECORD, json.dumps(record, indent=2) + "\n")
    check_loads_as_remote_code(staging)
    base = base_model or hub_id((record or {}).get("source")) or hub_id(name_or_path)
    card, images = model_card(source, staging, repo_id, config, base, license, record)
    for name, image in images.items():
        write_staged(staging, name, image)
    return card, left_out


def stage_adapter(
    source: Path, staging: Path, repo_id: str, base_model: str | None, license: str | None, include: list[str]
) -> tuple[str, list[str]]:
    """Validate a LoRA adapter folder and stage it; returns the generated card and the files left out."""
    adapter_config = read_json(source / "adapter_config.json")
    weights = source / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise UploadError(f"{source} has adapter_config.json but no {ADAPTER_WEIGHTS}")
    if not tensor_names(weights):
        raise UploadError(f"{weights} holds no tensors")
    base = base_model or adapter_config.get("base_model_name_or_path")
    if not base:
        raise UploadError("the adapter does not name its base model: pass --base-model")
    files, left_out = select_files(source, {ADAPTER_WEIGHTS}, include)
    link_files(source, staging, files)
    return adapter_card(repo_id, adapter_config, base, license), left_out


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
    include: list[str] | None = None,
) -> Plan:
    """Validate `source` and fill `staging` with exactly what will be uploaded."""
    if not source.is_dir():
        raise UploadError(f"{source} is not a directory")
    kind = folder_kind(source)
    staging.mkdir(parents=True)
    stage_folder = stage_adapter if kind == "adapter" else stage_model
    card, left_out = stage_folder(source, staging, repo_id, base_model, license, list(include or []))
    existing = (source / "README.md").read_text() if (source / "README.md").is_file() else None
    card_generated = regenerate_card or existing is None or any(m in existing for m in TEMPLATE_CARD_MARKERS)
    if card_generated:
        write_staged(staging, "README.md", card)
    else:
        card = existing
    files = {path.relative_to(staging).as_posix(): path.stat().st_size for path in staging.rglob("*") if path.is_file()}
    return Plan(kind=kind, files=files, card=card, card_generated=card_generated, left_out=left_out)
