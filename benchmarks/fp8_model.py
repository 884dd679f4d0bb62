"""A whole model kept in FP8 against the same weights dequantized to bf16, on a GPU where the FP8 Triton kernels run:
parameter memory, peak memory, prefill time and greedy decode tokens/s through `generate`.

DeepSeek-V3's layer shapes (hidden 7168, MLA, 256 experts top-8 with moe_intermediate 2048) with `--layers` decoder
layers (the first dense, the rest MoE) and `--expert-scale` dividing the number of experts; random weights are saved,
converted to DeepSeek's FP8 form (`convert --to fp8`, 128×128 block scales), and that folder is loaded twice:
`DeepseekFp8Config(dequantize=False)` (E4M3 weights: `fp8_linear`, `fused_experts_fp8`) and `dequantize=True` (bf16,
`deepseek_triton` experts). The kept model's last-step logits are compared with the bf16 model's (relative Frobenius
error: activation quantization to E4M3, a sanity check).

    python benchmarks/fp8_model.py                 # GPU (defaults: 2 layers, 64 experts; ~10 GB of bf16 weights)
    python benchmarks/fp8_model.py --smoke         # CPU: tiny shapes through Triton's interpreter, no timing

Without an FP8 GPU it says so and stops, unless `--smoke` runs the flow once on tiny shapes (times mean nothing there
and are not printed).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

if "--smoke" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from deepseek_moe import DeepseekFp8Config, DeepseekMoeConfig, DeepseekMoeForCausalLM  # noqa: E402
from deepseek_moe.conversion import convert_checkpoint  # noqa: E402
from deepseek_moe.model.fp8_kernels import fp8_gemm_runs_on  # noqa: E402


def build_config(args: argparse.Namespace) -> DeepseekMoeConfig:
    if args.smoke:  # whole 128-blocks in the experts, so that they stay FP8 too
        return DeepseekMoeConfig.from_preset("tiny-v3", moe_intermediate_size=128, num_nextn_predict_layers=0)
    v3 = DeepseekMoeConfig.from_preset("deepseek-v3")
    return DeepseekMoeConfig.from_preset(
        "deepseek-v3",
        num_hidden_layers=args.layers,
        first_k_dense_replace=1,
        num_nextn_predict_layers=0,
        n_routed_experts=v3.n_routed_experts // args.expert_scale,
    )


def write_fp8_folder(config: DeepseekMoeConfig, directory: Path, device: str) -> Path:
    """Random bf16 weights (initializer_range), saved, then converted to DeepSeek's FP8 form."""
    torch.manual_seed(0)
    with torch.device(device):
        model = DeepseekMoeForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory / "bf16")
    del model
    convert_checkpoint(directory / "bf16", directory / "fp8", target="fp8", progress=False)
    return directory / "fp8"


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(model, prompt: torch.Tensor, new_tokens: int, reps: int, device: str) -> dict[str, float]:
    """Prefill ms (one forward over the prompt) and decode tokens/s (generate's greedy steps after the first token)."""
    with torch.no_grad():
        logits = model(prompt).logits[:, -1].float()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = {"prefill": [], "generate": []}
        for _ in range(reps):
            synchronize(device)
            start = time.perf_counter()
            model(prompt)
            synchronize(device)
            times["prefill"].append(time.perf_counter() - start)
            start = time.perf_counter()
            model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
            synchronize(device)
            times["generate"].append(time.perf_counter() - start)
    prefill, generate = min(times["prefill"]), min(times["generate"])
    decode_steps = prompt.shape[0] * (new_tokens - 1)
    return {
        "parameters_gib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan"),
        "prefill_ms": prefill * 1e3,
        "decode_tokens_per_s": decode_steps / max(generate - prefill, 1e-9),
        "logits": logits,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="decoder layers (the first dense)")
    parser.add_argument("--expert-scale", type=int, default=4, help="divide V3's 256 experts by this")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one run each, no timing (CPU check)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not fp8_gemm_runs_on(torch.device(device)):
        print(f"no GPU with FP8 tensor cores here ({platform.processor() or platform.machine()}): nothing measured")
        return
    if args.smoke:
        args.batch, args.prompt_tokens, args.new_tokens, args.reps = 1, 4, 2, 1
    config = build_config(args)
    prompt = torch.randint(0, config.vocab_size, (args.batch, args.prompt_tokens), device=device)
    with tempfile.TemporaryDirectory() as directory:
        folder = write_fp8_folder(config, Path(directory), device)
        results = {}
        for precision, dequantize in (("fp8", False), ("bf16", True)):
            model = DeepseekMoeForCausalLM.from_pretrained(
                folder,
                dtype=torch.bfloat16,
                device_map=device,
                quantization_config=DeepseekFp8Config(dequantize=dequantize),
            ).eval()
            assert (model.model.layers[-1].mlp.experts.down_proj.dtype == torch.float8_e4m3fn) == (not dequantize)
            results[precision] = measure(model, prompt, args.new_tokens, args.reps, device)
            del model
            if device == "cuda":
                torch.cuda.empty_cache()
    fp8, bf16 = results["fp8"], results["bf16"]
    error = ((fp8["logits"] - bf16["logits"]).norm() / bf16["logits"].norm()).item()
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter)"
    shapes = "tiny-v3 shapes" if args.smoke else "V3 shapes"
    layers, experts = config.num_hidden_layers, config.n_routed_experts
    print(f"{name}; {shapes}, {layers} layers, {experts} experts; batch {args.batch}, prompt {args.prompt_tokens}")
    print(f"kept FP8 last-token logits vs bf16: relative error {error:.3g}")
    if args.smoke:
        print("smoke run: the flow works; times and memory on CPU under the interpreter are not reported")
        return
    print(f"{'':>6} {'params GiB':>11} {'peak GiB':>9} {'prefill ms':>11} {'decode tok/s':>13}")
    for precision, row in results.items():
        print(
            f"{precision:>6} {row['parameters_gib']:11.2f} {row['peak_gib']:9.2f} {row['prefill_ms']:11.1f} "
            f"{row['decode_tokens_per_s']:13.1f}"
        )
    parameters = fp8["parameters_gib"] / bf16["parameters_gib"]
    decode = fp8["decode_tokens_per_s"] / bf16["decode_tokens_per_s"]
    prefill = bf16["prefill_ms"] / fp8["prefill_ms"]
    print(f"fp8/bf16: parameters {parameters:.3f}, decode tokens/s {decode:.2f}x, prefill speed {prefill:.2f}x")


if __name__ == "__main__":
    main()
