"""Configuration of the DeepSeek mixture-of-experts family (DeepSeekMoE-16B, DeepSeek-V2, V2-Lite, V3).

One config class reads the official `config.json` of every family member (`model_type` `deepseek`,
`deepseek_v2` or `deepseek_v3`): keys a family's file leaves out take that family's defaults, so the
16B file (no `kv_lora_rank`) gives multi-head attention and the V2/V3 files give MLA.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from .quantization_deepseek_moe import QUANT_METHOD, DeepseekFp8Config

# Defaults for keys an official config.json may leave out, per original `model_type`.
# V3 values are also the defaults of a bare `DeepseekMoeConfig()`, as in transformers' built-in V3 config.
_V3_DEFAULTS: dict[str, Any] = {
    "vocab_size": 129280,
    "hidden_size": 7168,
    "intermediate_size": 18432,
    "moe_intermediate_size": 2048,
    "num_hidden_layers": 61,
    "num_nextn_predict_layers": 0,
    "num_attention_heads": 128,
    "num_key_value_heads": None,
    "head_dim": None,
    "n_shared_experts": 1,
    "n_routed_experts": 256,
    "ep_size": 1,
    "routed_scaling_factor": 2.5,
    "kv_lora_rank": 512,
    "q_lora_rank": 1536,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "qk_nope_head_dim": 128,
    "topk_method": "noaux_tc",
    "n_group": 8,
    "topk_group": 4,
    "num_experts_per_tok": 8,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 3,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "aux_loss_alpha": 0.001,
    "seq_aux": True,
    "rope_interleave": True,
}
# DeepSeek-V2 remote code defaults (its own config.json files spell out most values).
_V2_DEFAULTS: dict[str, Any] = {
    **_V3_DEFAULTS,
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
_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "deepseek_v3": _V3_DEFAULTS,
    "deepseek_v2": _V2_DEFAULTS,
    # DeepSeekMoE-16B: Llama-style multi-head attention (its config.json has no MLA keys), plain softmax top-k.
    "deepseek": {
        **_V2_DEFAULTS,
        "num_hidden_layers": 32,
        "kv_lora_rank": None,
        "q_lora_rank": None,
        "rope_interleave": False,
    },
    "deepseek_moe": _V3_DEFAULTS,
}

TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
SCORING_FUNCS = ("softmax", "sigmoid")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn")
MLA_ATTENTION_MODES = ("auto", "absorbed", "expanded")


class DeepseekMoeConfig(PreTrainedConfig):
    r"""Configuration for [`DeepseekMoeModel`]: DeepSeekMoE-16B (MHA), DeepSeek-V2 / V2-Lite and V3 (MLA).

    Attention is multi-head (Llama-style `q/k/v/o_proj`) when `kv_lora_rank` is `None`, MLA otherwise, with
    `q_lora_rank=None` meaning a plain `q_proj`. Routing: `scoring_func` (`softmax`/`sigmoid`) and `topk_method`
    (`greedy`, also spelled `gready`; `group_limited_greedy`, group score = max; `noaux_tc`, biased selection and
    group score = sum of the top two). V2-style routers scale by `routed_scaling_factor` only when the weights are
    not normalised; `noaux_tc` (V3) normalises (if `norm_topk_prob`) and then always scales.

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

    def __init__(
        self,
        vocab_size: int | None = None,
        hidden_size: int | None = None,
        intermediate_size: int | None = None,
        moe_intermediate_size: int | None = None,
        num_hidden_layers: int | None = None,
        num_nextn_predict_layers: int | None = None,
        num_attention_heads: int | None = None,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        n_shared_experts: int | None = None,
        n_routed_experts: int | None = None,
        ep_size: int | None = None,
        routed_scaling_factor: float | None = None,
        kv_lora_rank: int | None = ...,  # type: ignore[assignment]
        q_lora_rank: int | None = ...,  # type: ignore[assignment]
        qk_rope_head_dim: int | None = None,
        v_head_dim: int | None = None,
        qk_nope_head_dim: int | None = None,
        topk_method: str | None = None,
        n_group: int | None = None,
        topk_group: int | None = None,
        num_experts_per_tok: int | None = None,
        moe_layer_freq: int | None = None,
        first_k_dense_replace: int | None = None,
        norm_topk_prob: bool | None = None,
        scoring_func: str | None = None,
        aux_loss_alpha: float | None = None,
        seq_aux: bool | None = None,
        rope_interleave: bool | None = None,
        hidden_act: str = "silu",
        max_position_embeddings: int = 4096,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 0,
        eos_token_id: int | list[int] | None = 1,
        pretraining_tp: int = 1,
        tie_word_embeddings: bool = False,
        rope_parameters: dict | None = None,
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        output_router_logits: bool = False,
        mtp_loss_weight: float = 0.3,
        mla_attention_mode: str = "auto",
        seq_aux_alpha: float = 1e-4,
        num_devices: int | None = None,
        device_limit: int | None = None,
        aux_loss_device_alpha: float = 0.05,
        aux_loss_comm_alpha: float = 0.02,
        router_z_loss_coef: float = 0.0,
        add_aux_loss_to_loss: bool = True,
        bias_update_speed: float = 0.001,
        capacity_factor: float | None = None,
        capacity_protected_fraction: float = 0.1,
        drop_tokens_at_inference: bool = False,
        **kwargs,
    ) -> None:
        explicit = dict(locals())
        self._fp8_quantization(kwargs)
        # The official model_type decides the defaults of absent keys; ours is always "deepseek_moe".
        original_type = kwargs.pop("model_type", None)
        family = kwargs.pop("_family", None) or original_type or "deepseek_moe"
        if family not in _FAMILY_DEFAULTS:
            raise ValueError(
                f"model_type={family!r} is not a DeepSeek MoE config; expected one of {sorted(_FAMILY_DEFAULTS)}"
            )
        # `None` means "not given", except for the two ranks where it means "no LoRA" / "multi-head attention".
        given = {k: v for k, v in explicit.items() if k in _V3_DEFAULTS and v is not None and v is not ...}
        given.update({k: None for k in ("kv_lora_rank", "q_lora_rank") if explicit[k] is None})
        values = {**_FAMILY_DEFAULTS[family], **given}
        for key, value in values.items():
            setattr(self, key, value)
        if self.topk_method == "gready":  # early V2 remote code spelled it this way
            self.topk_method = "greedy"
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        # The remote code's None experts mean a dense model.
        for key in ("n_routed_experts", "n_shared_experts"):
            if getattr(self, key) is None:
                setattr(self, key, 0)
        if self.num_experts_per_tok is None and not self.n_routed_experts:
            self.num_experts_per_tok = 0
        # Official 16B/V2-Lite configs carry no groups: one group holding every expert.
        if self.n_group is None:
            self.n_group = 1
        if self.topk_group is None:
            self.topk_group = self.n_group

        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.pretraining_tp = pretraining_tp
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.output_router_logits = output_router_logits
        self.mtp_loss_weight = mtp_loss_weight  # λ of the V3 paper: 0.3, later 0.1 (see training.mtp)
        # MLA: "absorbed" attends over the cached latent, "expanded" re-projects it to per-head K/V, "auto" picks
        # absorbed for decoding and expanded for prefill.
        self.mla_attention_mode = mla_attention_mode
        self.seq_aux_alpha = seq_aux_alpha
        self.num_devices = num_devices
        self.device_limit = device_limit
        self.aux_loss_device_alpha = aux_loss_device_alpha
        self.aux_loss_comm_alpha = aux_loss_comm_alpha
        self.router_z_loss_coef = router_z_loss_coef
        self.add_aux_loss_to_loss = add_aux_loss_to_loss
        self.bias_update_speed = bias_update_speed
        self.capacity_factor = capacity_factor
        self.capacity_protected_fraction = capacity_protected_fraction
        self.drop_tokens_at_inference = drop_tokens_at_inference
        self.rope_parameters = rope_parameters
        # transformers' RoPE helpers read `head_dim`: the rotary width (MLA) or the attention head width (MHA).
        if self.use_mla:
            self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
            self.head_dim = self.qk_rope_head_dim
        elif self.head_dim is None and self.num_attention_heads:
            self.head_dim = self.hidden_size // self.num_attention_heads
        # Validate before transformers' own RoPE standardisation, which would fill in or reject fields less clearly.
        raw_rope = dict(rope_parameters or kwargs.get("rope_scaling") or {})
        raw_rope.setdefault("rope_theta", kwargs.get("rope_theta", 10000.0))
        self.validate_deepseek(head_dim_given=head_dim is not None, rope=raw_rope)
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @staticmethod
    def _fp8_quantization(kwargs: dict[str, Any]) -> None:
        """Official FP8 checkpoints (`quant_method: "fp8"`, block scales) load through our own quantizer, which
        dequantizes partial edge blocks right and into the requested dtype; transformers' "fp8" quantizer stays in
        charge of every other model. The entry is written back in DeepSeek's form."""
        quantization = kwargs.get("quantization_config")
        if isinstance(quantization, dict) and quantization.get("quant_method") in ("fp8", QUANT_METHOD):
            kwargs["quantization_config"] = DeepseekFp8Config.from_official(quantization)

    @property
    def use_mla(self) -> bool:
        """Multi-head latent attention (V2/V3) rather than multi-head attention (DeepSeekMoE-16B)."""
        return self.kv_lora_rank is not None

    @property
    def num_experts_allowed(self) -> int:
        """How many routed experts a token can reach once group-limited routing has kept `topk_group` groups."""
        if self.topk_method == "greedy":
            return self.n_routed_experts
        return self.topk_group * (self.n_routed_experts // self.n_group)

    def is_moe_layer(self, layer_idx: int) -> bool:
        """MoE FFN for layers past the first `first_k_dense_replace`, every `moe_layer_freq`-th one."""
        return self.n_routed_experts > 0 and (
            layer_idx >= self.first_k_dense_replace and layer_idx % self.moe_layer_freq == 0
        )

    def validate_deepseek(self, head_dim_given: bool = False, rope: dict[str, Any] | None = None) -> None:
        """Raise a `ValueError` naming the first field that does not fit the architecture. `rope` is the RoPE
        dict as given (`rope_parameters` or the official `rope_scaling`), defaulting to the standardised one."""

        def check(ok: bool, field: str, message: str) -> None:
            if not ok:
                raise ValueError(f"DeepseekMoeConfig.{field}: {message}")

        for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            value = getattr(self, field)
            check(isinstance(value, int) and value > 0, field, f"must be a positive integer, got {value!r}")
        check(
            self.num_nextn_predict_layers >= 0,
            "num_nextn_predict_layers",
            f"must be >= 0, got {self.num_nextn_predict_layers}",
        )
        check(self.mtp_loss_weight >= 0, "mtp_loss_weight", f"must be >= 0, got {self.mtp_loss_weight}")
        check(
            self.mla_attention_mode in MLA_ATTENTION_MODES,
            "mla_attention_mode",
            f"must be one of {MLA_ATTENTION_MODES}, got {self.mla_attention_mode!r}",
        )
        check(
            self.num_nextn_predict_layers == 0 or self.n_routed_experts > 0,
            "num_nextn_predict_layers",
            "MTP modules are MoE blocks and need n_routed_experts > 0",
        )
        check(self.n_routed_experts >= 0, "n_routed_experts", f"must be >= 0, got {self.n_routed_experts}")
        check(self.n_shared_experts >= 0, "n_shared_experts", f"must be >= 0, got {self.n_shared_experts}")
        check(self.moe_layer_freq >= 1, "moe_layer_freq", f"must be >= 1, got {self.moe_layer_freq}")
        check(
            0 <= self.first_k_dense_replace <= self.num_hidden_layers,
            "first_k_dense_replace",
            f"must be between 0 and num_hidden_layers={self.num_hidden_layers}, got {self.first_k_dense_replace}",
        )
        check(
            self.topk_method in TOPK_METHODS,
            "topk_method",
            f"unknown method {self.topk_method!r}; expected one of {TOPK_METHODS} (or 'gready')",
        )
        check(
            self.scoring_func in SCORING_FUNCS,
            "scoring_func",
            f"unknown scoring function {self.scoring_func!r}; expected one of {SCORING_FUNCS}",
        )
        if self.n_routed_experts > 0:
            check(
                self.moe_intermediate_size > 0,
                "moe_intermediate_size",
                f"must be a positive integer, got {self.moe_intermediate_size}",
            )
            check(self.n_group >= 1, "n_group", f"must be >= 1, got {self.n_group}")
            check(
                self.n_routed_experts % self.n_group == 0,
                "n_group",
                f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}",
            )
            check(
                1 <= self.topk_group <= self.n_group,
                "topk_group",
                f"must be between 1 and n_group={self.n_group}, got {self.topk_group}",
            )
            if self.topk_method == "noaux_tc" and self.n_group > 1:
                check(
                    self.n_routed_experts // self.n_group >= 2,
                    "n_group",
                    "noaux_tc scores a group by its top two experts, so each group needs at least 2 experts",
                )
            check(
                isinstance(self.num_experts_per_tok, int) and 1 <= self.num_experts_per_tok <= self.num_experts_allowed,
                "num_experts_per_tok",
                f"must be between 1 and the {self.num_experts_allowed} experts that topk_method="
                f"{self.topk_method!r} with topk_group={self.topk_group} of n_group={self.n_group} allows, "
                f"got {self.num_experts_per_tok}",
            )
        check(
            self.num_attention_heads % self.num_key_value_heads == 0,
            "num_key_value_heads",
            f"num_attention_heads={self.num_attention_heads} is not a multiple of {self.num_key_value_heads}",
        )
        if self.use_mla:
            check(self.kv_lora_rank > 0, "kv_lora_rank", f"must be positive or None, got {self.kv_lora_rank}")
            check(
                self.q_lora_rank is None or self.q_lora_rank > 0,
                "q_lora_rank",
                f"must be positive or None, got {self.q_lora_rank}",
            )
            check(self.qk_nope_head_dim >= 0, "qk_nope_head_dim", f"must be >= 0, got {self.qk_nope_head_dim}")
            check(self.v_head_dim > 0, "v_head_dim", f"must be positive, got {self.v_head_dim}")
            rotary = self.qk_rope_head_dim
            check(rotary > 0 and rotary % 2 == 0, "qk_rope_head_dim", f"must be a positive even number, got {rotary}")
        else:
            check(
                self.head_dim is not None and self.head_dim > 0 and self.head_dim % 2 == 0,
                "head_dim",
                f"must be a positive even number (hidden_size / num_attention_heads), got {self.head_dim}",
            )
            check(
                head_dim_given or self.head_dim * self.num_attention_heads == self.hidden_size,
                "num_attention_heads",
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}",
            )
        self._validate_balancing()
        self._validate_rope(self.rope_parameters or {} if rope is None else rope)

    def _validate_balancing(self) -> None:
        for field in (
            "aux_loss_alpha",
            "seq_aux_alpha",
            "aux_loss_device_alpha",
            "aux_loss_comm_alpha",
            "router_z_loss_coef",
            "bias_update_speed",
        ):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"DeepseekMoeConfig.{field}: must be a number >= 0, got {value!r}")
        devices, limit = self.num_devices, self.device_limit
        if devices is not None:
            if not isinstance(devices, int) or devices < 1:
                raise ValueError(f"DeepseekMoeConfig.num_devices: must be a positive integer or None, got {devices!r}")
            if self.n_routed_experts % devices != 0:
                raise ValueError(
                    f"DeepseekMoeConfig.num_devices: n_routed_experts={self.n_routed_experts} is not divisible by "
                    f"num_devices={devices}"
                )
        if limit is not None:
            if devices is None:
                raise ValueError("DeepseekMoeConfig.device_limit: needs num_devices to be set")
            if not isinstance(limit, int) or not 1 <= limit <= devices:
                raise ValueError(
                    f"DeepseekMoeConfig.device_limit: must be between 1 and num_devices={devices}, got {limit!r}"
                )
        factor = self.capacity_factor
        if factor is not None and (not isinstance(factor, (int, float)) or factor <= 0):
            raise ValueError(f"DeepseekMoeConfig.capacity_factor: must be a positive number or None, got {factor!r}")
        fraction = self.capacity_protected_fraction
        if not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
            raise ValueError(
                f"DeepseekMoeConfig.capacity_protected_fraction: must be between 0 and 1, got {fraction!r}"
            )

    @staticmethod
    def _validate_rope(rope: dict[str, Any]) -> None:
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(
                f"DeepseekMoeConfig.rope_scaling: unknown type {rope_type!r}; expected one of {ROPE_TYPES}"
            )
        theta = rope.get("rope_theta", 10000.0)
        if not theta or theta <= 0:
            raise ValueError(f"DeepseekMoeConfig.rope_theta: must be positive, got {theta!r}")
        if rope_type == "default":
            return
        factor = rope.get("factor")
        if not isinstance(factor, (int, float)) or factor < 1:
            raise ValueError(f"DeepseekMoeConfig.rope_scaling: 'factor' must be a number >= 1, got {factor!r}")
        if rope_type == "yarn":
            original = rope.get("original_max_position_embeddings")
            if not isinstance(original, int) or original <= 0:
                raise ValueError(
                    "DeepseekMoeConfig.rope_scaling: yarn needs a positive 'original_max_position_embeddings', "
                    f"got {original!r}"
                )
            for key in ("mscale", "mscale_all_dim", "beta_fast", "beta_slow"):
                value = rope.get(key)
                if value is not None and (not isinstance(value, (int, float)) or value < 0):
                    raise ValueError(f"DeepseekMoeConfig.rope_scaling: {key!r} must be a number >= 0, got {value!r}")

    @classmethod
    def get_config_dict(cls, pretrained_model_name_or_path: Any, **kwargs: Any) -> tuple[dict, dict]:
        """Reads official config.json files as ours: their `model_type` only selects the family defaults."""
        config_dict, kwargs = super().get_config_dict(pretrained_model_name_or_path, **kwargs)
        if config_dict.get("model_type") in _FAMILY_DEFAULTS:
            config_dict = {**config_dict, "_family": config_dict["model_type"], "model_type": cls.model_type}
        return config_dict, kwargs

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output.pop("qk_head_dim", None)  # derived
        return output


__all__ = ["DeepseekMoeConfig"]
