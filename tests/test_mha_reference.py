"""DeepSeekMoE-16B layout (multi-head attention, softmax greedy routing, shared experts) against an fp64
re-computation written here from the formulas, reading weights by their official checkpoint names."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, tiny_model

from deepseek_moe import DeepseekMoeConfig


def rms_norm(x, weight, eps):
    return weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(x, positions, theta):
    """Half-split rotation: pairs (x_i, x_{i+d/2}) rotated by angle position·θ^(-2i/d)."""
    d = x.shape[-1]
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = positions[:, None].double() * freqs[None]
    cos, sin = angles.cos(), angles.sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def swiglu(x, gate, up, down):
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


def reference_logits(state: dict, config: DeepseekMoeConfig, input_ids: torch.Tensor) -> torch.Tensor:
    """One sequence, fp64, straight from the formulas."""
    w = {k: v.double() for k, v in state.items()}
    seq = input_ids.shape[0]
    heads, d = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    positions = torch.arange(seq)
    causal = torch.full((seq, seq), float("-inf"), dtype=torch.float64).triu(1)
    h = w["model.embed_tokens.weight"][input_ids]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        x = rms_norm(h, w[p + "input_layernorm.weight"], config.rms_norm_eps)
        q = (x @ w[p + "self_attn.q_proj.weight"].T).view(seq, heads, d).transpose(0, 1)
        k = (x @ w[p + "self_attn.k_proj.weight"].T).view(seq, heads, d).transpose(0, 1)
        v = (x @ w[p + "self_attn.v_proj.weight"].T).view(seq, heads, d).transpose(0, 1)
        q, k = rope(q, positions, config.rope_parameters["rope_theta"]), rope(k, positions, 10000.0)
        attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d) + causal, dim=-1) @ v
        h = h + attn.transpose(0, 1).reshape(seq, -1) @ w[p + "self_attn.o_proj.weight"].T

        x = rms_norm(h, w[p + "post_attention_layernorm.weight"], config.rms_norm_eps)
        if p + "mlp.gate.weight" not in w:
            h = h + swiglu(x, w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"], w[p + "mlp.down_proj.weight"])
            continue
        scores = torch.softmax(x @ w[p + "mlp.gate.weight"].T, dim=-1)
        out = swiglu(
            x,
            w[p + "mlp.shared_experts.gate_proj.weight"],
            w[p + "mlp.shared_experts.up_proj.weight"],
            w[p + "mlp.shared_experts.down_proj.weight"],
        )
        for t in range(seq):
            chosen = sorted(range(config.n_routed_experts), key=lambda e: -scores[t, e].item())
            weights = [scores[t, e] for e in chosen[: config.num_experts_per_tok]]
            if config.norm_topk_prob:
                total = sum(weights)
                weights = [wt / total for wt in weights]
            else:
                weights = [wt * config.routed_scaling_factor for wt in weights]
            for e, wt in zip(chosen, weights, strict=False):
                e_ = f"{p}mlp.experts.{e}."
                out[t] += wt * swiglu(
                    x[t], w[e_ + "gate_proj.weight"], w[e_ + "up_proj.weight"], w[e_ + "down_proj.weight"]
                )
        h = h + out
    h = rms_norm(h, w["model.norm.weight"], config.rms_norm_eps)
    return h @ w["lm_head.weight"].T


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_16b_layout_matches_fp64_formulas(tmp_path, norm_topk_prob):
    config = DeepseekMoeConfig.from_preset("tiny-16b", norm_topk_prob=norm_topk_prob)
    assert not config.uses_mla
    model = tiny_model(config, seed=7).double().eval()
    model.set_experts_implementation("eager")  # grouped_mm has no fp64 kernel
    model.save_pretrained(tmp_path)  # the official per-expert layout the reference reads
    from safetensors.torch import load_file

    state = load_file(tmp_path / "model.safetensors")
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in state
    input_ids = torch.randint(0, config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(input_ids).logits
    for row in range(input_ids.shape[0]):
        reference = reference_logits(state, config, input_ids[row])
        # inv_freq is computed in fp32 (as everywhere in transformers); everything else runs in fp64.
        assert_close(ours[row], reference, 1e-8)
