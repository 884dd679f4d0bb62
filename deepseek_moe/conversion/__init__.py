"""Checkpoint conversion (`deepseek-moe convert`): official DeepSeek checkpoints ↔ ours, the FP8 official form,
DeepSeek's model-parallel inference format and resharding, streamed one tensor at a time."""

from .convert import (
    AUTO_MAP,
    FP8_QUANTIZATION_CONFIG,
    TARGETS,
    ConversionPlan,
    ConversionReport,
    convert_checkpoint,
    plan_conversion,
    verify_conversion,
)
from .destination import ConversionInterrupted
from .layouts import Checkpoint, from_mp_name, quantize_fp8_blockwise, to_mp_name
from .safetensors_io import ConversionError, parse_size

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
