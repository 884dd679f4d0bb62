"""FP8 inference kernels (`model/fp8_kernels.py`, `moe_kernels.fused_experts_fp8`) against independent PyTorch and
fp64 references: DeepSeek's activation quantization bit for bit, the block-scaled GEMM within fp32 accumulation
error of the exact product of its E4M3 inputs, and within E4M3's bound of the unquantized product. Without a GPU,
conftest puts triton in its CPU interpreter (`TRITON_INTERPRET=1`), so shapes are small."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from deepseek_moe.model import fp8_kernels, moe_kernels  # noqa: E402
from deepseek_moe.model.fp8_kernels import act_quant, fp8_gemm_runs_on, fp8_linear  # noqa: E402
from deepseek_moe.training.fp8 import quantize_blocks  # noqa: E402

E4M3 = torch.float8_e4m3fn
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not fp8_gemm_runs_on(DEVICE), reason="needs an FP8 GPU or TRITON_INTERPRET=1")
# fp32 accumulation slack per unit of Σ|a·b|: (128 terms per chunk + chunks + scaling) roundings of 2⁻²⁴ in the
# interpreter. On a GPU the FP8 tensor cores keep only about 14 bits while they sum a 128-chunk (DeepSeek's H800
# measurement, which the per-chunk promotion bounds): 2⁻⁸ there, a margin over typical √128·2⁻¹⁴ ≈ 2⁻¹⁰·⁵ (not
# calibrated on hardware yet).
ACCUMULATION = 2**-24 * 140 if DEVICE == "cpu" else 2**-8
# The fused experts against the fp64 loop, relative Frobenius error overall and per token: on a GPU the gate/up sums
# differ from fp64 by that accumulation error, which moves a few percent of h's E4M3 roundings by one step.
EXPERTS_TOLERANCE = {"cpu": (1e-3, 1e-2), "cuda": (2e-2, 5e-2)}[DEVICE]


def reference_act_quant(x: torch.Tensor, ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's `act_quant` (inference/kernel.py) tile by tile: amax of the 1×128 tile (here possibly partial)
    clamped at 1e-4, s = amax / 448 in fp32, for ue8m0 2^ceil(log2 s), q = e4m3(x / s) (round to nearest even).

    `act_quant` was checked once (not at test time: GitHub is unreachable here) against DeepSeek's own kernel
    (deepseek-ai/DeepSeek-V3 `inference/kernel.py` at 9b4e978) under TRITON_INTERPRET=1, 64×512 inputs over nine
    decades, both scale formats, three seeds: scales bit-exact; E4M3 bytes equal to torch's cast of DeepSeek's own
    quotient x / s everywhere, and to DeepSeek's kernel output except where the interpreter's fp32→fp8 cast drops
    the carry (about 2% of values, e.g. 7.756 → 4.0 instead of 8.0). These are the conventions of
    `reference_quantize` in test_fp8_training.py, checked the same way; ceil(log2 s) is taken in float64 here,
    exact for any fp32 s."""
    rows = x.reshape(-1, x.shape[-1]).float().cpu()
    k_tiles = math.ceil(rows.shape[1] / 128)
    quantized, scale = torch.empty(rows.shape, dtype=E4M3), torch.empty(rows.shape[0], k_tiles)
    for i, row in enumerate(rows):
        for j in range(k_tiles):
            tile = row[j * 128 : (j + 1) * 128]
            s = torch.clamp(tile.abs().max(), min=1e-4) / torch.tensor(448.0)
            if ue8m0:
                s = torch.tensor(2.0 ** math.ceil(math.log2(s.item())))
            scale[i, j] = s
            quantized[i, j * 128 : (j + 1) * 128] = (tile / s).to(E4M3)
    return quantized.view(x.shape), scale.view(*x.shape[:-1], k_tiles)


