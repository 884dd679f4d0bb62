"""DeepSeek-V3's blockwise FP8 training recipe (V3 report §3.3) for our model.

The three GEMMs of every linear layer and of the routed experts take E4M3 inputs scaled by max-abs per block:
- Fprop  Y  = X·Wᵀ : X in 1×128 tiles (per token, 128 input channels), W in 128×128 blocks;
- Dgrad  dX = dY·W : dY in 1×128 tiles (per token, 128 output channels), the same W blocks;
- Wgrad  dW = dYᵀ·X: dY and X in 128×1 tiles (128 tokens, per channel), K being the token dimension.
Scales are amax/448 with amax clamped at 1e-4 (DeepSeek's `act_quant`), optionally rounded up to a power of two
(`ue8m0`). Products accumulate in fp32 with the block scales applied per 128-long K chunk, which is DeepSeek's
promotion of partial sums; master weights stay in the model's (fp32) parameters. The embedding, output head, router,
norms and the attention core stay in high precision.

On CPU the GEMMs are emulated: quantize → dequantize → fp32 matmul, the same bits a block-scaled FP8 GEMM sees, so the
emulation is what the tests check against an fp64 reference. On a GPU with FP8 tensor cores the same GEMMs run in
the Triton block-scaled kernel of `model/fp8_kernels.py` (tested here under the interpreter only).

    model = enable_fp8_training(model, recipe="blockwise", scale_format="ue8m0")
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from ..model.fp8_kernels import block_scaled_gemm, triton_gemm_available, ue8m0_scale
from ..model.quantization_deepseek_moe import dequantize_fp8_blockwise

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
AMAX_FLOOR = 1e-4  # DeepSeek's act_quant clamps amax here, so all-zero tiles get a finite scale
TILE = 128
SCALE_FORMATS = ("fp32", "ue8m0")
RECIPES = ("blockwise",)
EXPERTS_IMPLEMENTATION = "deepseek_fp8_blockwise"


def quantize_blocks(
    x: torch.Tensor, block: tuple[int, int], scale_format: str = "fp32"
) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 values and fp32 dequantization multipliers (amax/448, per `block` of the last two dims).

    Edge blocks are partial: they are zero-padded for their amax, which zeros do not change."""
    rows, cols = x.shape[-2:]
    grid = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    padded = F.pad(x.float(), (0, grid[1] * block[1] - cols, 0, grid[0] * block[0] - rows))
    blocks = padded.unflatten(-1, (grid[1], block[1])).unflatten(-3, (grid[0], block[0]))  # [..., gr, br, gc, bc]
    scale = blocks.abs().amax(dim=(-3, -1)).clamp(min=AMAX_FLOOR) / E4M3_MAX
    if scale_format == "ue8m0":
        scale = ue8m0_scale(scale)
    quantized = (blocks / scale[..., :, None, :, None]).to(E4M3).flatten(-4, -3).flatten(-2, -1)
    return quantized[..., :rows, :cols], scale


def fake_quantize(x: torch.Tensor, block: tuple[int, int], scale_format: str) -> torch.Tensor:
    """What an FP8 GEMM sees of `x`: quantized per block and dequantized, in fp32."""
    return dequantize_fp8_blockwise(*quantize_blocks(x, block, scale_format), block)


ACTIVATION_TILE = (1, TILE)  # per token, 128 channels along K
WEIGHT_BLOCK = (TILE, TILE)
BACKENDS = ("auto", "emulated", "triton")


def scaled_gemm(
    a: torch.Tensor, b: torch.Tensor, b_block: tuple[int, int], scale_format: str, backend: str = "auto"
) -> torch.Tensor:
    """A·Bᵀ in fp32 from E4M3 operands: A in 1×128 tiles along K, B in `b_block` blocks (128×128 for weights,
    1×128 for token-tiled operands). `auto` takes the Triton kernel on an FP8-capable GPU, else emulates."""
    use_kernel = backend == "triton" or (backend == "auto" and triton_gemm_available(a))
    if use_kernel:
        (a_q, a_scale), (b_q, b_scale) = (
            quantize_blocks(a, ACTIVATION_TILE, scale_format),
            quantize_blocks(b, b_block, scale_format),
        )
        return block_scaled_gemm(a_q, a_scale, b_q, b_scale, b_rows=b_block[0])
    return fake_quantize(a, ACTIVATION_TILE, scale_format) @ fake_quantize(b, b_block, scale_format).T


