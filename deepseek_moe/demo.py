"""The package's main job, end to end on one CPU: build a small preset model and generate from it.

Greedy decoding with the latent KV cache is checked against re-running the whole sequence at every step, so the
demo shows both that generation works and that the cache is exact.
"""

from __future__ import annotations

import time

import torch

from .model.configuration_deepseek_moe import DeepseekMoeConfig
from .model.modeling_deepseek_moe import DeepseekMoeForCausalLM


def build_model(preset: str, seed: int) -> DeepseekMoeForCausalLM:
    """A randomly initialised model of the preset's architecture (MTP modules are kept for training demos)."""
    torch.manual_seed(seed)
    return DeepseekMoeForCausalLM(DeepseekMoeConfig.from_preset(preset)).eval()


@torch.no_grad()
def greedy_without_cache(model: DeepseekMoeForCausalLM, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Reference decoding: the full sequence is recomputed for every new token."""
    tokens = prompt
    for _ in range(new_tokens):
        next_token = model(tokens, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, next_token], dim=1)
    return tokens


def run_demo(preset: str = "tiny-v3", new_tokens: int = 24, prompt_length: int = 8, seed: int = 0) -> int:
    """Builds the model, generates greedily with the cache, compares with full recomputation; 0 when they agree."""
    model = build_model(preset, seed)
    config = model.config
    attention = "MLA" if config.uses_mla else "MHA"
    print(
        f"preset {preset}: {config.num_hidden_layers} layers, {attention}, {config.n_routed_experts} routed + "
        f"{config.n_shared_experts} shared experts, top-{config.num_experts_per_tok} ({config.topk_method}, "
        f"{config.scoring_func})"
    )
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, config.vocab_size, (1, prompt_length), generator=generator)

    start = time.perf_counter()
    generated = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    elapsed = time.perf_counter() - start
    reference = greedy_without_cache(model, prompt, new_tokens)

    print(f"prompt    {prompt[0].tolist()}")
    print(f"generated {generated[0, prompt_length:].tolist()}")
    print(f"{new_tokens} tokens in {elapsed:.2f} s ({new_tokens / elapsed:.1f} tokens/s, random weights, CPU)")
    if torch.equal(generated, reference):
        print("cached greedy decoding equals full recomputation: OK")
        return 0
    print("cached greedy decoding differs from full recomputation: FAILED")
    return 1
