"""FP8 inference kernels against bf16 on the same weights, on a GPU with FP8 tensor cores (compute capability ≥ 8.9):

- routed experts layer: `fused_experts_fp8` (E4M3 weights, 128×128 block scales) against our bf16 `fused_experts`,
  prefill (ms, TFLOP/s of the routed GEMMs) and decode steps (ms, GB/s on the touched experts' weights);
- dense linears: `fp8_linear` against bf16 `F.linear` at V3's projection shapes (ms, TFLOP/s);
- decode step of one MoE decoder layer's GEMMs (MLA projections q_a, q_b, kv_a, o; shared expert; routed experts;
  not the attention core, norms or router) at batch B: ms, tokens/s of that layer, weight memory and peak memory.

Every row also prints the FP8 output's relative error against bf16 (Frobenius), a sanity check of the quantization.
Shapes are DeepSeek-V3's (hidden 7168, moe_intermediate 2048, 256 experts, top-8), `--scale` divides hidden and
intermediate sizes and `--expert-scale` the number of experts (full size needs ~35 GB of GPU memory).

    python benchmarks/fp8_inference.py                      # on the GPU, V3 shapes
    TRITON_INTERPRET=1 python benchmarks/fp8_inference.py --smoke   # CPU: interpreter on tiny shapes, no timing

Without an FP8 GPU it says so and stops, unless `--smoke` runs the kernels once through Triton's interpreter on tiny
shapes (a check that the script and kernels run; the interpreter's times mean nothing and are not printed).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from moe_layer import _copy_bandwidth, _routing, _time_each  # noqa: E402  (the sibling benchmark's helpers)

from deepseek_moe.model import moe_kernels  # noqa: E402
from deepseek_moe.model.fp8_kernels import fp8_gemm_runs_on, fp8_linear  # noqa: E402
from deepseek_moe.training.fp8 import quantize_blocks  # noqa: E402

# hidden, moe_intermediate, routed experts, top-k, q_lora_rank, heads, qk head dim, kv_lora_rank + rope dim, v head dim
V3 = {"hidden": 7168, "inter": 2048, "experts": 256, "top_k": 8, "q_lora": 1536, "heads": 128, "qk_head": 192}
V3 |= {"kv_a": 576, "v_head": 128}


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 + 128×128 `weight_scale_inv` of a bf16 weight [..., N, K], one matrix at a time (bounded memory)."""
    rows, cols = weight.shape[-2:]
    quantized = torch.empty(weight.shape, dtype=torch.float8_e4m3fn, device=weight.device)
    scale = weight.new_empty(*weight.shape[:-2], -(-rows // 128), -(-cols // 128), dtype=torch.float32)
    for matrix, matrix_q, matrix_scale in zip(
        weight.view(-1, rows, cols), quantized.view(-1, rows, cols), scale.view(-1, *scale.shape[-2:]), strict=True
    ):
        matrix_q[:], matrix_scale[:] = quantize_blocks(matrix, (128, 128))
    return quantized, scale


def _bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _relative_error(fp8: torch.Tensor, bf16: torch.Tensor) -> float:
    return ((fp8.float() - bf16.float()).norm() / bf16.float().norm()).item()


class Experts:
    """bf16 routed-expert weights and their FP8 copy."""

    def __init__(self, hidden: int, inter: int, num_experts: int, device: str) -> None:
        bf16 = {"device": device, "dtype": torch.bfloat16}
        self.gate_up = torch.randn(num_experts, 2 * inter, hidden, **bf16).mul_(hidden**-0.5)
        self.down = torch.randn(num_experts, hidden, inter, **bf16).mul_(inter**-0.5)
        self.quantized = (*quantize_weight(self.gate_up), *quantize_weight(self.down))

    def bf16(self, x, index, weights):
        return moe_kernels.fused_experts(x, index, weights, self.gate_up, self.down)

    def fp8(self, x, index, weights):
        return moe_kernels.fused_experts_fp8(x, index, weights, *self.quantized)


class Linear:
    def __init__(self, in_features: int, out_features: int, device: str) -> None:
        self.weight = torch.randn(out_features, in_features, device=device, dtype=torch.bfloat16)
        self.weight.mul_(in_features**-0.5)
        self.quantized = quantize_weight(self.weight)

    def bf16(self, x):
        return F.linear(x, self.weight)

    def fp8(self, x):
        return fp8_linear(x, *self.quantized)


def _cells(values: list[float], formats: list[str], shown: bool) -> str:
    """Table cells; "–" where the numbers mean nothing (timed through the interpreter)."""
    return " | ".join(format(value, spec) if shown else "–" for value, spec in zip(values, formats, strict=True))


def _compare(fns: dict[str, Callable[[], torch.Tensor]], device: str, reps: int) -> tuple[dict[str, float], float]:
    """Seconds per call of the bf16 and fp8 variants, and the fp8 output's relative error against bf16."""
    return _time_each(fns, device, reps), _relative_error(fns["fp8"](), fns["bf16"]())


@torch.no_grad()
def bench_moe(experts: Experts, top_k: int, tokens: list[int], device: str, reps: int, shown: bool) -> list[str]:
    hidden, inter = experts.down.shape[1], experts.down.shape[2]
    rows = [
        "| tokens | bf16 ms | fp8 ms | fp8 speed-up | bf16 TFLOP/s | fp8 TFLOP/s | fp8 rel. error |",
        "|---" * 7 + "|",
    ]
    for num_tokens in tokens:
        index, weights = _routing(num_tokens, experts.gate_up.shape[0], top_k, device)
        x = torch.randn(num_tokens, hidden, device=device).bfloat16()
        fns = {p: partial(getattr(experts, p), x, index, weights.bfloat16()) for p in ("bf16", "fp8")}
        times, error = _compare(fns, device, reps)
        flop = 6 * num_tokens * top_k * hidden * inter
        values = [times["bf16"] * 1e3, times["fp8"] * 1e3, times["bf16"] / times["fp8"]]
        values += [flop / times["bf16"] / 1e12, flop / times["fp8"] / 1e12]
        rows.append(f"| {num_tokens} | {_cells(values, ['.3f', '.3f', '.2f', '.1f', '.1f'], shown)} | {error:.4f} |")
    return rows


@torch.no_grad()
def bench_linears(linears: dict[str, Linear], tokens: list[int], device: str, reps: int, shown: bool) -> list[str]:
    rows = [
        "| linear | N × K | tokens | bf16 ms | fp8 ms | fp8 speed-up | bf16 TFLOP/s | fp8 TFLOP/s | fp8 rel. error |",
        "|---" * 9 + "|",
    ]
    for name, linear in linears.items():
        n, k = linear.weight.shape
        for num_tokens in tokens:
            x = torch.randn(num_tokens, k, device=device).bfloat16()
            times, error = _compare({p: partial(getattr(linear, p), x) for p in ("bf16", "fp8")}, device, reps)
            flop = 2 * num_tokens * n * k
            values = [times["bf16"] * 1e3, times["fp8"] * 1e3, times["bf16"] / times["fp8"]]
            values += [flop / times["bf16"] / 1e12, flop / times["fp8"] / 1e12]
            cells = _cells(values, [".3f", ".3f", ".2f", ".1f", ".1f"], shown)
            rows.append(f"| {name} | {n} × {k} | {num_tokens} | {cells} | {error:.4f} |")
    return rows


def _decode_layer(linears: dict[str, Linear], experts: Experts, precision: str, x, index, weights):
    """One MoE decoder layer's GEMMs on a batch of B tokens, chained by shape (the attention core is left out)."""
    run = {name: getattr(linear, precision) for name, linear in linears.items()}
    q = run["q_b_proj"](run["q_a_proj"](x))
    run["kv_a_proj_with_mqa"](x)
    attention_out = q[:, : linears["o_proj"].weight.shape[1]]  # stands in for the attention output
    h = run["o_proj"](attention_out.contiguous())
    gate, up = run["shared_gate_up"](h).chunk(2, dim=-1)
    shared = run["shared_down"](F.silu(gate) * up)
    return shared + getattr(experts, precision)(h, index, weights)


def _peak_mib(fn: Callable[[], torch.Tensor], device: str) -> float:
    """Memory a call allocates beyond what is already held (its activations and workspace), in MiB."""
    if device != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


@torch.no_grad()
def bench_decode(linears, experts: Experts, top_k: int, batches: list[int], device: str, reps: int, shown: bool):
    weight_bytes = {
        "bf16": _bytes(*(linear.weight for linear in linears.values()), experts.gate_up, experts.down),
        "fp8": _bytes(*(t for linear in linears.values() for t in linear.quantized), *experts.quantized),
    }
    rows = [
        f"weights of one layer: bf16 {weight_bytes['bf16'] / 2**30:.3f} GiB, fp8 {weight_bytes['fp8'] / 2**30:.3f} "
        f"GiB ({weight_bytes['fp8'] / weight_bytes['bf16']:.3f}×)\n",
        "| batch | bf16 ms | fp8 ms | fp8 speed-up | bf16 tokens/s | fp8 tokens/s | bf16 peak MiB | fp8 peak MiB "
        "| fp8 rel. error |",
        "|---" * 9 + "|",
    ]
    hidden = experts.down.shape[1]
    for batch in batches:
        index, weights = _routing(batch, experts.gate_up.shape[0], top_k, device)
        x = torch.randn(batch, hidden, device=device).bfloat16()
        step = {p: partial(_decode_layer, linears, experts, p, x, index, weights.bfloat16()) for p in ("bf16", "fp8")}
        peak = {p: _peak_mib(fn, device) for p, fn in step.items()}
        times, error = _compare(step, device, reps)
        values = [times["bf16"] * 1e3, times["fp8"] * 1e3, times["bf16"] / times["fp8"]]
        values += [batch / times["bf16"], batch / times["fp8"], peak["bf16"], peak["fp8"]]
        cells = _cells(values, [".3f", ".3f", ".2f", ".0f", ".0f", ".1f", ".1f"], shown)
        rows.append(f"| {batch} | {cells} | {error:.4f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=1, help="divide hidden and intermediate sizes by this")
    parser.add_argument("--expert-scale", type=int, default=1, help="divide the number of experts by this")
    parser.add_argument("--prefill-tokens", type=int, nargs="+", default=[128, 1024, 4096])
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one call each, no timing (CPU check)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not fp8_gemm_runs_on(device):
        print(
            f"No GPU with FP8 tensor cores here ({device}): the FP8 vs bf16 numbers need one (compute capability "
            "≥ 8.9). On CPU, run `TRITON_INTERPRET=1 python benchmarks/fp8_inference.py --smoke` for a smoke check."
        )
        return
    shown = device == "cuda"  # the interpreter's (smoke) times are measured but not printed
    shape = dict(V3)
    if args.smoke:
        shape |= {"hidden": 256, "inter": 128, "experts": 8, "top_k": 2, "q_lora": 128, "heads": 2, "kv_a": 144}
        args.prefill_tokens, args.decode_batches, args.reps = [16], [1, 4], 1
    else:
        shape |= {key: shape[key] // args.scale for key in ("hidden", "inter", "q_lora")}
        shape["experts"] //= args.expert_scale
    torch.manual_seed(0)
    device_name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    bandwidth = f", copy bandwidth {_copy_bandwidth(device) / 1e9:.0f} GB/s" if shown else ""
    print(f"device {device} ({device_name}), torch {torch.__version__}{bandwidth}; shapes {shape}")
    if not shown:
        print("Smoke check through Triton's interpreter: kernels run and FP8 stays close to bf16; no timing.")
    hidden, heads = shape["hidden"], shape["heads"]
    experts = Experts(hidden, shape["inter"], shape["experts"], device)
    linears = {
        "q_a_proj": Linear(hidden, shape["q_lora"], device),
        "q_b_proj": Linear(shape["q_lora"], heads * shape["qk_head"], device),
        "kv_a_proj_with_mqa": Linear(hidden, shape["kv_a"], device),
        "o_proj": Linear(heads * shape["v_head"], hidden, device),
        "shared_gate_up": Linear(hidden, 2 * shape["inter"], device),
        "shared_down": Linear(shape["inter"], hidden, device),
    }
    top_k = shape["top_k"]
    print(f"\n### Routed experts, prefill ({shape['experts']} experts, top-{top_k}; TFLOP/s of the routed GEMMs)\n")
    print("\n".join(bench_moe(experts, top_k, args.prefill_tokens, device, args.reps, shown)))
    print("\n### Routed experts, decode step\n")
    print("\n".join(bench_moe(experts, top_k, args.decode_batches, device, args.reps * 4, shown)))
    print("\n### Dense linears (V3 projections)\n")
    print("\n".join(bench_linears(linears, args.decode_batches + args.prefill_tokens, device, args.reps, shown)))
    print("\n### Decode step: one MoE decoder layer's GEMMs (no attention core, norms or router)\n")
    print("\n".join(bench_decode(linears, experts, top_k, args.decode_batches, device, args.reps * 4, shown)))


if __name__ == "__main__":
    main()
