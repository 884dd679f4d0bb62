"""What must hold before anything is staged or sent: the config loads, the weights are complete against the model's
official key names (headers only, through the converter's validated reader), index entries are plain file names, and
the staged folder loads as remote code in a Python that cannot import this package."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ..conversion.layouts import INDEX_FILE, SINGLE_FILE, expected_shapes, read_index
from ..conversion.safetensors_io import ConversionError, read_header
from ..model.configuration_deepseek_moe import DeepseekMoeConfig
from ..presets import load_config


class UploadError(ValueError):
    """A problem the user can fix (found before anything is uploaded, or a failure that a re-run resumes from); the
    command line prints it on one line without a traceback and exits with 2."""


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except ValueError as error:
        raise UploadError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise UploadError(f"{path} is not a JSON object")
    return value


def load_folder_config(model_dir: Path) -> DeepseekMoeConfig:
    try:
        return load_config(model_dir / "config.json")
    except ValueError as error:
        raise UploadError(f"{model_dir / 'config.json'} does not load as a DeepseekMoeConfig: {error}") from None


def tensor_names(path: Path) -> set[str]:
    """Tensor names of a safetensors file, its header validated against the file (no data is read)."""
    try:
        return set(read_header(path))
    except ConversionError as error:
        raise UploadError(str(error)) from None


def stored_weights(model_dir: Path) -> dict[str, str]:
    """Tensor name -> file, from the index or a single `model.safetensors`; every shard must be a plain file name in
    the folder, exist and hold what the index maps to it (headers only are read)."""
    index = model_dir / INDEX_FILE
    single = model_dir / SINGLE_FILE
    if index.is_file():
        try:
            weight_map = read_index(index)
        except ConversionError as error:
            raise UploadError(str(error)) from None
    elif single.is_file():
        weight_map = dict.fromkeys(tensor_names(single), SINGLE_FILE)
    else:
        raise UploadError(f"{model_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}")
    missing = sorted({file for file in weight_map.values() if not (model_dir / file).is_file()})
    if missing:
        raise UploadError(f"{index} lists weight shards that are not in the folder: {', '.join(missing)}")
    for file in sorted(set(weight_map.values())):
        keys = tensor_names(model_dir / file)
        absent = sorted(name for name, shard in weight_map.items() if shard == file and name not in keys)
        if absent:
            raise UploadError(f"{file} lacks {len(absent)} tensors that {INDEX_FILE} maps to it, e.g. {absent[0]}")
    return weight_map


def check_weights(model_dir: Path, config: DeepseekMoeConfig) -> set[str]:
    """Every weight the config implies is stored; returns the weight files (the index too, if there is one)."""
    weight_map = stored_weights(model_dir)
    required, optional = expected_shapes(config)
    missing = sorted(required.keys() - optional - weight_map.keys())
    if missing:
        raise UploadError(f"{len(missing)} weights are missing from {model_dir}, e.g. {', '.join(missing[:3])}")
    return set(weight_map.values()) | ({INDEX_FILE} if (model_dir / INDEX_FILE).is_file() else set())


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
    """Load the staged folder in `python -I` with this package hidden; its module cache goes beside the staging
    folder, never into the user's."""
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
        details = " | ".join((result.stdout + result.stderr).strip().splitlines()[-8:])
        raise UploadError(
            f"the staged folder does not load with AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True) "
            f"where deepseek_moe is not installed: {details}"
        )
