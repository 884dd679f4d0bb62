"""Configuration of the DeepSeek mixture-of-experts family (DeepSeekMoE-16B, DeepSeek-V2, V2-Lite, V3).

`DeepseekMoeConfig` is a transformers dataclass config: typed fields whose defaults are DeepSeek-V3's. Official
`config.json` files of every family member (`model_type` `deepseek`, `deepseek_v2` or `deepseek_v3`) leave keys out
and mean that family's defaults; `normalize_config_dict` turns such a dict into ours, and `from_dict` /
`from_pretrained` always go through it. Every field is then checked for type and range and every rule between
fields is checked, each failure a `ValueError` naming the field, before any model (and so any weight) exists.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from transformers import GenerationConfig, PreTrainedConfig
from transformers.activations import ACT2FN
from transformers.utils import logging

from .quantization_deepseek_moe import QUANT_METHOD, DeepseekFp8Config

logger = logging.get_logger(__name__)

# ----------------------------------------------------------------------------------- official config.json families

# Defaults for the keys an official config.json of each family may leave out (DeepSeek's remote-code defaults).
# A V3 file (and ours) falls back on the field defaults of `DeepseekMoeConfig`, which are V3's.
_V2_DEFAULTS: dict[str, Any] = {
    "vocab_size": 102400,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "moe_intermediate_size": 1407,
    "num_hidden_layers": 30,
    "num_attention_heads": 32,
    "n_shared_experts": None,
    "n_routed_experts": None,
    "routed_scaling_factor": 1.0,
    "topk_method": "greedy",
    "n_group": None,
    "topk_group": None,
    "num_experts_per_tok": None,
    "first_k_dense_replace": 0,
    "norm_topk_prob": False,
    "scoring_func": "softmax",
}
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_moe": {},
    "deepseek_v3": {},
    "deepseek_v2": _V2_DEFAULTS,
    # DeepSeekMoE-16B: Llama-style multi-head attention (its config.json has no MLA keys), plain softmax top-k.
    "deepseek": {**_V2_DEFAULTS, "num_hidden_layers": 32, "kv_lora_rank": None, "q_lora_rank": None,
                 "rope_interleave": False},
}  # fmt: skip
# Keys official files carry that no code reads (DeepSeek's expert-parallel size, Llama's tensor-parallel split).
UNUSED_OFFICIAL_KEYS = ("ep_size", "pretraining_tp")


def normalize_config_dict(config_dict: dict[str, Any]) -> dict[str, Any]:
    """An official `config.json` of any family, or ours, as `DeepseekMoeConfig` keyword arguments.

    The original `model_type` picks the defaults of absent keys; the remote code's `None` counts (no shared or
    routed experts, no groups) become explicit numbers; `gready` (early V2 spelling) becomes `greedy`; keys nothing
    reads are dropped, and so is an official `auto_map` (it names DeepSeek's remote code). An official FP8
    `quantization_config` (`quant_method: "fp8"`) becomes `DeepseekFp8Config`, so our quantizer loads it (dequantized
    into the requested dtype, partial edge blocks right) while transformers' own "fp8" quantizer stays in charge of
    every other model; it is written back in DeepSeek's form.
    """
    family = config_dict.get("model_type", DeepseekMoeConfig.model_type)
    if family not in FAMILY_DEFAULTS:
        raise ValueError(
            f"DeepseekMoeConfig.model_type: {family!r} is not a DeepSeek MoE config; expected one of "
            f"{sorted(FAMILY_DEFAULTS)}"
        )
    values = {**FAMILY_DEFAULTS[family], **config_dict, "model_type": DeepseekMoeConfig.model_type}
    for key in UNUSED_OFFICIAL_KEYS:
        values.pop(key, None)
    if family != DeepseekMoeConfig.model_type:
        values.pop("auto_map", None)  # names DeepSeek's remote code, which is not what loads this config
    if values.get("topk_method") == "gready":
        values["topk_method"] = "greedy"
    for key in ("n_routed_experts", "n_shared_experts"):
        if key in values and values[key] is None:
            values[key] = 0
    if values.get("n_routed_experts") == 0 and values.get("num_experts_per_tok") is None:
        values["num_experts_per_tok"] = 0
    # Official 16B/V2-Lite configs carry no groups: one group holding every expert.
    if "n_group" in values and values["n_group"] is None:
        values["n_group"] = 1
    if "topk_group" in values and values["topk_group"] is None:
        values["topk_group"] = values.get("n_group", DeepseekMoeConfig.n_group)
    quantization = values.get("quantization_config")
    if isinstance(quantization, dict) and quantization.get("quant_method") in ("fp8", QUANT_METHOD):
        values["quantization_config"] = DeepseekFp8Config.from_official(quantization)
    return values


# ------------------------------------------------------------------------------------------------- field rules

TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn")
MLA_ATTENTION_MODES = ("auto", "absorbed", "expanded")


def _require(ok: bool, field: str, message: str) -> None:
    """The one way a check fails: a `ValueError` that names the field."""
    if not ok:
        raise ValueError(f"DeepseekMoeConfig.{field}: {message}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class Rule:
    """Type and range of one field: `kind` int / float (any finite number) / bool / str; `low` <= value, value <= `high`
    (or < with `high_open`), value in `choices`; `optional` allows None."""

    kind: type
    low: float | None = None
    high: float | None = None
    high_open: bool = False
    low_open: bool = False
    choices: tuple[str, ...] | None = None
    optional: bool = False

    def check(self, field: str, value: Any) -> None:
        if value is None:
            _require(self.optional, field, "must be given, got None")
            return
        typed = {int: _is_int, float: _is_number}.get(self.kind)
        ok = typed(value) if typed else isinstance(value, self.kind)
        expected = {int: "an integer", float: "a finite number", bool: "a bool (true/false)"}.get(self.kind)
        _require(ok, field, f"must be {expected or 'a ' + self.kind.__name__}, got {value!r} ({type(value).__name__})")
        if self.choices is not None:
            _require(value in self.choices, field, f"must be one of {self.choices}, got {value!r}")
        if self.low is not None:
            below = value <= self.low if self.low_open else value < self.low
            _require(not below, field, f"must be {'>' if self.low_open else '>='} {self.low}, got {value!r}")
        if self.high is not None:
            above = value >= self.high if self.high_open else value > self.high
            _require(not above, field, f"must be {'<' if self.high_open else '<='} {self.high}, got {value!r}")


def _count(low: int = 1, optional: bool = False) -> Rule:
    return Rule(int, low=low, optional=optional)


def _weight(low_open: bool = False, optional: bool = False) -> Rule:
    """A non-negative (or, with `low_open`, positive) finite number."""
    return Rule(float, low=0, low_open=low_open, optional=optional)


FLAG = Rule(bool)
# Every field of `DeepseekMoeConfig` has one rule (tests/test_config.py checks that none is missing).
FIELD_RULES: dict[str, Rule] = {
    "vocab_size": _count(),
    "hidden_size": _count(),
    "intermediate_size": _count(),
    "moe_intermediate_size": _count(),
    "num_hidden_layers": _count(),
    "num_nextn_predict_layers": _count(0),
    "num_attention_heads": _count(),
    "num_key_value_heads": _count(optional=True),
    "head_dim": _count(optional=True),
    "n_shared_experts": _count(0),
    "n_routed_experts": _count(0),
    "routed_scaling_factor": _weight(low_open=True),
    "kv_lora_rank": _count(optional=True),
    "q_lora_rank": _count(optional=True),
    "qk_rope_head_dim": _count(),
    "v_head_dim": _count(),
    "qk_nope_head_dim": _count(0),
    "topk_method": Rule(str, choices=TOPK_METHODS),
    "n_group": _count(),
    "topk_group": _count(),
    "num_experts_per_tok": _count(0),
    "moe_layer_freq": _count(),
    "first_k_dense_replace": _count(0),
    "norm_topk_prob": FLAG,
    "scoring_func": Rule(str, choices=SCORING_FUNCS),
    "aux_loss_alpha": _weight(),
    "seq_aux": FLAG,
    "rope_interleave": FLAG,
    "hidden_act": Rule(str, choices=tuple(sorted(ACT2FN))),
    "max_position_embeddings": _count(),
    "initializer_range": _weight(),
    "rms_norm_eps": _weight(low_open=True),
    "use_cache": FLAG,
    "pad_token_id": _count(0, optional=True),
    "bos_token_id": _count(0, optional=True),
    "eos_token_id": Rule(object, optional=True),  # an id or a list of ids: checked with the vocabulary below
    "tie_word_embeddings": FLAG,
    "rope_parameters": Rule(dict, optional=True),  # checked by `_check_rope`
    "attention_bias": FLAG,
    "attention_dropout": Rule(float, low=0, high=1, high_open=True),
    "output_router_logits": FLAG,
    "mtp_loss_weight": _weight(),
    "mla_attention_mode": Rule(str, choices=MLA_ATTENTION_MODES),
    "seq_aux_alpha": _weight(),
    "num_devices": _count(optional=True),
    "device_limit": _count(optional=True),
    "aux_loss_device_alpha": _weight(),
    "aux_loss_comm_alpha": _weight(),
    "router_z_loss_coef": _weight(),
    "add_aux_loss_to_loss": FLAG,
    "bias_update_speed": _weight(),
    "capacity_factor": _weight(low_open=True, optional=True),
    "capacity_protected_fraction": Rule(float, low=0, high=1),
    "drop_tokens_at_inference": FLAG,
}

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


class DeepseekMoeConfig(PreTrainedConfig):
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

    # Shapes
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_nextn_predict_layers: int = 0
    # Attention: MHA when kv_lora_rank is None, else MLA
    num_attention_heads: int = 128
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    kv_lora_rank: int | None = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mla_attention_mode: str = "auto"
    rope_parameters: dict | None = None
    rope_interleave: bool = True
    max_position_embeddings: int = 4096
    # Experts and routing
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    moe_layer_freq: int = 1
    first_k_dense_replace: int = 3
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    n_group: int = 8
    topk_group: int = 4
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    # Load balancing and auxiliary losses (see the class docstring)
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    seq_aux_alpha: float = 1e-4
    num_devices: int | None = None
    device_limit: int | None = None
    aux_loss_device_alpha: float = 0.05
    aux_loss_comm_alpha: float = 0.02
    router_z_loss_coef: float = 0.0
    add_aux_loss_to_loss: bool = True
    bias_update_speed: float = 0.001
    capacity_factor: float | None = None
    capacity_protected_fraction: float = 0.1
    drop_tokens_at_inference: bool = False
    output_router_logits: bool = False
    mtp_loss_weight: float = 0.3
    # Everything else
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    tie_word_embeddings: bool = False

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
        self._check_fields()
        # Validate the RoPE dict as given: transformers' standardisation would fill in or reject fields less clearly.
        rope = kwargs.get("rope_scaling") or self.rope_parameters or {}
        _require(isinstance(rope, dict), "rope_scaling", f"must be a dict or None, got {rope!r}")
        rope = {"rope_theta": kwargs.get("rope_theta", self.default_theta), **rope}
        head_dim_given = self.head_dim is not None
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        # transformers' RoPE helpers read `head_dim`: the rotary width (MLA) or the attention head width (MHA).
        if self.uses_mla:
            self.head_dim = self.qk_rope_head_dim
        elif not head_dim_given:
            self.head_dim = self.hidden_size // self.num_attention_heads
        self._check_consistency(head_dim_given or self.uses_mla)
        self._check_rope(rope)
        super().__post_init__(**kwargs)

    # ------------------------------------------------------------------------------------------- family switches

    @property
    def uses_mla(self) -> bool:
        """Multi-head latent attention (V2/V3) rather than multi-head attention (DeepSeekMoE-16B)."""
        return self.kv_lora_rank is not None

    @property
    def uses_bias_balancing(self) -> bool:
        """V3's router (`noaux_tc`): a correction bias steers selection (auxiliary-loss-free balancing), groups score
        by their top two experts, weights are normalised and then always scaled, and the balance loss is the
        complementary sequence-wise one (`seq_aux_alpha`)."""
        return self.topk_method == "noaux_tc"

    @property
    def uses_group_limited_routing(self) -> bool:
        """Each token may only reach experts of its `topk_group` best groups (V2 `group_limited_greedy`, V3)."""
        return self.topk_method != "greedy" and self.n_group > 1

    @property
    def scales_routing_weights(self) -> bool:
        """Whether the router multiplies its weights by `routed_scaling_factor`: V3 always (after normalising), V2
        only when it does not normalise them."""
        return self.uses_bias_balancing or not self.norm_topk_prob

    @property
    def expert_balance_alpha(self) -> float:
        """α of the expert-level balance loss: V3's sequence-wise `seq_aux_alpha` or DeepSeekMoE/V2's α₁."""
        return self.seq_aux_alpha if self.uses_bias_balancing else self.aux_loss_alpha

    @property
    def official_model_type(self) -> str:
        """The `model_type` DeepSeek's own config.json uses for this architecture."""
        if not self.uses_mla:
            return "deepseek"
        return "deepseek_v3" if self.uses_bias_balancing else "deepseek_v2"

    @property
    def qk_head_dim(self) -> int:
        """Width of an MLA query/key head: the non-rotary part plus the rotary part."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_experts_allowed(self) -> int:
        """How many routed experts a token can reach once group-limited routing has kept `topk_group` groups."""
        if not self.uses_group_limited_routing:
            return self.n_routed_experts
        return self.topk_group * (self.n_routed_experts // self.n_group)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """MoE FFN for layers past the first `first_k_dense_replace`, every `moe_layer_freq`-th one."""
        return self.n_routed_experts > 0 and (
            layer_idx >= self.first_k_dense_replace and layer_idx % self.moe_layer_freq == 0
        )

    # ------------------------------------------------------------------------------------------------ validation

    def validate(self) -> None:
        """Every check (run while constructing, and again by `save_pretrained`), then transformers' own."""
        self._check_fields()
        self._check_consistency(head_dim_given=True)
        self._check_rope(self.rope_parameters or {})
        super().validate()

    def _check_fields(self) -> None:
        for field, rule in FIELD_RULES.items():
            rule.check(field, getattr(self, field))

    def _check_consistency(self, head_dim_given: bool) -> None:
        """The rules between fields; `head_dim_given`: MHA heads may then be narrower than hidden_size / heads."""
        _require(
            self.first_k_dense_replace <= self.num_hidden_layers,
            "first_k_dense_replace",
            f"must be at most num_hidden_layers={self.num_hidden_layers}, got {self.first_k_dense_replace}",
        )
        _require(
            self.num_nextn_predict_layers == 0 or self.n_routed_experts > 0,
            "num_nextn_predict_layers",
            "MTP modules are MoE blocks and need n_routed_experts > 0",
        )
        self._check_token_ids()
        self._check_routing()
        self._check_balancing()
        _require(
            self.num_attention_heads % self.num_key_value_heads == 0,
            "num_key_value_heads",
            f"must divide num_attention_heads={self.num_attention_heads}, got {self.num_key_value_heads}",
        )
        rotary, rotary_field = (
            (self.qk_rope_head_dim, "qk_rope_head_dim") if self.uses_mla else (self.head_dim, "head_dim")
        )
        _require(rotary % 2 == 0, rotary_field, f"must be even (it is rotated in pairs), got {rotary}")
        if not self.uses_mla:
            _require(
                head_dim_given or self.head_dim * self.num_attention_heads == self.hidden_size,
                "num_attention_heads",
                f"must divide hidden_size={self.hidden_size}, got {self.num_attention_heads}",
            )

    def _check_token_ids(self) -> None:
        for field in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, field)
            ids = value if isinstance(value, list) else [] if value is None else [value]
            _require(
                all(_is_int(i) and 0 <= i < self.vocab_size for i in ids),
                field,
                f"must be None or token ids in [0, vocab_size={self.vocab_size}), got {value!r}",
            )

    def _check_routing(self) -> None:
        if self.n_routed_experts == 0:
            return
        _require(
            self.n_routed_experts % self.n_group == 0,
            "n_group",
            f"must divide n_routed_experts={self.n_routed_experts}, got {self.n_group}",
        )
        _require(
            self.topk_group <= self.n_group,
            "topk_group",
            f"must be between 1 and n_group={self.n_group}, got {self.topk_group}",
        )
        if self.uses_bias_balancing and self.n_group > 1:
            _require(
                self.n_routed_experts // self.n_group >= 2,
                "n_group",
                "noaux_tc scores a group by its top two experts, so each group needs at least 2 experts",
            )
        _require(
            1 <= self.num_experts_per_tok <= self.num_experts_allowed,
            "num_experts_per_tok",
            f"must be between 1 and the {self.num_experts_allowed} experts that topk_method={self.topk_method!r} "
            f"with topk_group={self.topk_group} of n_group={self.n_group} allows, got {self.num_experts_per_tok}",
        )

    def _check_balancing(self) -> None:
        if self.num_devices is not None:
            _require(
                self.n_routed_experts % self.num_devices == 0,
                "num_devices",
                f"must divide n_routed_experts={self.n_routed_experts}, got {self.num_devices}",
            )
        if self.device_limit is not None:
            _require(self.num_devices is not None, "device_limit", "needs num_devices to be set")
            _require(
                self.device_limit <= self.num_devices,
                "device_limit",
                f"must be between 1 and num_devices={self.num_devices}, got {self.device_limit}",
            )

    @staticmethod
    def _check_rope(rope: dict[str, Any]) -> None:
        """The RoPE dict (`rope_parameters`, or an official `rope_scaling` with `rope_theta`)."""
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        _require(rope_type in ROPE_TYPES, "rope_scaling", f"type must be one of {ROPE_TYPES}, got {rope_type!r}")
        theta = rope.get("rope_theta")
        _require(_is_number(theta) and theta > 0, "rope_theta", f"must be a positive number, got {theta!r}")
        if rope_type == "default":
            return
        factor = rope.get("factor")
        _require(_is_number(factor) and factor >= 1, "rope_scaling", f"'factor' must be a number >= 1, got {factor!r}")
        if rope_type != "yarn":
            return
        original = rope.get("original_max_position_embeddings")
        _require(
            _is_int(original) and original > 0,
            "rope_scaling",
            f"yarn needs a positive integer 'original_max_position_embeddings', got {original!r}",
        )
        for key in ("mscale", "mscale_all_dim", "beta_fast", "beta_slow", "attention_factor"):
            value = rope.get(key)
            _require(
                value is None or (_is_number(value) and value >= 0),
                "rope_scaling",
                f"{key!r} must be a number >= 0, got {value!r}",
            )
        beta_fast = 32 if rope.get("beta_fast") is None else rope["beta_fast"]  # DeepSeek's and transformers' defaults
        beta_slow = 1 if rope.get("beta_slow") is None else rope["beta_slow"]
        _require(
            beta_fast >= beta_slow,
            "rope_scaling",
            f"'beta_fast' ({beta_fast}) must be at least 'beta_slow' ({beta_slow})",
        )

    # --------------------------------------------------------------------------------------------- serialization

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> DeepseekMoeConfig:
        """Also reads official config dicts: see `normalize_config_dict`."""
        return super().from_dict(normalize_config_dict(config_dict), **kwargs)

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> tuple[dict, dict]:
        """Reads official config.json files as ours: their `model_type` only selects the family defaults."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        return normalize_config_dict(config_dict), kwargs


# Official checkpoints give every MTP layer its own copy of the embedding and of the output head (DeepSeek's loaders,
# vLLM and SGLang expect them); in memory ours share the model's. Copy name (inside the MTP layer) -> tensor copied.
MTP_COPIES = {"embed_tokens.weight": "model.embed_tokens.weight", "shared_head.head.weight": "lm_head.weight"}


def mtp_copies(config: DeepseekMoeConfig) -> dict[str, str]:
    """Full name of every copy an official checkpoint of this config holds -> name of the tensor it copies."""
    return {
        f"model.layers.{config.num_hidden_layers + k}.{copy}": source
        for k in range(config.num_nextn_predict_layers)
        for copy, source in MTP_COPIES.items()
    }


# ------------------------------------------------------------------------------------------- saved folders

# Where transformers' Auto classes find this code in a saved folder (the files of `remote_code_files`).
AUTO_MAP = {
    "AutoConfig": "configuration_deepseek_moe.DeepseekMoeConfig",
    "AutoModel": "modeling_deepseek_moe.DeepseekMoeModel",
    "AutoModelForCausalLM": "modeling_deepseek_moe.DeepseekMoeForCausalLM",
    "AutoModelForSequenceClassification": "modeling_deepseek_moe.DeepseekMoeForSequenceClassification",
}
# DeepSeekMoE-16B has no transformers built-in: its releases point at DeepSeek's own remote code (not shipped here).
DEEPSEEK_16B_AUTO_MAP = {
    "AutoConfig": "configuration_deepseek.DeepseekConfig",
    "AutoModel": "modeling_deepseek.DeepseekModel",
    "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM",
}


def remote_code_files() -> list[Path]:
    """The modules of this folder (a package `__init__` excepted), which a saved folder carries flat beside its
    weights; also right when this file itself runs as remote code from transformers' module cache."""
    return sorted(path for path in Path(__file__).resolve().parent.glob("*.py") if path.name != "__init__.py")


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


__all__ = ["DeepseekMoeConfig"]
