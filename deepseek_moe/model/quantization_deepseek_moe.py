"""DeepSeek's official FP8 checkpoints as a transformers quantization method.

V3 ships its linear and expert weights as float8 e4m3 with one fp32 `weight_scale_inv` per 128×128 block (the
dequantization *multiplier*, amax/448, despite the name) and says so in `config.json` (`quantization_config`,
`quant_method: "fp8"`). The config class maps that entry to `DeepseekFp8Config`, whose quantizer does one of two things
(`DeepseekFp8Config.dequantize`; by default the first on CPU, the second on a GPU where the FP8 Triton GEMMs run):

- dequantize while loading: each weight's scale companion is collected and the weight dequantized in fp32, then cast
  once into the parameter's dtype, so float32, bfloat16, float16 and `"auto"` (the checkpoint's bf16) all give a model
  entirely in that dtype. Only the per-expert merges and a converter for the FP8 weights are touched.
- keep FP8 (inference only, about half the memory of bf16): every linear the checkpoint stores with a scale becomes a
  `DeepseekFp8Linear` holding the E4M3 weight and its scales exactly as in the files, and routed experts keep fused E4M3
  `gate_up_proj`/`down_proj` with fused scales (`gate_up_proj_scale_inv`: gate's blocks, then up's) and run through the
  `"deepseek_fp8"` experts implementation. Where Triton runs, activations are quantized per 1×128 tile and multiplied
  in FP8 (`fp8_kernels`, `moe_kernels.fused_experts_fp8`); elsewhere one weight (one expert) at a time is dequantized
  into the activations' dtype, which reproduces the dequantized model exactly. `save_pretrained` writes the official
  layout back (per-expert E4M3 weights with their `weight_scale_inv`, DeepSeek's `quantization_config`).

Plain checkpoints never see this code. The kernels (and triton) are imported where they are used: the config imports
this module for configs that carry a `quantization_config`, and commands that need only the config stay light.

transformers' own fine-grained FP8 loader infers the block size from the scale grid, which is wrong for partial edge
blocks (V3's 576-row `kv_a_proj_with_mqa`); here the declared block size is used and the expanded grid cut to shape.
"""

from __future__ import annotations

import inspect
import math
import re
import sys
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn
from transformers.core_model_loading import ConversionOps, WeightConverter
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.utils.quantization_config import FineGrainedFP8Config

from .architecture_deepseek_moe import FP8_BLOCK

OFFICIAL_QUANT_METHOD = "fp8"  # what DeepSeek's config.json says
QUANT_METHOD = "deepseek_fp8"  # our registration, so transformers' own "fp8" quantizer stays untouched for others
SCALE_SUFFIX = "_scale_inv"
FP8_DTYPE = torch.float8_e4m3fn
FP8_EXPERTS_IMPLEMENTATION = "deepseek_fp8"  # the experts implementation of a model that keeps FP8 experts


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


class DeepseekFp8Config(FineGrainedFP8Config):
    """DeepSeek's `quantization_config` (`quant_method: "fp8"`, e4m3, dynamic activation scales, 128×128 weight
    blocks). Serialized back in DeepSeek's own form, so a saved config reads as the official one.

    `dequantize` is a loading choice, never saved: True dequantizes into the requested dtype, False keeps the E4M3
    weights (inference only), None (default) keeps them when the model is loaded onto GPUs where the FP8 Triton GEMMs
    run and dequantizes otherwise. Pass it as `from_pretrained(..., quantization_config=DeepseekFp8Config(...))`:
    transformers then takes the checkpoint's config and overrides only the loading attributes, which it does for
    subclasses of its fine-grained FP8 config (the reason for the base class; none of its fields are used here)."""

    def __init__(
        self,
        weight_block_size: tuple[int, int] | list[int] = (FP8_BLOCK, FP8_BLOCK),
        activation_scheme: str = "dynamic",
        fmt: str = "e4m3",
        scale_fmt: str | None = None,
        dequantize: bool | None = None,
        **kwargs,
    ) -> None:
        self.quant_method = QUANT_METHOD
        self.weight_block_size = list(weight_block_size) if weight_block_size is not None else None
        self.activation_scheme = activation_scheme
        self.fmt = fmt
        self.scale_fmt = scale_fmt
        self.dequantize = dequantize
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
        if self.dequantize not in (None, True, False):
            raise ValueError(f"DeepseekFp8Config.dequantize must be True, False or None, got {self.dequantize!r}")

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

    def get_loading_attributes(self) -> dict[str, Any]:
        return {"dequantize": self.dequantize}


