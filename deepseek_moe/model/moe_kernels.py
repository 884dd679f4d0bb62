"""Fused MoE experts in Triton: routing metadata, training forward/backward, small-batch decode.

Registered in transformers' `ExpertsInterface` as `"deepseek_triton"` (experts forward signature
`fn(self, hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`). It reads
`self.gate_up_proj` [E, 2I, H] (gate rows first) and `self.down_proj` [E, H, I] at call time, so PEFT's
parametrized (LoRA-adapted) weights are what the kernels see. Without a GPU (and outside `TRITON_INTERPRET=1`) or
without triton it runs the model's PyTorch forward: kernels are optional.

Layout. The S = T·k (token, slot) pairs are sorted by expert once (`routing_metadata`); a slot id is
`token * k + j`. Rows of the sorted order are cut into BLOCK_M tiles that never straddle two experts, and each tile
carries its expert id, so every kernel program streams one expert's weights. Nothing is padded except the tile
table, and nothing needs the host (no `.item()`), so the grid size depends on shapes only.

Kernels (vLLM fused_moe / SonicMoE / Liger designs):
- `_gate_up_swiglu_kernel`: gather x rows by token in the prologue, gate and up GEMMs, SwiGLU epilogue.
- `_grouped_gemm_scatter_kernel`: sorted rows @ W[e]ᵀ with an optional per-slot scale, written in slot order.
  Forward down projection (scale = routing weight) and the input gradient through gate_up.
- `_combine_kernel`: out[t] = Σ_j y[t·k + j] in fp32 — a deterministic gather-sum, no atomics.
- `_swiglu_backward_kernel`: dA = dOut[token] @ W_down[e], fused with the SwiGLU backward (from the saved
  pre-activation, h recomputed) and the routing-weight gradient (per-N-block partial sums, reduced after).
- `_grouped_wgrad_kernel`: dW[e] = Σ_rows Aᵀ B for both expert weights.
The backward keeps only the [S, 2I] pre-activation; no [S, H] tensor is saved. Decode (small T) runs the same
forward kernels with BLOCK_M = 16 and no saved activations, so each selected expert's weights are read once per
tile, i.e. once per step while an expert has ≤ 16 tokens (vLLM's small-M configuration).

Interpreter (`TRITON_INTERPRET=1`, CPU): loads are upcast to fp32 before any math (bf16 arithmetic is wrong there)
and autotuning has one config.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from .fp8_kernels import BLOCK_K as FP8_BLOCK
from .fp8_kernels import E4M3, act_quant, check_fp8_weight, fp8_gemm_configs, fp8_gemm_runs_on
from .triton_support import INTERPRET, tl, triton, triton_runs_on

IMPLEMENTATION_NAME = "deepseek_triton"
BLOCK_M_TRAIN = 64
BLOCK_M_DECODE = 16
DECODE_MAX_TOKENS = 64


@dataclass
class RoutingMetadata:
    """Expert-sorted view of the S = T·k routed slots, built on device without host synchronisation.

    `sorted_slots[r]` is the slot (token·k + j) at sorted row r; expert e owns rows
    `expert_offsets[e]:expert_offsets[e + 1]`. Tile t covers rows `tile_row_start[t]` up to BLOCK_M further,
    clipped to its expert's end; `tile_expert[t] == num_experts` marks an unused tile (the table has the
    static size `cdiv(S, BLOCK_M) + min(E, S)`). Slots routed to ids ≥ E (expert-parallel sentinels) are
    sorted last and covered by no tile.
    """

    tokens_per_expert: torch.Tensor
    expert_offsets: torch.Tensor
    sorted_slots: torch.Tensor
    tile_expert: torch.Tensor
    tile_row_start: torch.Tensor
    block_m: int


def routing_metadata(top_k_index: torch.Tensor, num_experts: int, block_m: int) -> RoutingMetadata:
    """Counts by histogram, offsets by cumsum, slots by a stable sort, tiles by searchsorted — all on device."""
    flat_experts = top_k_index.reshape(-1)
    num_slots = flat_experts.numel()
    # histc rather than bincount: bincount sizes its output from the data (a sync); histc takes int on CUDA only.
    counts_input = flat_experts.int() if flat_experts.is_cuda else flat_experts.float()
    tokens_per_expert = torch.histc(counts_input, bins=num_experts, min=0, max=num_experts - 1).long()
    expert_offsets = torch.nn.functional.pad(tokens_per_expert.cumsum(0), (1, 0))
    sorted_slots = torch.sort(flat_experts, stable=True).indices
    tiles_per_expert = (tokens_per_expert + block_m - 1) // block_m
    tile_end = tiles_per_expert.cumsum(0)
    max_tiles = -(-num_slots // block_m) + min(num_experts, num_slots)
    tile = torch.arange(max_tiles, device=flat_experts.device)
    tile_expert = torch.searchsorted(tile_end, tile, right=True)
    owner = tile_expert.clamp(max=num_experts - 1)
    tile_row_start = expert_offsets[owner] + (tile - (tile_end - tiles_per_expert)[owner]) * block_m
    return RoutingMetadata(
        tokens_per_expert=tokens_per_expert,
        expert_offsets=expert_offsets.int(),
        sorted_slots=sorted_slots.int(),
        tile_expert=tile_expert.int(),
        tile_row_start=tile_row_start.int(),
        block_m=block_m,
    )


def _gemm_configs() -> list:
    """One small config under the interpreter (autotuning needs a GPU); a few Hopper/Ampere-friendly ones else."""
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    return [
        triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=warps, num_stages=stages)
        for block_n, block_k, warps, stages in ((64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 4), (64, 128, 4, 4))
    ]


def _combine_configs() -> list:
    if INTERPRET:
        return [triton.Config({"BLOCK_T": 16, "BLOCK_H": 32}, num_warps=4)]
    return [triton.Config({"BLOCK_T": 16, "BLOCK_H": block_h}, num_warps=4) for block_h in (128, 256)]


if triton is not None:

    @triton.jit
    def _expert_tile(
        tile_expert_ptr,
        tile_row_start_ptr,
        expert_offsets_ptr,
        sorted_slots_ptr,
        num_experts,
        N,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """This program's share of the work: the expert of its tile (`num_experts` for an unused tile, which the
        caller skips), the tile's sorted rows (masked to the expert's end), the slot each row holds, its BLOCK_N
        output columns of N (masked) and the BLOCK_K offsets."""
        tile = tl.program_id(0)
        expert = tl.load(tile_expert_ptr + tile)
        expert_end = tl.load(expert_offsets_ptr + tl.minimum(expert, num_experts - 1) + 1)  # in bounds for any tile
        rows = tl.load(tile_row_start_ptr + tile) + tl.arange(0, BLOCK_M)
        row_mask = rows < tl.where(expert < num_experts, expert_end, 0)  # an unused tile masks every row
        slots = tl.load(sorted_slots_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        return expert, rows, row_mask, slots, offs_n, offs_n < N, tl.arange(0, BLOCK_K)

    @triton.jit
    def _rows_times_weight(
        a_ptrs,
        w_ptrs,
        row_mask,
        n_mask,
        offs_k,
        K,
        stride_wk,
        UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """A @ W in fp32 over K in BLOCK_K steps: A's BLOCK_M rows at `a_ptrs` (contiguous in K), W [K, N] at `w_ptrs`
        (BLOCK_N columns); masked rows and columns read as 0."""
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_mask = offs_k < K - k0
            a = tl.load(a_ptrs + k0, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs + k0 * stride_wk, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if UPCAST:
                a, w = a.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(a, w, acc)
        return acc

    @triton.autotune(configs=_gemm_configs(), key=["inter", "hidden", "STORE_GATE_UP"])
    @triton.jit
    def _gate_up_swiglu_kernel(
        x_ptr,
        w_ptr,
        gate_up_ptr,
        h_ptr,
        sorted_slots_ptr,
        tile_expert_ptr,
        tile_row_start_ptr,
        expert_offsets_ptr,
        num_experts,
        hidden,
        inter,
        top_k,
        stride_xt,
        stride_we,
        stride_wn,
        stride_wk,
        STORE_GATE_UP: tl.constexpr,
        UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """h[r] = silu(x[token(r)] @ W_gate[e]ᵀ) * (x[token(r)] @ W_up[e]ᵀ); optionally keeps [gate, up]."""
        expert, rows, row_mask, slots, offs_n, n_mask, offs_k = _expert_tile(
            tile_expert_ptr, tile_row_start_ptr, expert_offsets_ptr, sorted_slots_ptr, num_experts, inter,
            BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        if expert >= num_experts:
            return
        tokens = slots // top_k
        x_ptrs = x_ptr + tokens[:, None] * stride_xt + offs_k[None, :]
        w_expert_ptr = w_ptr + expert.to(tl.int64) * stride_we
        w_gate_ptrs = w_expert_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
        w_up_ptrs = w_gate_ptrs + inter * stride_wn
        acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            k_mask = offs_k < hidden - k0
            x = tl.load(x_ptrs + k0, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w_mask = k_mask[:, None] & n_mask[None, :]
            w_gate = tl.load(w_gate_ptrs + k0 * stride_wk, mask=w_mask, other=0.0)
            w_up = tl.load(w_up_ptrs + k0 * stride_wk, mask=w_mask, other=0.0)
            if UPCAST:
                x, w_gate, w_up = x.to(tl.float32), w_gate.to(tl.float32), w_up.to(tl.float32)
            acc_gate = tl.dot(x, w_gate, acc_gate)
            acc_up = tl.dot(x, w_up, acc_up)
        out_mask = row_mask[:, None] & n_mask[None, :]
        if STORE_GATE_UP:
            gate_up_ptrs = gate_up_ptr + rows[:, None].to(tl.int64) * (2 * inter) + offs_n[None, :]
            tl.store(gate_up_ptrs, acc_gate.to(gate_up_ptr.dtype.element_ty), mask=out_mask)
            tl.store(gate_up_ptrs + inter, acc_up.to(gate_up_ptr.dtype.element_ty), mask=out_mask)
        h = acc_gate * tl.sigmoid(acc_gate) * acc_up
        h_ptrs = h_ptr + rows[:, None].to(tl.int64) * inter + offs_n[None, :]
        tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=out_mask)

    @triton.autotune(configs=_gemm_configs(), key=["N", "K", "HAS_SCALE"])
    @triton.jit
    def _grouped_gemm_scatter_kernel(
        a_ptr,
        w_ptr,
        out_ptr,
        scale_ptr,
        sorted_slots_ptr,
        tile_expert_ptr,
        tile_row_start_ptr,
        expert_offsets_ptr,
        num_experts,
        N,
        K,
        stride_we,
        stride_wn,
        stride_wk,
        HAS_SCALE: tl.constexpr,
        UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """out[slot(r)] = scale[slot(r)] · a[r] @ W[e]ᵀ, W[e] read as [N, K] through its strides; a is [S, K]."""
        expert, rows, row_mask, slots, offs_n, n_mask, offs_k = _expert_tile(
            tile_expert_ptr, tile_row_start_ptr, expert_offsets_ptr, sorted_slots_ptr, num_experts, N,
            BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        if expert >= num_experts:
            return
        a_ptrs = a_ptr + rows[:, None].to(tl.int64) * K + offs_k[None, :]
        w_ptrs = w_ptr + expert.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
        acc = _rows_times_weight(
            a_ptrs, w_ptrs, row_mask, n_mask, offs_k, K, stride_wk, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K
        )
        if HAS_SCALE:
            acc *= tl.load(scale_ptr + slots, mask=row_mask, other=0.0).to(tl.float32)[:, None]
        out_ptrs = out_ptr + slots[:, None] * N + offs_n[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])

    from .fp8_kernels import block_scaled_dot, quantize_tiles

    # BLOCK_N = 128: a program holds whole 1×128 tiles of h, so it quantizes them for the down GEMM itself.
    @triton.autotune(configs=fp8_gemm_configs((128,)), key=["inter", "hidden", "UE8M0", "BLOCK_M"])
    @triton.jit
    def _gate_up_swiglu_fp8_kernel(
        x_ptr, x_scale_ptr, w_ptr, w_scale_ptr, h_ptr, h_scale_ptr,
        sorted_slots_ptr, tile_expert_ptr, tile_row_start_ptr, expert_offsets_ptr,
        num_experts, hidden, inter, top_k,
        stride_xt, stride_xst, stride_we, stride_wn, stride_wk, stride_wse, stride_wsn, stride_wsk,
        UE8M0: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """h[r] = silu(x[token(r)] @ W_gate[e]ᵀ) * (x[token(r)] @ W_up[e]ᵀ) from E4M3 x (1×128 tiles) and E4M3
        weights (128×128 blocks), stored as E4M3 with one scale per row and 128 columns."""
        expert, rows, row_mask, slots, offs_n, n_mask, offs_k = _expert_tile(
            tile_expert_ptr, tile_row_start_ptr, expert_offsets_ptr, sorted_slots_ptr, num_experts, inter,
            BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        if expert >= num_experts:
            return
        tokens = slots // top_k
        x_ptrs = x_ptr + tokens[:, None] * stride_xt + offs_k[None, :]
        x_scale_ptrs = x_scale_ptr + tokens * stride_xst
        gate_ptrs = w_ptr + expert.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
        gate_scale_ptrs = w_scale_ptr + expert.to(tl.int64) * stride_wse + (offs_n // BLOCK_K) * stride_wsn
        # The up rows start at `inter`, a multiple of 128: their scale rows start at inter / 128.
        up_ptrs, up_scale_ptrs = gate_ptrs + inter * stride_wn, gate_scale_ptrs + (inter // BLOCK_K) * stride_wsn
        gate = block_scaled_dot(
            x_ptrs, x_scale_ptrs, row_mask, gate_ptrs, gate_scale_ptrs, n_mask, offs_k, hidden,
            1, stride_wk, 1, stride_wsk, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        up = block_scaled_dot(
            x_ptrs, x_scale_ptrs, row_mask, up_ptrs, up_scale_ptrs, n_mask, offs_k, hidden,
            1, stride_wk, 1, stride_wsk, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        h, h_scale = quantize_tiles(gate * tl.sigmoid(gate) * up, UE8M0)
        h_ptrs = h_ptr + rows[:, None].to(tl.int64) * inter + offs_n[None, :]
        tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])
        tl.store(h_scale_ptr + rows.to(tl.int64) * (inter // BLOCK_K) + tl.program_id(1), h_scale, mask=row_mask)

    @triton.autotune(configs=fp8_gemm_configs((64, 128)), key=["N", "K", "BLOCK_M"])
    @triton.jit
    def _grouped_gemm_scatter_fp8_kernel(
        a_ptr, a_scale_ptr, w_ptr, w_scale_ptr, out_ptr, weights_ptr,
        sorted_slots_ptr, tile_expert_ptr, tile_row_start_ptr, expert_offsets_ptr,
        num_experts, N, K,
        stride_we, stride_wn, stride_wk, stride_wse, stride_wsn, stride_wsk,
        UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        """out[slot(r)] = weight[slot(r)] · a[r] @ W[e]ᵀ from E4M3 a [S, K] (1×128 tiles, scales [S, K/128]) and
        E4M3 W[e] [N, K] (128×128 blocks)."""
        expert, rows, row_mask, slots, offs_n, n_mask, offs_k = _expert_tile(
            tile_expert_ptr, tile_row_start_ptr, expert_offsets_ptr, sorted_slots_ptr, num_experts, N,
            BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        if expert >= num_experts:
            return
        acc = block_scaled_dot(
            a_ptr + rows[:, None].to(tl.int64) * K + offs_k[None, :],
            a_scale_ptr + rows.to(tl.int64) * (K // BLOCK_K),
            row_mask,
            w_ptr + expert.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
            w_scale_ptr + expert.to(tl.int64) * stride_wse + (offs_n // BLOCK_K) * stride_wsn,
            n_mask, offs_k, K, 1, stride_wk, 1, stride_wsk, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        acc *= tl.load(weights_ptr + slots, mask=row_mask, other=0.0).to(tl.float32)[:, None]
        out_ptrs = out_ptr + slots[:, None] * N + offs_n[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])

    @triton.autotune(configs=_combine_configs(), key=["hidden", "top_k"])
    @triton.jit
    def _combine_kernel(y_ptr, out_ptr, num_tokens, hidden, top_k, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
        """out[t] = Σ_j y[t·k + j], accumulated in fp32 in a fixed order."""
        offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask = (offs_t < num_tokens)[:, None] & (offs_h < hidden)[None, :]
        y_ptrs = y_ptr + offs_t[:, None].to(tl.int64) * top_k * hidden + offs_h[None, :]
        acc = tl.zeros((BLOCK_T, BLOCK_H), dtype=tl.float32)
        for j in range(top_k):
            acc += tl.load(y_ptrs + j * hidden, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs_t[:, None].to(tl.int64) * hidden + offs_h[None, :], acc, mask=mask)

    # Each BLOCK_N config writes its own number of partial rows: zero them between autotuning runs.
    @triton.autotune(configs=_gemm_configs(), key=["hidden", "inter"], reset_to_zero=["d_weights_partial_ptr"])
    @triton.jit
    def _swiglu_backward_kernel(
        grad_out_ptr,
        w_down_ptr,
        gate_up_ptr,
        weights_ptr,
        d_gate_up_ptr,
        weighted_h_ptr,
        d_weights_partial_ptr,
        sorted_slots_ptr,
        tile_expert_ptr,
        tile_row_start_ptr,
        expert_offsets_ptr,
        num_experts,
        num_slots,
        hidden,
        inter,
        top_k,
        stride_we,
        stride_wh,
        stride_wi,
        UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """With dA = dOut[token] @ W_down[e] and h = silu(g)·u recomputed from the saved [g, u]:
        d_weight[slot] = Σ dA·h (this N-block's share), dh = w·dA → [dg, du], and w·h for the down-weight grad."""
        pid_n = tl.program_id(1)
        expert, rows, row_mask, slots, offs_n, n_mask, offs_k = _expert_tile(
            tile_expert_ptr, tile_row_start_ptr, expert_offsets_ptr, sorted_slots_ptr, num_experts, inter,
            BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip
        if expert >= num_experts:
            return
        tokens = slots // top_k
        g_ptrs = grad_out_ptr + tokens[:, None] * hidden + offs_k[None, :]
        w_expert_ptr = w_down_ptr + expert.to(tl.int64) * stride_we
        w_ptrs = w_expert_ptr + offs_k[:, None] * stride_wh + offs_n[None, :] * stride_wi
        d_act = _rows_times_weight(
            g_ptrs, w_ptrs, row_mask, n_mask, offs_k, hidden, stride_wh, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K
        )
        mask = row_mask[:, None] & n_mask[None, :]
        gate_up_ptrs = gate_up_ptr + rows[:, None].to(tl.int64) * (2 * inter) + offs_n[None, :]
        gate = tl.load(gate_up_ptrs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(gate_up_ptrs + inter, mask=mask, other=0.0).to(tl.float32)
        routing_weight = tl.load(weights_ptr + slots, mask=row_mask, other=0.0).to(tl.float32)[:, None]
        sigmoid = tl.sigmoid(gate)
        silu = gate * sigmoid
        h = silu * up
        tl.store(d_weights_partial_ptr + pid_n * num_slots + slots, tl.sum(d_act * h, axis=1), mask=row_mask)
        d_h = routing_weight * d_act
        d_gate = d_h * up * sigmoid * (1.0 + gate * (1.0 - sigmoid))
        d_gate_up_ptrs = d_gate_up_ptr + rows[:, None].to(tl.int64) * (2 * inter) + offs_n[None, :]
        tl.store(d_gate_up_ptrs, d_gate.to(d_gate_up_ptr.dtype.element_ty), mask=mask)
        tl.store(d_gate_up_ptrs + inter, (d_h * silu).to(d_gate_up_ptr.dtype.element_ty), mask=mask)
        weighted_h_ptrs = weighted_h_ptr + rows[:, None].to(tl.int64) * inter + offs_n[None, :]
        tl.store(weighted_h_ptrs, (routing_weight * h).to(weighted_h_ptr.dtype.element_ty), mask=mask)

    @triton.autotune(configs=_gemm_configs(), key=["N", "K", "GATHER_A", "GATHER_B"])
    @triton.jit
    def _grouped_wgrad_kernel(
        a_ptr,
        b_ptr,
        dw_ptr,
        sorted_slots_ptr,
        expert_offsets_ptr,
        N,
        K,
        top_k,
        stride_de,
        stride_dn,
        stride_dk,
        GATHER_A: tl.constexpr,
        GATHER_B: tl.constexpr,
        UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """dW[e] = Σ over expert e's sorted rows r of a[row_a(r)]ᵀ b[row_b(r)] ([N, K]); a row is the token (gathered)
        or the sorted row itself. A deterministic K-loop over the expert's rows, no atomics."""
        expert = tl.program_id(0)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.program_id(2) * BLOCK_K + tl.arange(0, BLOCK_K)
        n_mask = offs_n < N
        k_mask = offs_k < K
        row_end = tl.load(expert_offsets_ptr + expert + 1)
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for row_start in range(tl.load(expert_offsets_ptr + expert), row_end, BLOCK_M):
            rows = row_start + tl.arange(0, BLOCK_M)
            row_mask = rows < row_end
            tokens = (tl.load(sorted_slots_ptr + rows, mask=row_mask, other=0) // top_k).to(tl.int64)
            rows_a = tokens if GATHER_A else rows.to(tl.int64)
            rows_b = tokens if GATHER_B else rows.to(tl.int64)
            a_mask = n_mask[:, None] & row_mask[None, :]
            b_mask = row_mask[:, None] & k_mask[None, :]
            a = tl.load(a_ptr + rows_a[None, :] * N + offs_n[:, None], mask=a_mask, other=0.0)
            b = tl.load(b_ptr + rows_b[:, None] * K + offs_k[None, :], mask=b_mask, other=0.0)
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc)
        dw_ptrs = dw_ptr + expert.to(tl.int64) * stride_de + offs_n[:, None] * stride_dn + offs_k[None, :] * stride_dk
        tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=n_mask[:, None] & k_mask[None, :])


def _grid_tiles(meta: RoutingMetadata, n: int):
    return lambda cfg: (meta.tile_expert.numel(), triton.cdiv(n, cfg["BLOCK_N"]))


def _gate_up(
    hidden_states: torch.Tensor, gate_up_proj: torch.Tensor, meta: RoutingMetadata, top_k: int, keep_gate_up: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sorted-row SwiGLU activations h [S, I] and, for the backward, the pre-activation [S, 2I]."""
    num_slots, inter = meta.sorted_slots.numel(), gate_up_proj.shape[1] // 2
    h = hidden_states.new_empty(num_slots, inter)
    gate_up = hidden_states.new_empty(num_slots, 2 * inter) if keep_gate_up else h
    _gate_up_swiglu_kernel[_grid_tiles(meta, inter)](
        hidden_states,
        gate_up_proj,
        gate_up,
        h,
        meta.sorted_slots,
        meta.tile_expert,
        meta.tile_row_start,
        meta.expert_offsets,
        gate_up_proj.shape[0],
        hidden_states.shape[1],
        inter,
        top_k,
        hidden_states.stride(0),
        *gate_up_proj.stride(),
        STORE_GATE_UP=keep_gate_up,
        UPCAST=INTERPRET,
        BLOCK_M=meta.block_m,
    )
    return h, gate_up if keep_gate_up else None


def _grouped_gemm_scatter(
    rows: torch.Tensor,
    weight: torch.Tensor,
    n: int,
    weight_strides: tuple[int, int, int],
    meta: RoutingMetadata,
    scale: torch.Tensor | None,
) -> torch.Tensor:
    """[S, n] in slot order: scale[slot] · rows[r] @ W[e]ᵀ, W[e] given as [n, K] by (expert, n, k) strides."""
    out = rows.new_empty(meta.sorted_slots.numel(), n)
    _grouped_gemm_scatter_kernel[_grid_tiles(meta, n)](
        rows,
        weight,
        out,
        rows if scale is None else scale,
        meta.sorted_slots,
        meta.tile_expert,
        meta.tile_row_start,
        meta.expert_offsets,
        weight.shape[0],
        n,
        rows.shape[1],
        *weight_strides,
        HAS_SCALE=scale is not None,
        UPCAST=INTERPRET,
        BLOCK_M=meta.block_m,
    )
    return out


def _combine(per_slot: torch.Tensor, num_tokens: int, top_k: int, dtype: torch.dtype) -> torch.Tensor:
    hidden = per_slot.shape[1]
    out = per_slot.new_empty(num_tokens, hidden, dtype=dtype)
    grid = lambda cfg: (triton.cdiv(num_tokens, cfg["BLOCK_T"]), triton.cdiv(hidden, cfg["BLOCK_H"]))  # noqa: E731
    _combine_kernel[grid](per_slot, out, num_tokens, hidden, top_k)
    return out


def _grouped_wgrad(
    a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, meta: RoutingMetadata, top_k: int, gather_a: bool
) -> torch.Tensor:
    """out[e] = Σ_rows aᵀ b over expert e's rows; the token-indexed operand (a if gather_a, else b) is gathered."""
    num_experts, n, k = out.shape
    grid = lambda cfg: (num_experts, triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(k, cfg["BLOCK_K"]))  # noqa: E731
    _grouped_wgrad_kernel[grid](
        a,
        b,
        out,
        meta.sorted_slots,
        meta.expert_offsets,
        n,
        k,
        top_k,
        *out.stride(),
        GATHER_A=gather_a,
        GATHER_B=not gather_a,
        UPCAST=INTERPRET,
        BLOCK_M=meta.block_m,
    )
    return out


def _forward(
    hidden_states: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    meta: RoutingMetadata,
    keep_gate_up: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    num_tokens, top_k = top_k_weights.shape
    h, gate_up = _gate_up(hidden_states, gate_up_proj, meta, top_k, keep_gate_up)
    weighted = _grouped_gemm_scatter(h, down_proj, down_proj.shape[1], down_proj.stride(), meta, top_k_weights)
    return _combine(weighted, num_tokens, top_k, hidden_states.dtype), gate_up


class _FusedExperts(torch.autograd.Function):
    """Training path: saves x, the weights and the [S, 2I] pre-activation; recomputes everything else."""

    @staticmethod
    def forward(ctx, hidden_states, top_k_weights, gate_up_proj, down_proj, meta):
        out, gate_up = _forward(hidden_states, top_k_weights, gate_up_proj, down_proj, meta, keep_gate_up=True)
        ctx.save_for_backward(hidden_states, top_k_weights, gate_up_proj, down_proj, gate_up)
        ctx.meta = meta
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden_states, top_k_weights, gate_up_proj, down_proj, gate_up = ctx.saved_tensors
        meta: RoutingMetadata = ctx.meta
        grad_out = grad_out.contiguous()
        num_tokens, top_k = top_k_weights.shape
        num_slots, inter = gate_up.shape[0], down_proj.shape[2]
        d_gate_up = torch.empty_like(gate_up)
        weighted_h = gate_up.new_empty(num_slots, inter)
        num_n_blocks = triton.cdiv(inter, min(cfg.kwargs["BLOCK_N"] for cfg in _gemm_configs()))
        d_weights_partial = grad_out.new_zeros(num_n_blocks, num_slots, dtype=torch.float32)
        _swiglu_backward_kernel[_grid_tiles(meta, inter)](
            grad_out,
            down_proj,
            gate_up,
            top_k_weights,
            d_gate_up,
            weighted_h,
            d_weights_partial,
            meta.sorted_slots,
            meta.tile_expert,
            meta.tile_row_start,
            meta.expert_offsets,
            down_proj.shape[0],
            num_slots,
            down_proj.shape[1],
            inter,
            top_k,
            *down_proj.stride(),
            UPCAST=INTERPRET,
            BLOCK_M=meta.block_m,
        )
        d_weights = d_weights_partial.sum(0).view(num_tokens, top_k).to(top_k_weights.dtype)
        d_down = _grouped_wgrad(grad_out, weighted_h, torch.empty_like(down_proj), meta, top_k, gather_a=True)
        d_gate_up_proj = _grouped_wgrad(
            d_gate_up, hidden_states, torch.empty_like(gate_up_proj), meta, top_k, gather_a=False
        )
        transposed_strides = (gate_up_proj.stride(0), gate_up_proj.stride(2), gate_up_proj.stride(1))
        d_per_slot = _grouped_gemm_scatter(
            d_gate_up, gate_up_proj, hidden_states.shape[1], transposed_strides, meta, scale=None
        )
        d_hidden = _combine(d_per_slot, num_tokens, top_k, hidden_states.dtype)
        return d_hidden, d_weights, d_gate_up_proj, d_down, None


def _default_block_m(num_tokens: int) -> int:
    """16-row tiles for decode-sized batches (each expert's weights read once per step), 64 for training."""
    return BLOCK_M_DECODE if num_tokens <= DECODE_MAX_TOKENS or INTERPRET else BLOCK_M_TRAIN


def fused_experts(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    block_m: int | None = None,
) -> torch.Tensor:
    """Σ_j w[t, j] · down[e_j](silu(gate[e_j] x_t) · up[e_j] x_t) with the Triton kernels (SiLU experts).

    Differentiable in hidden_states, top_k_weights and both weights. Without autograd (decode, eval) nothing is
    saved, and small batches use BLOCK_M = 16 tiles. `block_m` overrides the tile height (a power of two ≥ 16).
    A GEMM takes one dtype, so the hidden states are cast to the weights' (autocast), and the result back.
    """
    num_tokens = hidden_states.shape[0]
    if num_tokens == 0:
        return torch.zeros_like(hidden_states)
    meta = routing_metadata(top_k_index, gate_up_proj.shape[0], block_m or _default_block_m(num_tokens))
    tensors = (hidden_states.to(gate_up_proj.dtype).contiguous(), top_k_weights.contiguous(), gate_up_proj, down_proj)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        out = _FusedExperts.apply(*tensors, meta)
    else:
        out = _forward(*tensors, meta, keep_gate_up=False)[0]
    return out.to(hidden_states.dtype)


def _check_fp8_experts(
    gate_up_proj: torch.Tensor,
    gate_up_proj_scale_inv: torch.Tensor,
    down_proj: torch.Tensor,
    down_proj_scale_inv: torch.Tensor,
    hidden: int,
    act: str,
) -> None:
    """Clear errors for what the FP8 kernels cannot take."""
    if act != "silu":
        raise ValueError(f"fused_experts_fp8: only act='silu' (SwiGLU experts) is supported, got {act!r}")
    check_fp8_weight(gate_up_proj, gate_up_proj_scale_inv, "fused_experts_fp8", "gate_up_proj")
    check_fp8_weight(down_proj, down_proj_scale_inv, "fused_experts_fp8", "down_proj")
    num_experts, two_inter = gate_up_proj.shape[:2]
    inter = two_inter // 2
    if gate_up_proj.shape != (num_experts, 2 * inter, hidden) or down_proj.shape != (num_experts, hidden, inter):
        raise ValueError(
            f"fused_experts_fp8: expected gate_up_proj [E, 2I, H] and down_proj [E, H, I] with H = {hidden}, got "
            f"{tuple(gate_up_proj.shape)} and {tuple(down_proj.shape)}"
        )
    if inter % FP8_BLOCK:
        raise ValueError(
            f"fused_experts_fp8: the expert intermediate size must be a multiple of {FP8_BLOCK} (gate and up blocks "
            f"must not share a 128-row scale block), got {inter}; dequantize such experts instead"
        )


@torch.no_grad()
def fused_experts_fp8(
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    gate_up_proj_scale_inv: torch.Tensor,
    down_proj: torch.Tensor,
    down_proj_scale_inv: torch.Tensor,
    act: str = "silu",
    scale_fmt: str | None = None,
) -> torch.Tensor:
    """Σ_j w[t, j] · down[e_j](silu(gate[e_j] x_t) · up[e_j] x_t) (inference only) with E4M3 expert weights and
    their 128×128 `*_scale_inv` blocks ([E, 2I/128, ceil(H/128)] for gate_up, gate's rows then up's;
    [E, ceil(H/128), I/128] for down), I a multiple of 128. x is quantized per 1×128 tile (`act_quant`), the SwiGLU
    output per 1×128 tile inside the gate/up kernel; both grouped GEMMs promote each 128-K chunk into fp32. The
    routing metadata, tile layout and deterministic combine are those of `fused_experts`. Slots whose expert id is
    ≥ E (expert-parallel sentinels) contribute nothing. Returns [T, H] in hidden_states' dtype."""
    num_tokens, hidden = hidden_states.shape
    _check_fp8_experts(gate_up_proj, gate_up_proj_scale_inv, down_proj, down_proj_scale_inv, hidden, act)
    if not fp8_gemm_runs_on(hidden_states.device):
        raise RuntimeError(
            f"fused_experts_fp8: the FP8 kernels do not run on {hidden_states.device} (see fp8_gemm_runs_on); "
            "dequantize the experts instead"
        )
    if num_tokens == 0:
        return torch.zeros_like(hidden_states)
    num_experts, two_inter, _ = gate_up_proj.shape
    inter, top_k = two_inter // 2, top_k_index.shape[1]
    meta = routing_metadata(top_k_index, num_experts, _default_block_m(num_tokens))
    num_slots = meta.sorted_slots.numel()
    x, x_scale = act_quant(hidden_states, FP8_BLOCK, scale_fmt)
    h = torch.empty(num_slots, inter, dtype=E4M3, device=x.device)
    h_scale = torch.empty(num_slots, inter // FP8_BLOCK, dtype=torch.float32, device=x.device)
    gate_up_scale = gate_up_proj_scale_inv.float()
    _gate_up_swiglu_fp8_kernel[_grid_tiles(meta, inter)](
        x, x_scale, gate_up_proj, gate_up_scale, h, h_scale,
        meta.sorted_slots, meta.tile_expert, meta.tile_row_start, meta.expert_offsets,
        num_experts, hidden, inter, top_k,
        x.stride(0), x_scale.stride(0), *gate_up_proj.stride(), *gate_up_scale.stride(),
        UE8M0=scale_fmt == "ue8m0", UPCAST=INTERPRET, BLOCK_M=meta.block_m, BLOCK_K=FP8_BLOCK,
    )  # fmt: skip
    # Zeros: slots routed to no local expert are covered by no tile and must add nothing in the combine.
    per_slot = hidden_states.new_zeros(num_slots, hidden)
    down_scale = down_proj_scale_inv.float()
    _grouped_gemm_scatter_fp8_kernel[_grid_tiles(meta, hidden)](
        h, h_scale, down_proj, down_scale, per_slot, top_k_weights.contiguous(),
        meta.sorted_slots, meta.tile_expert, meta.tile_row_start, meta.expert_offsets,
        num_experts, hidden, inter,
        *down_proj.stride(), *down_scale.stride(),
        UPCAST=INTERPRET, BLOCK_M=meta.block_m, BLOCK_K=FP8_BLOCK,
    )  # fmt: skip
    return _combine(per_slot, num_tokens, top_k, hidden_states.dtype)


def kernels_default() -> bool:
    """Whether `"deepseek_triton"` should be the default experts implementation: triton and a CUDA device."""
    return triton is not None and torch.cuda.is_available()


def deepseek_triton_experts_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """`ExpertsInterface` entry: the kernels where they can run, the module's own PyTorch forward elsewhere."""
    supported = self.config.hidden_act == "silu" and not self._is_expert_parallel and not self.has_bias
    if not (supported and triton_runs_on(hidden_states.device)):
        return inspect.unwrap(type(self).forward)(self, hidden_states, top_k_index, top_k_weights)
    return fused_experts(hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj)


ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION_NAME, deepseek_triton_experts_forward)
