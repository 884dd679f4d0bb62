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

from deepseek_moe import DeepseekMoeConfig
from deepseek_moe.dtypes import DTYPE_ALIASES, torch_dtype
from deepseek_moe.model import moe_kernels
from deepseek_moe.model.modeling_deepseek_moe import DeepseekMoeExperts

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


def _time_each(fns: dict[str, Callable[[], object]], device: str, reps: int) -> dict[str, float]:
    """Fastest of `reps` calls of each function after one warm-up. The functions take turns within each round, so
    that load from other work on a shared machine falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for round_ in range(reps + 1):
        for name, fn in fns.items():
            _synchronize(device)
            start = time.perf_counter()
            fn()
            _synchronize(device)
            if round_:
                times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def _copy_bandwidth(device: str) -> float:
    """Bytes/s of a large copy (read + write), the floor's memory speed."""
    source = torch.empty(64 * 2**20, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    seconds = _time_each({"copy": lambda: target.copy_(source)}, device, reps=5)["copy"]
    return 2 * source.numel() * source.element_size() / seconds


def _implementations(device: str, training: bool) -> list[str]:
    names = ["eager", "grouped_mm"] + ([] if training else ["batched_mm"])
    if moe_kernels.triton_runs_on(torch.device(device)) and device == "cuda":
        names.append(moe_kernels.IMPLEMENTATION_NAME)
    return names


def bench_training(experts, top_k: int, num_tokens: int, device: str, reps: int) -> list[str]:
    hidden, inter = experts.hidden_dim, experts.intermediate_dim
    index, weights = _routing(num_tokens, experts.num_experts, top_k, device)
    x = torch.randn(num_tokens, hidden, device=device, dtype=experts.gate_up_proj.dtype, requires_grad=True)
    weights = weights.to(x.dtype).requires_grad_()
    grad_out = torch.randn_like(x)
    forward_flop = 6 * num_tokens * top_k * hidden * inter
    names = _implementations(device, training=True)
    steps = {}
    for name in names:
        steps[name, "fwd"] = partial(_step, experts, name, x, index, weights, None)
        steps[name, "fwd+bwd"] = partial(_step, experts, name, x, index, weights, grad_out)
    times = _time_each(steps, device, reps)
    rows = []
    for name in names:
        t_forward, t_total = times[name, "fwd"], times[name, "fwd+bwd"]
        t_backward = t_total - t_forward
        rows.append(
            f"| {name} | {t_forward * 1e3:.1f} | {t_backward * 1e3:.1f} | {t_total * 1e3:.1f} | "
            f"{forward_flop / t_forward / 1e12:.3f} | {2 * forward_flop / t_backward / 1e12:.3f} | "
            f"{3 * forward_flop / t_total / 1e12:.3f} |"
        )
    return rows


def _step(experts, name: str, x, index, weights, grad_out: torch.Tensor | None) -> None:
    """One forward (with autograd, as in training) and, given an output gradient, its backward."""
    experts.config._experts_implementation = name
    experts.zero_grad(set_to_none=True)  # as a training step would, instead of accumulating
    out = experts(x, index, weights)
    if grad_out is not None:
        out.backward(grad_out)


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
        times = _time_each(
            {name: partial(_decode_step, experts, name, x, index, weights) for name in names}, device, reps
        )
        cells = " | ".join(f"{times[n] * 1e3:.2f} ({floor_bytes / times[n] / 1e9:.1f})" for n in names)
        rows.append(f"| {batch} | {touched} | {floor_bytes / bandwidth * 1e3:.2f} | {cells} |")
    header = " | ".join(f"{n} ms (GB/s)" for n in names)
    return [f"| batch | experts touched | floor ms | {header} |", "|" + "---|" * (3 + len(names)), *rows]


def _decode_step(experts, name: str, x, index, weights) -> torch.Tensor:
    experts.config._experts_implementation = name
    return experts(x, index, weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--scale", type=int, default=8, help="divide hidden and intermediate sizes by this")
    parser.add_argument("--expert-scale", type=int, default=4, help="divide the number of experts by this")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per training step")
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--dtype", default="float32", choices=DTYPE_ALIASES)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    dtype = torch_dtype(args.dtype)
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
        print(f"\nTraining, {args.tokens} tokens (ms; bwd = fwd+bwd − fwd; TFLOP/s of the routed GEMMs):\n")
        print("| implementation | fwd ms | bwd ms | fwd+bwd ms | fwd TFLOP/s | bwd TFLOP/s | fwd+bwd TFLOP/s |")
        print("|---|---|---|---|---|---|---|")
        print("\n".join(bench_training(experts, top_k, args.tokens, args.device, args.reps)))
        print("\nDecode, one step (ms, and effective GB/s on the touched experts' weights):\n")
        print("\n".join(bench_decode(experts, top_k, args.decode_batches, args.device, args.reps * 4, bandwidth)))


if __name__ == "__main__":
    main()
