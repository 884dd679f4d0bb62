"""Triton decode kernel for absorbed multi-head latent attention (one new token per sequence).

Flash-decoding over the latent cache: each program takes a group of BLOCK_H query heads and one split of the
sequence, so every latent tile it reads serves all heads of the group; splits run in parallel and their partial
results are merged with a log-sum-exp reduction. Scores are q_latent · c_kv + q_pe · k_pe, values are c_kv itself.

Model-code sibling: imported by the modeling file, which uses it where `triton_support.triton_runs_on` says Triton
can run (the PyTorch path serves elsewhere, and without triton).
"""

from __future__ import annotations

import torch

from .triton_support import tl, triton

if triton is not None:

    @triton.jit
    def _mla_decode_split_kernel(
        q_latent,  # [B, H, R]
        q_rope,  # [B, H, P]
        latent,  # [B, T, R]
        rope,  # [B, T, P]
        bias,  # [B, T] additive mask (0 or -inf)
        partial_out,  # [B, H, SPLITS, R] fp32
        partial_lse,  # [B, H, SPLITS] fp32
        num_heads,
        kv_length,
        tokens_per_split,
        scale,
        stride_qb,
        stride_qh,
        stride_pb,
        stride_ph,
        stride_lb,
        stride_lt,
        stride_rb,
        stride_rt,
        stride_bb,
        stride_ob,
        stride_oh,
        stride_os,
        stride_sb,
        stride_sh,
        R: tl.constexpr,
        P: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_T: tl.constexpr,
    ):
        batch = tl.program_id(0)
        head_block = tl.program_id(1)
        split = tl.program_id(2)
        heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
        head_ok = heads < num_heads
        r = tl.arange(0, R)
        p = tl.arange(0, P)

        # Upcast right after loading: the CPU interpreter computes bf16 on raw bits otherwise.
        q = tl.load(
            q_latent + batch * stride_qb + heads[:, None] * stride_qh + r[None, :], mask=head_ok[:, None], other=0.0
        )
        q = q.to(tl.float32)
        qp = tl.load(
            q_rope + batch * stride_pb + heads[:, None] * stride_ph + p[None, :], mask=head_ok[:, None], other=0.0
        )
        qp = qp.to(tl.float32)

        m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_H], tl.float32)
        acc = tl.zeros([BLOCK_H, R], tl.float32)
        start = split * tokens_per_split
        end = tl.minimum(start + tokens_per_split, kv_length)
        for t0 in range(start, end, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            t_ok = t < end
            c = tl.load(latent + batch * stride_lb + t[:, None] * stride_lt + r[None, :], mask=t_ok[:, None], other=0.0)
            c = c.to(tl.float32)
            k = tl.load(rope + batch * stride_rb + t[:, None] * stride_rt + p[None, :], mask=t_ok[:, None], other=0.0)
            k = k.to(tl.float32)
            b = tl.load(bias + batch * stride_bb + t, mask=t_ok, other=float("-inf")).to(tl.float32)
            scores = (tl.dot(q, tl.trans(c)) + tl.dot(qp, tl.trans(k))) * scale + b[None, :]
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a fully masked tile so far
            alpha = tl.exp(m_i - m_safe)
            probs = tl.exp(scores - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(probs, axis=1)
            acc = acc * alpha[:, None] + tl.dot(probs, c)
            m_i = m_new

        seen = l_i > 0  # a split whose keys are all masked contributes nothing
        safe_l = tl.where(seen, l_i, 1.0)
        lse = tl.where(seen, m_i + tl.log(safe_l), float("-inf"))
        out = acc / safe_l[:, None]
        out_ptr = partial_out + batch * stride_ob + heads[:, None] * stride_oh + split * stride_os + r[None, :]
        tl.store(out_ptr, out, mask=head_ok[:, None])
        tl.store(partial_lse + batch * stride_sb + heads * stride_sh + split, lse, mask=head_ok)


def mla_decode_triton(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    latent: torch.Tensor,
    rope: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    block_h: int = 16,
    block_t: int = 32,
    tokens_per_split: int = 256,
) -> torch.Tensor:
    """softmax(scale·(q_latent c_kvᵀ + q_rope k_peᵀ) + bias) c_kv for one query per sequence.

    q_latent [B, H, R], q_rope [B, H, P], latent [B, T, R], rope [B, T, P], bias [B, T] (0 / -inf); returns
    [B, H, R] in fp32. R and P must be powers of two ≥ 16 (tl.dot tiles)."""
    batch, num_heads, latent_dim = q_latent.shape
    rope_dim, kv_length = q_rope.shape[-1], latent.shape[1]
    for name, size in (("kv_lora_rank", latent_dim), ("qk_rope_head_dim", rope_dim)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"the Triton MLA decode kernel needs {name} to be a power of two >= 16, got {size}")
    splits = max(1, triton.cdiv(kv_length, tokens_per_split))
    partial_out = torch.empty(batch, num_heads, splits, latent_dim, device=q_latent.device, dtype=torch.float32)
    partial_lse = torch.empty(batch, num_heads, splits, device=q_latent.device, dtype=torch.float32)
    q_latent, q_rope = q_latent.contiguous(), q_rope.contiguous()
    # Rows may be views into a wider cache buffer (`LatentCache`): strided rows are read in place, not copied.
    latent, rope = (t if t.stride(-1) == 1 else t.contiguous() for t in (latent, rope))
    bias = bias.contiguous()
    grid = (batch, triton.cdiv(num_heads, block_h), splits)
    _mla_decode_split_kernel[grid](
        q_latent, q_rope, latent, rope, bias, partial_out, partial_lse,
        num_heads, kv_length, tokens_per_split, scale,
        q_latent.stride(0), q_latent.stride(1), q_rope.stride(0), q_rope.stride(1),
        latent.stride(0), latent.stride(1), rope.stride(0), rope.stride(1), bias.stride(0),
        partial_out.stride(0), partial_out.stride(1), partial_out.stride(2),
        partial_lse.stride(0), partial_lse.stride(1),
        R=latent_dim, P=rope_dim, BLOCK_H=block_h, BLOCK_T=block_t,
    )  # fmt: skip
    return merge_splits(partial_out, partial_lse)


def merge_splits(partial_out: torch.Tensor, partial_lse: torch.Tensor) -> torch.Tensor:
    """Combine per-split softmax results: weights exp(lse_s - max lse) over the splits that saw any key."""
    top = partial_lse.amax(dim=-1, keepdim=True).clamp(min=torch.finfo(partial_lse.dtype).min)
    weights = torch.exp(partial_lse - top)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return (weights.unsqueeze(-1) * partial_out).sum(dim=-2)
