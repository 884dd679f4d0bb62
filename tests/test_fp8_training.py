"""Blockwise FP8 training (DeepSeek-V3's recipe) emulated on CPU: quantization bits, GEMM error bounds against fp64,
and a tiny V3 model whose loss tracks the bf16 run."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import randomize_

from deepseek_moe import DeepseekMoeConfig, DeepseekMoeForCausalLM
from deepseek_moe.model import fp8_kernels
from deepseek_moe.training.fp8 import (
    Fp8BlockwiseLinear,
    enable_fp8_training,
    fp8_grouped_linear,
    fp8_linear,
    quantize_blocks,
)

E4M3 = torch.float8_e4m3fn
# The Triton kernel runs here under the CPU interpreter (conftest sets TRITON_INTERPRET=1 without a GPU): not on a GPU.
BACKENDS = [
    "emulated",
    pytest.param(
        "triton",
        marks=pytest.mark.skipif(
            fp8_kernels.triton is None or not fp8_kernels.INTERPRET, reason="needs triton's CPU interpreter"
        ),
    ),
]


def reference_quantize(x: torch.Tensor, block: tuple[int, int], ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's `act_quant`/`weight_quant` conventions written as a plain loop over blocks: amax clamped at 1e-4,
    s = amax / 448 (rounded up to a power of two for ue8m0), q = e4m3(x / s) with round-to-nearest-even.

    Checked once (not at test time: GitHub is unreachable here) against `inference/kernel.py` of deepseek-ai/DeepSeek-V3
    at adecc0e (`act_quant` for 1x128 tiles, both scale formats, an all-zero tile; `weight_dequant` with partial
    edge blocks 200x136 and 576x1024) under TRITON_INTERPRET=1: scales bit-exact, dequantization bit-exact, E4M3
    bytes equal except where the Triton *interpreter's* fp32→e4m3 cast drops the carry when a value rounds up to the
    next power of two (e.g. 1.9438 → 1.0 instead of 2.0; torch and the hardware give 2.0) — there the bytes equal
    torch's cast of the kernel's own quotient x / s."""
    rows, cols = x.shape
    grid = (math.ceil(rows / block[0]), math.ceil(cols / block[1]))
    quantized, scale = torch.empty(rows, cols, dtype=E4M3), torch.empty(grid)
    for i in range(grid[0]):
        for j in range(grid[1]):
            tile = (slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1]))
            s = max(x[tile].abs().max().item(), 1e-4) / 448.0
            s = 2.0 ** math.ceil(math.log2(s)) if ue8m0 else s
            scale[i, j] = s
            quantized[tile] = (x[tile].float() / scale[i, j]).to(E4M3)
    return quantized, scale


def smallest_power_of_two_at_least(s: float) -> float:
    """The definition of ue8m0's scale, by search: the smallest 2^k with 2^k ≥ s."""
    k = 0
    while 2.0**k < s:
        k += 1
    while 2.0 ** (k - 1) >= s:
        k -= 1
    return 2.0**k


def test_ue8m0_scale_is_the_smallest_power_of_two_not_below_the_scale():
    """DeepSeek's s = 2^ceil(log2 s) taken exactly, for every fp32 power of two (subnormal ones too), one ulp above
    (2^k·(1 + 2⁻²³) for normal ones) and one ulp below it, and a few subnormals between powers. A float log2, as
    `quantize_blocks` had, keeps 2^k for scales one ulp above 2^k at most exponents (k ≤ −5 and k ≥ 4)."""
    powers = torch.tensor([2.0**k for k in range(-149, 127)])
    scales = torch.cat(
        [
            powers,
            torch.nextafter(powers, torch.tensor(math.inf)),
            torch.nextafter(powers[1:], torch.tensor(0.0)),
            torch.tensor([3 * 2.0**-149, 5 * 2.0**-140, 2.0**-127 + 2.0**-149, 1e-4 / 448, 0.3, 1e30]),
        ]
    )
    assert (scales[: len(powers)] < torch.finfo(torch.float32).tiny).sum() == 23  # subnormal powers 2^-149..2^-127
    rounded = fp8_kernels.ue8m0_scale(scales)
    assert rounded.dtype == torch.float32
    assert rounded.tolist() == [smallest_power_of_two_at_least(s) for s in scales.tolist()]
    one_ulp_above = torch.nextafter(torch.tensor(2.0**-9), torch.tensor(math.inf))
    assert fp8_kernels.ue8m0_scale(one_ulp_above) == 2.0**-8
    assert quantize_blocks(torch.full((1, 128), one_ulp_above.item() * 448), (1, 128), "ue8m0")[1] == 2.0**-8