# ------------------------------------------------------------------------------------------- kept FP8 (inference)


def refuse_training(module: nn.Module) -> None:
    """Kept E4M3 weights are frozen storage with no gradient of their own: training must not silently skip them."""
    if module.training and torch.is_grad_enabled():
        raise RuntimeError(
            f"{type(module).__name__}: this model keeps its FP8 (E4M3) weights for inference only; to train, load it "
            "dequantized: from_pretrained(..., quantization_config=DeepseekFp8Config(dequantize=True))"
        )


def runs_fp8_kernels(hidden_states: torch.Tensor) -> bool:
    """The Triton FP8 GEMMs serve inference (they have no backward) where Triton runs for these activations."""
    from .fp8_kernels import fp8_gemm_runs_on

    return not (torch.is_grad_enabled() and hidden_states.requires_grad) and fp8_gemm_runs_on(hidden_states.device)


class DeepseekFp8Linear(nn.Module):
    """A linear layer kept as DeepSeek ships it: E4M3 `weight` [out, in] and an fp32 `weight_scale_inv`
    [ceil(out/128), ceil(in/128)], the dequantization multiplier of each 128×128 block.

    Forward: activations quantized per 1×128 tile and a block-scaled FP8 GEMM where Triton runs; elsewhere the weight is
    dequantized into the activations' dtype for this call only, which gives exactly the dequantized model's result."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, block: tuple[int, int], scale_fmt: str | None
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.block, self.scale_fmt = tuple(block), scale_fmt
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8_DTYPE), requires_grad=False)
        grid = (math.ceil(out_features / self.block[0]), math.ceil(in_features / self.block[1]))
        self.weight_scale_inv = nn.Parameter(torch.empty(grid, dtype=torch.float32), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize_fp8_blockwise(self.weight, self.weight_scale_inv, self.block).to(dtype)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        refuse_training(self)
        if runs_fp8_kernels(hidden_states):
            from .fp8_kernels import fp8_linear

            return fp8_linear(hidden_states, self.weight, self.weight_scale_inv, self.bias, self.scale_fmt)
        return F.linear(hidden_states, self.dequantized_weight(hidden_states.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def model_code_class(model: nn.Module, cls: type) -> type:
    """`cls` as the model's own code knows it. Remote code loaded from a local folder is imported once per entry module
    (the config's, the model's), each with its own copy of this file, and the quantizer at work is the copy imported
    first: the modules it builds must be of the class the model's `isinstance` checks name (that of the first module
    along the model class's bases that has one, so a user's subclass elsewhere is served too)."""
    for base in type(model).__mro__:
        found = getattr(sys.modules.get(base.__module__), cls.__name__, None)
        if found is not None:
            return found
    return cls


def dense_weight(linear: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """A linear layer's weight as a matrix to compute with: a kept FP8 one dequantized into `dtype`."""
    return linear.dequantized_weight(dtype) if isinstance(linear, DeepseekFp8Linear) else linear.weight


def keeps_fp8_experts(config: Any) -> bool:
    """Whether routed experts stay E4M3: when FP8 is kept and each expert's projections are whole 128-row blocks, so
    that the fused `gate_up_proj` scales are the per-expert ones concatenated (otherwise experts are dequantized).
    The config is known by its `quant_method`: it may be another copy's `DeepseekFp8Config` (`model_code_class`)."""
    quantization = getattr(config, "quantization_config", None)
    kept = getattr(quantization, "quant_method", None) == QUANT_METHOD and quantization.dequantize is False
    return kept and config.n_routed_experts > 0 and config.moe_intermediate_size % FP8_BLOCK == 0


def keep_experts_fp8(experts: nn.Module) -> None:
    """Turn a (meta) experts module's fused weights into E4M3 with fused 128×128 block scales beside them."""
    for name in ("gate_up_proj", "down_proj"):
        weight = getattr(experts, name)
        scales = (weight.shape[0], math.ceil(weight.shape[1] / FP8_BLOCK), math.ceil(weight.shape[2] / FP8_BLOCK))
        setattr(experts, name, nn.Parameter(torch.empty_like(weight, dtype=FP8_DTYPE), requires_grad=False))
        scale_inv = torch.empty(scales, dtype=torch.float32, device=weight.device)
        experts.register_parameter(name + SCALE_SUFFIX, nn.Parameter(scale_inv, requires_grad=False))


