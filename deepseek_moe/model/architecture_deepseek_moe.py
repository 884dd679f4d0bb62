"""The DeepSeek MoE architecture as plain values: family defaults, official `config.json` normalisation, field rules,
derived properties and every check between fields, in the standard library alone.

`DeepseekMoeConfig` (the transformers config, `configuration_deepseek_moe.py`) builds on `DeepseekMoeArchitecture`;
tooling that only needs a config's values and the shapes they imply (checkpoint conversion) reads them with
`DeepseekMoeValues` and never imports transformers. The one check left to the transformers config is `hidden_act`'s
list of activations (`transformers.activations.ACT2FN`).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

# ----------------------------------------------------------------------------------- official config.json families

# Defaults for the keys an official config.json of each family may leave out (DeepSeek's remote-code defaults).
# A V3 file (and ours) falls back on the field defaults of `DeepseekMoeArchitecture`, which are V3's.
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
# Official FP8 checkpoints (V3) scale their e4m3 weights per FP8_BLOCK x FP8_BLOCK tile (see the quantizer).
FP8_BLOCK = 128
# Keys official files carry that no code reads (DeepSeek's expert-parallel size, Llama's tensor-parallel split).
UNUSED_OFFICIAL_KEYS = ("ep_size", "pretraining_tp")


def normalize_config_dict(config_dict: dict[str, Any]) -> dict[str, Any]:
    """An official `config.json` of any family, or ours, as `DeepseekMoeConfig` keyword arguments.

    The original `model_type` picks the defaults of absent keys; the remote code's `None` counts (no shared or
    routed experts, no groups) become explicit numbers; `gready` (early V2 spelling) becomes `greedy`; keys nothing
    reads are dropped, and so is an official `auto_map` (it names DeepSeek's remote code). A `quantization_config`
    stays as given (`DeepseekMoeConfig.from_dict` makes an FP8 one our quantizer's).
    """
    family = config_dict.get("model_type", DeepseekMoeArchitecture.model_type)
    if family not in FAMILY_DEFAULTS:
        raise ValueError(
            f"DeepseekMoeConfig.model_type: {family!r} is not a DeepSeek MoE config; expected one of "
            f"{sorted(FAMILY_DEFAULTS)}"
        )
    values = {**FAMILY_DEFAULTS[family], **config_dict, "model_type": DeepseekMoeArchitecture.model_type}
    for key in UNUSED_OFFICIAL_KEYS:
        values.pop(key, None)
    if family != DeepseekMoeArchitecture.model_type:
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
        values["topk_group"] = values.get("n_group", DeepseekMoeArchitecture.n_group)
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
# Every field of `DeepseekMoeArchitecture` has one rule (tests/test_config_validation.py checks that none is missing).
ARCHITECTURE_RULES: dict[str, Rule] = {
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
    "hidden_act": Rule(str),  # its choices are transformers' activations: `DeepseekMoeConfig.field_rules`
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


# --------------------------------------------------------------------------------------------------- architecture


@dataclasses.dataclass(kw_only=True, eq=False, repr=False)
class DeepseekMoeArchitecture:
    """The fields of a DeepSeek MoE config with their defaults (DeepSeek-V3's), the family switches derived from them
    and every check; see `DeepseekMoeConfig` for what each field means."""

    model_type = "deepseek_moe"
    field_rules = ARCHITECTURE_RULES

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

    def _complete(self, rope_scaling: Any, rope_theta: Any) -> None:
        """Check every field, derive `num_key_value_heads` and `head_dim`, check the rules between fields and the RoPE
        dict as given (`rope_scaling` of an official file, else `rope_parameters`, with `rope_theta`)."""
        self._check_fields()
        rope = rope_scaling or self.rope_parameters or {}
        _require(isinstance(rope, dict), "rope_scaling", f"must be a dict or None, got {rope!r}")
        rope = {"rope_theta": rope_theta, **rope}
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

    def _check_fields(self) -> None:
        for field, rule in self.field_rules.items():
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


# Official checkpoints give every MTP layer its own copy of the embedding and of the output head (DeepSeek's loaders,
# vLLM and SGLang expect them); in memory ours share the model's. Copy name (inside the MTP layer) -> tensor copied.
MTP_COPIES = {"embed_tokens.weight": "model.embed_tokens.weight", "shared_head.head.weight": "lm_head.weight"}


def mtp_copies(config: DeepseekMoeArchitecture) -> dict[str, str]:
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


def remote_code_files() -> list[Path]:
    """The modules of this folder (a package `__init__` excepted), which a saved folder carries flat beside its
    weights; also right when this file itself runs as remote code from transformers' module cache."""
    return sorted(path for path in Path(__file__).resolve().parent.glob("*.py") if path.name != "__init__.py")


# ------------------------------------------------------------------------------------------------ light config


class DeepseekMoeValues(DeepseekMoeArchitecture):
    """A config read without transformers, for tools that need only its values and the shapes they imply
    (conversion): `from_dict` normalises and checks like `DeepseekMoeConfig.from_dict`; the keys it does not interpret
    (transformers' own, RoPE as given, `quantization_config`) are kept in `extra` and written back by `to_dict`."""

    default_theta = 10_000.0  # `rope_theta` when a file gives none (DeepSeek's and transformers' default)

    def __init__(self, extra: dict[str, Any], **fields: Any) -> None:
        super().__init__(**fields)
        self.extra = extra
        self._complete(extra.get("rope_scaling"), extra.get("rope_theta", self.default_theta))

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any]) -> DeepseekMoeValues:
        values = normalize_config_dict(config_dict)
        names = {field.name for field in dataclasses.fields(DeepseekMoeArchitecture)}
        extra = {key: value for key, value in values.items() if key not in names}
        return cls(extra, **{key: value for key, value in values.items() if key in names})

    def to_dict(self) -> dict[str, Any]:
        """Every field (derived ones included) and the keys carried through; reads back as the same config."""
        fields = {field.name: getattr(self, field.name) for field in dataclasses.fields(DeepseekMoeArchitecture)}
        if fields["rope_parameters"] is None:
            del fields["rope_parameters"]  # RoPE given as `rope_scaling` / `rope_theta`, carried in `extra`
        return {**self.extra, **fields, "model_type": self.model_type}


__all__ = ["FP8_BLOCK", "DeepseekMoeArchitecture", "DeepseekMoeValues", "normalize_config_dict"]
