"""The model code as Hub remote code: the flat files a folder needs for `trust_remote_code=True` on a machine without
this package, and the `auto_map` in config.json that points transformers' Auto classes at them. Conversion writes
them into loadable folders and publishing into what it uploads, from this one definition."""

from __future__ import annotations

from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "model"

AUTO_MAP = {
    "AutoConfig": "configuration_deepseek_moe.DeepseekMoeConfig",
    "AutoModel": "modeling_deepseek_moe.DeepseekMoeModel",
    "AutoModelForCausalLM": "modeling_deepseek_moe.DeepseekMoeForCausalLM",
    "AutoModelForSequenceClassification": "modeling_deepseek_moe.DeepseekMoeForSequenceClassification",
}

# How a folder was made (JSON; "source" names the original checkpoint): written by `deepseek-moe convert`, shown on
# the Hub model card.
CONVERSION_RECORD = "conversion.json"


def remote_code_files() -> list[Path]:
    """Every module of the model folder (its `__init__`, which registers the package's classes, excepted), copied
    flat into a saved folder's root."""
    return sorted(path for path in MODEL_DIR.glob("*.py") if path.name != "__init__.py")


__all__ = ["AUTO_MAP", "CONVERSION_RECORD", "remote_code_files"]
