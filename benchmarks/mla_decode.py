"""MLA decode speed: ours (absorbed attention over the `LatentCache`) against transformers' built-in DeepseekV3
(re-expands the whole cached latent through `kv_b_proj` at every step, over a `DynamicCache`), and ours as a fraction
of this machine's floor for the step. Same weights, same cache contents.

Both caches are filled with the same random latent rows (both models cache the normalised `c_kv` and the rotated
`k_pe`), so long contexts need no prefill. Each configuration runs `--rounds` greedy one-token decode steps per model
after one warm-up step, alternating the two models within every round (the machine is shared: alternation spreads
the other jobs' load over both arms), and reports medians. Both models feed back their own argmax, and the tokens
they produce are compared.

The floor of one step is max(bytes / read bandwidth, FLOPs / matmul throughput), both measured in every round right
before its two steps, with the same thread count (the shared machine's load drifts within seconds); "ours / floor" is
the median over rounds of that round's floor over its step time:
- bytes: every weight the step touches (all but the routed experts, plus min(experts, batch × top-k) experts per MoE
  layer, plus one embedding row per sequence) and the whole latent cache, at the bandwidth of a sum over 256 MB
  (median of 3);
- FLOPs: 2 × batch × the matrix parameters each token uses (top-k of the routed experts) plus, per layer, the scores
  over the cache (2·B·H·T·(kv_lora_rank + qk_rope_head_dim)) and the weighted sum (2·B·H·T·kv_lora_rank), at the
  throughput of a 1024 × 1024 fp32 matmul (median of 3) through the faster of torch's two CPU GEMM libraries: MKL
  (`a @ b`) and oneDNN (`torch.ops.mkldnn._linear_pointwise`, which our decode step uses). On AMD CPUs MKL runs
  without AVX-512, so oneDNN's rate can be twice MKL's; "ours / floor (MKL rate)" is the ratio with MKL's rate
  alone, as earlier entries of docs/BENCHMARKS.md measured it.

"Ours, prepacked" is the same model after `prepack_cpu_weights()` (its linears of a megabyte or more through oneDNN
over packed copies of their weights), as a third arm in the same rounds.

    OMP_NUM_THREADS=1 python benchmarks/mla_decode.py --contexts 512 2048 8192 16384 --batches 1 8

`--dtype bf16` runs every arm, the cache and the floor's matmul in bf16 (torch's `a @ b` in bf16 goes to oneDNN on a
CPU too, so both matmul columns are then oneDNN's).
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, DynamicCache

from deepseek_moe import DeepseekMoeConfig, DeepseekMoeForCausalLM
from deepseek_moe.model.cache_deepseek_moe import LatentCache

# V3 attention dimensions (kv_lora 512, nope 128, rope 64, v 128) with fewer heads and layers to fit a CPU.
SHAPE = {
    "vocab_size": 1024,
    "hidden_size": 1024,
    "intermediate_size": 2048,
    "moe_intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 16,
    "q_lora_rank": 384,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
}


def build_models(dtype: torch.dtype = torch.float32) -> tuple[DeepseekMoeForCausalLM, DeepseekV3ForCausalLM]:
    torch.manual_seed(0)
    ours = DeepseekMoeForCausalLM(DeepseekMoeConfig.from_preset("deepseek-v3", **SHAPE, num_nextn_predict_layers=0))
    builtin_config = DeepseekV3Config(
        **SHAPE, rope_parameters=dict(ours.config.rope_parameters), max_position_embeddings=163840, num_mtp_layers=0
    )
    with tempfile.TemporaryDirectory() as directory:  # both loaded alike: the router stays fp32 in both
        ours.save_pretrained(directory)
        ours = DeepseekMoeForCausalLM.from_pretrained(directory, dtype=dtype)
        builtin = DeepseekV3ForCausalLM.from_pretrained(directory, config=builtin_config, dtype=dtype)
    return ours.eval(), builtin.eval()


def filled_caches(
    config, batch: int, context: int, room: int, dtype: torch.dtype = torch.float32
) -> tuple[LatentCache, DynamicCache]:
    """Ours (sized for `room` more tokens, as `generate` sizes it) and the built-in's, with the same rows."""
    ours, builtin = LatentCache(capacity=context + room), DynamicCache()
    generator = torch.Generator().manual_seed(context + batch)
    for layer in range(config.num_hidden_layers):
        c_kv = torch.randn(batch, 1, context, config.kv_lora_rank, generator=generator).to(dtype)
        k_pe = torch.randn(batch, 1, context, config.qk_rope_head_dim, generator=generator).to(dtype)
        ours.update(c_kv, k_pe, layer)
        builtin.update(c_kv, k_pe, layer)
    return ours, builtin


