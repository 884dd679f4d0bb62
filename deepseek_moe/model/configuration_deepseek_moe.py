"""Configuration of the DeepSeek mixture-of-experts family (DeepSeekMoE-16B, DeepSeek-V2, V2-Lite, V3).

`DeepseekMoeConfig` is a transformers dataclass config built on `DeepseekMoeArchitecture`
(`architecture_deepseek_moe.py`, standard library only): typed fields whose defaults are DeepSeek-V3's. Official
`config.json` files of every family member (`model_type` `deepseek`, `deepseek_v2` or `deepseek_v3`) leave keys out and
mean that family's defaults; `normalize_config_dict` turns such a dict into ours, and `from_dict` / `from_pretrained`
always go through it. Every field is then checked for type and range and every rule between fields is checked, each
failure a `ValueError` naming the field, before any model (and so any weight) exists.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import GenerationConfig, PreTrainedConfig
from transformers.activations import ACT2FN
from transformers.utils import logging

from .architecture_deepseek_moe import (
    ARCHITECTURE_RULES,
    AUTO_MAP,
    MTP_COPIES,
    DeepseekMoeArchitecture,
    Rule,
    _require,
    mtp_copies,
    normalize_config_dict,
    remote_code_files,
)

logger = logging.get_logger(__name__)


def _read(config_dict: dict[str, Any]) -> dict[str, Any]:
    """`normalize_config_dict` (official files of every family as ours), and an official FP8 `quantization_config`
    (`quant_method: "fp8"`) as `DeepseekFp8Config`, so our quantizer loads it (dequantized into the requested dtype,
    partial edge blocks right) while transformers' own "fp8" quantizer stays in charge of every other model; it is
    written back in DeepSeek's form. The quantizer is imported only for configs that have one."""
    values = normalize_config_dict(config_dict)
    quantization = values.get("quantization_config")
    if isinstance(quantization, dict):
        from .quantization_deepseek_moe import OFFICIAL_QUANT_METHOD, QUANT_METHOD, DeepseekFp8Config

        if quantization.get("quant_method") in (OFFICIAL_QUANT_METHOD, QUANT_METHOD):
            values["quantization_config"] = DeepseekFp8Config.from_official(quantization)
    return values


# The architecture's rules, and `hidden_act` checked against transformers' activations.
FIELD_RULES: dict[str, Rule] = {**ARCHITECTURE_RULES, "hidden_act": Rule(str, choices=tuple(sorted(ACT2FN)))}

# Keyword arguments that are not our fields but that transformers reads or writes, or that config.json files from
# transformers, the Hub or DeepSeek carry: accepted without a warning (anything else is probably a typo).
_TRANSFORMERS_KEYS = frozenset(
    {
        *GenerationConfig().to_dict(),  # popped (and ignored) by PreTrainedConfig
        *(field.name for field in dataclasses.fields(PreTrainedConfig)),
        "model_type", "torch_dtype", "num_labels", "rope_scaling", "rope_theta", "partial_rotary_factor",
        "name_or_path", "_name_or_path", "_commit_hash", "output_attentions", "attn_implementation",
        "experts_implementation", "per_layer_config", "_attn_implementation_internal",
        "_experts_implementation_internal", "auto_map", "quantization_config", "tokenizer_class", "use_bfloat16",
        "torchscript", "is_decoder", "add_cross_attention", "cross_attention_hidden_size", "tie_encoder_decoder",
        "pruned_heads", "finetuning_task", "task_specific_params", "prefix", "sep_token_id",
        "decoder_start_token_id", "tf_legacy_loss",
    }
)  # fmt: skip


# --------------------------------------------------------------------------------------------------------- config


