"""Size facts about a configuration: exact parameter counts, KV-cache bytes per token and a readable summary.

Everything is derived from the model itself (built on the meta device, so no memory is allocated) rather than from
closed-form formulas, so the numbers cannot drift from what the modeling code actually creates.
"""

from __future__ import annotations

import torch
from torch import nn

from .model.configuration_deepseek_moe import DeepseekMoeConfig
from .model.modeling_deepseek_moe import DeepseekMoeExperts, DeepseekMoeForCausalLM


def _layer_counts(layer: nn.Module, config: DeepseekMoeConfig) -> tuple[int, int]:
    """(all parameters, parameters one token uses) of a decoder or MTP layer: a token reaches only
    `num_experts_per_tok` of the `n_routed_experts` routed experts; router and shared experts always run."""
    total = sum(p.numel() for p in layer.parameters())
    routed = sum(p.numel() for m in layer.modules() if isinstance(m, DeepseekMoeExperts) for p in m.parameters())
    active_routed = routed // config.n_routed_experts * config.num_experts_per_tok if routed else 0
    return total, total - routed + active_routed


def count_parameters(config: DeepseekMoeConfig) -> dict[str, int]:
    """Exact parameter counts of `DeepseekMoeForCausalLM(config)` (parameters only; V3's per-layer
    `e_score_correction_bias` is a buffer and not counted).

    - `total` / `activated`: the main model with embedding and `lm_head`, MTP layers excluded; activated is what one
      token uses (all routed experts replaced by `num_experts_per_tok` of them).
    - `mtp_total` / `mtp_activated`: the MTP layers' own parameters, `eh_proj` included (they share the model's
      embedding and head). DeepSeek's V3 figures, 11.5B unique / 2.4B activated with embedding and head, are these
      counts without the 0.10B `eh_proj` (11.51B / 2.44B).
    - `total_with_mtp`: every parameter this model holds.
    - `checkpoint_total`: what the official checkpoint stores, which also keeps one copy of the embedding and of the
      head inside each MTP layer: 684.49B for V3, which with the 0.04B FP8 scale entries is the hub's "685B"
      (671B main model + MTP + those copies).
    """
    with torch.device("meta"):
        model = DeepseekMoeForCausalLM(config)
    layers = model.model.layers
    main_layers = [_layer_counts(layer, config) for layer in layers[: config.num_hidden_layers]]
    mtp_layers = [_layer_counts(layer, config) for layer in layers[config.num_hidden_layers :]]
    mtp_total = sum(total for total, _ in mtp_layers)
    outside_layers = sum(p.numel() for p in model.parameters()) - sum(total for total, _ in main_layers) - mtp_total
    embedding_and_head = model.model.embed_tokens.weight.numel() + model.lm_head.weight.numel()
    total = outside_layers + sum(total for total, _ in main_layers)
    return {
        "total": total,
        "activated": outside_layers + sum(active for _, active in main_layers),
        "mtp_total": mtp_total,
        "mtp_activated": sum(active for _, active in mtp_layers),
        "total_with_mtp": total + mtp_total,
        "checkpoint_total": total + mtp_total + config.num_nextn_predict_layers * embedding_and_head,
    }


def kv_cache_bytes_per_token(config: DeepseekMoeConfig, dtype_bytes: int = 2) -> dict[str, int]:
    """Bytes the KV cache grows by per token: MLA stores the latent and the rotary key (`kv_lora_rank +
    qk_rope_head_dim` values), multi-head attention stores keys and values of every KV head. MTP layers, which only
    cache when used as a draft model, are not included."""
    if config.uses_mla:
        values = config.kv_lora_rank + config.qk_rope_head_dim
    else:
        values = 2 * config.num_key_value_heads * config.head_dim
    per_layer = values * dtype_bytes
    return {
        "values_per_layer": values,
        "bytes_per_layer": per_layer,
        "num_layers": config.num_hidden_layers,
        "bytes_all_layers": per_layer * config.num_hidden_layers,
    }