def fp8_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """`ExpertsInterface` entry of kept FP8 experts (registered by the modeling code): the fused FP8 Triton kernels
    where they run, else the module's own forward, which dequantizes one expert at a time."""
    refuse_training(self)
    if runs_fp8_kernels(hidden_states) and self.config.hidden_act == "silu" and hasattr(self, "down_proj_scale_inv"):
        from .moe_kernels import fused_experts_fp8

        scale_fmt = self.config.quantization_config.scale_fmt
        return fused_experts_fp8(
            hidden_states,
            top_k_index,
            top_k_weights,
            self.gate_up_proj,
            self.gate_up_proj_scale_inv,
            self.down_proj,
            self.down_proj_scale_inv,
            scale_fmt=scale_fmt,
        )
    return inspect.unwrap(type(self).forward)(self, hidden_states, top_k_index, top_k_weights)


def checkpoint_scale_owners(checkpoint_files: list[str] | None) -> set[str]:
    """Names of the modules whose weight the checkpoint stores in FP8 (it has a `weight_scale_inv` companion), read
    from the safetensors headers only."""
    if not checkpoint_files:
        raise ValueError("keeping FP8 weights needs the checkpoint's safetensors files (not a state dict)")
    owners = set()
    for file in checkpoint_files:
        with safe_open(file, framework="pt") as handle:
            scales = [key for key in handle.keys() if key.endswith(".weight" + SCALE_SUFFIX)]
        owners.update(key.removesuffix(".weight" + SCALE_SUFFIX) for key in scales)
    return owners


