"""Block-scaled FP8 (E4M3) kernels in Triton, with DeepSeek's conventions (`inference/kernel.py`): activations
quantized on the fly per 1×128 tile (`act_quant`), weights stored as E4M3 in 128×128 blocks with their
`weight_scale_inv` (the dequantization multiplier, despite the name), and GEMMs that multiply each 128-long K chunk
in the tensor cores and add it, scaled by that chunk's A and B scales, to an fp32 accumulator (the V3 report's
promotion of partial sums). Used by FP8 inference (`fp8_linear`, and the MoE kernels of `moe_kernels.py`) and by
the blockwise FP8 training recipe (`block_scaled_gemm`, from `training/fp8.py`).

Quantization (`act_quant`): amax of the tile clamped at 1e-4, s = amax / 448 (for `scale_fmt="ue8m0"` rounded up to
a power of two exactly, `ue8m0_scale`), q = e4m3(x / s) rounded to nearest even; the same convention as
`training/fp8.py::quantize_blocks`. The kernel divides with IEEE rounding (`div_rn`), takes ceil(log2 s) from the
float's bits, and rounds x / s to E4M3 in fp32 arithmetic before the final (then exact) cast, so it is bit-exact
with PyTorch's reference everywhere: Triton's `/` and `log2` are approximate on GPUs, and its interpreter's fp32→fp8
cast drops the carry of values that round up to the next power of two.

Under `TRITON_INTERPRET=1` (CPU) E4M3 loads are upcast to fp32 before `tl.dot`, since the interpreter does not
multiply fp8; the products are the same exact values, only the accumulation order may differ from a GPU.
"""

from __future__ import annotations

import math

import torch

from .triton_support import INTERPRET, tl, triton, triton_runs_on

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
AMAX_FLOOR = 1e-4  # DeepSeek's act_quant clamps amax here, so an all-zero tile gets a finite scale
BLOCK_K = 128  # the quantization tile along K, and the promotion interval of the GEMMs
SCALE_FORMATS = (None, "ue8m0")


def fp8_gemm_runs_on(device: torch.device | str) -> bool:
    """Whether the Triton FP8 path runs for tensors on `device`: a GPU with FP8 tensor cores (compute capability
    ≥ 8.9), or any device under Triton's interpreter (slow; for tests)."""
    device = torch.device(device)
    if device.type == "cuda" and triton is not None:
        return torch.cuda.get_device_capability(device) >= (8, 9)
    return triton_runs_on(device)


def triton_gemm_available(tensor: torch.Tensor) -> bool:
    """Whether training's `auto` backend takes the kernel: an FP8 GPU (the interpreter only when asked by name)."""
    return tensor.is_cuda and fp8_gemm_runs_on(tensor.device)