def _routing(config: DeepseekMoeConfig) -> str:
    scoring = config.scoring_func + (" + correction bias" if config.uses_bias_balancing else "")
    groups = ""
    if config.uses_group_limited_routing:
        score = "top-2 sum" if config.uses_bias_balancing else "max"
        groups = f", within the best {config.topk_group} of {config.n_group} groups (group score: {score})"
    weights = "normalised" if config.norm_topk_prob else "unnormalised"
    if config.scales_routing_weights:
        weights += f", scaled by {config.routed_scaling_factor:g}"
    return f"{config.topk_method}: {scoring}, top-{config.num_experts_per_tok}{groups}; weights {weights}"


def _billions(count: int) -> str:
    """Billions for reading, the exact count too so that small configurations do not all show 0.00B."""
    return f"{count / 1e9:.2f}B ({count:,})"


def family(config: DeepseekMoeConfig) -> str:
    """Which DeepSeek generation the architecture follows: multi-head attention is DeepSeekMoE (16B), MLA with the
    auxiliary-loss-free router is V3, other MLA models are V2."""
    if not config.uses_mla:
        return "DeepSeekMoE"
    return "DeepSeek-V3" if config.uses_bias_balancing else "DeepSeek-V2"


def summary(config: DeepseekMoeConfig) -> list[tuple[str, str]]:
    """(label, value) rows describing the architecture and its size: `describe` prints them, the Hub model card
    shows them as a table."""
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    if config.uses_mla:
        q = "none (q_proj)" if config.q_lora_rank is None else str(config.q_lora_rank)
        attention = (
            f"MLA, {config.num_attention_heads} heads, kv_lora_rank {config.kv_lora_rank}, q_lora_rank {q}, "
            f"head dims nope/rope/v {config.qk_nope_head_dim}/{config.qk_rope_head_dim}/{config.v_head_dim}"
        )
    else:
        attention = (
            f"multi-head, {config.num_attention_heads} heads ({config.num_key_value_heads} KV), "
            f"head dim {config.head_dim}"
        )
    params = count_parameters(config)
    kv = kv_cache_bytes_per_token(config)
    rows = [
        ("architecture", f"{family(config)}-style, hidden {config.hidden_size}, vocab {config.vocab_size}"),
        ("attention", attention),
        (
            "layers",
            f"{config.num_hidden_layers} ({config.num_hidden_layers - moe_layers} dense, {moe_layers} MoE)"
            + (f" + {config.num_nextn_predict_layers} MTP" if config.num_nextn_predict_layers else ""),
        ),
        (
            "experts",
            f"{config.n_routed_experts} routed + {config.n_shared_experts} shared, {config.num_experts_per_tok} "
            f"routed active per token, expert width {config.moe_intermediate_size}",
        ),
        ("routing", _routing(config)),
        (
            "parameters",
            f"{_billions(params['total'])} total, {_billions(params['activated'])} activated per token "
            "(incl. embedding and head)",
        ),
    ]
    if config.num_nextn_predict_layers:
        rows.append(
            (
                "MTP",
                f"{_billions(params['mtp_total'])} total, {_billions(params['mtp_activated'])} activated; "
                f"checkpoint incl. its embedding/head copies {_billions(params['checkpoint_total'])}",
            )
        )
    rows.append(
        (
            "KV cache",
            f"{kv['bytes_all_layers']:,} bytes per token in bf16 "
            f"({kv['values_per_layer']} values x {kv['num_layers']} layers)",
        )
    )
    return rows


def describe(config: DeepseekMoeConfig) -> str:
    """A multi-line, human-readable summary of the architecture and its size."""
    return "\n".join(f"{label + ':':<14}{value}" for label, value in summary(config))


__all__ = ["count_parameters", "describe", "family", "kv_cache_bytes_per_token", "summary"]