class DeepseekFp8HfQuantizer(HfQuantizer):
    """Loads an official FP8 checkpoint dequantized into the requested dtype, or keeps it FP8 (see the module doc).

    Dequantizing: the model's own converters (per-expert weights → fused 3D tensors) also collect each weight's
    `weight_scale_inv` and dequantize into their fused tensor; every other weight goes through `Fp8BlockDequantize`.
    Tensors are read in the checkpoint's dtype and cast once, by those ops, so scales are never rounded to a
    low-precision dtype. Keeping: the FP8 modules' E4M3 weights and fp32 scales load as they are; the expert merges
    get a twin that merges the per-expert scales into the fused scale tensors (and splits them again on save)."""

    requires_calibration = True  # quantizes nothing itself: the checkpoint must already be FP8
    serialized_names = {"weight": ["weight", "weight_scale_inv"]}

    def validate_environment(self, device_map: Any = None, **kwargs) -> None:
        """Settles `dequantize` before the model is built: by default FP8 is kept only on GPUs running the kernels."""
        config = self.quantization_config
        if config.dequantize is None:
            config.dequantize = not keeps_fp8_on(device_map)
        if config.dequantize is False and tuple(config.weight_block_size) != (FP8_BLOCK, FP8_BLOCK):
            raise ValueError(
                f"keeping FP8 weights needs {FP8_BLOCK}x{FP8_BLOCK} blocks (the kernels' tiles), the checkpoint has "
                f"{config.weight_block_size}; load it with DeepseekFp8Config(dequantize=True)"
            )

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files=None, **kwargs) -> None:
        """Kept FP8: the linears the checkpoint stores in FP8 become `DeepseekFp8Linear` (still on the meta device), and
        routed experts take E4M3 storage with fused scales when `keeps_fp8_experts`."""
        if self.quantization_config.dequantize:
            return
        owners = checkpoint_scale_owners(checkpoint_files)
        prefix = model.base_model_prefix + "."
        fp8_linear = model_code_class(model, DeepseekFp8Linear)
        for name, module in list(model.named_modules()):
            if isinstance(module, nn.Linear) and (name in owners or prefix + name in owners):
                parent, _, child = name.rpartition(".")
                replacement = fp8_linear(
                    module.in_features,
                    module.out_features,
                    module.bias is not None,
                    self.quantization_config.weight_block_size,
                    self.quantization_config.scale_fmt,
                )
                setattr(model.get_submodule(parent), child, replacement.to(module.weight.device))
            elif name.endswith("mlp.experts") and keeps_fp8_experts(model.config):
                keep_experts_fp8(module)

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs) -> nn.Module:
        """transformers makes every loaded floating tensor a trainable parameter: kept FP8 ones are frozen storage."""
        for name, parameter in model.named_parameters():
            if parameter.dtype == FP8_DTYPE or name.endswith(SCALE_SUFFIX):
                parameter.requires_grad_(False)
        return model

    @torch.no_grad()
    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        """`model.dequantize()`: every kept E4M3 weight becomes a plain one in `dtype` (the model's), e.g. to train."""
        self.quantization_config.dequantize = True
        fp8_linear = model_code_class(model, DeepseekFp8Linear)
        for name, module in list(model.named_modules()):
            if isinstance(module, fp8_linear):
                linear = nn.Linear(module.in_features, module.out_features, module.bias is not None, dtype=dtype)
                linear.weight.copy_(module.dequantized_weight(dtype))
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, linear.to(module.weight.device))
            for fused in ("gate_up_proj", "down_proj"):
                scale = module._parameters.pop(fused + SCALE_SUFFIX, None)
                if scale is not None:
                    weight = dequantize_fp8_blockwise(getattr(module, fused), scale).to(dtype)
                    setattr(module, fused, nn.Parameter(weight))
        model.set_experts_implementation(model.get_correct_experts_implementation(None))
        return model

    def get_load_operations(self) -> dict:
        return {"dequantize": Fp8BlockDequantize}

    def update_weight_conversions(self, weight_conversions: list, model: torch.nn.Module) -> list:
        """Each expert merge also takes the scales: as a twin converter into the fused scale tensor where the model
        keeps FP8 experts, else as companions it dequantizes with."""
        parameters = "\n".join(name for name, _ in model.named_parameters())
        updated = []
        for converter in weight_conversions:
            sources = converter._original_source_patterns if isinstance(converter, WeightConverter) else []
            if sources and all(source.endswith(".weight") for source in sources):
                targets = converter._original_target_patterns
                operations = list(converter.operations)
                if re.search(re.escape(targets[0] + SCALE_SUFFIX) + "$", parameters, re.MULTILINE):
                    scales = [source + SCALE_SUFFIX for source in sources]
                    updated.append(converter.copy(scales, [t + SCALE_SUFFIX for t in targets], operations=operations))
                else:
                    with_scales = [name for source in sources for name in (source, source + SCALE_SUFFIX)]
                    converter = converter.copy(with_scales, targets, operations=operations)
            updated.append(converter)
        return updated + self.get_weight_conversions()

    def get_new_dtype(self, converter: Any, param: Any, dtype: torch.dtype | None) -> torch.dtype | None:
        # Converters cast themselves after dequantizing; renamed tensors (buffers, kept FP8 weights and their scales)
        # take their parameter's dtype.
        return None if isinstance(converter, WeightConverter) else dtype

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict, dict]:
        """transformers saves a quantized model's state dict from here rather than the one `save_pretrained` builds:
        take the model's own (with the official MTP copies where it has them)."""
        return getattr(model, "checkpoint_state_dict", model.state_dict)(), {}

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return bool(self.quantization_config.dequantize)


# `device_map` strategies that spread a model over the GPUs (and CPU and disk when they run out), as Accelerate does.
SPREADING_DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def keeps_fp8_on(device_map: Any) -> bool:
    """Whether every device of a `from_pretrained` device map is a GPU where the FP8 Triton GEMMs run (no map: CPU)."""
    from .fp8_kernels import fp8_gemm_runs_on

    if device_map is None:
        return False
    targets = device_map.values() if isinstance(device_map, dict) else [device_map]
    devices = []
    for target in targets:
        if target in SPREADING_DEVICE_MAPS:
            target = "cuda"
        if target == "disk":
            return False
        devices.append(torch.device(f"cuda:{target}" if isinstance(target, int) else target))
    return all(device.type == "cuda" and torch.cuda.is_available() and fp8_gemm_runs_on(device) for device in devices)


def _register() -> None:
    """Idempotent: the package and a remote-code copy of this module may both be imported in one process."""
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantization_config(QUANT_METHOD)(DeepseekFp8Config)
        register_quantizer(QUANT_METHOD)(DeepseekFp8HfQuantizer)


_register()
