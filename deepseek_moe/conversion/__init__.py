"""Checkpoint conversion (`deepseek-moe convert`): official DeepSeek checkpoints ↔ ours, the FP8 official form,
DeepSeek's model-parallel inference format and resharding, streamed one tensor at a time. Importing it imports neither
torch nor transformers: the names that need them (`quantize_fp8_blockwise`, `verify_conversion`) load on first use."""

import importlib

from .convert import (
    AUTO_MAP,
    FP8_QUANTIZATION_CONFIG,
    TARGETS,
    ConversionPlan,
    ConversionReport,
    convert_checkpoint,
    plan_conversion,
)
from .destination import ConversionInterrupted
from .layouts import Checkpoint, from_mp_name, to_mp_name
from .safetensors_io import ConversionError, parse_size

_TORCH_EXPORTS = {"quantize_fp8_blockwise": "tensors", "verify_conversion": "verify"}


def __getattr__(name: str):
    if name in _TORCH_EXPORTS:
        return getattr(importlib.import_module(f".{_TORCH_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "AUTO_MAP",
    "FP8_QUANTIZATION_CONFIG",
    "TARGETS",
    "Checkpoint",
    "ConversionError",
    "ConversionInterrupted",
    "ConversionPlan",
    "ConversionReport",
    "convert_checkpoint",
    "from_mp_name",
    "parse_size",
    "plan_conversion",
    "quantize_fp8_blockwise",
    "to_mp_name",
    "verify_conversion",
]