@pytest.mark.parametrize("scale_format", ["fp32", "ue8m0"])
@pytest.mark.parametrize("block, shape", [((1, 128), (5, 384)), ((128, 128), (200, 136)), ((128, 1), (300, 24))])
def test_block_quantization_is_bit_exact_to_deepseeks_conventions(block, shape, scale_format):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator) * torch.logspace(-5, 2, shape[0])[:, None]
    x[0] = 0  # an all-zero row: the 1e-4 floor keeps its scale finite
    quantized, scale = quantize_blocks(x, block, scale_format)
    expected_q, expected_s = reference_quantize(x, block, scale_format == "ue8m0")
    assert torch.equal(scale, expected_s)
    assert torch.equal(quantized.view(torch.uint8), expected_q.view(torch.uint8))
    if scale_format == "ue8m0":
        assert torch.equal(torch.exp2(torch.log2(scale).round()), scale)


def quantization_error_bound(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Per-element bound of |dequant(quant(x)) − x| for E4M3 with round-to-nearest: half an ulp, i.e. 2⁻⁴·|x| for
    normal numbers and 2⁻¹⁰·s below the smallest normal (2⁻⁶·s), s the block's scale."""
    _, scale = quantize_blocks(x, block, "fp32")
    expanded = scale.repeat_interleave(block[0], 0)[: x.shape[0]].repeat_interleave(block[1], 1)[:, : x.shape[1]]
    return torch.maximum(x.abs().double() * 2**-4, expanded.double() * 2**-10)


def gemm_bound(a: torch.Tensor, a_block, b: torch.Tensor, b_block) -> torch.Tensor:
    """Bound of |A_q·B_qᵀ − A·Bᵀ| from the elementwise bounds: |ΔA||B|ᵀ + |A||ΔB|ᵀ + |ΔA||ΔB|ᵀ, plus fp32
    accumulation slack."""
    error_a, error_b = quantization_error_bound(a, a_block), quantization_error_bound(b, b_block)
    magnitude = a.abs().double() @ b.abs().double().T
    return error_a @ b.abs().double().T + a.abs().double() @ error_b.T + error_a @ error_b.T + 1e-5 * magnitude


def check_within_bound(result: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor) -> None:
    error = (result.double() - exact).abs()
    assert (error <= bound).all(), (error / bound).max()
    # The inputs really were rounded: far more error than fp32 alone would make.
    assert error.max() > 1e-4 * exact.abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale_format", ["fp32", "ue8m0"])
def test_fp8_linear_fprop_dgrad_wgrad_within_e4m3_bounds(scale_format, backend):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(140, 200, generator=generator)  # partial tiles along tokens and channels
    weight = torch.randn(136, 200, generator=generator) * 0.05
    grad_output = torch.randn(140, 136, generator=generator)
    x.requires_grad_(True)
    weight.requires_grad_(True)
    y = fp8_linear(x, weight, scale_format, backend)
    y.backward(grad_output)
    x64, w64, dy64 = x.detach().double(), weight.detach().double(), grad_output.double()
    if scale_format == "fp32":  # the bound assumes unrounded scales (ue8m0 only moves values within [224, 448])
        check_within_bound(y.detach(), x64 @ w64.T, gemm_bound(x.detach(), (1, 128), weight.detach(), (128, 128)))
        check_within_bound(
            x.grad, dy64 @ w64, gemm_bound(grad_output, (1, 128), weight.detach().T.contiguous(), (128, 128))
        )
        check_within_bound(
            weight.grad, dy64.T @ x64, gemm_bound(grad_output.T.contiguous(), (1, 128), x.detach().T, (1, 128))
        )
    else:
        for result, exact in ((y.detach(), x64 @ w64.T), (x.grad, dy64 @ w64), (weight.grad, dy64.T @ x64)):
            assert (result.double() - exact).abs().max() <= 0.15 * exact.abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_fp8_gemm_within_e4m3_bounds_per_group(backend):
    generator = torch.Generator().manual_seed(2)
    counts = [70, 0, 140, 3]
    x = torch.randn(sum(counts), 136, generator=generator, requires_grad=True)
    weight = (torch.randn(4, 96, 136, generator=generator) * 0.05).requires_grad_(True)
    grad_output = torch.randn(sum(counts), 96, generator=generator)
    y = fp8_grouped_linear(x, weight, counts, backend=backend)
    y.backward(grad_output)
    y = y.detach()
    start = 0
    for group, count in enumerate(counts):
        rows, w, dy = x.detach()[start : start + count], weight.detach()[group], grad_output[start : start + count]
        if count == 0:
            assert torch.equal(weight.grad[group], torch.zeros_like(w))
            continue
        exact = rows.double() @ w.double().T
        check_within_bound(y[start : start + count], exact, gemm_bound(rows, (1, 128), w, (128, 128)))
        dgrad = gemm_bound(dy, (1, 128), w.T.contiguous(), (128, 128))
        assert ((x.grad[start : start + count].double() - dy.double() @ w.double()).abs() <= dgrad).all()
        wgrad = gemm_bound(dy.T.contiguous(), (1, 128), rows.T, (1, 128))
        assert ((weight.grad[group].double() - dy.double().T @ rows.double()).abs() <= wgrad).all()
        start += count


@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_triton_block_scaled_gemm_equals_the_emulation(backend):
    """Same E4M3 operands and scales: the kernel's per-chunk promoted fp32 sums equal the emulation's fp32 matmul up
    to accumulation order, for the Fprop, Dgrad and Wgrad shapes."""
    generator = torch.Generator().manual_seed(4)
    x, weight = torch.randn(70, 136, generator=generator), torch.randn(200, 136, generator=generator)
    grad_output = torch.randn(70, 200, generator=generator)
    results = {}
    for name in ("emulated", backend):
        xx, ww = x.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        fp8_linear(xx, ww, "ue8m0", name).backward(grad_output)
        results[name] = (fp8_linear(x, weight, "ue8m0", name), xx.grad, ww.grad)
    for emulated, kernel in zip(results["emulated"], results[backend], strict=True):
        assert (kernel - emulated).abs().max() <= 1e-5 * emulated.abs().max()


def test_enable_fp8_training_swaps_linears_and_experts_only():
    config = DeepseekMoeConfig.from_preset("tiny-v3")
    model = randomize_(DeepseekMoeForCausalLM(config), seed=3)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert enable_fp8_training(model, scale_format="ue8m0") is model
    assert type(model.lm_head) is torch.nn.Linear  # the output head stays high precision
    assert isinstance(model.model.layers[0].self_attn.q_a_proj, Fp8BlockwiseLinear)
    assert isinstance(model.model.layers[1].mlp.shared_experts.down_proj, Fp8BlockwiseLinear)
    assert model.config._experts_implementation == "deepseek_fp8_blockwise"
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="scale_format"):
        enable_fp8_training(model, scale_format="e5m2")
    with pytest.raises(ValueError, match="recipe"):
        enable_fp8_training(model, recipe="tensorwise")


