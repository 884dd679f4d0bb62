"""MLA decode speed: our absorbed attention over the latent cache against transformers' built-in DeepseekV3, which
re-expands the whole cached latent through `kv_b_proj` at every step. Same weights, same cache contents.

The cache is filled with random latent rows (both models cache the normalised `c_kv` and the rotated `k_pe` in the
same layout), so long contexts need no prefill. Each configuration times `--steps` one-token decode steps.

    python benchmarks/mla_decode.py --contexts 512 2048 8192 --batches 1 8
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, DynamicCache

from deepseek_moe import DeepseekMoeConfig, DeepseekMoeForCausalLM

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


def build_models() -> tuple[DeepseekMoeForCausalLM, DeepseekV3ForCausalLM]:
    torch.manual_seed(0)
    ours = DeepseekMoeForCausalLM(DeepseekMoeConfig.from_preset("deepseek-v3", **SHAPE, num_nextn_predict_layers=0))
    builtin_config = DeepseekV3Config(
        **SHAPE, rope_parameters=dict(ours.config.rope_parameters), max_position_embeddings=163840, num_mtp_layers=0
    )
    with tempfile.TemporaryDirectory() as directory:
        ours.save_pretrained(directory)
        builtin = DeepseekV3ForCausalLM.from_pretrained(directory, config=builtin_config, dtype=torch.float32)
    return ours.eval(), builtin.eval()


def filled_cache(model, batch: int, context: int) -> DynamicCache:
    config = model.config
    cache = DynamicCache(config=config)
    generator = torch.Generator().manual_seed(context + batch)
    for layer in range(config.num_hidden_layers):
        c_kv = torch.randn(batch, 1, context, config.kv_lora_rank, generator=generator)
        k_pe = torch.randn(batch, 1, context, config.qk_rope_head_dim, generator=generator)
        cache.update(c_kv, k_pe, layer)
    return cache


@torch.no_grad()
def decode_seconds(model, batch: int, context: int, steps: int) -> float:
    """Mean seconds per one-token decode step after `context` cached tokens."""
    cache = filled_cache(model, batch, context)
    token = torch.zeros(batch, 1, dtype=torch.long)
    model(token, cache=cache, position_ids=torch.full((batch, 1), context), use_cache=True)  # warm-up
    start = time.perf_counter()
    for step in range(steps):
        position = torch.full((batch, 1), context + 1 + step)
        model(token, cache=cache, position_ids=position, use_cache=True)
    return (time.perf_counter() - start) / steps


@torch.no_grad()
def check_same_logits(ours, builtin) -> float:
    cache_a, cache_b = filled_cache(ours, 2, 64), filled_cache(builtin, 2, 64)
    token, position = torch.tensor([[5], [7]]), torch.full((2, 1), 64)
    a = ours(token, cache=cache_a, position_ids=position, use_cache=True).logits
    b = builtin(token, cache=cache_b, position_ids=position, use_cache=True).logits
    return float((a - b).abs().max() / b.abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()

    ours, builtin = build_models()
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, fp32")
    print(f"relative logit difference ours vs built-in on one decode step: {check_same_logits(ours, builtin):.1e}")
    print("| batch | context | built-in tok/s | ours tok/s | speed-up |")
    print("| --- | --- | --- | --- | --- |")
    for batch in args.batches:
        for context in args.contexts:
            theirs = decode_seconds(builtin, batch, context, args.steps)
            mine = decode_seconds(ours, batch, context, args.steps)
            print(f"| {batch} | {context} | {batch / theirs:.1f} | {batch / mine:.1f} | {theirs / mine:.2f}x |")


if __name__ == "__main__":
    main()
