"""DeepSeek's official FP8 checkpoints as a transformers quantization method.

V3 ships its linear and expert weights as float8 e4m3 with one fp32 `weight_scale_inv` per 128×128 block (the
dequantization *multiplier*, amax/448, despite the name) and says so in `config.json` (`quantization_config`,
`quant_method: "fp8"`). The config class maps that entry to `DeepseekFp8Config`, whose quantizer makes transformers
collect each weight's scale companion and dequantize while loading: in fp32, then cast once into the parameter's
dtype, so float32, bfloat16, float16 and `"auto"` (the checkpoint's bf16) all give a model entirely in that dtype.
Only the per-expert merges and a converter for the FP8 weights are touched; plain checkpoints never see this code.

transformers' own fine-grained FP8 loader infers the block size from the scale grid, which is wrong for partial edge
blocks (V3's 576-row `kv_a_proj_with_mqa`); here the declared block size is used and the expanded grid cut to shape.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from transformers.core_model_loading import ConversionOps, WeightConverter
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.utils.quantization_config import QuantizationConfigMixin

from .architecture_deepseek_moe import FP8_BLOCK

OFFICIAL_QUANT_METHOD = "fp8"  # what DeepSeek's config.json says
QUANT_METHOD = "deepseek_fp8"  # our registration, so transformers' own "fp8" quantizer stays untouched for others
SCALE_SUFFIX = "_scale_inv"


def dequantize_fp8_blockwise(
    weight: torch.Tensor, scale_inv: torch.Tensor, block: int | tuple[int, int] = FP8_BLOCK
) -> torch.Tensor:
    """W = w_fp8 · s per (block × block) tile, in fp32; `weight_scale_inv` is the multiplier despite its name.

    The scale grid is ceil(rows/block) × ceil(cols/block): edge tiles are partial (e.g. V3's 576-row
    `kv_a_proj_with_mqa`), so the expanded grid is cut to the weight's shape rather than inferring the block size.
    """
    block_rows, block_cols = (block, block) if isinstance(block, int) else block
    rows, cols = weight.shape[-2:]
    expected = (math.ceil(rows / block_rows), math.ceil(cols / block_cols))
    if tuple(scale_inv.shape[-2:]) != expected:
        raise ValueError(
            f"FP8 weight of shape {tuple(weight.shape)} needs a weight_scale_inv grid of {expected} for "
            f"{block_rows}x{block_cols} blocks, got {tuple(scale_inv.shape)}"
        )
    scale = scale_inv.float().repeat_interleave(block_rows, dim=-2)[..., :rows, :]
    scale = scale.repeat_interleave(block_cols, dim=-1)[..., :cols]
    return weight.float() * scale


def target_dtype(model: torch.nn.Module | None, name: str | None, like: torch.Tensor) -> torch.dtype:
    """The dtype a loaded tensor must take: its parameter's (the requested dtype, or fp32 for the router), else the
    tensor's own, fp32 for FP8."""
    if model is not None and name is not None:
        try:
            return model.get_parameter(name).dtype
        except AttributeError:
            return model.get_buffer(name).dtype
    return like.dtype if like.dtype.itemsize > 1 else torch.float32


def block_size(config: Any) -> tuple[int, int]:
    """The checkpoint's declared FP8 block (the model config's `quantization_config` while loading)."""
    quantization = getattr(config, "quantization_config", None)
    block = getattr(quantization, "weight_block_size", None) or (FP8_BLOCK, FP8_BLOCK)
    return tuple(block)


class Fp8BlockDequantize(ConversionOps):
    """One weight of an FP8 checkpoint: dequantized in fp32 when it has a `weight_scale_inv` companion, then cast to
    its parameter's dtype (plain weights of the same checkpoint, e.g. embeddings and norms, are only cast)."""

    def __init__(self, hf_quantizer: HfQuantizer | None = None) -> None:
        self.hf_quantizer = hf_quantizer

    def convert(
        self,
        input_dict: dict,
        source_patterns: list[str],
        target_patterns: list[str],
        model: torch.nn.Module | None = None,
        full_layer_name: str | None = None,
        config: Any = None,
        **kwargs,
    ) -> dict:
        weight, scale = (_single(input_dict.get(p)) for p in source_patterns)
        dtype = target_dtype(model, full_layer_name, weight)
        if scale is not None:
            weight = dequantize_fp8_blockwise(weight, scale, block_size(config))
        return {target_patterns[0]: weight.to(dtype)}