def fp8_gemm_configs(block_ns: tuple[int, ...] = (64, 128)) -> list:
    """Autotune configs of the FP8 GEMM kernels (here and in `moe_kernels.py`): BLOCK_N and warps/stages on GPUs
    (BLOCK_K is the 128-long quantization tile; DeepSeek autotunes a wider grid), one config under the interpreter,
    whose autotuner needs a GPU."""
    if INTERPRET:
        return [triton.Config({"BLOCK_N": block_ns[-1]}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
        for block_n in block_ns
        for warps, stages in ((4, 3), (8, 3), (4, 4))
    ]


if triton is not None:
    # Module-level values a jit function reads must be constexpr globals.
    _AMAX_FLOOR, _E4M3_MAX = tl.constexpr(AMAX_FLOOR), tl.constexpr(E4M3_MAX)

    @triton.jit
    def pow2_ceil(s):
        """2^ceil(log2 s) for positive normal fp32 s (the 1e-4 amax floor keeps s above 2^-22), exactly: the exponent,
        plus one if any mantissa bit is set."""
        bits = s.to(tl.int32, bitcast=True)
        exponent = (bits >> 23) + ((bits & 0x7FFFFF) != 0).to(tl.int32)
        return (exponent << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def round_to_e4m3(y):
        """y (|y| ≤ 448, fp32) rounded to the nearest E4M3 value, ties to even, kept in fp32. The E4M3 spacing at y is
        2^(max(e, -6) - 3) for y's exponent e; adding and removing 2^23 rounds |y| / spacing (< 16) to an integer
        with fp32's own round-to-nearest-even."""
        bits = y.to(tl.int32, bitcast=True)
        spacing_exponent = tl.maximum(((bits >> 23) & 0xFF) - 127, -6) - 3
        spacing = ((spacing_exponent + 127) << 23).to(tl.float32, bitcast=True)
        inverse = ((127 - spacing_exponent) << 23).to(tl.float32, bitcast=True)
        steps = (tl.abs(y) * inverse + 8388608.0) - 8388608.0
        magnitude = tl.minimum(steps * spacing, 448.0)
        return tl.where(bits < 0, -magnitude, magnitude)  # bits < 0: the sign bit, so -0.0 stays -0.0

    @triton.jit
    def quantize_tiles(x, UE8M0: tl.constexpr):
        """x [R, 128] fp32 (masked entries 0) → (E4M3-valued fp32 [R, 128], scales [R]), one scale per row."""
        amax = tl.maximum(tl.max(tl.abs(x), axis=1), _AMAX_FLOOR)
        scale = tl.math.div_rn(amax, _E4M3_MAX)
        if UE8M0:
            scale = pow2_ceil(scale)
        return round_to_e4m3(tl.math.div_rn(x, scale[:, None])), scale

    @triton.jit
    def _act_quant_kernel(
        x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, stride_sm,
        UE8M0: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (rows < M)[:, None] & (cols < K)[None, :]
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + cols[None, :], mask=mask, other=0.0)
        q, scale = quantize_tiles(x.to(tl.float32), UE8M0)
        q_ptrs = q_ptr + rows[:, None].to(tl.int64) * stride_qm + cols[None, :]
        tl.store(q_ptrs, q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + rows.to(tl.int64) * stride_sm + tl.program_id(1), scale, mask=rows < M)

    @triton.jit
    def block_scaled_dot(
        a_ptrs, a_scale_ptrs, row_mask, b_ptrs, b_scale_ptrs, col_mask, offs_k, K,
        stride_ak, stride_bk, stride_ask, stride_bsk,
        UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """Σ over 128-long K chunks of (A_chunk · B_chunk) · a_scale[row, chunk] · b_scale[col, chunk], in fp32.
        `a_ptrs` [BLOCK_M, BLOCK_K] and `b_ptrs` [BLOCK_K, BLOCK_N] point at the first chunk, `a_scale_ptrs`
        [BLOCK_M] and `b_scale_ptrs` [BLOCK_N] at the first chunk's scales; masked rows/columns read as 0."""
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k_block in range(0, tl.cdiv(K, BLOCK_K)):
            k_mask = offs_k < K - k_block * BLOCK_K
            a = tl.load(a_ptrs + k_block * BLOCK_K * stride_ak, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs + k_block * BLOCK_K * stride_bk, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            a_scale = tl.load(a_scale_ptrs + k_block * stride_ask, mask=row_mask, other=0.0)
            b_scale = tl.load(b_scale_ptrs + k_block * stride_bsk, mask=col_mask, other=0.0)
            # Promotion: the chunk's partial product is scaled and added in fp32.
            acc += tl.dot(a, b, out_dtype=tl.float32) * a_scale[:, None] * b_scale[None, :]
        return acc

    @triton.autotune(configs=fp8_gemm_configs(), key=["N", "K", "B_ROWS", "HAS_BIAS", "BLOCK_M"])
    @triton.jit
    def _block_scaled_gemm_kernel(
        a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr,
        M, N, K,
        stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
        stride_asm, stride_ask, stride_bsn, stride_bsk,
        HAS_BIAS: tl.constexpr, B_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, UPCAST: tl.constexpr,
    ):  # fmt: skip
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        row_mask, col_mask = rows < M, cols < N
        acc = block_scaled_dot(
            a_ptr + rows[:, None].to(tl.int64) * stride_am + ks[None, :] * stride_ak,
            a_scale_ptr + rows * stride_asm,
            row_mask,
            b_ptr + cols[None, :].to(tl.int64) * stride_bn + ks[:, None] * stride_bk,
            b_scale_ptr + (cols // B_ROWS) * stride_bsn,
            col_mask,
            ks, K, stride_ak, stride_bk, stride_ask, stride_bsk, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        c_ptrs = c_ptr + rows[:, None].to(tl.int64) * stride_cm + cols[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def _check_scale_fmt(scale_fmt: str | None, caller: str) -> None:
    if scale_fmt not in SCALE_FORMATS:
        raise ValueError(f"{caller}: scale_fmt must be None or 'ue8m0', got {scale_fmt!r}")


def ue8m0_scale(scale: torch.Tensor) -> torch.Tensor:
    """2^ceil(log2 s) of positive fp32 scales, exactly (subnormal ones too): the smallest power of two ≥ s, so that
    |x / s| ≤ 448 still holds. DeepSeek-V3's `inference/kernel.py` writes it as exp2(ceil(log2 s)) in fp32, where a
    rounded log2 turns s = 2^k·(1 + 2⁻²³) into 2^k for most k; its later kernels (DeepSeek-V3.2's `fast_log2_ceil`,
    DeepEP) take the exponent from the float's bits instead, as the Triton `pow2_ceil` above and this do."""
    mantissa, exponent = torch.frexp(scale)  # scale = mantissa · 2^exponent, mantissa in [0.5, 1)
    return torch.ldexp(torch.ones_like(scale), exponent - (mantissa == 0.5).int())


def _act_quant_torch(x: torch.Tensor, block: int, ue8m0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The same quantization in PyTorch (devices Triton cannot run on); a partial last tile is zero-padded for its
    amax, which zeros do not change."""
    k = x.shape[-1]
    tiles = torch.nn.functional.pad(x.float(), (0, -k % block)).unflatten(-1, (-1, block))
    scale = tiles.abs().amax(-1).clamp(min=AMAX_FLOOR) / E4M3_MAX
    if ue8m0:
        scale = ue8m0_scale(scale)
    quantized = (tiles / scale[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return quantized.flatten(-2)[..., :k], scale


def act_quant(x: torch.Tensor, block: int = 128, scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 values [..., K] and fp32 dequantization multipliers [..., ceil(K / block)] of x, per 1×`block` tile
    along the last dimension (DeepSeek's `act_quant`; any K, the last tile may be partial)."""
    _check_scale_fmt(scale_fmt, "act_quant")
    if x.shape[-1] == 0:
        raise ValueError("act_quant: x has an empty last dimension")
    if not fp8_gemm_runs_on(x.device):
        return _act_quant_torch(x, block, scale_fmt == "ue8m0")
    if block & (block - 1) or block < 16:
        raise ValueError(f"act_quant: block must be a power of two ≥ 16 for the Triton kernel, got {block}")
    rows = x.reshape(-1, x.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    (m, k), k_tiles = rows.shape, math.ceil(x.shape[-1] / block)
    quantized = torch.empty(m, k, dtype=E4M3, device=x.device)
    scale = torch.empty(m, k_tiles, dtype=torch.float32, device=x.device)
    block_m = 16
    if m == 0:  # a grid needs programs
        return quantized.view(x.shape), scale.view(*x.shape[:-1], k_tiles)
    _act_quant_kernel[(triton.cdiv(m, block_m), k_tiles)](
        rows, quantized, scale, m, k, rows.stride(0), quantized.stride(0), scale.stride(0),
        UE8M0=scale_fmt == "ue8m0", BLOCK_M=block_m, BLOCK_K=block,
    )  # fmt: skip
    return quantized.view(x.shape), scale.view(*x.shape[:-1], k_tiles)


def _block_m(m: int) -> int:
    """Row tile of the GEMM: small for decode-sized M (DeepSeek autotunes over 16/32/64), 64 otherwise."""
    return min(64, max(16, triton.next_power_of_2(m)))


def block_scaled_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    b_rows: int,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """C = dequant(A)·dequant(B)ᵀ (+ bias) from E4M3 `a` [M, K] (scales [M, ceil(K/128)]) and `b` [N, K] (scales
    [ceil(N/b_rows), ceil(K/128)]), accumulated in fp32 and written in `out_dtype`, without materialising the
    dequantized operands."""
    if triton is None:
        raise RuntimeError("block_scaled_gemm needs triton")
    (m, k), n = a.shape, b.shape[0]
    c = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:  # a grid needs programs
        return c
    block_m = _block_m(m)
    grid = lambda cfg: (triton.cdiv(m, block_m), triton.cdiv(n, cfg["BLOCK_N"]))  # noqa: E731
    _block_scaled_gemm_kernel[grid](
        a, b, c, a_scale, b_scale, c if bias is None else bias,
        m, n, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        a_scale.stride(0), a_scale.stride(1), b_scale.stride(0), b_scale.stride(1),
        HAS_BIAS=bias is not None, B_ROWS=b_rows, BLOCK_M=block_m, BLOCK_K=BLOCK_K, UPCAST=INTERPRET,
    )  # fmt: skip
    return c


def check_fp8_weight(weight: torch.Tensor, scale_inv: torch.Tensor, caller: str, name: str = "weight") -> None:
    """A clear error unless `weight` is E4M3 [..., N, K] with one scale per 128×128 block in `scale_inv`
    [..., ceil(N/128), ceil(K/128)] (the kernels would read out of bounds otherwise)."""
    if weight.dtype != E4M3 or weight.dim() < 2:
        raise ValueError(
            f"{caller}: {name} must be float8_e4m3fn [..., N, K], got {weight.dtype} {tuple(weight.shape)}"
        )
    blocks = (*weight.shape[:-2], *(math.ceil(size / BLOCK_K) for size in weight.shape[-2:]))
    if tuple(scale_inv.shape) != blocks:
        raise ValueError(
            f"{caller}: {name}_scale_inv must have shape {blocks} (one scale per 128×128 block of the {name} "
            f"{tuple(weight.shape)}), got {tuple(scale_inv.shape)}"
        )


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale_inv: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale_fmt: str | None = None,
) -> torch.Tensor:
    """y = x·Wᵀ (+ bias) in x's dtype for an E4M3 weight [N, K] with 128×128-block `weight_scale_inv`
    [ceil(N/128), ceil(K/128)]: x quantized per 1×128 tile (`act_quant`), then the block-scaled GEMM with fp32
    promotion per 128-K chunk. Where the FP8 kernels cannot run (`fp8_gemm_runs_on`), W is dequantized in fp32 and
    multiplied with F.linear instead."""
    _check_scale_fmt(scale_fmt, "fp8_linear")
    check_fp8_weight(weight, weight_scale_inv, "fp8_linear")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"fp8_linear: x has {x.shape[-1]} features, the weight expects {weight.shape[1]}")
    if not fp8_gemm_runs_on(x.device):
        # Imported here: the quantizer module may itself use these kernels.
        from .quantization_deepseek_moe import dequantize_fp8_blockwise

        weight = dequantize_fp8_blockwise(weight, weight_scale_inv)
        return torch.nn.functional.linear(x.float(), weight, None if bias is None else bias.float()).to(x.dtype)
    x_q, x_scale = act_quant(x.reshape(-1, x.shape[-1]), BLOCK_K, scale_fmt)
    y = block_scaled_gemm(x_q, x_scale, weight, weight_scale_inv.float(), BLOCK_K, bias, out_dtype=x.dtype)
    return y.view(*x.shape[:-1], weight.shape[0])


__all__ = [
    "AMAX_FLOOR",
    "E4M3",
    "E4M3_MAX",
    "act_quant",
    "block_scaled_gemm",
    "check_fp8_weight",
    "fp8_gemm_configs",
    "fp8_gemm_runs_on",
    "fp8_linear",
    "triton_gemm_available",
    "ue8m0_scale",
]