class DeepseekMoeConfig(DeepseekMoeArchitecture, PreTrainedConfig):
    r"""Configuration for [`DeepseekMoeModel`]: DeepSeekMoE-16B (MHA), DeepSeek-V2 / V2-Lite and V3 (MLA).

    Attention is multi-head (Llama-style `q/k/v/o_proj`) when `kv_lora_rank` is `None`, MLA otherwise, with
    `q_lora_rank=None` meaning a plain `q_proj`. Routing: `scoring_func` (`softmax`/`sigmoid`) and `topk_method`
    (`greedy`, also spelled `gready` in official files; `group_limited_greedy`, group score = max; `noaux_tc`, biased
    selection and group score = sum of the top two). V2-style routers scale by `routed_scaling_factor` only when the
    weights are not normalised; `noaux_tc` (V3) normalises (if `norm_topk_prob`) and then always scales.

    Load balancing (training only; see `deepseek_moe.training.balancing`):
    - Expert-level balance loss α·Σ f_i P_i per MoE layer, per sequence (`seq_aux`) or over the batch. α is
      `aux_loss_alpha` (α₁ of DeepSeekMoE/V2) for `greedy`/`group_limited_greedy` and `seq_aux_alpha` for `noaux_tc`
      (V3's complementary sequence-wise loss, 1e-4; the V3 config's `aux_loss_alpha` is an unused leftover).
    - V2 device-level (`aux_loss_device_alpha`, α₂) and communication (`aux_loss_comm_alpha`, α₃) balance losses when
      `num_devices` (D, experts split evenly in order) is set; the communication loss also needs `device_limit` (M).
    - `router_z_loss_coef`: optional router z-loss (mean squared logsumexp of the logits), 0 = off.
    - `add_aux_loss_to_loss`: add the auxiliary losses to `loss` when labels are given (they are always returned).
    - `bias_update_speed` (γ): step of V3's auxiliary-loss-free bias update b_i += γ·sign(mean load − load_i); 0
      freezes the bias.
    - `capacity_factor`: V2 device-level token dropping (None = off): each device (of `num_devices`, else each
      expert) keeps at most capacity_factor·T·K/D routed slots, dropping the lowest affinities first; the first
      `capacity_protected_fraction` of the sequences of a batch are never dropped. Training only, unless
      `drop_tokens_at_inference`.

    Other: `mtp_loss_weight` is λ of the V3 paper (0.3, later 0.1; see `training.mtp`); `mla_attention_mode`
    "absorbed" attends over the cached latent, "expanded" re-projects it to per-head K/V, "auto" picks absorbed for
    decoding and expanded for prefill. `head_dim` is derived (transformers' RoPE helpers read it): the rotary width
    for MLA, hidden_size / num_attention_heads for MHA unless given.
    """

    model_type = "deepseek_moe"
    field_rules = FIELD_RULES
    keys_to_ignore_at_inference = ["cache"]
    attribute_map = {"num_local_experts": "n_routed_experts", "num_experts": "n_routed_experts"}
    base_model_tp_plan = {
        "layers.*.mlp.experts.gate_up_proj": "packed_colwise",
        "layers.*.mlp.experts.down_proj": "rowwise",
        "layers.*.mlp.experts": "moe_tp_experts",
        "layers.*.mlp.shared_experts.gate_proj": "colwise",
        "layers.*.mlp.shared_experts.up_proj": "colwise",
        "layers.*.mlp.shared_experts.down_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    base_model_ep_plan = {
        "layers.*.mlp.experts.gate_up_proj": "grouped_gemm",
        "layers.*.mlp.experts.down_proj": "grouped_gemm",
        "layers.*.mlp.experts": "ep_dispatch_experts",
    }
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }

    def __post_init__(self, **kwargs: Any) -> None:
        model_type = kwargs.pop("model_type", self.model_type)
        _require(
            model_type == self.model_type,
            "model_type",
            f"got {model_type!r}: read official config dicts with DeepseekMoeConfig.from_dict or from_pretrained, "
            "which fill in that family's defaults",
        )
        unknown = sorted(set(kwargs) - _TRANSFORMERS_KEYS)
        if unknown:
            logger.warning(f"DeepseekMoeConfig: ignoring unknown keyword arguments {unknown} (misspelled?)")
        # The RoPE dict is checked as given: transformers' standardisation would fill in or reject fields less clearly.
        self._complete(kwargs.get("rope_scaling"), kwargs.get("rope_theta", self.default_theta))
        super().__post_init__(**kwargs)

    # ------------------------------------------------------------------------------------------------ validation

    def validate(self) -> None:
        """Every check (run while constructing, and again by `save_pretrained`), then transformers' own."""
        self._check_fields()
        self._check_consistency(head_dim_given=True)
        self._check_rope(self.rope_parameters or {})
        super().validate()

    # --------------------------------------------------------------------------------------------- serialization

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> DeepseekMoeConfig:
        """Also reads official config dicts: see `normalize_config_dict`."""
        return super().from_dict(_read(config_dict), **kwargs)

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> tuple[dict, dict]:
        """Reads official config.json files as ours: their `model_type` only selects the family defaults."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        return _read(config_dict), kwargs


# ------------------------------------------------------------------------------------------- saved folders

# DeepSeekMoE-16B has no transformers built-in: its releases point at DeepSeek's own remote code (not shipped here).
DEEPSEEK_16B_AUTO_MAP = {
    "AutoConfig": "configuration_deepseek.DeepseekConfig",
    "AutoModel": "modeling_deepseek.DeepseekModel",
    "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM",
}


OFFICIAL_ARCHITECTURES = {
    "deepseek": "DeepseekForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
}


def official_config(config: DeepseekMoeConfig) -> dict:
    """config.json as DeepSeek's releases write it: their `model_type` and `architectures`, RoPE as `rope_theta` +
    `rope_scaling` (None without scaling), none of our derived keys (`head_dim`, `rope_interleave`), and for 16B
    DeepSeek's `auto_map`. Our training options stay (other loaders ignore unknown keys; ours reads them back)."""
    values = config.to_dict()
    for key in ("head_dim", "rope_interleave", "auto_map", "architectures", "rope_parameters"):
        values.pop(key, None)
    rope = dict(config.rope_parameters)
    values["rope_theta"] = rope.pop("rope_theta")
    rope_type = rope.pop("rope_type", "default")
    values["rope_scaling"] = {"type": rope_type, **rope} if rope_type != "default" else None
    model_type = config.official_model_type
    values.update(model_type=model_type, architectures=[OFFICIAL_ARCHITECTURES[model_type]])
    if model_type == "deepseek":
        values["auto_map"] = dict(DEEPSEEK_16B_AUTO_MAP)
    return values


# Also imported from here by the modeling code and tools (defined beside the architecture, which needs no transformers).
__all__ = ["AUTO_MAP", "MTP_COPIES", "DeepseekMoeConfig", "mtp_copies", "normalize_config_dict", "remote_code_files"]
