"""The matrix products of one MLA decode step on CPU, alone: MKL (torch's default CPU GEMM) against oneDNN, at the
step's own shapes, with the square-matmul rate and the read bandwidth that `mla_decode.py`'s floor uses.

Per layer and sequence the absorbed step does two skinny products over the cached latent (heads × new tokens = 16
query rows): the scores [16, 576] · [T, 576]ᵀ and the weighted sum [16, T] · [T, 512]; and it reads the weights
through matrix-vector products. Each line is the median of `--repeats` runs, the variants alternating within every
run; GEMVs read weights evicted from the caches (a 64 MB sum runs before each).

    OMP_NUM_THREADS=1 python benchmarks/mla_decode_shapes.py --contexts 8192 16384
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

HEADS, RANK, ROPE = 16, 512, 64
BLOCK = 2048  # the LatentCache's transposed blocks


def onednn(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x · wᵀ through oneDNN (the op torch's inductor uses for frozen fp32 linears)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def race(variants: dict[str, Callable[[], object]], repeats: int, before: Callable[[], object] | None = None) -> dict:
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, work in variants.items():
            if before is not None:
                before()
            start = time.perf_counter()
            work()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values[1:]) for name, values in times.items()}


def products(context: int, repeats: int) -> None:
    rows = torch.randn(context + 256, RANK + ROPE)  # the cache's row buffer, with spare room
    latent = rows[:context]
    query = torch.randn(HEADS, RANK + ROPE)
    weights = torch.randn(HEADS, context).softmax(-1)
    blocks = context // BLOCK
    columns = latent[: blocks * BLOCK, :RANK].reshape(blocks, BLOCK, RANK).transpose(1, 2).contiguous()
    feature_major = latent[:, :RANK].t().contiguous()

    def blocked_sum() -> torch.Tensor:
        out = weights[:, blocks * BLOCK :] @ latent[blocks * BLOCK :, :RANK]
        per_block = weights[:, : blocks * BLOCK].unflatten(-1, (blocks, BLOCK)).transpose(0, 1).contiguous()
        for block_weights, block_columns in zip(per_block, columns, strict=True):
            out += onednn(block_columns, block_weights).t()
        return out

    scores_flops, sum_flops = 2 * HEADS * context * (RANK + ROPE), 2 * HEADS * context * RANK
    results = race(
        {
            "scores  MKL  query · rowsᵀ (bmm)": lambda: torch.bmm(query[None], latent[None].transpose(1, 2)),
            "scores  oneDNN over the rows": lambda: onednn(latent, query),
            "sum     MKL  weights · rows (bmm)": lambda: torch.bmm(weights[None], latent[None, :, :RANK]),
            "sum     oneDNN, whole c_kv feature-major": lambda: onednn(feature_major, weights),
            f"sum     oneDNN, {BLOCK}-row blocks + MKL rest": blocked_sum,
        },
        repeats,
    )
    for name, seconds in results.items():
        flops = scores_flops if name.startswith("scores") else sum_flops
        print(f"T={context:6d}  {name:46s} {seconds * 1e3:7.3f} ms  {flops / seconds / 1e9:6.1f} GFLOP/s")
    lengths = itertools.count(context)
    fresh = race({"scores  oneDNN, a new T every call": lambda: onednn(rows[: next(lengths)], query)}, repeats)
    for name, seconds in fresh.items():
        print(f"T={context:6d}  {name:46s} {seconds * 1e3:7.3f} ms  (a kernel compiled per shape)")


def square(repeats: int) -> None:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    results = race({"MKL a @ b": lambda: a @ b, "oneDNN a · bᵀ": lambda: onednn(a, b)}, repeats)
    for name, seconds in results.items():
        print(f"square 1024² fp32  {name:30s} {2 * 1024**3 / seconds / 1e9:6.1f} GFLOP/s")


def gemv(repeats: int) -> None:
    flush = torch.ones(16 * 2**20)
    sums = race({"sum": flush.sum}, repeats)
    print(f"read bandwidth (sum over 64 MB)  {flush.nbytes / sums['sum'] / 1e9:6.1f} GB/s")
    for out_features, in_features in ((3072, 384), (2048, 1024), (1024, 2048)):
        weight = torch.randn(out_features, in_features)
        for name, seconds in gemv_variants(weight, torch.randn(1, in_features), repeats, flush.sum).items():
            print(f"GEMV {out_features}x{in_features}  {name:34s} {weight.nbytes / seconds / 1e9:6.1f} GB/s")


def gemv_variants(weight: torch.Tensor, x: torch.Tensor, repeats: int, flush: Callable[[], object]) -> dict:
    transposed = weight.t().contiguous()
    variants = {
        "F.linear(x, W) (MKL)": lambda: F.linear(x, weight),
        "oneDNN x · Wᵀ": lambda: onednn(x, weight),
        "x @ Wᵀ stored transposed (MKL)": lambda: x @ transposed,
    }
    return race(variants, repeats, before=flush)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--repeats", type=int, default=11)
    args = parser.parse_args()
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    square(args.repeats)
    for context in args.contexts:
        products(context, args.repeats)
    gemv(args.repeats)


if __name__ == "__main__":
    main()