def reference_weight_quant(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Official checkpoints' weights: E4M3 per 128×128 block, s = amax / 448 (the stored `weight_scale_inv`)."""
    n, k = w.shape
    grid = (math.ceil(n / 128), math.ceil(k / 128))
    quantized, scale = torch.empty(n, k, dtype=E4M3), torch.empty(grid)
    for i in range(grid[0]):
        for j in range(grid[1]):
            block = (slice(i * 128, (i + 1) * 128), slice(j * 128, (j + 1) * 128))
            scale[i, j] = w[block].abs().max().clamp(min=1e-4).float() / 448.0
            quantized[block] = (w[block].float() / scale[i, j]).to(E4M3)
    return quantized, scale


def dequantize64(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """fp64 q·s with s expanded over its block (edge blocks partial)."""
    rows, cols = q.shape[-2:]
    expanded = scale.double().repeat_interleave(block[0], -2)[..., :rows, :].repeat_interleave(block[1], -1)
    return q.double() * expanded[..., :cols]


def _activations(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Normal values over 9 decades across rows, an all-zero tile start, a negative zero."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator)
    x = x * torch.logspace(-6, 3, x.shape[-2])[:, None]
    x[..., 0, :] = 0
    x[..., -1, 0] = -0.0
    return x


@pytest.mark.parametrize("ue8m0", [False, True], ids=["fp32-scales", "ue8m0"])
@pytest.mark.parametrize("shape", [(7, 384), (5, 200), (2, 3, 130), (4, 17)], ids=str)
def test_act_quant_is_bit_exact_to_deepseeks_act_quant(shape, ue8m0):
    """Triton kernel and PyTorch fallback, full and partial last tiles, any leading dims."""
    x = _activations(shape, seed=0)
    expected_q, expected_s = reference_act_quant(x, ue8m0)
    scale_fmt = "ue8m0" if ue8m0 else None
    results = {
        "triton": act_quant(x.to(DEVICE), scale_fmt=scale_fmt),
        "pytorch": fp8_kernels._act_quant_torch(x, 128, ue8m0),
    }
    for name, (quantized, scale) in results.items():
        assert quantized.dtype == E4M3 and scale.dtype == torch.float32, name
        assert quantized.shape == x.shape and scale.shape == expected_s.shape, name
        assert torch.equal(scale.cpu(), expected_s), name
        assert torch.equal(quantized.cpu().view(torch.uint8), expected_q.view(torch.uint8)), name
    if ue8m0:
        assert torch.equal(torch.exp2(torch.log2(expected_s).round()), expected_s)


def test_act_quant_rounds_scales_and_ties_like_deepseek():
    """Scales at and one ulp above a power of two (ue8m0 keeps the first, doubles the second); quotients exactly
    halfway between two E4M3 values round to even, including the carry into the next binade (15.5 → 16) and
    subnormal ties; input in bf16, and a non-contiguous view."""
    power = 448.0 * 2.0**-3
    above = torch.nextafter(torch.tensor(power), torch.tensor(math.inf)).item()
    x = torch.zeros(3, 256)
    x[0, 0], x[1, 0] = power, above
    x[2, 0] = 448.0  # s = 1: the quotients are the values themselves
    x[2, 1:9] = torch.tensor([15.5, 14.5, 13.0 + 0.5, 1.0625, 1.1875, 2.0**-9 * 1.5, 2.0**-9 * 3.5, -(2.0**-10)])
    x[:, 128:] = torch.linspace(-3, 3, 128)
    for scale_fmt in (None, "ue8m0"):
        quantized, scale = act_quant(x.to(DEVICE), scale_fmt=scale_fmt)
        expected_q, expected_s = reference_act_quant(x, scale_fmt == "ue8m0")
        assert torch.equal(scale.cpu(), expected_s)
        assert torch.equal(quantized.cpu().view(torch.uint8), expected_q.view(torch.uint8))
    assert scale[0, 0] == 2.0**-3 and scale[1, 0] == 2.0**-2  # the ue8m0 run
    expected_row = [448.0, 16.0, 14.0, 14.0, 1.0, 1.25, 2.0**-8, 2.0**-7, -0.0]
    assert quantized[2, :9].float().cpu().tolist() == expected_row
    strided = _activations((4, 2 * 200), seed=5)[:, ::2].bfloat16()
    for result, expected in zip(act_quant(strided.to(DEVICE)), reference_act_quant(strided, False), strict=True):
        assert torch.equal(result.cpu().view(torch.uint8), expected.view(torch.uint8))


def _scales_at_powers_of_two(exponents: range) -> torch.Tensor:
    """Rows of one 1×128 tile each whose scale amax / 448 is exactly 2^k, then one ulp above 2^k (amax the next fp32
    after 448·2^k), for each k: the edges where ue8m0's rounding up to a power of two keeps or doubles the scale."""
    rows = []
    for k in exponents:
        power = torch.tensor(448.0 * 2.0**k)
        for amax in (power, torch.nextafter(power, torch.tensor(math.inf))):
            row = torch.linspace(-1, 1, 128) * amax * 0.99
            row[5] = -amax
            rows.append(row)
    return torch.stack(rows)


def test_act_quant_follows_the_training_recipes_convention():
    """The training recipe's `quantize_blocks` with 1×128 tiles quantizes the same way as both act_quant paths and
    the reference (bits and scales), also at scales of exactly and one ulp above 2^k, for k from the smallest the 1e-4
    amax floor allows (−22) to 19, where ue8m0 keeps, then doubles the scale."""
    exponents = range(-22, 20)
    edges = _scales_at_powers_of_two(exponents)
    powers = torch.tensor([[2.0**k, 2.0 ** (k + 1)] for k in exponents])
    assert torch.equal(reference_act_quant(edges, ue8m0=True)[1].view(-1, 2), powers)
    for x in (_activations((9, 300), seed=1), edges):
        for scale_fmt, training_format in ((None, "fp32"), ("ue8m0", "ue8m0")):
            training_q, training_s = quantize_blocks(x, (1, 128), training_format)
            expected_q, expected_s = reference_act_quant(x, scale_fmt == "ue8m0")
            assert torch.equal(training_s, expected_s), training_format
            assert torch.equal(training_q.view(torch.uint8), expected_q.view(torch.uint8)), training_format
            for quantized, scale in (
                act_quant(x.to(DEVICE), scale_fmt=scale_fmt),
                fp8_kernels._act_quant_torch(x, 128, scale_fmt == "ue8m0"),
            ):
                assert torch.equal(scale.cpu(), training_s)
                assert torch.equal(quantized.cpu().view(torch.uint8), training_q.view(torch.uint8))


def test_bad_arguments_get_clear_errors():
    weight, scale = torch.zeros(256, 128, dtype=E4M3), torch.ones(2, 1)
    with pytest.raises(ValueError, match="scale_fmt"):
        act_quant(torch.ones(2, 128), scale_fmt="e8m0")
    with pytest.raises(ValueError, match="weight_scale_inv must have shape"):
        fp8_linear(torch.ones(2, 128), weight, torch.ones(2, 2))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_linear(torch.ones(2, 128), weight.float(), scale)
    with pytest.raises(ValueError, match="features"):
        fp8_linear(torch.ones(2, 64), weight, scale)


def _fp8_weight(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random weight (fp32), its E4M3 blocks and `weight_scale_inv`, with block scales over two decades."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=generator) / k**0.5
    weight = weight * torch.logspace(-1, 1, n)[:, None]
    return weight, *reference_weight_quant(weight)


@pytest.mark.parametrize("m, n, k", [(37, 200, 200), (1, 128, 384), (70, 136, 100)], ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_fp8_linear_equals_the_exact_product_of_its_fp8_inputs(m, n, k, with_bias):
    """Partial blocks in M, N and K: the kernel's result against the fp64 product of the same dequantized E4M3
    operands (x quantized by the reference act_quant), up to fp32 accumulation error."""
    x = _activations((m, k), seed=2) if m > 1 else torch.randn(m, k)
    weight, weight_q, weight_scale = _fp8_weight(n, k, seed=3)
    bias = torch.randn(n, generator=torch.Generator().manual_seed(4)) if with_bias else None
    y = fp8_linear(
        x.to(DEVICE), weight_q.to(DEVICE), weight_scale.to(DEVICE), None if bias is None else bias.to(DEVICE)
    )
    assert y.dtype == torch.float32 and y.shape == (m, n)
    x_q, x_scale = reference_act_quant(x, ue8m0=False)
    a, b = dequantize64(x_q, x_scale, (1, 128)), dequantize64(weight_q, weight_scale, (128, 128))
    exact = a @ b.T + (0 if bias is None else bias.double())
    bound = ACCUMULATION * (a.abs() @ b.abs().T) + 2**-23 * exact.abs() + 1e-30
    error = (y.cpu().double() - exact).abs()
    assert (error <= bound).all(), (error / bound).max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"], ids=["fp32-scales", "ue8m0"])
def test_fp8_linear_within_e4m3_error_of_the_unquantized_product(scale_fmt, dtype):
    """End to end from unquantized x and W (3D x, partial blocks). Every E4M3 rounding changes a value by at most
    half a step, 2⁻⁴ of its magnitude (2⁻¹⁰·s below the smallest normal, 2⁻⁶·s), so elementwise
    |ΔY| ≤ |ΔX|·|W|ᵀ + |X|·|ΔW|ᵀ + |ΔX|·|ΔW|ᵀ with |ΔX| ≤ max(2⁻⁴|X|, 2⁻¹⁰ s_x) (ue8m0 scales are at most twice as
    large, so its subnormal floor doubles) and likewise for W — about 2·2⁻⁴ of |X|·|W|ᵀ in the worst case;
    plus the output dtype's rounding. In norm, independent roundings average out: two roundings of relative RMS
    2⁻³/√12 / E[mantissa] ≈ 2.6% each give about 3.7% relative Frobenius error, checked against 2⁻⁴ (≈ 6.3%)."""
    x = torch.randn(2, 19, 200, generator=torch.Generator().manual_seed(6))
    weight, weight_q, weight_scale = _fp8_weight(136, 200, seed=7)
    y = fp8_linear(x.to(DEVICE, dtype), weight_q.to(DEVICE), weight_scale.to(DEVICE), scale_fmt=scale_fmt)
    assert y.dtype == dtype and y.shape == (2, 19, 136)
    x64 = x.to(dtype).double().reshape(-1, 200)
    exact = x64 @ weight.double().T
    floor = 2 ** (-10 + (scale_fmt == "ue8m0"))
    x_scale = reference_act_quant(x64.float(), scale_fmt == "ue8m0")[1].repeat_interleave(128, -1)[:, :200]
    w_scale = weight_scale.repeat_interleave(128, 0)[:136].repeat_interleave(128, 1)[:, :200]
    dx = torch.maximum(x64.abs() * 2**-4, x_scale.double() * floor)
    dw = torch.maximum(weight.double().abs() * 2**-4, w_scale.double() * 2**-10)
    magnitude = x64.abs() @ weight.double().abs().T
    output_rounding = 2**-24 if dtype == torch.float32 else 2**-8
    bound = dx @ weight.double().abs().T + x64.abs() @ dw.T + dx @ dw.T + (ACCUMULATION + output_rounding) * magnitude
    error = (y.cpu().double().reshape(-1, 136) - exact).abs()
    assert (error <= bound).all(), (error / bound).max()
    assert error.norm() <= 2**-4 * exact.norm()
    assert error.max() > 1e-3 * exact.abs().max()  # the inputs really were rounded to E4M3


def test_empty_batches_pass_through():
    weight, weight_q, weight_scale = _fp8_weight(136, 200, seed=9)
    for shape in ((0, 200), (2, 0, 200)):
        x = torch.randn(shape, device=DEVICE)
        assert fp8_linear(x, weight_q.to(DEVICE), weight_scale.to(DEVICE)).shape == (*shape[:-1], 136)
        quantized, scale = act_quant(x)
        assert quantized.shape == shape and scale.shape == (*shape[:-1], 2)
    experts = [t.to(DEVICE) for t in _fp8_experts(4, 256, 128, seed=0)]
    empty = torch.zeros(0, 256, device=DEVICE)
    index, routing = torch.zeros(0, 2, dtype=torch.long, device=DEVICE), torch.zeros(0, 2, device=DEVICE)
    assert moe_kernels.fused_experts_fp8(empty, index, routing, *experts).shape == (0, 256)


def test_fp8_linear_falls_back_to_dequantized_weights_where_triton_cannot_run(monkeypatch):
    """Outside the Triton path: W dequantized in fp32 and F.linear (the activations stay unquantized)."""
    monkeypatch.setattr(fp8_kernels, "fp8_gemm_runs_on", lambda device: False)
    x = torch.randn(3, 200, generator=torch.Generator().manual_seed(8))
    weight, weight_q, weight_scale = _fp8_weight(136, 200, seed=9)
    bias = torch.randn(136)
    y = fp8_linear(x.bfloat16(), weight_q, weight_scale, bias)
    expected = x.bfloat16().double() @ dequantize64(weight_q, weight_scale, (128, 128)).T + bias.double()
    assert y.dtype == torch.bfloat16
    assert (y.double() - expected).abs().max() <= 2**-7 * expected.abs().max()


def _fp8_experts(num_experts: int, hidden: int, inter: int, seed: int) -> list[torch.Tensor]:
    """Random E4M3 expert weights with their block scales (spread over two decades, so a scale read from the wrong
    block shows): gate_up [E, 2I, H] (gate rows, then up), its scales, down [E, H, I], its scales."""
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for rows, cols in ((2 * inter, hidden), (hidden, inter)):
        values = (torch.randn(num_experts, rows, cols, generator=generator) * 100).clamp(-448, 448).to(E4M3)
        grid = (num_experts, math.ceil(rows / 128), math.ceil(cols / 128))
        scale = torch.exp(torch.rand(grid, generator=generator) * math.log(100)) / (100 * 448 * cols**0.5)
        tensors += [values, scale]
    return tensors


def _routing(num_tokens: int, num_experts: int, top_k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct experts per token, skewed popularity, the last expert never chosen; token 0's slots and token 2's
    last slot are routed to no expert (id E, the expert-parallel sentinel) when there are enough tokens."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randn(num_tokens, num_experts, generator=generator) + torch.linspace(2, 0, num_experts)
    scores[:, -1] = -math.inf
    weights, index = scores.softmax(-1).topk(top_k)
    if num_tokens >= 3:
        index[0], index[2, -1] = num_experts, num_experts
    return index, weights


def reference_fp8_experts(x, index, weights, gate_up, gate_up_scale, down, down_scale, ue8m0):
    """Token by token over its selected experts in fp64: x quantized per 1×128 tile, E4M3 weights dequantized,
    h = silu(gate)·up quantized per 1×128 tile from its fp32 value (as the kernel holds it), the down projection,
    the routing weight; also the same sum with h left unquantized (to show the h quantization is there)."""
    num_experts = gate_up.shape[0]
    x_q, x_scale = reference_act_quant(x, ue8m0)
    x64 = dequantize64(x_q, x_scale, (1, 128))
    out, out_unquantized_h = torch.zeros(x.shape, dtype=torch.float64), torch.zeros(x.shape, dtype=torch.float64)
    for token, (experts, token_weights) in enumerate(zip(index.tolist(), weights.double(), strict=True)):
        for expert, weight in zip(experts, token_weights, strict=True):
            if expert >= num_experts:
                continue
            gate, up = (dequantize64(gate_up[expert], gate_up_scale[expert], (128, 128)) @ x64[token]).chunk(2)
            h = torch.nn.functional.silu(gate) * up
            h_q, h_scale = reference_act_quant(h.float()[None], ue8m0)
            w_down = dequantize64(down[expert], down_scale[expert], (128, 128))
            out[token] += weight * w_down @ dequantize64(h_q, h_scale, (1, 128))[0]
            out_unquantized_h[token] += weight * w_down @ h
    return out, out_unquantized_h


@pytest.mark.parametrize("inter", [128, 256])
@pytest.mark.parametrize("hidden", [256, 200], ids=["H256", "H200-partial"])
@pytest.mark.parametrize("num_tokens", [1, 5, 37])
def test_fused_experts_fp8_against_a_token_by_token_fp64_loop(num_tokens, hidden, inter):
    """E=8, top-2: skewed routing with an expert that gets no token, slots and a whole token routed to no expert.
    The kernels and the reference see the same E4M3 bits except h, which each computes from its own gate/up sums
    (fp32 in the kernel), so an h value on an E4M3 rounding boundary may round one step apart: the error is checked
    in norm (at most 1e-3 in the interpreter, twenty times below what dropping the h quantization changes) and per
    token."""
    num_experts, top_k = 8, 2
    x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(10))
    weights_fp8 = _fp8_experts(num_experts, hidden, inter, seed=11)
    index, routing = _routing(num_tokens, num_experts, top_k, seed=12)
    out = moe_kernels.fused_experts_fp8(
        x.to(DEVICE), index.to(DEVICE), routing.to(DEVICE), *(t.to(DEVICE) for t in weights_fp8)
    )
    assert out.dtype == torch.float32 and out.shape == x.shape
    expected, unquantized_h = reference_fp8_experts(x, index, routing, *weights_fp8, ue8m0=False)
    error = out.cpu().double() - expected
    overall, per_token = EXPERTS_TOLERANCE
    assert error.norm() <= overall * expected.norm(), error.norm() / expected.norm()
    assert (error.norm(dim=1) <= per_token * expected.norm(dim=1) + 1e-30).all()
    if num_tokens >= 3:
        assert torch.equal(out[0].cpu(), torch.zeros(hidden))  # routed to no expert
    assert (unquantized_h - expected).norm() >= 1e-2 * expected.norm()


@pytest.mark.parametrize("dtype, scale_fmt", [(torch.bfloat16, None), (torch.float32, "ue8m0")], ids=str)
def test_fused_experts_fp8_bf16_and_ue8m0_scales(dtype, scale_fmt):
    """bf16 activations (the result rounded once per slot and once after the sum: a few 2⁻⁸ ulps) and power-of-two
    scales for both activation quantizations."""
    x = torch.randn(21, 256, generator=torch.Generator().manual_seed(13)).to(dtype)
    weights_fp8 = _fp8_experts(8, 256, 128, seed=14)
    index, routing = _routing(21, 8, 2, seed=15)
    out = moe_kernels.fused_experts_fp8(
        x.to(DEVICE),
        index.to(DEVICE),
        routing.to(DEVICE, dtype),
        *(t.to(DEVICE) for t in weights_fp8),
        scale_fmt=scale_fmt,
    )
    assert out.dtype == dtype
    expected, unquantized_h = reference_fp8_experts(
        x.float(), index, routing.to(dtype), *weights_fp8, ue8m0=scale_fmt == "ue8m0"
    )
    tolerance = max(EXPERTS_TOLERANCE[0], 0 if dtype == torch.float32 else 2**-7)
    assert (out.cpu().double() - expected).norm() <= tolerance * expected.norm()
    if dtype == torch.float32:
        assert (unquantized_h - expected).norm() >= 1e-2 * expected.norm()


def test_fused_experts_fp8_rejects_what_it_cannot_run():
    x, index, routing = torch.randn(3, 256), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2)
    gate_up, gate_up_scale, down, down_scale = _fp8_experts(4, 256, 100, seed=0)
    with pytest.raises(ValueError, match="multiple of 128.*got 100"):
        moe_kernels.fused_experts_fp8(x, index, routing, gate_up, gate_up_scale, down, down_scale)
    gate_up, gate_up_scale, down, down_scale = _fp8_experts(4, 256, 128, seed=0)
    with pytest.raises(ValueError, match="act='silu'"):
        moe_kernels.fused_experts_fp8(x, index, routing, gate_up, gate_up_scale, down, down_scale, act="gelu")
    with pytest.raises(ValueError, match="down_proj_scale_inv must have shape"):
        moe_kernels.fused_experts_fp8(x, index, routing, gate_up, gate_up_scale, down, down_scale[:, :1])
    with pytest.raises(ValueError, match="gate_up_proj must be float8_e4m3fn"):
        moe_kernels.fused_experts_fp8(x, index, routing, gate_up.float(), gate_up_scale, down, down_scale)
    with pytest.raises(ValueError, match="H = 200"):
        moe_kernels.fused_experts_fp8(x[:, :200], index, routing, gate_up, gate_up_scale, down, down_scale)


@pytest.mark.parametrize(
    "arguments",
    [
        pytest.param(["--quick", "90", "bf16"], id="sm90-bf16-one-variant-each"),
        pytest.param(["90", "bf16", "89", "fp16"], id="all-variants", marks=pytest.mark.slow),
    ],
)
def test_fp8_kernels_compile_for_fp8_gpus(arguments, tmp_path):
    """Triton's GPU pipeline (down to a cubin) accepts the FP8 kernels, which the interpreter cannot tell (it runs
    kernels the GPU compiler rejects); no GPU needed. Runs outside the interpreter, in a subprocess."""
    script = Path(__file__).with_name("fp8_kernels_aot_compile.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    package_root = str(Path(fp8_kernels.__file__).resolve().parents[2])
    env.update(PYTHONPATH=os.pathsep.join([package_root, str(script.parent)]), TRITON_CACHE_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, str(script), *arguments], env=env, capture_output=True)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
