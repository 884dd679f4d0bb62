"""Logits of a checkpoint computed one module at a time, for `convert --verify`: the model is built on the meta
device and each top-level piece (embedding, every decoder layer, final norm, head) is read from the checkpoint in
fp32 just before it runs and dropped right after, so peak memory is about one layer, not the whole model."""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Callable

import torch
from torch import nn

from ..model.configuration_deepseek_moe import DeepseekMoeConfig
from ..model.modeling_deepseek_moe import DeepseekMoeForCausalLM, DeepseekMoeRotaryEmbedding
from ..model.quantization_deepseek_moe import dequantize_fp8_blockwise
from .layouts import Checkpoint, layer_index
from .tensors import load_weight


def _official(checkpoint: Checkpoint, name: str) -> torch.Tensor:
    weight, scale = load_weight(checkpoint, name)
    return (dequantize_fp8_blockwise(weight, scale) if scale is not None else weight).float()


def _in_memory(checkpoint: Checkpoint, config: DeepseekMoeConfig, name: str) -> torch.Tensor:
    """One parameter or buffer of our model from the checkpoint's official tensors: fused experts are stacked from
    the per-expert weights (gate rows before up rows), as the registered loading conversion does."""
    experts = range(config.n_routed_experts)
    if name.endswith("mlp.experts.gate_up_proj"):
        base = name.removesuffix("gate_up_proj")
        gate = torch.stack([_official(checkpoint, f"{base}{e}.gate_proj.weight") for e in experts])
        up = torch.stack([_official(checkpoint, f"{base}{e}.up_proj.weight") for e in experts])
        return torch.cat([gate, up], dim=1)
    if name.endswith("mlp.experts.down_proj"):
        base = name.removesuffix("down_proj")
        return torch.stack([_official(checkpoint, f"{base}{e}.down_proj.weight") for e in experts])
    if name == "lm_head.weight" and name not in checkpoint.tensors and config.tie_word_embeddings:
        name = "model.embed_tokens.weight"
    return _official(checkpoint, name)


def _materialize(checkpoint: Checkpoint, config: DeepseekMoeConfig, prefix: str, module: nn.Module) -> None:
    module.to_empty(device="cpu")
    persistent = set(module.state_dict())
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if name in persistent:
                tensor.copy_(_in_memory(checkpoint, config, prefix + name))
            else:  # running statistics (token counts): start from zero
                tensor.zero_()


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None where the C library has none (macOS, musl, Windows)."""
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except OSError:
        return None


def _release(module: nn.Module, args: tuple, output: object) -> None:
    """Drop the module's weights and hand the freed memory back to the system. glibc otherwise keeps much of it in
    heap fragments that later layers do not reuse: the peak grew by 55-240 MB over 13 layers of 29 MB from one run to
    the next; trimmed, it stays near one layer."""
    module.to("meta")
    if (trim := _malloc_trim()) is not None:
        trim(0)


def streamed_logits(checkpoint: Checkpoint, config: DeepseekMoeConfig, input_ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits of `checkpoint` (official names) on `input_ids`, one module in memory at a time."""
    with torch.device("meta"):
        model = DeepseekMoeForCausalLM(config).eval()
    model.model.rotary_emb = DeepseekMoeRotaryEmbedding(config)  # computed, not stored: built on the CPU
    layers = {f"model.layers.{i}.": model.model.layers[i] for i in range(config.num_hidden_layers)}
    pieces = {"model.embed_tokens.": model.model.embed_tokens, **layers, "model.norm.": model.model.norm}
    pieces["lm_head."] = model.lm_head
    for prefix, module in pieces.items():
        module.register_forward_pre_hook(lambda m, args, prefix=prefix: _materialize(checkpoint, config, prefix, m))
        module.register_forward_hook(_release)
    with torch.no_grad():
        return model(input_ids, use_cache=False).logits


def largest_layer_bytes(checkpoint: Checkpoint) -> int:
    """fp32 bytes of the largest piece `streamed_logits` holds at once (a layer, or a tensor outside the layers)."""
    pieces: dict[str | int, int] = {}
    for name, tensor in checkpoint.tensors.items():
        key = layer_index(name)
        key = name if key is None else key
        pieces[key] = pieces.get(key, 0) + math.prod(tensor.shape) * 4
    return max(pieces.values())
