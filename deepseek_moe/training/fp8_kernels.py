"""Triton block-scaled FP8 GEMM for the blockwise recipe (`training/fp8.py`): C = A·Bᵀ from E4M3 operands and fp32
dequantization multipliers, with DeepSeek's promotion: each 128-long K chunk is multiplied in the tensor cores
(`tl.dot`) and added to an fp32 accumulator after scaling by that chunk's A and B scales.

A is [M, K] in 1×128 tiles along K (scales [M, K/128]). B is [N, K] with one scale per `b_rows`×128 block: 128 for
weights in 128×128 blocks (Fprop, and Dgrad with Wᵀ), 1 for the token-tiled operands of Wgrad. Partial tiles in any
dimension are masked. Grouped (expert) GEMMs call it per expert on the expert's contiguous rows.

Under `TRITON_INTERPRET=1` (CPU) the E4M3 loads are upcast to fp32 before `tl.dot`, since the interpreter does not
multiply fp8; the products are the same exact values, only the accumulation order may differ from a GPU.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # kernels are optional
    triton = None

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK_K = 128


def triton_gemm_available(tensor: torch.Tensor) -> bool:
    """A GPU with FP8 tensor cores and triton installed (the interpreter is only used when asked for by name)."""
    return triton is not None and tensor.is_cuda and torch.cuda.get_device_capability(tensor.device) >= (8, 9)


if triton is not None:

    @triton.jit
    def _block_scaled_gemm_kernel(
        a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr,
        M, N, K,
        stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
        stride_asm, stride_ask, stride_bsn, stride_bsk,
        B_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        UPCAST: tl.constexpr,
    ):  # fmt: skip
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k_block in range(0, tl.cdiv(K, BLOCK_K)):
            k = k_block * BLOCK_K + ks
            a_mask = (rows[:, None] < M) & (k[None, :] < K)
            b_mask = (cols[None, :] < N) & (k[:, None] < K)
            a = tl.load(a_ptr + rows[:, None] * stride_am + k[None, :] * stride_ak, mask=a_mask, other=0.0)
            b = tl.load(b_ptr + cols[None, :] * stride_bn + k[:, None] * stride_bk, mask=b_mask, other=0.0)
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            a_scale = tl.load(a_scale_ptr + rows * stride_asm + k_block * stride_ask, mask=rows < M, other=0.0)
            b_scale = tl.load(
                b_scale_ptr + (cols // B_ROWS) * stride_bsn + k_block * stride_bsk, mask=cols < N, other=0.0
            )
            # Promotion: the chunk's partial product is scaled and added in fp32.
            acc += tl.dot(a, b, out_dtype=tl.float32) * a_scale[:, None] * b_scale[None, :]
        c_mask = (rows[:, None] < M) & (cols[None, :] < N)
        tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn, acc, mask=c_mask)


def block_scaled_gemm(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, b_rows: int
) -> torch.Tensor:
    """C = dequant(A)·dequant(B)ᵀ in fp32 from E4M3 `a` [M, K] (scales [M, K/128]) and `b` [N, K] (scales
    [N/b_rows, K/128]), without materialising the dequantized operands."""
    if triton is None:
        raise RuntimeError("block_scaled_gemm needs triton")
    (m, k), n = a.shape, b.shape[0]
    c = torch.empty(m, n, dtype=torch.float32, device=a.device)
    block_m, block_n = 64, 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _block_scaled_gemm_kernel[grid](
        a, b, c, a_scale, b_scale,
        m, n, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        a_scale.stride(0), a_scale.stride(1), b_scale.stride(0), b_scale.stride(1),
        B_ROWS=b_rows, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK_K, UPCAST=_INTERPRET,
    )  # fmt: skip
    return c


__all__ = ["block_scaled_gemm", "triton_gemm_available"]
