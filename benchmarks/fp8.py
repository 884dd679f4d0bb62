"""Blockwise FP8 training step (DeepSeek-V3 recipe, `enable_fp8_training`) against fp32 and bf16 autocast on the
same model and batch: forward + backward + AdamW step, arms alternating within rounds, medians.

On CPU the FP8 GEMMs are emulated (quantize → dequantize → fp32 matmul), so this measures the emulation's overhead,
not a speed-up. On a GPU with FP8 tensor cores (compute capability ≥ 8.9) the same script runs the Triton
block-scaled kernel (`model/fp8_kernels.py`); that path has not been run on a GPU yet.

    python benchmarks/fp8.py --rounds 5
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time

import torch

from deepseek_moe import DeepseekMoeConfig, DeepseekMoeForCausalLM
from deepseek_moe.training.fp8 import enable_fp8_training


def build(arm: str, device: str) -> DeepseekMoeForCausalLM:
    torch.manual_seed(0)
    config = DeepseekMoeConfig.from_preset(
        "tiny-v3",
        vocab_size=4096,
        hidden_size=512,
        intermediate_size=1024,
        moe_intermediate_size=256,
        num_attention_heads=4,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        num_nextn_predict_layers=0,
    )
    model = DeepseekMoeForCausalLM(config).to(device).train()
    return enable_fp8_training(model) if arm == "fp8 blockwise" else model


def step_seconds(model, optimizer, input_ids, autocast: bool) -> float:
    device_type = input_ids.device.type
    context = torch.autocast(device_type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    if device_type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with context:
        loss = model(input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    if device_type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    arms = ["fp32", "bf16 autocast", "fp8 blockwise"]
    models = {arm: build(arm, device) for arm in arms}
    optimizers = {arm: torch.optim.AdamW(m.parameters(), lr=1e-4) for arm, m in models.items()}
    input_ids = torch.randint(0, 4096, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)
    times: dict[str, list[float]] = {arm: [] for arm in arms}
    for arm in arms:  # warm-up
        step_seconds(models[arm], optimizers[arm], input_ids, arm == "bf16 autocast")
    for round_index in range(args.rounds):
        for arm in arms[round_index % 3 :] + arms[: round_index % 3]:
            times[arm].append(step_seconds(models[arm], optimizers[arm], input_ids, arm == "bf16 autocast"))
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    print(f"device: {name}, {os.cpu_count()} cores, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"batch {args.batch} × seq {args.seq}, {args.rounds} rounds, medians")
    print("| arm | step ms | vs fp32 | vs bf16 |")
    print("| --- | --- | --- | --- |")
    medians = {arm: statistics.median(t) * 1e3 for arm, t in times.items()}
    for arm in arms:
        fp32, bf16 = medians[arm] / medians["fp32"], medians[arm] / medians["bf16 autocast"]
        print(f"| {arm} | {medians[arm]:.0f} | {fp32:.2f}× | {bf16:.2f}× |")


if __name__ == "__main__":
    main()
