"""Routed-experts layer: training forward / backward / forward+backward time and TFLOP/s, and decode time per step
against the bytes-read floor, for our experts implementations against transformers' `grouped_mm`, `batched_mm`
and `eager` on identical weights and routing.

Shapes are DeepSeek-V3 (hidden 7168, moe_intermediate 2048, 256 experts, top-8) and V2-Lite / 16B (2048, 1408, 64,
top-6), divided by `--scale` in hidden and intermediate size and by `--expert-scale` in the number of experts, so
that they fit a CPU. `deepseek_triton` is timed only where its kernels run (CUDA); elsewhere it would be `eager`.

    python benchmarks/moe_layer.py --scale 8 --expert-scale 4 --tokens 1024
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from functools import partial

import torch

from deepseek_moe import DeepseekMoeConfig, moe_kernels
from deepseek_moe.modeling_deepseek_moe import DeepseekMoeExperts

# name: (hidden, moe_intermediate, routed experts, top-k)
SHAPES = {"v3": (7168, 2048, 256, 8), "v2-lite": (2048, 1408, 64, 6)}


def _experts(hidden: int, inter: int, num_experts: int, device: str, dtype: torch.dtype) -> DeepseekMoeExperts:
    config = DeepseekMoeConfig(
        hidden_size=hidden, moe_intermediate_size=inter, n_routed_experts=num_experts, n_group=1, topk_group=1
    )
    experts = DeepseekMoeExperts(config).to(device=device, dtype=dtype)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, hidden**-0.5)
        experts.down_proj.normal_(0, inter**-0.5)
    return experts


def _routing(num_tokens: int, num_experts: int, top_k: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax-top-k of random logits: roughly balanced, as after load balancing."""
    weights, index = torch.randn(num_tokens, num_experts, device=device).softmax(-1).topk(top_k)
    return index, weights


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time(fn: Callable[[], object], device: str, reps: int) -> float:
    """Fastest of `reps` calls after one warm-up: the least disturbed by other work on a shared machine."""
    fn()
    times = []
    for _ in range(reps):
        _synchronize(device)
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def _copy_bandwidth(device: str) -> float:
    """Bytes/s of a large copy (read + write), the floor's memory speed."""
    source = torch.empty(64 * 2**20, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    seconds = _time(lambda: target.copy_(source), device, reps=5)
    return 2 * source.numel() * source.element_size() / seconds


def _implementations(device: str, training: bool) -> list[str]:
    names = ["eager", "grouped_mm"] + ([] if training else ["batched_mm"])
    if moe_kernels.kernels_run_on(torch.device(device)) and device == "cuda":
        names.append(moe_kernels.IMPLEMENTATION_NAME)
    return names


def bench_training(experts, top_k: int, num_tokens: int, device: str, reps: int) -> list[str]:
    hidden, inter = experts.hidden_dim, experts.intermediate_dim
    index, weights = _routing(num_tokens, experts.num_experts, top_k, device)
    x = torch.randn(num_tokens, hidden, device=device, dtype=experts.gate_up_proj.dtype, requires_grad=True)
    weights = weights.to(x.dtype).requires_grad_()
    grad_out = torch.randn_like(x)
    forward_flop = 6 * num_tokens * top_k * hidden * inter
    rows = []
    for name in _implementations(device, training=True):
        experts.config._experts_implementation = name

        def forward():
            return experts(x, index, weights)

        def forward_backward():
            experts(x, index, weights).backward(grad_out)

        def backward_only():
            out = forward()
            _synchronize(device)
            start = time.perf_counter()
            out.backward(grad_out)
            _synchronize(device)
            return time.perf_counter() - start

        t_forward = _time(forward, device, reps)
        backward_only()
        t_backward = min(backward_only() for _ in range(reps))
        t_total = _time(forward_backward, device, reps)
        rows.append(
            f"| {name} | {t_forward * 1e3:.1f} | {t_backward * 1e3:.1f} | {t_total * 1e3:.1f} | "
            f"{forward_flop / t_forward / 1e12:.3f} | {2 * forward_flop / t_backward / 1e12:.3f} | "
            f"{3 * forward_flop / t_total / 1e12:.3f} |"
        )
    return rows


@torch.no_grad()
def bench_decode(experts, top_k: int, batches: list[int], device: str, reps: int, bandwidth: float) -> list[str]:
    hidden, inter = experts.hidden_dim, experts.intermediate_dim
    element = experts.gate_up_proj.element_size()
    names = _implementations(device, training=False)
    rows = []
    for batch in batches:
        index, weights = _routing(batch, experts.num_experts, top_k, device)
        x = torch.randn(batch, hidden, device=device, dtype=experts.gate_up_proj.dtype)
        weights = weights.to(x.dtype)
        touched = index.unique().numel()
        floor_bytes = touched * 3 * hidden * inter * element + 2 * batch * hidden * element
        times = {}
        for name in names:
            experts.config._experts_implementation = name
            times[name] = _time(partial(experts, x, index, weights), device, reps)
        cells = " | ".join(f"{times[n] * 1e3:.2f} ({floor_bytes / times[n] / 1e9:.1f})" for n in names)
        rows.append(f"| {batch} | {touched} | {floor_bytes / bandwidth * 1e3:.2f} | {cells} |")
    header = " | ".join(f"{n} ms (GB/s)" for n in names)
    return [f"| batch | experts touched | floor ms | {header} |", "|" + "---|" * (3 + len(names)), *rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--scale", type=int, default=8, help="divide hidden and intermediate sizes by this")
    parser.add_argument("--expert-scale", type=int, default=4, help="divide the number of experts by this")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per training step")
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    bandwidth = _copy_bandwidth(args.device)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    print(
        f"device {args.device} ({device_name}), {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{args.dtype}, copy bandwidth {bandwidth / 1e9:.1f} GB/s"
    )
    for shape in args.shapes:
        hidden, inter, num_experts, top_k = SHAPES[shape]
        hidden, inter, num_experts = hidden // args.scale, inter // args.scale, num_experts // args.expert_scale
        experts = _experts(hidden, inter, num_experts, args.device, dtype)
        print(f"\n### {shape} scaled: hidden {hidden}, intermediate {inter}, {num_experts} experts, top-{top_k}")
        print(f"\nTraining, {args.tokens} tokens (ms; TFLOP/s of the routed GEMMs):\n")
        print("| implementation | fwd ms | bwd ms | fwd+bwd ms | fwd TFLOP/s | bwd TFLOP/s | fwd+bwd TFLOP/s |")
        print("|---|---|---|---|---|---|---|")
        print("\n".join(bench_training(experts, top_k, args.tokens, args.device, args.reps)))
        print("\nDecode, one step (ms, and effective GB/s on the touched experts' weights):\n")
        print("\n".join(bench_decode(experts, top_k, args.decode_batches, args.device, args.reps * 4, bandwidth)))


if __name__ == "__main__":
    main()