def train_losses(steps: int, fp8: bool, seed: int = 0) -> list[float]:
    """A tiny V3 (MLA, 8 experts, a dense first layer) trained with AdamW on a stream with an entropy floor (each
    token is the previous one plus 1, 2 or 3 at random, so the loss settles near log 3 instead of zero and relative
    gaps stay meaningful): fp32 master weights; FP8 GEMMs or bf16 autocast, same initialisation and data."""
    torch.manual_seed(seed)
    config = DeepseekMoeConfig.from_preset("tiny-v3", vocab_size=128, num_nextn_predict_layers=0)
    model = DeepseekMoeForCausalLM(config).train()
    if fp8:
        enable_fp8_training(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        steps_between = torch.randint(1, 4, (4, 32), generator=generator)
        input_ids = torch.randint(0, config.vocab_size, (4, 1), generator=generator) + steps_between.cumsum(1)
        input_ids = input_ids % config.vocab_size
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not fp8):
            loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def relative_final_loss_gap(steps: int) -> tuple[float, float, float]:
    fp8, bf16 = train_losses(steps, fp8=True), train_losses(steps, fp8=False)
    window = max(1, steps // 10)
    final_fp8, final_bf16 = sum(fp8[-window:]) / window, sum(bf16[-window:]) / window
    return abs(final_fp8 - final_bf16) / final_bf16, fp8[0], final_fp8


def test_fp8_training_tracks_bf16_for_30_steps():
    gap, first, final = relative_final_loss_gap(30)
    assert final < 0.85 * first  # it learns
    assert gap < 0.01, gap


@pytest.mark.slow
def test_fp8_training_tracks_bf16_for_200_steps():
    gap, first, final = relative_final_loss_gap(200)
    assert final < 0.5 * first and final > math.log(3)  # near the stream's entropy floor, not below it
    assert gap < 0.01, gap


def test_accelerate_fp8_mixed_precision_trains_our_model_on_cpu():
    """Accelerate's FP8 route (torchao float8 on the `nn.Linear` layers; it does not touch the 3D experts) works
    with our model as it is."""
    pytest.importorskip("torchao", reason="optional: pip install .[fp8]")
    from accelerate import Accelerator

    torch.manual_seed(0)
    config = DeepseekMoeConfig.from_preset("tiny-v3", hidden_size=64, num_nextn_predict_layers=0)
    accelerator = Accelerator(mixed_precision="fp8", cpu=True)
    model = DeepseekMoeForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model, optimizer = accelerator.prepare(model, optimizer)
    assert any(type(m).__name__ == "Float8Linear" for m in model.modules())
    input_ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(8):
        loss = model(input_ids, labels=input_ids).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
