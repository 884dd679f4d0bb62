"""DeepSeek mixture-of-experts models: DeepSeekMoE-16B (MHA), DeepSeek-V2 / V2-Lite and V3 (MLA).

Read top-down: norms and rotary embeddings, the two attention variants, the router and the experts, the decoder
layer, then the model classes. Parameter names follow the official checkpoints, so official directories load
with zero missing or unexpected keys; routed experts live in fused 3D tensors in memory and are converted from and
back to the per-expert layout on disk (see `register_checkpoint_conversion_mapping` at the end).

This file and its siblings are also the remote code of uploaded models: imports of siblings are single-dot.
"""

import functools
import json
import math
import os
import re
import shutil
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import MethodType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.conversion_mapping import register_checkpoint_conversion_mapping
from transformers.core_model_loading import ConversionOps, WeightConverter
from transformers.integrations import use_experts_implementation
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GenericForSequenceClassification, GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, dynamic_rope_update
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .cache_deepseek_moe import LatentCache, LatentCacheLayer
from .configuration_deepseek_moe import (
    AUTO_MAP,
    MTP_COPIES,
    DeepseekMoeConfig,
    mtp_copies,
    official_config,
    remote_code_files,
)
from .mla_kernels import mla_decode_triton
from .moe_kernels import IMPLEMENTATION_NAME, kernels_default
from .quantization_deepseek_moe import (
    FP8_DTYPE,
    FP8_EXPERTS_IMPLEMENTATION,
    SCALE_SUFFIX,
    DeepseekFp8Linear,
    block_size,
    dense_weight,
    dequantize_fp8_blockwise,
    fp8_experts_forward,
    keeps_fp8_experts,
    target_dtype,
)
from .speculative import MtpGenerationMixin
from .triton_support import triton_runs_on

logger = logging.get_logger(__name__)