def measured_bandwidth(data: torch.Tensor, repeats: int = 3) -> float:
    """Bytes/s of a one-pass read (a sum) over `data`, median of `repeats`."""
    return data.nbytes / _median_seconds(data.sum, repeats)


def measured_matmul(a: torch.Tensor, b: torch.Tensor, repeats: int = 3) -> tuple[float, float]:
    """FLOP/s of a square matmul through `a @ b` (MKL in fp32) and through oneDNN (0 without it), medians of
    `repeats`."""
    flops = 2 * a.shape[0] ** 3
    mkl = flops / _median_seconds(lambda: a @ b, repeats)
    if not torch.backends.mkldnn.is_available():
        return mkl, 0.0
    onednn = flops / _median_seconds(lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""), repeats)
    return mkl, onednn


def _median_seconds(work, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_work(model: DeepseekMoeForCausalLM, batch: int, context: int) -> tuple[float, float]:
    """(bytes the step must read, FLOPs it must do) for one decode step after `context` cached tokens."""
    config = model.config
    experts, top_k = config.n_routed_experts, config.num_experts_per_tok
    touched = min(experts, batch * top_k) / experts
    weight_bytes = flops = 0.0
    for name, parameter in model.named_parameters():
        if "embed_tokens" in name:
            weight_bytes += batch * parameter.shape[-1] * parameter.element_size()
            continue
        expert = ".experts." in name
        weight_bytes += parameter.nbytes * (touched if expert else 1.0)
        if parameter.dim() >= 2:
            flops += 2 * batch * parameter.numel() * (top_k / experts if expert else 1.0)
    width = config.kv_lora_rank + config.qk_rope_head_dim
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    cache_bytes = layers * batch * context * width * model.dtype.itemsize
    flops += layers * 2 * batch * heads * context * (width + config.kv_lora_rank)
    return weight_bytes + cache_bytes, flops


@dataclass
class Round:
    ours: float  # seconds per step
    prepacked: float
    builtin: float
    floor: float  # seconds, from this round's measurements
    memory_floor: float
    compute_floor: float
    mkl_floor: float  # the floor at MKL's matmul rate
    bandwidth: float  # bytes/s
    throughput: float  # FLOP/s, the faster library
    mkl_throughput: float
    onednn_throughput: float


@torch.no_grad()
def race(ours, prepacked, builtin, batch: int, context: int, rounds: int) -> tuple[list[Round], bool]:
    """`rounds` rounds of: measure the floor, one greedy step of ours, ours prepacked and the built-in (after a warm-up
    round).

    The floor is measured inside every round, next to the steps it is compared with, because the machine's load (and
    so its bandwidth and matmul throughput) drifts within seconds. Returns the rounds and whether the tokens agree."""
    dtype = ours.dtype
    cache_ours, cache_builtin = filled_caches(ours.config, batch, context, rounds + 1, dtype)
    cache_prepacked = filled_caches(ours.config, batch, context, rounds + 1, dtype)[0]
    arms = {"ours": (ours, cache_ours), "prepacked": (prepacked, cache_prepacked), "builtin": (builtin, cache_builtin)}
    tokens = {name: [torch.zeros(batch, 1, dtype=torch.long)] for name in arms}
    step_bytes, step_flops = step_work(ours, batch, context)
    data, a, b = torch.ones(64 * 2**20), torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    results = []
    for step in range(rounds + 1):
        bandwidth, (mkl, onednn) = measured_bandwidth(data), measured_matmul(a, b)
        throughput = max(mkl, onednn)
        seconds = {}
        for name, (model, cache) in arms.items():
            position = torch.full((batch, 1), context + step)
            start = time.perf_counter()
            logits = model(tokens[name][-1], cache=cache, position_ids=position, use_cache=True).logits
            seconds[name] = time.perf_counter() - start
            tokens[name].append(logits[:, -1:].argmax(-1))
        memory_floor, compute_floor = step_bytes / bandwidth, step_flops / throughput
        floor, mkl_floor = max(memory_floor, compute_floor), max(memory_floor, step_flops / mkl)
        if step:  # the first round warms up
            results.append(Round(**seconds, floor=floor, memory_floor=memory_floor, compute_floor=compute_floor,
                                 mkl_floor=mkl_floor, bandwidth=bandwidth, throughput=throughput,
                                 mkl_throughput=mkl, onednn_throughput=onednn))  # fmt: skip
    reference = torch.cat(tokens["builtin"], dim=1)
    same = all(torch.equal(torch.cat(tokens[name], dim=1), reference) for name in ("ours", "prepacked"))
    return results, same


@torch.no_grad()
def check_same_logits(ours, builtin) -> float:
    cache_a, cache_b = filled_caches(ours.config, 2, 64, 1, ours.dtype)
    token, position = torch.tensor([[5], [7]]), torch.full((2, 1), 64)
    a = ours(token, cache=cache_a, position_ids=position, use_cache=True).logits
    b = builtin(token, cache=cache_b, position_ids=position, use_cache=True).logits
    return float((a - b).abs().max() / b.abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192, 16384])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    args = parser.parse_args()

    ours, builtin = build_models(torch.bfloat16 if args.dtype == "bf16" else torch.float32)
    prepacked = copy.deepcopy(ours)
    prepacked.prepack_cpu_weights()
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, {args.dtype}")
    print(f"relative logit difference ours vs built-in on one decode step: {check_same_logits(ours, builtin):.1e}")
    print(
        "| batch | context | built-in ms | ours ms | ours prepacked ms | speed-up (ours) | read GB/s"
        " | matmul GFLOP/s MKL / oneDNN | floor ms (bytes / FLOPs) | ours / floor | prepacked / floor"
        " | ours / floor (MKL rate) | prepacked / floor (MKL rate) | same tokens |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for batch in args.batches:
        for context in args.contexts:
            rounds, same = race(ours, prepacked, builtin, batch, context, args.rounds)
            fields = ("ours", "prepacked", "builtin", "floor", "memory_floor")
            ms = {field: 1e3 * _median(rounds, field) for field in fields}
            ms["compute_floor"] = 1e3 * _median(rounds, "compute_floor")
            print(
                f"| {batch} | {context} | {ms['builtin']:.1f} | {ms['ours']:.1f} | {ms['prepacked']:.1f}"
                f" | {statistics.median(r.builtin / r.ours for r in rounds):.1f}x"
                f" | {_median(rounds, 'bandwidth') / 1e9:.1f}"
                f" | {_median(rounds, 'mkl_throughput') / 1e9:.0f} / {_median(rounds, 'onednn_throughput') / 1e9:.0f}"
                f" | {ms['floor']:.2f} ({ms['memory_floor']:.2f} / {ms['compute_floor']:.2f})"
                f" | {statistics.median(r.floor / r.ours for r in rounds):.0%}"
                f" | {statistics.median(r.floor / r.prepacked for r in rounds):.0%}"
                f" | {statistics.median(r.mkl_floor / r.ours for r in rounds):.0%}"
                f" | {statistics.median(r.mkl_floor / r.prepacked for r in rounds):.0%} | {'yes' if same else 'NO'} |",
                flush=True,
            )


def _median(rounds: list[Round], field: str) -> float:
    return statistics.median(getattr(r, field) for r in rounds)


if __name__ == "__main__":
    main()
