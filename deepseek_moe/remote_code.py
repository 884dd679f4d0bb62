"""The model code as Hub remote code: the flat files a folder needs for `trust_remote_code=True` on a machine without
this package, and the `auto_map` in config.json that points transformers' Auto classes at them. Conversion writes
them into loadable folders, `save_pretrained` into every saved folder and publishing into what it uploads; both are
defined beside the code they point at (`model/architecture_deepseek_moe.py`, which needs no transformers, so
conversion can import it)."""

from __future__ import annotations

from .model.architecture_deepseek_moe import AUTO_MAP, remote_code_files

# How a folder was made (JSON; "source" names the original checkpoint): written by `deepseek-moe convert`, shown on
# the Hub model card.
CONVERSION_RECORD = "conversion.json"


__all__ = ["AUTO_MAP", "CONVERSION_RECORD", "remote_code_files"]