def _single(tensors: torch.Tensor | list[torch.Tensor] | None) -> torch.Tensor | None:
    return tensors[0] if isinstance(tensors, list) else tensors


class DeepseekFp8Config(QuantizationConfigMixin):
    """DeepSeek's `quantization_config` (`quant_method: "fp8"`, e4m3, dynamic activation scales, 128×128 weight
    blocks). Serialized back in DeepSeek's own form, so a saved config reads as the official one."""

    def __init__(
        self,
        weight_block_size: tuple[int, int] | list[int] = (FP8_BLOCK, FP8_BLOCK),
        activation_scheme: str = "dynamic",
        fmt: str = "e4m3",
        scale_fmt: str | None = None,
        **kwargs,
    ) -> None:
        self.quant_method = QUANT_METHOD
        self.weight_block_size = list(weight_block_size) if weight_block_size is not None else None
        self.activation_scheme = activation_scheme
        self.fmt = fmt
        self.scale_fmt = scale_fmt
        # Weights are dequantized while loading (the FP8 GEMM path is not wired into the model).
        self.dequantize = True
        self.post_init()

    def post_init(self) -> None:
        block = self.weight_block_size
        if block is None or len(block) != 2 or not all(isinstance(b, int) and b > 0 for b in block):
            raise ValueError(f"quantization_config.weight_block_size must be two positive integers, got {block}")
        if self.fmt != "e4m3":
            raise ValueError(f"quantization_config.fmt: only e4m3 FP8 checkpoints are supported, got {self.fmt!r}")
        if self.activation_scheme != "dynamic":
            raise ValueError(
                f"quantization_config.activation_scheme: only 'dynamic' is supported, got {self.activation_scheme!r}"
            )
        if self.scale_fmt not in (None, "ue8m0"):
            raise ValueError(f"quantization_config.scale_fmt must be absent or 'ue8m0', got {self.scale_fmt!r}")

    @classmethod
    def from_official(cls, quantization: dict) -> DeepseekFp8Config:
        values = {k: v for k, v in quantization.items() if k not in ("quant_method", "dequantize")}
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        official = {
            "activation_scheme": self.activation_scheme,
            "fmt": self.fmt,
            "quant_method": OFFICIAL_QUANT_METHOD,
            "weight_block_size": list(self.weight_block_size),
        }
        return official if self.scale_fmt is None else {**official, "scale_fmt": self.scale_fmt}

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()

    def get(self, key: str, default: Any = None) -> Any:
        """transformers reads a model config's `quantization_config` as a dict before building the quantizer."""
        return getattr(self, key, default)


class DeepseekFp8HfQuantizer(HfQuantizer):
    """Loads an official FP8 checkpoint dequantized into the requested dtype.

    The model's own converters (per-expert weights → fused 3D tensors) also collect each weight's `weight_scale_inv`
    and dequantize into their fused tensor; every other weight goes through `Fp8BlockDequantize`. Tensors are read in
    the checkpoint's dtype and cast once, by those ops, so scales are never rounded to a low-precision dtype."""

    requires_calibration = True  # quantizes nothing itself: the checkpoint must already be FP8
    serialized_names = {"weight": ["weight", "weight_scale_inv"]}

    def get_load_operations(self) -> dict:
        return {"dequantize": Fp8BlockDequantize}

    def update_weight_conversions(self, weight_conversions: list, model: torch.nn.Module) -> list:
        updated = []
        for converter in weight_conversions:
            sources = converter._original_source_patterns if isinstance(converter, WeightConverter) else []
            if sources and all(source.endswith(".weight") for source in sources):
                with_scales = [name for source in sources for name in (source, source + SCALE_SUFFIX)]
                converter = converter.copy(
                    with_scales, converter._original_target_patterns, operations=list(converter.operations)
                )
            updated.append(converter)
        return updated + self.get_weight_conversions()

    def get_new_dtype(self, converter: Any, param: Any, dtype: torch.dtype | None) -> torch.dtype | None:
        # Converters cast themselves after dequantizing; renamed tensors (buffers) take their own dtype.
        return None if isinstance(converter, WeightConverter) else dtype

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


def _register() -> None:
    """Idempotent: the package and a remote-code copy of this module may both be imported in one process."""
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantization_config(QUANT_METHOD)(DeepseekFp8Config)
        register_quantizer(QUANT_METHOD)(DeepseekFp8HfQuantizer)


_register()
