"""One training step (forward + backward + AdamW step) of a scaled DeepSeek-V3: tokens/s and peak memory, our model
against transformers' built-in `DeepseekV3ForCausalLM` on the same weights, driven by the same loop.

Ours runs its full V3 training step: the sequence-wise balance loss (α = 1e-4) in the loss, the routers counting
expert loads, and the bias update after the optimizer step; the built-in has no balancing at all (it computes no
auxiliary loss and never moves the bias), so ours does strictly more work; a third arm runs our model without the
balance loss and the bias update, the built-in's work. Neither runs MTP (the built-in cannot
train it). Both use their default experts implementation (`grouped_mm` on CPU, ours `deepseek_triton` on CUDA).

Timing alternates the two models step by step (so that load from other work falls on both alike) and reports the
median step. Peak memory is measured per model in its own process that loads only that model and runs 3 steps: the
peak above the loaded model (CUDA: max allocated bytes; CPU: peak resident set size minus the resident size before
the first step, so gradients, AdamW state and activations). On CUDA, MFU uses 6 × activated
parameters per token plus the attention score/value products, against the device's dense bf16 peak (`--peak-tflops`).

    OMP_NUM_THREADS=1 python benchmarks/training.py --batch 4 --seq 256 --steps 6
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from deepseek_moe import DeepseekMoeConfig, DeepseekMoeForCausalLM
from deepseek_moe.training import update_expert_bias

# V3's structure (MLA with q-LoRA, sigmoid group-limited routing, shared expert, dense first layer) scaled to a CPU.
SHAPE = {
    "vocab_size": 4096,
    "hidden_size": 512,
    "intermediate_size": 1408,
    "moe_intermediate_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "q_lora_rank": 192,
    "kv_lora_rank": 128,
    "qk_nope_head_dim": 64,
    "qk_rope_head_dim": 32,
    "v_head_dim": 64,
    "n_routed_experts": 32,
    "n_shared_experts": 1,
    "num_experts_per_tok": 4,
    "n_group": 4,
    "topk_group": 2,
    "first_k_dense_replace": 1,
}


def builtin_config(config: DeepseekMoeConfig) -> DeepseekV3Config:
    return DeepseekV3Config(
        **SHAPE, rope_parameters=dict(config.rope_parameters), max_position_embeddings=163840, num_mtp_layers=0
    )


def build_models(
    directory: str, dtype: torch.dtype, device: str
) -> tuple[DeepseekMoeForCausalLM, DeepseekV3ForCausalLM]:
    """Our model and the built-in with identical weights (ours saved to `directory`, loaded by the built-in)."""
    torch.manual_seed(0)
    config = DeepseekMoeConfig.from_preset("deepseek-v3", **SHAPE, num_nextn_predict_layers=0, seq_aux_alpha=1e-4)
    ours = DeepseekMoeForCausalLM(config)
    ours.save_pretrained(directory)
    builtin = DeepseekV3ForCausalLM.from_pretrained(directory, config=builtin_config(config), dtype=torch.float32)
    return ours.to(device=device, dtype=dtype).train(), builtin.to(device=device, dtype=dtype).train()


class Stepper:
    """The shared training loop: forward with labels, backward, clip, AdamW (DeepSeek's betas), zero grads; for our
    model also the once-per-step bias update that V3 training needs."""

    def __init__(self, model: torch.nn.Module, balancing: bool) -> None:
        self.model, self.balancing = model, balancing
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)

    def __call__(self, input_ids: torch.Tensor) -> float:
        loss = self.model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.balancing:
            update_expert_bias(self.model)
        return loss.item()


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(steppers: dict[str, Stepper], batches: list[torch.Tensor], device: str) -> dict[str, list[float]]:
    """Seconds per step of each model, taking turns on the same batches after one warm-up step each."""
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for round_, input_ids in enumerate(batches):
        for name, step in steppers.items():
            _synchronize(device)
            start = time.perf_counter()
            step(input_ids)
            _synchronize(device)
            if round_:
                times[name].append(time.perf_counter() - start)
    return times


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def measure_peak_memory(name: str, directory: str, dtype_name: str, device: str, batch: int, seq: int) -> int:
    """Load one model from `directory`, run 3 steps, return the peak memory above the loaded model (CUDA: max
    allocated; CPU: peak resident set size minus the resident size before the first step). Run in a fresh process."""
    torch.set_num_threads(1)
    model_class = DeepseekMoeForCausalLM if name == "ours" else DeepseekV3ForCausalLM
    config = None if name == "ours" else builtin_config(DeepseekMoeConfig.from_pretrained(directory))
    model = model_class.from_pretrained(directory, config=config, dtype=torch.float32)
    stepper = Stepper(model.to(device=device, dtype=getattr(torch, dtype_name)).train(), balancing=name == "ours")
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, SHAPE["vocab_size"], (batch, seq), generator=generator).to(device) for _ in range(3)]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _resident_bytes()
    for input_ids in batches:
        stepper(input_ids)
    if device == "cuda":
        return torch.cuda.max_memory_allocated() - before
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before


def peak_memory(name: str, directory: str, dtype_name: str, device: str, batch: int, seq: int) -> int:
    """`measure_peak_memory` in a child process (this script with --memory-of), so that nothing else is resident."""
    command = [sys.executable, __file__, "--memory-of", name, directory, "--dtype", dtype_name, "--device", device]
    command += ["--batch", str(batch), "--seq", str(seq)]
    completed = subprocess.run(command, capture_output=True, text=True, check=True)
    return int(completed.stdout.strip().splitlines()[-1])


def training_flops_per_token(config: DeepseekMoeConfig, seq: int) -> float:
    """6 × activated parameters (embedding excluded, output head included) + 6 × the attention products per token."""
    hidden, layers = config.hidden_size, config.num_hidden_layers
    heads, qk, v = config.num_attention_heads, config.qk_nope_head_dim + config.qk_rope_head_dim, config.v_head_dim
    q_proj = hidden * config.q_lora_rank + config.q_lora_rank * heads * qk
    kv_proj = hidden * (config.kv_lora_rank + config.qk_rope_head_dim) + config.kv_lora_rank * heads * (
        config.qk_nope_head_dim + v
    )
    attention = q_proj + kv_proj + heads * v * hidden
    dense_mlp = 3 * hidden * config.intermediate_size
    active_experts = config.num_experts_per_tok + config.n_shared_experts
    moe_mlp = 3 * hidden * config.moe_intermediate_size * active_experts + hidden * config.n_routed_experts
    dense_layers = config.first_k_dense_replace
    params = layers * attention + dense_layers * dense_mlp + (layers - dense_layers) * moe_mlp
    params += hidden * config.vocab_size
    attention_products = layers * heads * (qk + v) * seq  # causal: half of S per token, × 2 FLOPs per MAC
    return 6 * params + 6 * attention_products


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per model (after one warm-up)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100/H200: 989)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    parser.add_argument("--memory-of", nargs=2, metavar=("MODEL", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_of:
        print(measure_peak_memory(*args.memory_of, args.dtype, args.device, args.batch, args.seq))
        return
    dtype = getattr(torch, args.dtype)

    directory = tempfile.mkdtemp(prefix="training-benchmark-")
    ours, builtin = build_models(directory, dtype, args.device)
    generator = torch.Generator().manual_seed(1)
    batches = [
        torch.randint(0, SHAPE["vocab_size"], (args.batch, args.seq), generator=generator).to(args.device)
        for _ in range(args.steps + 1)
    ]
    with torch.no_grad():
        ours.eval(), builtin.eval()
        ref = builtin(batches[0]).logits.float()
        difference = ((ours(batches[0]).logits.float() - ref).abs().max() / ref.abs().max()).item()
        ours.train(), builtin.train()
    # The same work as the built-in: our model without the balance loss and without the bias update.
    unbalanced = copy.deepcopy(ours)
    unbalanced.config.seq_aux_alpha = 0.0
    steppers = {"ours": Stepper(ours, True), "ours, no balancing": Stepper(unbalanced, False)}
    steppers["built-in"] = Stepper(builtin, False)
    times = time_steps(steppers, batches, args.device)
    del ours, builtin, unbalanced, steppers
    tokens = args.batch * args.seq
    results = {}
    flops = training_flops_per_token(DeepseekMoeConfig.from_preset("deepseek-v3", **SHAPE), args.seq)
    for name, seconds in times.items():
        median = statistics.median(seconds)
        results[name] = {"step_ms": median * 1e3, "tokens_per_s": tokens / median}
        if name in ("ours", "built-in"):
            arm = "ours" if name == "ours" else "builtin"
            memory = peak_memory(arm, directory, args.dtype, args.device, args.batch, args.seq)
            results[name]["peak_memory_mb"] = memory / 2**20
        if args.device == "cuda":
            results[name]["mfu"] = tokens * flops / median / (args.peak_tflops * 1e12)

    device = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, {args.dtype}")
    print(f"batch {args.batch} x seq {args.seq} = {tokens} tokens/step; median of {args.steps} alternating steps")
    print(f"relative logit difference ours vs built-in before training: {difference:.1e}")
    print("| model | step ms | tokens/s | peak memory MB |" + (" MFU |" if args.device == "cuda" else ""))
    print("|---|---|---|---|" + ("---|" if args.device == "cuda" else ""))
    for name, row in results.items():
        mfu = f" {row['mfu']:.1%} |" if "mfu" in row else ""
        memory = f"{row['peak_memory_mb']:.0f}" if "peak_memory_mb" in row else "—"
        print(f"| {name} | {row['step_ms']:.1f} | {row['tokens_per_s']:.0f} | {memory} |{mfu}")
    for name in ("ours", "ours, no balancing"):
        ratio = results[name]["tokens_per_s"] / results["built-in"]["tokens_per_s"]
        print(f"{name} / built-in tokens/s: {ratio:.2f}")
    if args.json:
        print(json.dumps(results, indent=2))
    shutil.rmtree(directory)


if __name__ == "__main__":
    main()