class DeepseekMoeRMSNorm(nn.Module):
    """RMSNorm computed in (at least) fp32, scaled by the weight after casting back (the official order)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.promote_types(input_dtype, torch.float32))
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


# --------------------------------------------------------------------------------------------- rotary embeddings


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature sqrt(1/t) = 0.1 * mscale * ln(scale) + 1 (1 when not extending)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale(config: DeepseekMoeConfig, qk_head_dim: int) -> float:
    """1/sqrt(d) times mscale(factor, mscale_all_dim)^2 whenever YaRN is configured (the official V2/V3 rule)."""
    scale = qk_head_dim**-0.5
    rope = config.rope_parameters or {}
    if rope.get("rope_type", "default") == "yarn" and rope.get("mscale_all_dim"):
        scale *= yarn_mscale(rope["factor"], rope["mscale_all_dim"]) ** 2
    return scale


class DeepseekMoeRotaryEmbedding(nn.Module):
    """cos/sin tables for positions; YaRN frequencies and cos/sin scaling come from transformers' RoPE helpers."""

    inv_freq: torch.Tensor

    def __init__(self, config: DeepseekMoeConfig) -> None:
        super().__init__()
        self.config = config
        self.rope_type = config.rope_parameters["rope_type"]
        self.max_seq_len_cached = self.original_max_seq_len = config.max_position_embeddings  # dynamic NTK
        rope_init_fn = ROPE_INIT_FUNCTIONS.get(self.rope_type, self.compute_default_rope_parameters)
        inv_freq, self.attention_scaling = rope_init_fn(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    @staticmethod
    def compute_default_rope_parameters(config: DeepseekMoeConfig, **kwargs) -> tuple[torch.Tensor, float]:
        """Plain RoPE: θ_i = base^(-2i/d) over the rotary width `head_dim`."""
        dim, base = config.head_dim, config.rope_parameters["rope_theta"]
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0

    @torch.no_grad()
    @dynamic_rope_update  # recomputes the frequencies for `dynamic` RoPE past the original length
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = torch.promote_types(x.dtype, torch.float32)
        freqs = position_ids[..., None].to(dtype) * self.inv_freq.to(device=x.device, dtype=dtype)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split RoPE (DeepSeekMoE-16B, Llama layout); `x` is [B, heads, S, d], cos/sin [B, S, d]."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


def apply_rotary_pos_emb_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on interleaved pairs (x[2i], x[2i+1]) as stored in official MLA checkpoints.

    The result is written de-interleaved (all first components, then all second ones); queries and keys get the same
    permutation, so their dot products equal the official complex-number rotation.
    """
    half = cos.shape[-1] // 2
    cos, sin = cos[..., :half].unsqueeze(1), sin[..., :half].unsqueeze(1)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# ------------------------------------------------------------------------------------------------------ attention


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Unpack[TransformersKwargs],
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q kᵀ · scale + mask) v with the softmax in fp32; K/V heads repeated for grouped queries."""
    groups = module.num_key_value_groups
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class DeepseekMoeAttention(nn.Module):
    """Multi-head attention of DeepSeekMoE-16B: Llama-style q/k/v/o projections with half-split RoPE."""

    def __init__(self, config: DeepseekMoeConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.head_dim = config.head_dim
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.scaling = softmax_scale(config, self.head_dim)
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, seq_length = hidden_states.shape[:-1]
        shape = (batch_size, seq_length, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)

        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, cos, sin), apply_rotary_pos_emb(key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(batch_size, seq_length, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


@contextmanager
def loaded_weights(module: nn.Module) -> Iterator[None]:
    """Holds an offloaded module's weights in place while code outside its `forward` reads them.

    accelerate's offloading hooks (`device_map` with "cpu"/"disk") load a module's weights only for its own forward
    and put meta tensors back after it; this runs the module's hook around the block instead. Nothing keeps the
    weights afterwards, so they stay owned (and offloaded) by their module. Without a hook it does nothing."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        yield
        return
    hook.pre_forward(module)
    try:
        yield
    finally:
        hook.post_forward(module, None)


@functools.cache
def onednn_dtypes() -> tuple[torch.dtype, ...]:
    """fp32, and bf16 where oneDNN supports it on this CPU (AVX-512 or newer)."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return ()
    bf16 = hasattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported") and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return (torch.float32, torch.bfloat16) if bf16 else (torch.float32,)


def onednn_serves(query: torch.Tensor, rows: torch.Tensor) -> bool:
    """Whether oneDNN's linear can take a product over the cached rows (or a linear over a packed weight): inference
    in fp32 or bf16 (`onednn_dtypes`) on a CPU torch built with it.

    It has no autograd formula, so it serves only without grad, and inductor cannot lower it with an unpacked weight,
    so compiled code keeps bmm; `torch.backends.mkldnn.flags(enabled=False)` turns it off."""
    return (
        not torch.compiler.is_compiling()
        and rows.device.type == "cpu"
        and query.dtype == rows.dtype
        and query.dtype in onednn_dtypes()
        and not torch.is_grad_enabled()
        and torch.backends.mkldnn.enabled
    )


def latent_scores(query: torch.Tensor, cached: LatentCacheLayer, packed: bool = False) -> torch.Tensor:
    """query · latentᵀ, [B, Q, T], for query rows [B, Q, d] (Q = heads × new tokens) against the cached rows [B, T, d].

    MKL (torch's CPU matmul) runs this skinny product at about 45% of its square-matmul rate, and only with AVX2 on
    AMD CPUs; oneDNN's linear over the cached rows as its input (the kernel torch's inductor uses for frozen linears)
    runs it 2-3x faster on the same thread, exact in fp32 (bf16 bmm is slower still: a bf16 decode step through
    oneDNN takes half the time or less). oneDNN compiles a kernel for every new shape (~0.5 ms), so it reads the rows
    up to the next whole chunk (a new shape every 256 steps) and the extra rows' scores are dropped.

    With `packed` (after `prepack_cpu_weights`), the whole blocks of rows are read from the cache's copies in oneDNN's
    packed weight layout, the query as the input: a product shaped for its kernels, 5-10% faster from memory
    (`docs/BENCHMARKS.md`); the rows after them as before."""
    rows = cached.latent
    if not onednn_serves(query, rows):
        return torch.bmm(query, rows.transpose(1, 2))
    blocks = cached.packed_blocks("rows", query.shape[1]) if packed else [[]] * query.shape[0]
    start = sum(block.shape[0] for block in blocks[0])
    after = cached.chunked_latent[:, start:] if start < rows.shape[1] else None  # as the input: [B, T', d]
    scores = query.new_empty(*query.shape[:2], start + (0 if after is None else after.shape[1]))
    for sequence, (q, row_blocks, out) in enumerate(zip(query, blocks, scores, strict=True)):
        parts = [onednn_linear(q, block) for block in row_blocks]
        if after is not None:
            parts.append(onednn_linear(after[sequence], q).t())
        torch.cat(parts, dim=1, out=out)
    return scores[..., : rows.shape[1]]


def latent_weighted_sum(
    weights: torch.Tensor, latent: torch.Tensor, cached: LatentCacheLayer | None, packed: bool = False
) -> torch.Tensor:
    """weights · latent, [B, Q, r], for attention weights [B, Q, T] over the cached latent rows [B, T, r].

    The same skinny product as the scores; oneDNN needs the latent feature-major, which a `LatentCacheLayer` keeps
    for its whole blocks of rows (`sealed_columns`): those go through oneDNN block by block, as the input, the rows
    after them through bmm. With `packed` (after `prepack_cpu_weights`), the blocks are the cache's copies in oneDNN's
    packed weight layout and the weights are the input: 3-4% off a one-token step at 8K tokens."""
    if cached is None or not onednn_serves(weights, latent):
        return torch.bmm(weights, latent)
    columns = cached.packed_blocks("columns", weights.shape[1]) if packed else cached.sealed_columns()
    if len(columns[0]) == 0:
        return torch.bmm(weights, latent)
    num_blocks, block = len(columns[0]), columns[0][0].shape[-1]
    sealed = num_blocks * block
    out = torch.bmm(weights[..., sealed:], latent[:, sealed:])
    # [B, blocks, Q, block]: each block's weights contiguous, as oneDNN takes them
    blocks = weights[..., :sealed].unflatten(-1, (num_blocks, block)).transpose(1, 2).contiguous()
    for row_blocks, row_columns, row_out in zip(blocks, columns, out, strict=True):
        for block_weights, block_columns in zip(row_blocks, row_columns, strict=True):
            if packed:
                row_out += onednn_linear(block_weights, block_columns)
            else:  # the block as the input: as the second operand oneDNN would reorder it (3.7x slower, cold cache)
                row_out += onednn_linear(block_columns, block_weights).t()
    return out


def heads_matmul(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Each head's rows x [B, H, S, k] through its own matrix weight [H, n, k], as [B, H, S, n]: one bmm over the
    heads with the weight as the left operand, so that a contiguous weight's rows are read in order (as the right
    operand, transposed, a one-token CPU step through W_UV takes 1.3-1.6x as long)."""
    batch, heads, seq_length, k = x.shape
    columns = x.permute(1, 3, 0, 2).reshape(heads, k, batch * seq_length)
    return torch.bmm(weight, columns).view(heads, -1, batch, seq_length).permute(2, 0, 3, 1)


def project_values(out_latent: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
    """Each head's attention output in latent space [B, H, S, r] through its W_UV [H, v, r], as [B, S, H, v]."""
    return heads_matmul(out_latent, w_uv).transpose(1, 2)


# The copies `prepack_cpu_weights` made of each module's weights, by layout, each with the (storage, version) of the
# weight it copies. Kept beside the modules, not in them: the opaque packed tensors cannot be deep-copied, and a
# copied module makes its own.
PACKED_WEIGHTS: weakref.WeakKeyDictionary[nn.Module, dict[str, tuple[object, tuple[int, int]]]] = (
    weakref.WeakKeyDictionary()
)


def weight_copy(module: nn.Module, layout: str, weight: torch.Tensor, make: Callable[[torch.Tensor], object]) -> Any:
    """`make(weight)` for one of `module`'s weights, kept in `PACKED_WEIGHTS` under `layout`, and made again on first
    use after the weight was replaced or changed in place (a training step)."""
    copies = PACKED_WEIGHTS.get(module)
    if copies is None:
        copies = PACKED_WEIGHTS[module] = {}
    stamp = (weight.data_ptr(), weight._version)
    if layout not in copies or copies[layout][1] != stamp:
        with torch.no_grad():
            copies[layout] = make(weight), stamp
    return copies[layout][0]


def onednn_packed(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, None)


def onednn_packed_experts(weights: torch.Tensor) -> list[torch.Tensor]:
    return [onednn_packed(weight) for weight in weights.unbind(0)]


def onednn_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x · weightᵀ through oneDNN's linear; `weight` plain (oneDNN reorders it for the call) or `onednn_packed`."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


def packed_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """`nn.Linear.forward` of a linear that `prepack_cpu_weights` packed: through oneDNN's linear over the weight in
    its blocked layout where oneDNN serves (see `onednn_serves`), else as usual."""
    if not onednn_serves(x, self.weight):
        return F.linear(x, self.weight, self.bias)
    packed = weight_copy(self, "onednn", self.weight, onednn_packed)
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), packed, self.bias, "none", [], "")
    return out.view(*x.shape[:-1], out.shape[-1])


class DeepseekMoeLatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3).

    Keys and values come from a shared latent `c_kv = RMSNorm(W_DKV x)` (kv_lora_rank wide) and one decoupled
    rotary key `k_pe = RoPE(W_KR x)` shared by all heads. The cache holds only `c_kv` and `k_pe`
    (kv_lora_rank + qk_rope_head_dim values per token), viewed as one-head tensors so every transformers cache
    layer (dynamic, static, offloaded) stores them; per-head keys and values are expanded through `kv_b_proj`.
    """

    def __init__(self, config: DeepseekMoeConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_key_value_groups = 1
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.qk_head_dim = config.qk_head_dim
        self.v_head_dim = config.v_head_dim
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.scaling = softmax_scale(config, self.qk_head_dim)
        self.rope = apply_rotary_pos_emb_interleaved if config.rope_interleave else apply_rotary_pos_emb
        bias = config.attention_bias

        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(config.hidden_size, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = DeepseekMoeRMSNorm(self.q_lora_rank, eps=config.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, self.num_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(config.hidden_size, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = DeepseekMoeRMSNorm(self.kv_lora_rank, eps=config.rms_norm_eps)
        self.kv_b_proj = nn.Linear(
            self.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(self.num_heads * self.v_head_dim, config.hidden_size, bias=bias)
        self.cpu_prepacked = False  # set by `prepack_cpu_weights`: CPU inference reads copies in faster layouts

    def project_query(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head `q_nope` and (not yet rotated) `q_pe`, each [B, heads, S, d]."""
        batch_size, seq_length = hidden_states.shape[:-1]
        if self.q_lora_rank is None:
            query = self.q_proj(hidden_states)
        else:
            query = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        query = query.view(batch_size, seq_length, self.num_heads, self.qk_head_dim).transpose(1, 2)
        return query.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)

    def absorb_query(self, q_nope: torch.Tensor, w_uk: torch.Tensor) -> torch.Tensor:
        """q_nope · W_UK per head, [B, heads, S, kv_lora_rank]: the query in latent space.

        After `prepack_cpu_weights`, CPU inference reads a contiguous copy of each head's W_UKᵀ as the left operand
        (`heads_matmul`); the einsum reads W_UK column-wise and, from memory, takes 1.7x as long."""
        if self.cpu_prepacked and type(self.kv_b_proj) is nn.Linear and onednn_serves(q_nope, w_uk):
            w_uk_t = weight_copy(self.kv_b_proj, "w_uk_t", self.kv_b_proj.weight, self.transposed_w_uk)
            return heads_matmul(q_nope, w_uk_t)
        return torch.einsum("bhsd,hdr->bhsr", q_nope, w_uk)

    def transposed_w_uk(self, w_kv: torch.Tensor) -> torch.Tensor:
        """Each head's W_UKᵀ [heads, kv_lora_rank, qk_nope_head_dim], contiguous, from kv_b_proj's weight."""
        w_uk = w_kv.view(self.num_heads, -1, self.kv_lora_rank)[:, : self.qk_nope_head_dim]
        return w_uk.transpose(1, 2).contiguous()

    def compress_kv(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The normalised latent `c_kv` [B, 1, S, kv_lora_rank] and the (not yet rotated) key `k_pe` [B, 1, S, d_r]."""
        batch_size, seq_length = hidden_states.shape[:-1]
        c_kv, k_pe = self.kv_a_proj_with_mqa(hidden_states).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        return c_kv.view(batch_size, 1, seq_length, -1), k_pe.view(batch_size, 1, seq_length, -1)

    def expand_kv(self, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head keys [k_nope; k_pe] and values from the latent, [B, heads, T, d]."""
        batch_size, _, kv_length, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv).view(batch_size, kv_length, self.num_heads, -1).transpose(1, 2)
        k_nope, value = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        key = torch.cat((k_nope, k_pe.expand(-1, self.num_heads, -1, -1)), dim=-1)
        return key, value

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, seq_length = hidden_states.shape[:-1]
        q_nope, q_pe = self.project_query(hidden_states)
        c_kv, k_pe = self.compress_kv(hidden_states)
        cos, sin = position_embeddings
        q_pe, k_pe = self.rope(q_pe, cos, sin), self.rope(k_pe, cos, sin)
        if cache is not None:
            c_kv, k_pe = cache.update(c_kv, k_pe, self.layer_idx)
        cached = cache.layers[self.layer_idx] if isinstance(cache, LatentCache) else None

        dropout = 0.0 if not self.training else self.attention_dropout
        mode = kwargs.pop("mla_attention_mode", None) or self.config.mla_attention_mode
        if self.use_absorbed(mode, seq_length, c_kv.shape[2]):
            with loaded_weights(self.kv_b_proj):  # absorbed attention reads W_UK and W_UV directly
                attn_output, attn_weights = self.absorbed_attention(
                    q_nope, q_pe, c_kv, k_pe, attention_mask, dropout, cached
                )
        else:
            attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, eager_attention_forward
            )
            key, value = self.expand_kv(c_kv, k_pe)
            query = torch.cat((q_nope, q_pe), dim=-1)
            attn_output, attn_weights = attention_interface(
                self, query, key, value, attention_mask, dropout=dropout, scaling=self.scaling, **kwargs
            )
        attn_output = attn_output.reshape(batch_size, seq_length, -1).contiguous()
        return self.o_proj(attn_output), attn_weights

    def use_absorbed(self, mode: str, seq_length: int, kv_length: int) -> bool:
        """`auto` absorbs for decoding (a few new queries against a longer cache) and expands for prefill, where
        per-head keys are the cheaper, compute-friendly form. Shapes only, so compiled decode steps do not branch on
        data (a static cache is always longer than the queries: short prompts take the absorbed path, also exact)."""
        plain_weight = type(self.kv_b_proj) in (nn.Linear, DeepseekFp8Linear)  # an adapter (e.g. LoRA) wraps it
        if mode == "absorbed" and not plain_weight:
            raise ValueError("mla_attention_mode='absorbed' needs a plain kv_b_proj; merge adapters first")
        if mode == "auto":
            return plain_weight and seq_length <= 8 and kv_length > seq_length
        return mode == "absorbed"

    def can_use_decode_kernel(self, query: torch.Tensor) -> bool:
        """The Triton decode kernel serves inference (no autograd) when Triton can run and its tiles fit."""
        dims_fit = all(d >= 16 and d & (d - 1) == 0 for d in (self.kv_lora_rank, self.qk_rope_head_dim))
        return dims_fit and not torch.is_grad_enabled() and triton_runs_on(query.device)

    def absorbed_attention(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        c_kv: torch.Tensor,
        k_pe: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float,
        cached: LatentCacheLayer | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention straight over the cached latent: W_UK is absorbed into the query (q_nope W_UK lives in latent
        space), scores are q_latent · c_kv + q_pe · k_pe, the weighted sum is taken over c_kv and mapped by W_UV.

        All heads share the one latent "head" (multi-query attention), so heads are folded into the rows of two
        matrix products that read each cached row once for every head, without concatenating the cache into keys.
        On CPU this is about twice as fast as routing the same multi-query problem through sdpa. `cached` is the
        layer of a `LatentCache`, which stores the `[c_kv | k_pe]` rows side by side: then one product over
        [q_latent | q_pe] gives the scores, and fp32 and bf16 CPU inference run both products through oneDNN. Returns
        [B, S, heads, v_head_dim] like the expanded path, and the attention weights [B, heads, S, T]."""
        batch_size, num_heads, seq_length, _ = q_nope.shape
        kv_length = c_kv.shape[2]
        w_kv = dense_weight(self.kv_b_proj, q_nope.dtype)
        w_kv = w_kv.view(num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = w_kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)
        q_latent = self.absorb_query(q_nope, w_uk).reshape(batch_size, -1, self.kv_lora_rank)
        q_rope = q_pe.reshape(batch_size, -1, self.qk_rope_head_dim)
        latent, rotary = c_kv[:, 0], k_pe[:, 0]  # [B, T, r], [B, T, d_r]
        if seq_length == 1 and self.can_use_decode_kernel(q_nope):
            bias = torch.zeros(batch_size, kv_length, dtype=torch.float32, device=q_nope.device)
            if attention_mask is not None:
                mask = attention_mask[..., :kv_length].reshape(-1, kv_length).expand(batch_size, -1)
                bias = bias.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else bias + mask
            out_latent = mla_decode_triton(q_latent, q_rope, latent, rotary, bias, self.scaling).to(q_nope.dtype)
            out_latent = out_latent.view(batch_size, num_heads, 1, self.kv_lora_rank)
            return project_values(out_latent, w_uv), None
        if cached is not None:
            query = torch.cat((q_latent, q_rope), dim=-1) * self.scaling
            scores = latent_scores(query, cached, packed=self.cpu_prepacked)
        else:
            scores = torch.bmm(q_rope, rotary.transpose(1, 2))
            scores = torch.baddbmm(scores, q_latent, latent.transpose(1, 2), alpha=self.scaling, beta=self.scaling)
        scores = scores.view(batch_size, num_heads, seq_length, kv_length)
        if attention_mask is None and seq_length > 1:
            # transformers leaves the mask out only for a prefill from position 0 (sdpa's causal shortcut)
            attention_mask = torch.ones(seq_length, kv_length, dtype=torch.bool, device=scores.device).tril()
        if attention_mask is not None:
            mask = attention_mask[..., :kv_length]
            if mask.dtype == torch.bool:  # sdpa-style masks say where to attend
                scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
            else:
                scores = scores + mask
        weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(q_nope.dtype)
        weights = F.dropout(weights, p=dropout, training=self.training)
        out_latent = latent_weighted_sum(weights.view(batch_size, -1, kv_length), latent, cached, self.cpu_prepacked)
        out_latent = out_latent.view(batch_size, num_heads, seq_length, self.kv_lora_rank)
        return project_values(out_latent, w_uv), weights


# ------------------------------------------------------------------------------------------------- feed-forward


class DeepseekMoeMLP(nn.Module):
    """SwiGLU feed-forward: down(act(gate(x)) * up(x)). Dense layers and the (fused) shared experts."""

    def __init__(self, config: DeepseekMoeConfig, intermediate_size: int | None = None) -> None:
        super().__init__()
        intermediate_size = intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def counts_this_forward(module: nn.Module) -> bool:
    """Whether a router forward is a training forward whose routing must be counted, exactly once per micro-batch.

    No-grad and eval forwards do not count. Activation checkpointing re-runs the forward inside backward: the
    non-reentrant kind (transformers' default) counted in its first forward and recomputes under saved-tensor hooks,
    so that re-run is skipped; the reentrant kind ran its first forward without grad, so its re-run is counted.
    """
    if not (module.training and torch.is_grad_enabled()):
        return False
    if torch._C._current_graph_task_id() == -1:  # not inside a backward pass
        return True
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is None


class DeepseekMoeTopkRouter(nn.Module):
    """The gate: affinities s = softmax|sigmoid(W x) in fp32, then a top-k choice of routed experts.

    - `greedy`: top-k over all experts.
    - `group_limited_greedy` (V2 device-limited): keep the `topk_group` groups with the highest max affinity.
    - `noaux_tc` (V3 node-limited, auxiliary-loss-free): select on s + `e_score_correction_bias`, groups scored by
      the sum of their top two; the bias never enters the weights.
    Excluded groups are masked with -inf. Weights are the unbiased affinities of the chosen experts; V3 normalises
    then scales by `routed_scaling_factor`, V2/16B scale only when they do not normalise.

    Training state (not saved, not gradients): `tokens_per_expert` counts routed (token, expert) pairs of real
    tokens (padding left out) and `dropped_tokens` the pairs dropped by the optional capacity limit, once per
    training forward, until `deepseek_moe.training.update_expert_bias` reads them, moves the bias and resets them.
    They are plain int64 tensors, not buffers: DDP broadcasts every buffer from rank 0 at each synchronised forward,
    which would overwrite the other ranks' counts, and `.to()` would round them in bf16. They follow the device of
    the routing. The capacity settings are read from the config at every forward, so they can change mid-run.
    """

    e_score_correction_bias: torch.Tensor
    tokens_per_expert: torch.Tensor
    dropped_tokens: torch.Tensor

    def __init__(self, config: DeepseekMoeConfig) -> None:
        super().__init__()
        self.config = config
        self.top_k = config.num_experts_per_tok
        self.num_experts = config.n_routed_experts
        self.uses_bias_balancing = config.uses_bias_balancing
        self.uses_group_limited_routing = config.uses_group_limited_routing
        self.scales_routing_weights = config.scales_routing_weights
        self.scoring_func = config.scoring_func
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.num_experts, config.hidden_size, dtype=torch.float32))
        if self.uses_bias_balancing:
            self.register_buffer("e_score_correction_bias", torch.zeros(self.num_experts, dtype=torch.float32))
        self.reset_counts()

    def reset_counts(self) -> None:
        """Zero the counts (on the device they are on; a new router's live on the CPU, even on the meta device)."""
        device = self.tokens_per_expert.device if hasattr(self, "tokens_per_expert") else "cpu"
        self.tokens_per_expert = torch.zeros(self.num_experts, dtype=torch.int64, device=device)
        self.dropped_tokens = torch.zeros((), dtype=torch.int64, device=device)

    def affinities(self, router_logits: torch.Tensor) -> torch.Tensor:
        if self.scoring_func == "sigmoid":
            return router_logits.sigmoid()
        return router_logits.softmax(dim=-1)

    def mask_groups(self, scores_for_choice: torch.Tensor) -> torch.Tensor:
        """Set every expert outside the `topk_group` best groups to -inf."""
        grouped = scores_for_choice.view(-1, self.n_group, self.num_experts // self.n_group)
        if self.uses_bias_balancing:
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores = grouped.amax(dim=-1)
        group_idx = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
        return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view_as(scores_for_choice)

    def forward(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns router logits [T, E], routing weights [T, k] (both at least fp32) and expert indices [T, k].

        `hidden_states` is [B, S, H] (or [T, H], one sequence); dropped (token, expert) pairs get weight 0.
        `token_mask` [B, S] is False on padding, which is routed like any token but not counted.
        """
        batch_size = hidden_states.shape[0] if hidden_states.dim() == 3 else 1
        hidden_states = hidden_states.reshape(-1, hidden_states.shape[-1])
        dtype = torch.promote_types(hidden_states.dtype, torch.float32)  # never below fp32
        router_logits = F.linear(hidden_states.to(dtype), self.weight.to(dtype))
        scores, topk_weights, topk_indices = self.route(router_logits)
        keep = None
        if self.config.capacity_factor is not None and (self.training or self.config.drop_tokens_at_inference):
            keep = self.capacity_mask(scores.gather(1, topk_indices), topk_indices, batch_size)
            topk_weights = topk_weights * keep
        if counts_this_forward(self):
            self.count(topk_indices, keep, token_mask)
        return router_logits, topk_weights, topk_indices

    @torch.no_grad()
    def count(self, topk_indices: torch.Tensor, keep: torch.Tensor | None, token_mask: torch.Tensor | None) -> None:
        """Add this forward's routed pairs per expert, and its dropped pairs, to the counts; padding is left out."""
        if self.tokens_per_expert.device != topk_indices.device:
            self.tokens_per_expert = self.tokens_per_expert.to(topk_indices.device)
            self.dropped_tokens = self.dropped_tokens.to(topk_indices.device)
        real = torch.ones_like(topk_indices, dtype=torch.bool)
        if token_mask is not None:
            real = real & token_mask.reshape(-1, 1).to(real.device, torch.bool)
        self.tokens_per_expert.scatter_add_(0, topk_indices.reshape(-1), real.reshape(-1).long())
        if keep is not None:
            self.dropped_tokens += (real & ~keep).sum()

    def route(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Affinities s [T, E], routing weights [T, k] and expert indices [T, k] from the logits (no dropping)."""
        scores = self.affinities(router_logits)
        scores_for_choice = scores
        if self.uses_bias_balancing:
            scores_for_choice = scores + self.e_score_correction_bias
        if self.uses_group_limited_routing:
            scores_for_choice = self.mask_groups(scores_for_choice)
        topk_indices = scores_for_choice.topk(self.top_k, dim=-1, sorted=False).indices
        topk_weights = scores.gather(1, topk_indices)
        if self.norm_topk_prob and self.top_k > 1:
            topk_weights = topk_weights / (topk_weights.sum(dim=-1, keepdim=True) + 1e-20)
        if self.scales_routing_weights:
            topk_weights = topk_weights * self.routed_scaling_factor
        return scores, topk_weights, topk_indices

    def capacity_mask(self, affinity: torch.Tensor, topk_indices: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Which (token, expert) pairs [T, k] fit the device capacity (DeepSeek-V2 §2.2.4 token dropping).

        Each of D devices (`num_devices`, else one per expert) keeps capacity_factor·T·k/D pairs, highest affinity
        first. Pairs of the first `capacity_protected_fraction` of the batch's sequences always stay (and count).
        """
        num_devices = self.config.num_devices or self.num_experts
        num_pairs = topk_indices.numel()
        capacity = math.ceil(self.config.capacity_factor * num_pairs / num_devices)
        device = (topk_indices // (self.num_experts // num_devices)).reshape(-1)
        protected = torch.zeros_like(topk_indices, dtype=torch.bool)
        protected_sequences = int(self.config.capacity_protected_fraction * batch_size + 0.5)
        protected[: protected_sequences * (topk_indices.shape[0] // batch_size)] = True
        protected = protected.reshape(-1)
        # Affinities are in [0, 1]: protected pairs rank first, then by affinity, within each device.
        priority = affinity.reshape(-1).double() + 2.0 * protected
        order = torch.argsort(device.double() * 4.0 - priority, stable=True)
        per_device = torch.bincount(device, minlength=num_devices)
        first_of_device = torch.cumsum(per_device, 0) - per_device
        rank = torch.empty_like(order)
        rank[order] = torch.arange(num_pairs, device=order.device) - first_of_device[device[order]]
        return ((rank < capacity) | protected).view_as(topk_indices)


@use_experts_implementation
class DeepseekMoeExperts(nn.Module):
    """Routed experts as fused 3D weights: `gate_up_proj` [E, 2I, H] (gate rows first) and `down_proj` [E, H, I].

    This eager path sorts the (token, slot) pairs by expert once and runs each expert on one contiguous slice;
    transformers' `grouped_mm`/`batched_mm` and our Triton kernels (`"deepseek_triton"`, `moe_kernels`) plug in
    through `@use_experts_implementation`.
    """

    def __init__(self, config: DeepseekMoeConfig) -> None:
        super().__init__()
        self.num_experts = config.n_routed_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        return self.sorted_forward(hidden_states, top_k_index, top_k_weights)

    def sorted_forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        packed: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """The eager path; with `packed` (`packed_experts`), each expert's products run through oneDNN's linear."""
        top_k = top_k_index.shape[-1]
        flat_experts = top_k_index.reshape(-1)
        order = flat_experts.argsort(stable=True)
        # Under expert parallelism, ids >= num_experts mark pairs of other ranks: they sort last and are skipped.
        counts = torch.bincount(flat_experts, minlength=self.num_experts).tolist()[: self.num_experts]
        order = order[: sum(counts)]
        token_of_slot = order // top_k
        routed_inputs = hidden_states[token_of_slot].split(counts)
        # One unbind, not `proj[expert]` per expert: autograd would build a full [E, ...] gradient for each index.
        per_expert = zip(routed_inputs, self.gate_up_proj.unbind(0), self.down_proj.unbind(0), strict=True)
        outputs = []
        linear = F.linear if packed is None else onednn_linear
        for expert, (rows, gate_up_proj, down_proj) in enumerate(per_expert):
            if rows.shape[0] == 0:
                continue
            if packed is not None:
                gate_up_proj, down_proj = packed[0][expert], packed[1][expert]
            elif gate_up_proj.dtype == FP8_DTYPE:  # kept FP8: one expert dequantized at a time, never all of them
                gate_up_proj, down_proj = self.dequantized_expert(expert, rows.dtype)
            gate, up = linear(rows, gate_up_proj).chunk(2, dim=-1)
            outputs.append(linear(self.act_fn(gate) * up, down_proj))
        if not outputs:
            return torch.zeros_like(hidden_states)
        routed_outputs = torch.cat(outputs) * top_k_weights.reshape(-1)[order, None]
        final = torch.zeros_like(hidden_states)
        return final.index_add_(0, token_of_slot, routed_outputs.to(final.dtype))

    def packed_experts(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each expert's `gate_up_proj` and `down_proj` packed for oneDNN (`prepack_cpu_weights`)."""
        gate_up = weight_copy(self, "gate_up_proj", self.gate_up_proj, onednn_packed_experts)
        return gate_up, weight_copy(self, "down_proj", self.down_proj, onednn_packed_experts)

    def dequantized_expert(self, expert: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """One kept-FP8 expert's `gate_up_proj` and `down_proj` (E4M3 with 128×128 block scales) in `dtype`."""
        return tuple(
            dequantize_fp8_blockwise(getattr(self, name)[expert], getattr(self, name + SCALE_SUFFIX)[expert]).to(dtype)
            for name in ("gate_up_proj", "down_proj")
        )

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        """`load_state_dict` with the on-disk layout (one tensor per expert, e.g. a Trainer checkpoint on resume): a
        complete per-expert set (FP8 ones with their scales) is fused first, as `from_pretrained` does; the experts of
        a partial set, such as one shard of a sharded checkpoint, are copied into their rows of the fused weights."""
        projections = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
        for fused, parts in projections.items():
            patterns = [f"{prefix}{{}}.{part}.weight" for part in parts]
            if not all(pattern.format(e) in state_dict for pattern in patterns for e in range(self.num_experts)):
                self._load_expert_rows(state_dict, patterns, getattr(self, fused))
                continue
            input_dict = {}
            for pattern in patterns:
                for suffix in ("", "_scale_inv"):
                    if (pattern + suffix).format(0) in state_dict:
                        keys = [(pattern + suffix).format(e) for e in range(self.num_experts)]
                        input_dict[pattern + suffix] = [state_dict.pop(key) for key in keys]
            state_dict.update(MergeExperts().convert(input_dict, patterns, [prefix + fused]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def _load_expert_rows(self, state_dict: dict, patterns: list[str], fused: torch.Tensor) -> None:
        """Copy the per-expert tensors present in `state_dict` (consumed) into their rows of `fused`."""
        rows = fused.shape[1] // len(patterns)
        for expert in range(self.num_experts):
            for part, pattern in enumerate(patterns):
                key = pattern.format(expert)
                if key in state_dict:
                    weight, scale = state_dict.pop(key), state_dict.pop(key + SCALE_SUFFIX, None)
                    if scale is not None:
                        weight = dequantize_fp8_blockwise(weight, scale)
                    fused[expert, part * rows : (part + 1) * rows].copy_(weight)


def packed_experts_forward(
    self: DeepseekMoeExperts, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """`forward` of routed experts that `prepack_cpu_weights` packed: where oneDNN serves, the eager loop over the
    packed copies (whatever `experts_implementation` says: on a CPU the others read the plain weights at about half
    the bandwidth), else the configured implementation."""
    if not onednn_serves(hidden_states, self.gate_up_proj):
        return type(self).forward(self, hidden_states, top_k_index, top_k_weights)
    return self.sorted_forward(hidden_states, top_k_index, top_k_weights, packed=self.packed_experts())


class DeepseekMoeSparseBlock(nn.Module):
    """MoE feed-forward: routed experts chosen by the gate plus always-on shared experts (one fused MLP)."""

    def __init__(self, config: DeepseekMoeConfig) -> None:
        super().__init__()
        self.config = config
        self.gate = DeepseekMoeTopkRouter(config)
        self.experts = DeepseekMoeExperts(config)
        if config.n_shared_experts > 0:
            self.shared_experts = DeepseekMoeMLP(config, config.moe_intermediate_size * config.n_shared_experts)

    def forward(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's output and the router logits [T, E] (for the balance losses); `token_mask` as the router's."""
        shape = hidden_states.shape
        router_logits, topk_weights, topk_indices = self.gate(hidden_states, token_mask)
        routed = self.experts(hidden_states.reshape(-1, shape[-1]), topk_indices, topk_weights).view(shape)
        if self.config.n_shared_experts > 0:
            routed = routed + self.shared_experts(hidden_states)
        return routed, router_logits


# ------------------------------------------------------------------------------------------------ balance losses


def balance_losses(
    config: DeepseekMoeConfig,
    router: DeepseekMoeTopkRouter,
    router_logits: torch.Tensor,
    batch_size: int,
    token_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """One MoE layer's auxiliary losses, each already multiplied by its coefficient (reference §3a, §3b).

    Routing is recomputed from the recorded logits (deterministic, before any dropping). With N' experts, K' chosen
    per token and T tokens per unit (a sequence when `seq_aux`, else the whole batch), averaged over units:
    - `expert`: α Σ_i f_i P_i, f_i = N'/(K'T)·#{t: t selects i}, P_i = mean_t s_i,t; sigmoid affinities are
      normalised per token (s'/Σs', V3). α is `seq_aux_alpha` for `noaux_tc`, else `aux_loss_alpha`.
    - `device` (with `num_devices` D): α₂ Σ_d f'_d P'_d, f'_d = mean of f over the device's experts, P'_d = their sum.
    - `comm` (with D and `device_limit` M): α₃ Σ_d f''_d P'_d, f''_d = D/(MT)·#{t: t is sent to device d}.
    - `z`: router z-loss, coefficient · mean_t logsumexp(logits_t)².
    Tokens where `token_mask` [B, S] is False (padding) are left out of every count, mean and T.
    """
    scores, _, topk_indices = router.route(router_logits)
    if router.scoring_func == "sigmoid":
        scores = scores / scores.sum(dim=-1, keepdim=True)
    num_experts, top_k = scores.shape[-1], topk_indices.shape[-1]
    units = batch_size if config.seq_aux else 1
    scores = scores.view(units, -1, num_experts)
    topk_indices = topk_indices.view(units, -1, top_k)
    mask = torch.ones_like(scores[..., :1]) if token_mask is None else token_mask.reshape(units, -1, 1).to(scores)
    tokens = mask.sum(dim=1)  # [U, 1]
    has_tokens = tokens.squeeze(-1) > 0
    tokens = tokens.clamp(min=1)

    def mean_over_units(per_unit: torch.Tensor) -> torch.Tensor:
        return per_unit.sum() / has_tokens.sum().clamp(min=1)

    selected = torch.zeros_like(scores).scatter_(2, topk_indices, 1.0) * mask  # [U, T, N'], no gradient
    f = selected.sum(dim=1) * num_experts / (top_k * tokens)
    P = (scores * mask).sum(dim=1) / tokens
    alpha = config.expert_balance_alpha
    losses = {}
    if alpha > 0:
        losses["expert"] = alpha * mean_over_units((f * P).sum(dim=-1))
    if config.num_devices is not None:
        D = config.num_devices
        P_device = P.view(units, D, -1).sum(dim=-1)
        if config.aux_loss_device_alpha > 0:
            f_device = f.view(units, D, -1).mean(dim=-1)
            losses["device"] = config.aux_loss_device_alpha * mean_over_units((f_device * P_device).sum(dim=-1))
        if config.device_limit is not None and config.aux_loss_comm_alpha > 0:
            sent = selected.view(units, selected.shape[1], D, -1).amax(dim=-1)
            f_comm = sent.sum(dim=1) * D / (config.device_limit * tokens)
            losses["comm"] = config.aux_loss_comm_alpha * mean_over_units((f_comm * P_device).sum(dim=-1))
    if config.router_z_loss_coef > 0:
        flat_mask = mask.reshape(-1)
        z = (router_logits.logsumexp(dim=-1).square() * flat_mask).sum() / flat_mask.sum().clamp(min=1)
        losses["z"] = config.router_z_loss_coef * z
    return losses


@dataclass
class DeepseekMoeCausalLMOutputWithPast(MoeCausalLMOutputWithPast):
    """`aux_loss` is the sum of `aux_losses`: each kind of balance loss (`expert`, `device`, `comm`, `z`) with its
    coefficient, summed over MoE layers. Computed when training or when router logits are asked for.
    `mtp_loss` is the multi-token prediction loss averaged over depths (weighted by `mtp_loss_weight` inside `loss`,
    reported here unweighted)."""

    aux_losses: dict[str, torch.Tensor] | None = None
    mtp_loss: torch.FloatTensor | None = None


# ------------------------------------------------------------------------------------------------- decoder layer


class DeepseekMoeDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: x + attn(norm(x)), then h + ffn(norm(h)); dense FFN for the first layers, MoE after."""

    def __init__(self, config: DeepseekMoeConfig, layer_idx: int) -> None:
        super().__init__()
        attention_class = DeepseekMoeLatentAttention if config.uses_mla else DeepseekMoeAttention
        self.self_attn = attention_class(config, layer_idx)
        is_moe = config.is_moe_layer(layer_idx) or layer_idx >= config.num_hidden_layers
        self.mlp = DeepseekMoeSparseBlock(config) if is_moe else DeepseekMoeMLP(config)
        self.input_layernorm = DeepseekMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = DeepseekMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        token_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The new hidden states and the router logits (None in dense layers). The logits leave as an output so that
        the balance losses get gradients under activation checkpointing: the reentrant kind runs the layer without
        grad first, so anything recorded inside it has none. `token_mask` [B, S] is False on padding."""
        residual = hidden_states
        hidden_states, _ = self.self_attn(
            self.input_layernorm(hidden_states),
            position_embeddings=position_embeddings,
            attention_mask=attention_mask,
            cache=cache,
            **kwargs,
        )
        hidden_states = residual + hidden_states
        ffn_input = self.post_attention_layernorm(hidden_states)
        if isinstance(self.mlp, DeepseekMoeSparseBlock):
            ffn_output, router_logits = self.mlp(ffn_input, token_mask)
        else:
            ffn_output, router_logits = self.mlp(ffn_input), None
        return hidden_states + ffn_output, router_logits


class DeepseekMoeSharedHead(nn.Module):
    """The MTP module's final norm (`shared_head.norm`); its `head` is the model's `lm_head`, not a copy."""

    def __init__(self, config: DeepseekMoeConfig) -> None:
        super().__init__()
        self.norm = DeepseekMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class DeepseekMoeMTPLayer(DeepseekMoeDecoderLayer):
    """Multi-token prediction module k (DeepSeek-V3), stored as `model.layers.{num_hidden_layers + k}`.

    h'_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h_i)]) (embedding first, as the official weights are used), then one
    MoE decoder block and `shared_head.norm` before the shared output head. The norm runs inside this forward, like
    every parameter of the module, so that FSDP (which gathers a module's weights around its forward) can shard it.
    Official checkpoints' copies of the embedding and head in this layer are dropped by `load_state_dict`.
    """

    def __init__(self, config: DeepseekMoeConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.enorm = DeepseekMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.hnorm = DeepseekMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.shared_head = DeepseekMoeSharedHead(config)

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        hidden_states: torch.Tensor,
        next_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        token_mask: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h^k from h^{k-1} (positions i) and the embeddings of the tokens k steps ahead (t_{i+k}); returns h^k, its
        router logits and `shared_head.norm(h^k)`, the input of the shared output head."""
        combined = self.eh_proj(torch.cat((self.enorm(next_embeds), self.hnorm(hidden_states)), dim=-1))
        hidden_states, router_logits = super().forward(
            combined,
            attention_mask=attention_mask,
            position_embeddings=position_embeddings,
            cache=cache,
            token_mask=token_mask,
            **kwargs,
        )
        return hidden_states, router_logits, self.shared_head.norm(hidden_states)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        for copy in ("embed_tokens.weight", "shared_head.head.weight"):  # ours share the model's own
            state_dict.pop(prefix + copy, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# ------------------------------------------------------------------------------------------------------- models


def padding_mask(attention_mask: torch.Tensor | None, seq_length: int) -> torch.Tensor | None:
    """[B, S] bool, False on padding, from a 2D attention mask over cached + new positions (None without one)."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    return attention_mask[:, -seq_length:].bool()


class DeepseekMoePreTrainedModel(PreTrainedModel):
    config: DeepseekMoeConfig
    config_class = DeepseekMoeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DeepseekMoeDecoderLayer", "DeepseekMoeMTPLayer"]
    _supports_flash_attn = False
    _supports_sdpa = True
    _supports_flex_attn = False
    _supports_attention_backend = True
    _can_compile_fullgraph = True
    _can_record_outputs = {
        "hidden_states": DeepseekMoeDecoderLayer,
        "attentions": [
            OutputRecorder(DeepseekMoeAttention, index=1),
            OutputRecorder(DeepseekMoeLatentAttention, index=1),
        ],
        "router_logits": OutputRecorder(DeepseekMoeDecoderLayer, index=1),
    }
    _keep_in_fp32_modules_strict = ["e_score_correction_bias", "gate.weight"]
    # Official MTP layers carry copies of the shared embedding and head (`MTP_COPIES`); ours share the model's own.
    _keys_to_ignore_on_load_unexpected = [r"model\.layers\.\d+\.(" + "|".join(map(re.escape, MTP_COPIES)) + ")$"]

    def __init__(self, config: DeepseekMoeConfig, *inputs, **kwargs) -> None:
        # `from_pretrained(path, field=value)` and hand edits set fields after the config checked itself: check
        # again before any weight is allocated.
        config.validate()
        super().__init__(config, *inputs, **kwargs)

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        """Unless the user chose one, run the experts with our Triton kernels (`"deepseek_triton"`, registered by
        `moe_kernels`) where CUDA and triton are present, and keep transformers' default everywhere else. Kept FP8
        experts run `"deepseek_fp8"` (the fused FP8 kernels where they run) or `"eager"` (dequantizing one expert at a
        time)."""
        if keeps_fp8_experts(self.config):
            if requested_experts not in (None, "eager", FP8_EXPERTS_IMPLEMENTATION):
                raise ValueError(
                    f"experts_implementation={requested_experts!r}: this model keeps its experts in FP8, which run "
                    f"{FP8_EXPERTS_IMPLEMENTATION!r} or 'eager'; for others load it with "
                    "DeepseekFp8Config(dequantize=True)"
                )
            return requested_experts or FP8_EXPERTS_IMPLEMENTATION
        if requested_experts is None and kernels_default():
            requested_experts = IMPLEMENTATION_NAME
        return super().get_correct_experts_implementation(requested_experts)

    def save_pretrained(
        self, save_directory: str | os.PathLike, *args, official_format: bool = False, **kwargs
    ) -> None:
        """Saves a folder that loads without this package.

        By default: `model_type` `deepseek_moe` with `auto_map` and the model code beside the weights, so
        `trust_remote_code=True` loads it on a machine without the package. With `official_format=True`: DeepSeek's
        own config.json (`official_config`) and no code of ours, for transformers' built-ins, vLLM and SGLang."""
        if not official_format:
            self.config.auto_map = dict(AUTO_MAP)
        super().save_pretrained(save_directory, *args, **kwargs)
        if not kwargs.get("is_main_process", True):
            return
        directory = Path(save_directory)
        if official_format:
            temporary = directory / "config.json.tmp"
            temporary.write_text(json.dumps(official_config(self.config), indent=2, sort_keys=True) + "\n")
            os.replace(temporary, directory / "config.json")
        else:
            for path in remote_code_files():
                shutil.copyfile(path, directory / path.name)

    def prepack_cpu_weights(self, enabled: bool = True, min_bytes: int = 1 << 20) -> int:
        """Runs every float32 or bfloat16 linear on the CPU with a weight of at least `min_bytes` (and routed experts
        whose `gate_up_proj` per expert is that large) through oneDNN, over copies of the weights packed in oneDNN's
        blocked layout, and has latent attention read copies laid out for its products; returns the bytes the weight
        copies take, beside the weights. `enabled=False` drops them. bfloat16 only where oneDNN supports it
        (`onednn_dtypes`).

        One-token decoding on a CPU reads every weight once per step, and a single-thread GEMV over a plain
        row-major weight streams it at about 60% of the memory bandwidth in fp32 and 40% in bf16 (MKL, or oneDNN
        unpacked); over the packed copy oneDNN reaches 80-90% (`docs/BENCHMARKS.md`). Small weights stay as they
        are: a oneDNN call costs about 8 us more than MKL's, which only a weight of a megabyte or so, read from
        memory, wins back. Experts run the eager loop over their packed copies (`packed_experts_forward`). Latent
        attention absorbs W_UK through a contiguous copy of W_UKᵀ (`absorb_query`), and its `LatentCache` layers keep
        their whole blocks packed too (`packed_blocks`: up to 2.9 times the plain cache). Only inference uses the
        copies (without grad, outside `torch.compile`); the weights themselves are untouched, so saving, training and
        moving the model work as before, and a copy is made again after its weight changes."""
        ours = (packed_linear_forward, packed_experts_forward)
        packable = [
            module
            for module in self.modules()
            if isinstance(module, nn.Linear | DeepseekMoeExperts) and not hasattr(module, "_hf_hook")  # offloaded
        ]
        attentions = [module for module in self.modules() if isinstance(module, DeepseekMoeLatentAttention)]
        for module in packable:
            if getattr(module.__dict__.get("forward"), "__func__", None) in ours:
                del module.forward
            PACKED_WEIGHTS.pop(module, None)
        for attention in attentions:
            attention.cpu_prepacked = False
        if not enabled:
            return 0
        dtypes = onednn_dtypes()
        if not (dtypes and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
            raise RuntimeError("prepack_cpu_weights needs a torch built with oneDNN (mkldnn), which this one is not")

        def served(weight: torch.Tensor) -> bool:
            return weight.device.type == "cpu" and weight.dtype in dtypes

        linears = [m for m in packable if type(m) is nn.Linear and served(m.weight) and m.weight.nbytes >= min_bytes]
        experts = [m for m in packable if isinstance(m, DeepseekMoeExperts) and served(m.gate_up_proj)]
        experts = [m for m in experts if m.gate_up_proj[0].nbytes >= min_bytes]
        if not linears and not experts:
            names = " or ".join(str(dtype).removeprefix("torch.") for dtype in dtypes)
            raise ValueError(
                f"prepack_cpu_weights packs {names} linear weights on the CPU of at least min_bytes={min_bytes}; "
                f"this model has none (its weights are {self.dtype} on {self.device})"
            )
        packed_bytes = 0
        for module in linears:
            weight_copy(module, "onednn", module.weight, onednn_packed)
            module.forward = MethodType(packed_linear_forward, module)
            packed_bytes += module.weight.nbytes
        for module in experts:
            module.packed_experts()
            module.forward = MethodType(packed_experts_forward, module)
            packed_bytes += module.gate_up_proj.nbytes + module.down_proj.nbytes
        for attention in attentions:
            kv_b_proj = attention.kv_b_proj
            if kv_b_proj in packable and served(kv_b_proj.weight):
                attention.cpu_prepacked = True
                packed_bytes += weight_copy(kv_b_proj, "w_uk_t", kv_b_proj.weight, attention.transposed_w_uk).nbytes
        return packed_bytes

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, DeepseekMoeTopkRouter):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.uses_bias_balancing:
                init.zeros_(module.e_score_correction_bias)
        elif isinstance(module, DeepseekMoeExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)


class DeepseekMoeModel(DeepseekMoePreTrainedModel):
    """Embedding, `num_hidden_layers` decoder layers and the final norm. `layers` also holds the MTP modules at
    indices `num_hidden_layers + k`, as in official checkpoints; the main forward pass does not run them."""

    def __init__(self, config: DeepseekMoeConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        main = [DeepseekMoeDecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        mtp = [
            DeepseekMoeMTPLayer(config, config.num_hidden_layers + k) for k in range(config.num_nextn_predict_layers)
        ]
        self.layers = nn.ModuleList(main + mtp)
        self.norm = DeepseekMoeRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = DeepseekMoeRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> MoeModelOutputWithPast:
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if use_cache and cache is None:
            cache = LatentCache() if self.config.uses_mla else DynamicCache(config=self.config)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        past_seen_tokens = cache.get_seq_length() if cache is not None else 0
        # A compiled step skips the check: a static cache's length is a tensor, and branching on it breaks the graph.
        too_long = past_seen_tokens + inputs_embeds.shape[1] > self.config.max_position_embeddings
        if not torch.compiler.is_compiling() and too_long:
            logger.warning_once(
                f"Sequence length {past_seen_tokens + inputs_embeds.shape[1]} exceeds max_position_embeddings="
                f"{self.config.max_position_embeddings}; positions beyond it were never trained and may degrade output"
            )
        if position_ids is None:
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_seen_tokens
            position_ids = position_ids.unsqueeze(0)

        causal_mask = create_causal_mask(
            config=self.config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
        )
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        token_mask = padding_mask(attention_mask, inputs_embeds.shape[1])
        for decoder_layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states, _ = decoder_layer(
                hidden_states,
                attention_mask=causal_mask,
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                token_mask=token_mask,
                **kwargs,
            )
        return MoeModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache)


class DeepseekMoeForCausalLM(DeepseekMoePreTrainedModel, MtpGenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _fsdp_plan = {"lm_head": "keep_full_weight"}  # gathered once with the final norm, as transformers' built-ins do
    _pp_plan = {"lm_head": (["hidden_states"], ["logits"])}

    def __init__(self, config: DeepseekMoeConfig) -> None:
        super().__init__(config)
        self.model = DeepseekMoeModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mla_attention_mode: str | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> DeepseekMoeCausalLMOutputWithPast:
        r"""Balance losses are computed when training or when `output_router_logits` is set, returned as `aux_loss`
        and `aux_losses`, and added to `loss` (if `config.add_aux_loss_to_loss`) with a weight that keeps them one
        mean per optimizer step under gradient accumulation: with Trainer's `num_items_in_batch` the LM loss is a
        sum over the whole accumulation window divided by its label tokens, so the aux term is weighted by this
        micro-batch's share of those tokens; otherwise both terms are per-micro-batch means (weight 1).

        `shift_labels` (labels already shifted left, as Trainer passes them under context parallelism) may replace
        `labels`. `mla_attention_mode` ("absorbed", "expanded" or "auto") overrides the config for this call, also as
        a `generate` option."""
        shift_labels = kwargs.pop("shift_labels", None)
        want_aux = self.training or kwargs.get("output_router_logits", self.config.output_router_logits)
        if want_aux:
            kwargs["output_router_logits"] = True
        outputs: MoeModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **({"mla_attention_mode": mla_attention_mode} if mla_attention_mode else {}),
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        aux_losses, aux_loss = None, None
        if want_aux and outputs.router_logits:
            batch_size, seq_length = hidden_states.shape[:2]
            token_mask = padding_mask(attention_mask, seq_length)
            layers = self.model.layers[: self.config.num_hidden_layers]
            routers = [layer.mlp.gate for layer in layers if isinstance(layer.mlp, DeepseekMoeSparseBlock)]
            aux_losses = {}
            for router, router_logits in zip(routers, outputs.router_logits, strict=True):
                for kind, value in balance_losses(self.config, router, router_logits, batch_size, token_mask).items():
                    aux_losses[kind] = aux_losses[kind] + value if kind in aux_losses else value
            aux_loss = sum(aux_losses.values()) if aux_losses else None
        loss = mtp_loss = None
        if shift_labels is None and labels is not None:
            shift_labels = F.pad(labels[..., 1:], (0, 1), value=-100)  # position i predicts t_{i+1}
        if shift_labels is not None:
            loss = self.loss_function(
                logits=logits, labels=None, shift_labels=shift_labels, vocab_size=self.config.vocab_size, **kwargs
            )
            if aux_loss is not None and self.config.add_aux_loss_to_loss:
                weight = 1.0
                num_items_in_batch = kwargs.get("num_items_in_batch")
                if num_items_in_batch is not None:
                    weight = shift_labels.ne(-100).sum() / num_items_in_batch
                loss = loss + weight * aux_loss
            if self.config.num_nextn_predict_layers > 0 and cache is None:
                embeds = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
                mtp_loss = self.multi_token_prediction_loss(
                    hidden_states, embeds, shift_labels, attention_mask, position_ids, **kwargs
                )
                loss = loss + self.config.mtp_loss_weight * mtp_loss
        return DeepseekMoeCausalLMOutputWithPast(
            loss=loss,
            mtp_loss=mtp_loss,
            aux_loss=aux_loss,
            aux_losses=aux_losses,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
        )

    def save_pretrained(
        self, save_directory: str, is_main_process: bool = True, state_dict: dict | None = None, **kwargs
    ) -> None:
        """Saves the official MTP layout too: every MTP layer with its own copies (`mtp_copies`)."""
        if state_dict is None and self.config.num_nextn_predict_layers > 0:
            state_dict = self.checkpoint_state_dict()
        super().save_pretrained(save_directory, is_main_process=is_main_process, state_dict=state_dict, **kwargs)

    def checkpoint_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict as official checkpoints hold it: every MTP layer with its own copies of the embedding and
        head (the FP8 quantizer saves this one too)."""
        state_dict = self.state_dict()
        for copy, source in mtp_copies(self.config).items():
            state_dict[copy] = state_dict[source].clone()
        return state_dict

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs: dict, generation_mode, batch_size: int, max_cache_length: int
    ) -> None:
        """Where `generate` would make a `DynamicCache` for MLA, make a `LatentCache` sized for the final length
        instead: its rows are written in place, never copied again. Other cache choices are transformers'."""
        default_cache = generation_config.cache_implementation in (None, "dynamic")
        if (
            self.config.uses_mla
            and default_cache
            and model_kwargs.get("cache") is None
            and generation_config.use_cache is not False
            and not generation_config.is_assistant
        ):
            model_kwargs["cache"] = LatentCache(capacity=max_cache_length)
            return
        super()._prepare_cache_for_generation(
            generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
        )

    def mtp_hidden_states(
        self,
        depth: int,
        previous: torch.Tensor,
        next_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor,
        cache: Cache | None = None,
        token_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h^depth over the positions of `previous` (= h^{depth-1}), given the embeddings `depth` tokens ahead, and
        `shared_head.norm(h^depth)`, which the shared output head turns into the logits of the token depth + 1 ahead.

        `attention_mask` is the 2D padding mask over cached + new positions; `cache` holds this depth's keys;
        `token_mask` [B, S] leaves positions out of the expert-load counts."""
        layer = self.model.layers[self.config.num_hidden_layers + depth - 1]
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=next_embeds,
            attention_mask=attention_mask,
            cache=cache,
            position_ids=position_ids,
            layer_idx=layer.self_attn.layer_idx,
        )
        position_embeddings = self.model.rotary_emb(previous, position_ids)
        hidden, _, head_input = layer(
            previous,
            next_embeds,
            attention_mask=mask,
            position_embeddings=position_embeddings,
            cache=cache,
            token_mask=token_mask,
        )
        return hidden, head_input

    def multi_token_prediction_loss(
        self,
        hidden_states: torch.Tensor,
        embeds: torch.Tensor,
        shift_labels: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        **kwargs,
    ) -> torch.Tensor:
        """(1/D) Σ_k CE(depth k predicting t_{i+k+1} at position i), chaining h^k from the main model's output.

        `shift_labels[:, i]` is the target of position i in the main model (t_{i+1}), so depth k's targets are
        `shift_labels[:, k:]`. Depth k sees positions i < T - k (its token t_{i+k} must exist); `ignore_index` labels
        and padding are skipped. With `num_items_in_batch` the loss function divides each depth's sum by it; without,
        each depth is a mean over its own targets, and 0 (with zero gradient) when it has none. In packed rows
        (position ids restarting at each document) no target lies in another document than its position."""
        seq_length = hidden_states.shape[1]
        if position_ids is None:
            position_ids = torch.arange(seq_length, device=hidden_states.device)[None]
        token_mask = padding_mask(attention_mask, seq_length)
        previous, losses = hidden_states, []
        for depth in range(1, self.config.num_nextn_predict_layers + 1):
            length = seq_length - depth
            if length < 1:
                break
            mask = attention_mask[:, :length] if token_mask is not None else None
            # a position is counted in the expert loads when it and the token it reads (t_{i+k}) are not padding
            counted = token_mask[:, :length] & token_mask[:, depth:] if token_mask is not None else None
            previous, head_input = self.mtp_hidden_states(
                depth, previous[:, :length], embeds[:, depth:], mask, position_ids[..., :length], token_mask=counted
            )
            targets = shift_labels[:, depth:].masked_fill(
                ~same_document_ahead(position_ids, depth + 1)[..., :length], -100
            )
            loss_kwargs = dict(kwargs)
            if loss_kwargs.get("num_items_in_batch") is None:
                loss_kwargs["num_items_in_batch"] = targets.ne(-100).sum().clamp(min=1)
            logits = self.lm_head(head_input)
            losses.append(
                self.loss_function(
                    logits=logits, labels=None, vocab_size=self.config.vocab_size, shift_labels=targets, **loss_kwargs
                )
            )
        return torch.stack(losses).mean() if losses else hidden_states.new_zeros(())


def same_document_ahead(position_ids: torch.Tensor, offset: int) -> torch.Tensor:
    """[B, S] bool: whether the token `offset` positions ahead exists and is in the same packed document. Packed rows
    restart their position ids at each document, so inside one document positions are exactly `offset` apart."""
    ahead = position_ids[..., offset:] - position_ids[..., :-offset] == offset
    return F.pad(ahead, (0, offset), value=False)


class DeepseekMoeForSequenceClassification(GenericForSequenceClassification, DeepseekMoePreTrainedModel):
    pass


# -------------------------------------------------------------------------------------------- checkpoint layout


class MergeExperts(ConversionOps):
    """Per-expert projections → one fused [E, n·rows, cols] tensor: experts stacked on dim 0, projections (gate, up)
    concatenated on dim 1. Each expert's weight is copied once, straight into its slot and cast on the way; FP8 ones
    (with a `weight_scale_inv` companion, collected by the FP8 quantizer) are dequantized into it in fp32."""

    def convert(
        self,
        input_dict: dict,
        source_patterns: list[str],
        target_patterns: list[str],
        model: nn.Module | None = None,
        full_layer_name: str | None = None,
        config: DeepseekMoeConfig | None = None,
        **kwargs,
    ) -> dict:
        companions = {p + SCALE_SUFFIX for p in source_patterns}  # kept FP8 merges the scales alone, as plain tensors
        projections = [
            (input_dict[p], input_dict.get(p + SCALE_SUFFIX)) for p in source_patterns if p not in companions
        ]
        first = projections[0][0][0]
        rows, cols = first.shape
        fused = first.new_empty(
            (len(projections[0][0]), len(projections) * rows, cols), dtype=target_dtype(model, full_layer_name, first)
        )
        for index, (weights, scales) in enumerate(projections):
            for expert, weight in enumerate(weights):
                if scales is not None:
                    weight = dequantize_fp8_blockwise(weight, scales[expert], block_size(config))
                fused[expert, index * rows : (index + 1) * rows].copy_(weight)
        return {target_patterns[0]: fused}

    @property
    def reverse_op(self) -> ConversionOps:
        return SplitExperts()


class SplitExperts(ConversionOps):
    """Saving counterpart of `MergeExperts`: the fused tensor back to one plain tensor per expert and projection."""

    def convert(self, input_dict: dict, source_patterns: list[str], target_patterns: list[str], **kwargs) -> dict:
        fused = next(iter(input_dict.values()))
        fused = fused[0] if isinstance(fused, list) else fused
        output = {}
        for pattern, projection in zip(target_patterns, fused.chunk(len(target_patterns), dim=1), strict=True):
            output.update({pattern.replace("*", str(e)): w.contiguous() for e, w in enumerate(projection.unbind(0))})
        return output

    @property
    def reverse_op(self) -> ConversionOps:
        return MergeExperts()


def checkpoint_conversions() -> list[WeightConverter]:
    """On disk: one tensor per expert (`mlp.experts.{e}.{gate,up,down}_proj.weight`), as DeepSeek, transformers'
    built-ins, vLLM and SGLang expect; in memory: fused 3D tensors. FP8 checkpoints add their `weight_scale_inv`
    companions through the quantizer (quantization_deepseek_moe.py), so plain checkpoints load without that path."""
    return [
        WeightConverter(
            source_patterns=["mlp.experts.*.gate_proj.weight", "mlp.experts.*.up_proj.weight"],
            target_patterns="mlp.experts.gate_up_proj",
            operations=[MergeExperts()],
        ),
        WeightConverter(
            source_patterns="mlp.experts.*.down_proj.weight",
            target_patterns="mlp.experts.down_proj",
            operations=[MergeExperts()],
        ),
    ]


# transformers skips conversions for code outside its own package unless they are registered for the model type.
register_checkpoint_conversion_mapping(DeepseekMoeConfig.model_type, checkpoint_conversions(), overwrite=True)
ALL_EXPERTS_FUNCTIONS.register(FP8_EXPERTS_IMPLEMENTATION, fp8_experts_forward)  # kept FP8 experts


__all__ = [
    "DeepseekMoePreTrainedModel",
    "DeepseekMoeModel",
    "DeepseekMoeForCausalLM",
    "DeepseekMoeForSequenceClassification",
]
