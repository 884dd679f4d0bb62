"""The model code as Hub remote code: the flat files a folder needs for `trust_remote_code=True` on a machine without
this package, and the `auto_map` in config.json that points transformers' Auto classes at them. Conversion writes
them into loadable folders and publishing into what it uploads, from this one definition."""

from __future__ import annotations

from pathlib import Path

from transformers.dynamic_module_utils import get_relative_import_files

from . import configuration_deepseek_moe, modeling_deepseek_moe
from .configuration_deepseek_moe import DeepseekMoeConfig
from .modeling_deepseek_moe import DeepseekMoeForCausalLM, DeepseekMoeForSequenceClassification, DeepseekMoeModel

AUTO_MAP = {
    auto: f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"
    for auto, cls in (
        ("AutoConfig", DeepseekMoeConfig),
        ("AutoModel", DeepseekMoeModel),
        ("AutoModelForCausalLM", DeepseekMoeForCausalLM),
        ("AutoModelForSequenceClassification", DeepseekMoeForSequenceClassification),
    )
}

# How a folder was made (JSON; "source" names the original checkpoint): written by `deepseek-moe convert`, shown on
# the Hub model card.
CONVERSION_RECORD = "conversion.json"


def remote_code_files() -> list[Path]:
    """The model code and every sibling it imports with single-dot imports, as transformers' `custom_object_save`
    would copy them (flat into the folder's root)."""
    files = {Path(module.__file__) for module in (configuration_deepseek_moe, modeling_deepseek_moe)}
    for module_file in list(files):
        files.update(Path(file) for file in get_relative_import_files(str(module_file)))
    return sorted(files)


__all__ = ["AUTO_MAP", "CONVERSION_RECORD", "remote_code_files"]