class _BlockwiseFp8Linear(torch.autograd.Function):
    """Y = X·Wᵀ with Fprop, Dgrad and Wgrad on blockwise-quantized E4M3 inputs, fp32 accumulation. Wgrad's K is the
    token dimension, so both of its operands are tiled along tokens (128×1 tiles of dY and X)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, scale_format: str, backend: str) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.scale_format, ctx.backend = scale_format, backend
        return scaled_gemm(x, weight, WEIGHT_BLOCK, scale_format, backend).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = scaled_gemm(grad_output, weight.T, WEIGHT_BLOCK, ctx.scale_format, ctx.backend).to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_weight = scaled_gemm(grad_output.T, x.T, ACTIVATION_TILE, ctx.scale_format, ctx.backend)
            grad_weight = grad_weight.to(weight.dtype)
        return grad_x, grad_weight, None, None


def fp8_linear(
    x: torch.Tensor, weight: torch.Tensor, scale_format: str = "fp32", backend: str = "auto"
) -> torch.Tensor:
    """`F.linear(x, weight)` (no bias) with the three GEMMs in blockwise FP8; any leading dims of `x`."""
    if backend not in BACKENDS:
        raise ValueError(f"fp8_linear: backend must be one of {BACKENDS}, got {backend!r}")
    out = _BlockwiseFp8Linear.apply(x.reshape(-1, x.shape[-1]), weight, scale_format, backend)
    return out.view(*x.shape[:-1], weight.shape[0])


class Fp8BlockwiseLinear(nn.Linear):
    """An `nn.Linear` (same parameters, same state dict) whose GEMMs run in blockwise FP8; the bias is added in high
    precision."""

    scale_format: str = "fp32"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = fp8_linear(x, self.weight, self.scale_format)
        return out if self.bias is None else out + self.bias


def fp8_grouped_linear(
    x: torch.Tensor, weight: torch.Tensor, counts: list[int], scale_format: str = "fp32", backend: str = "auto"
) -> torch.Tensor:
    """Grouped GEMM of rows sorted by group: rows `counts[g]` of `x` times `weight[g]ᵀ` ([G, N, K]), each group in
    blockwise FP8 on its own (activation tiles never straddle two groups). Empty groups cost nothing."""
    outputs = [
        fp8_linear(rows, w, scale_format, backend)
        for rows, w in zip(x.split(counts), weight.unbind(0), strict=True)
        if rows.shape[0]
    ]
    return torch.cat(outputs) if outputs else x.new_zeros(0, weight.shape[1])


def fp8_experts_forward(
    experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """Routed experts (an `ExpertsInterface` implementation) on grouped blockwise-FP8 GEMMs: the (token, slot) pairs
    sorted by expert, SwiGLU between the two grouped GEMMs in high precision."""
    scale_format = experts.fp8_scale_format
    top_k = top_k_index.shape[-1]
    flat_experts = top_k_index.reshape(-1)
    order = flat_experts.argsort(stable=True)
    token_of_slot = order // top_k
    counts = torch.bincount(flat_experts, minlength=experts.num_experts).tolist()
    gate, up = fp8_grouped_linear(hidden_states[token_of_slot], experts.gate_up_proj, counts, scale_format).chunk(
        2, dim=-1
    )
    routed = fp8_grouped_linear(experts.act_fn(gate) * up, experts.down_proj, counts, scale_format)
    routed = routed * top_k_weights.reshape(-1)[order, None]
    return torch.zeros_like(hidden_states).index_add_(0, token_of_slot, routed.to(hidden_states.dtype))


def _high_precision(name: str) -> bool:
    """The output head (and MTP's shared head) stays out of FP8, as in DeepSeek's recipe."""
    return name == "lm_head" or name.endswith(("shared_head.head", "score"))


def enable_fp8_training(model: nn.Module, recipe: str = "blockwise", scale_format: str = "fp32") -> nn.Module:
    """Switch a DeepseekMoe model's linear layers and routed experts to blockwise FP8 GEMMs, in place; returns it.

    Parameters are untouched (fp32 masters stay fp32; checkpoints save as before). Works from a hand-written loop or
    Trainer alike, since only the forward/backward arithmetic changes."""
    if recipe not in RECIPES:
        raise ValueError(f"enable_fp8_training: recipe must be one of {RECIPES}, got {recipe!r}")
    if scale_format not in SCALE_FORMATS:
        raise ValueError(f"enable_fp8_training: scale_format must be one of {SCALE_FORMATS}, got {scale_format!r}")
    for name, module in model.named_modules():
        if type(module) is nn.Linear and not _high_precision(name):
            module.__class__ = Fp8BlockwiseLinear
        if isinstance(module, Fp8BlockwiseLinear):
            module.scale_format = scale_format
        elif hasattr(module, "gate_up_proj") and hasattr(module, "down_proj"):  # fused routed experts
            module.fp8_scale_format = scale_format
    ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, fp8_experts_forward)
    model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    return model


__all__ = [
    "Fp8BlockwiseLinear",
    "enable_fp8_training",
    "fp8_experts_forward",
    "fp8_grouped_linear",
    "fp8_linear",
    "quantize_blocks",
]
