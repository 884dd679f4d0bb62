"""Config validation: every field checked for type and range, every rule between fields, each failure a `ValueError`
naming the field and raised before any model (and so any weight) is built; official files load silently."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
from conftest import tiny_model
from transformers import PreTrainedConfig
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from deepseek_moe import DeepseekMoeConfig, DeepseekMoeForCausalLM
from deepseek_moe.model import configuration_deepseek_moe, modeling_deepseek_moe
from deepseek_moe.model.architecture_deepseek_moe import DeepseekMoeArchitecture, DeepseekMoeValues
from deepseek_moe.model.configuration_deepseek_moe import FIELD_RULES, Rule, official_config
from deepseek_moe.presets import PRESETS

OUR_FIELDS = sorted(
    {f.name for f in dataclasses.fields(DeepseekMoeConfig)} - {f.name for f in dataclasses.fields(PreTrainedConfig)}
)


def test_every_field_has_a_rule() -> None:
    assert sorted(FIELD_RULES) == OUR_FIELDS


# DeepSeek's remote code writes None for "no experts" and "no groups": official files may too (see the test below).
NONE_IS_OFFICIAL = ("n_routed_experts", "n_shared_experts", "n_group", "topk_group")


def test_official_none_counts_become_numbers() -> None:
    config = DeepseekMoeConfig.from_dict(
        {"model_type": "deepseek_v2", "n_routed_experts": 8, "n_shared_experts": None, "n_group": None,
         "topk_group": None, "num_experts_per_tok": 2}
    )  # fmt: skip
    assert (config.n_shared_experts, config.n_group, config.topk_group) == (0, 1, 1)
    dense = DeepseekMoeConfig.from_dict({"model_type": "deepseek_v2", "n_routed_experts": None})
    assert (dense.n_routed_experts, dense.num_experts_per_tok) == (0, 0)


def _invalid_values(field: str, rule: Rule) -> list:
    """Values of the wrong type, or of the right type but out of range, for a field with this rule."""
    wrong_type = {
        int: ["16", 1.5, 2.0, True, [1]],
        float: ["1.0", math.nan, math.inf, True, [0.5]],
        bool: ["false", 0, 1, "true"],
        str: [3, ["silu"], "no-such-choice"],
        dict: ["yarn", [1, 2]],
        object: [],
    }[rule.kind]
    if not rule.optional and field not in NONE_IS_OFFICIAL:
        wrong_type.append(None)
    out_of_range = []
    if rule.low is not None:
        out_of_range += [rule.low - 1] + ([rule.low] if rule.low_open else [])
        if rule.kind is float:
            out_of_range += [rule.low - 0.5, -math.inf]
    if rule.high is not None:
        out_of_range += [rule.high + 1] + ([rule.high] if rule.high_open else [])
    return wrong_type + out_of_range


FUZZ = [
    pytest.param(field, value, id=f"{field}={value!r}")
    for field, rule in FIELD_RULES.items()
    for value in _invalid_values(field, rule)
]


@pytest.fixture
def no_model_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any model construction (and so any weight allocation) fails the test loudly."""

    def refuse(*args, **kwargs) -> None:
        raise AssertionError("a model was built from an invalid config")

    monkeypatch.setattr(modeling_deepseek_moe.DeepseekMoePreTrainedModel, "__init__", refuse)


def _valid_config_json(preset: str) -> dict:
    """The preset as config.json, less the derived `head_dim` (given, it would let MHA heads be narrower)."""
    values = json.loads(DeepseekMoeConfig.from_preset(preset).to_json_string())
    del values["head_dim"]
    return values


def _write_config(directory, values: dict) -> None:
    (directory / "config.json").write_text(json.dumps(values, allow_nan=True))


@pytest.mark.parametrize(("field", "value"), FUZZ)
def test_fuzzed_field_is_rejected_before_any_weight(field: str, value, tmp_path, no_model_is_built) -> None:
    """Through the constructor and through `from_pretrained` on a folder holding that config.json."""
    with pytest.raises(ValueError, match=f"DeepseekMoeConfig.{field}"):
        DeepseekMoeConfig.from_preset("tiny-v3", **{field: value})
    _write_config(tmp_path, {**_valid_config_json("tiny-v3"), field: value})
    with pytest.raises(ValueError, match=f"DeepseekMoeConfig.{field}"):
        DeepseekMoeForCausalLM.from_pretrained(tmp_path)


# Values users get wrong (issue 11's list among them), each with the field its error must name. Every value here is
# also rejected for a stated reason, independent of how the rule table is written.
NAMED_CASES = {
    "routed_scaling_factor_nan": ("tiny-v3", {"routed_scaling_factor": math.nan}, "routed_scaling_factor"),
    "routed_scaling_factor_negative": ("tiny-v2", {"routed_scaling_factor": -1.0}, "routed_scaling_factor"),
    "routed_scaling_factor_zero": ("tiny-v3", {"routed_scaling_factor": 0}, "routed_scaling_factor"),
    "rms_norm_eps_zero": ("tiny-v3", {"rms_norm_eps": 0.0}, "rms_norm_eps"),
    "rms_norm_eps_negative": ("tiny-16b", {"rms_norm_eps": -1e-6}, "rms_norm_eps"),
    "norm_topk_prob_string": ("tiny-v3", {"norm_topk_prob": "false"}, "norm_topk_prob"),
    "max_position_embeddings_zero": ("tiny-v3", {"max_position_embeddings": 0}, "max_position_embeddings"),
    "attention_dropout_2": ("tiny-v3", {"attention_dropout": 2.0}, "attention_dropout"),
    "attention_dropout_1": ("tiny-v3", {"attention_dropout": 1.0}, "attention_dropout"),
    "kv_lora_rank_fractional": ("tiny-v3", {"kv_lora_rank": 32.5}, "kv_lora_rank"),
    "n_shared_experts_fractional": ("tiny-v3", {"n_shared_experts": 1.5}, "n_shared_experts"),
    "hidden_act_unknown": ("tiny-v3", {"hidden_act": "swishy"}, "hidden_act"),
    "pad_token_id_beyond_vocab": ("tiny-v3", {"pad_token_id": 512}, "pad_token_id"),
    "eos_token_id_beyond_vocab": ("tiny-v3", {"eos_token_id": [1, 600]}, "eos_token_id"),
    "bos_token_id_negative": ("tiny-v3", {"bos_token_id": -1}, "bos_token_id"),
    "hidden_size_string": ("tiny-v3", {"hidden_size": "16"}, "hidden_size"),
    "num_key_value_heads_zero": ("tiny-16b", {"num_key_value_heads": 0}, "num_key_value_heads"),
    "num_key_value_heads_not_dividing": ("tiny-16b", {"num_key_value_heads": 3}, "num_key_value_heads"),
    "yarn_beta_fast_below_beta_slow": (
        "tiny-v3",
        {
            "rope_scaling": {
                "type": "yarn",
                "factor": 40,
                "beta_fast": 1,
                "beta_slow": 32,
                "original_max_position_embeddings": 4096,
            }
        },
        "rope_scaling",
    ),  # fmt: skip
    "yarn_without_original_length": ("tiny-v2", {"rope_scaling": {"type": "yarn", "factor": 40}}, "rope_scaling"),
    "yarn_bad_original_length": (
        "tiny-v2",
        {"rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": -1}},
        "original_max_position_embeddings",
    ),
    "rope_type_unknown": ("tiny-16b", {"rope_scaling": {"type": "ntk", "factor": 2.0}}, "rope_scaling"),
    "rope_factor_below_1": ("tiny-16b", {"rope_scaling": {"type": "linear", "factor": 0.5}}, "rope_scaling"),
    "rope_theta_zero": ("tiny-16b", {"rope_theta": 0}, "rope_theta"),
    "rope_mscale_negative": (
        "tiny-v3",
        {"rope_scaling": {"type": "yarn", "factor": 4, "mscale": -1, "original_max_position_embeddings": 64}},
        "mscale",
    ),
    # rules between fields
    "n_group_not_dividing_experts": ("tiny-v2", {"n_routed_experts": 15}, "n_group"),
    "topk_group_above_n_group": ("tiny-v2", {"topk_group": 5}, "topk_group"),
    "top_k_beyond_kept_groups": (
        "tiny-v2",
        {"n_routed_experts": 16, "n_group": 4, "topk_group": 1, "num_experts_per_tok": 5},
        "num_experts_per_tok",
    ),
    "top_k_zero_with_experts": ("tiny-v3", {"num_experts_per_tok": 0}, "num_experts_per_tok"),
    "noaux_tc_groups_of_one_expert": (
        "tiny-v3",
        {"n_routed_experts": 4, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 2},
        "n_group",
    ),
    "odd_rope_head_dim": ("tiny-v2", {"qk_rope_head_dim": 3}, "qk_rope_head_dim"),
    "odd_rope_head_dim_above_4": ("tiny-v2", {"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
    "odd_mha_head_dim": ("tiny-16b", {"head_dim": 15}, "head_dim"),
    "mha_hidden_not_divisible": ("tiny-16b", {"hidden_size": 66}, "num_attention_heads"),
    "mha_from_mla_preset_not_divisible": ("tiny-v2", {"kv_lora_rank": None, "hidden_size": 66}, "num_attention_heads"),
    "too_many_dense_layers": ("tiny-v3", {"first_k_dense_replace": 4}, "first_k_dense_replace"),
    "mtp_without_experts": ("tiny-v3", {"n_routed_experts": 0}, "num_nextn_predict_layers"),
    "num_devices_not_dividing_experts": ("tiny-v3", {"num_devices": 3}, "num_devices"),
    "device_limit_without_devices": ("tiny-v3", {"device_limit": 2}, "device_limit"),
    "device_limit_above_devices": ("tiny-v3", {"num_devices": 4, "device_limit": 5}, "device_limit"),
    "official_model_type_unknown": ("tiny-v3", {"model_type": "llama"}, "model_type"),
    "fp8_blocks_not_positive": (
        "tiny-v3",
        {"quantization_config": {"quant_method": "fp8", "weight_block_size": [0, 128]}},
        "quantization_config",
    ),
    "fp8_not_e4m3": ("tiny-v3", {"quantization_config": {"quant_method": "fp8", "fmt": "e5m2"}}, "quantization_config"),
}


@pytest.mark.parametrize(("preset", "overrides", "field"), NAMED_CASES.values(), ids=NAMED_CASES.keys())
def test_invalid_config_names_the_field(preset: str, overrides: dict, field: str, tmp_path, no_model_is_built) -> None:
    with pytest.raises(ValueError, match=field):
        DeepseekMoeConfig.from_preset(preset, **overrides)
    values = {**_valid_config_json(preset), **overrides}
    if "rope_scaling" in overrides or "rope_theta" in overrides:
        values.pop("rope_parameters")  # the official spelling replaces ours
    _write_config(tmp_path, values)
    with pytest.raises(ValueError, match=field):
        DeepseekMoeForCausalLM.from_pretrained(tmp_path)


def test_model_type_of_an_official_family_needs_from_dict() -> None:
    """Building directly with an official `model_type` would silently take V3 defaults for absent keys."""
    with pytest.raises(ValueError, match="model_type.*from_dict"):
        DeepseekMoeConfig(model_type="deepseek_v2")
    config = DeepseekMoeConfig.from_dict({"model_type": "deepseek_v2"})
    assert (config.topk_method, config.n_routed_experts, config.hidden_size) == ("greedy", 0, 4096)


def test_save_pretrained_validates_again(tmp_path) -> None:
    config = DeepseekMoeConfig.from_preset("tiny-v3")
    config.n_group = 3  # no longer divides the 16 experts
    with pytest.raises(ValueError, match="DeepseekMoeConfig.n_group"):
        config.save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()


def _warnings(function) -> str:
    logger = logging.get_logger(configuration_deepseek_moe.__name__)
    with CaptureLogger(logger) as captured:
        function()
    return captured.out


def test_misspelled_keyword_is_warned_about() -> None:
    out = _warnings(lambda: DeepseekMoeConfig.from_preset("tiny-v3", n_routed_expert=8, num_experts_per_tok=2))
    assert "n_routed_expert" in out and "num_experts_per_tok" not in out


def test_transformers_keys_pass_silently(tmp_path) -> None:
    """Keys transformers, the Hub and DeepSeek write into config.json are not typos."""
    extra = {
        "pad_token_id": 2,
        "dtype": "bfloat16",
        "torch_dtype": "bfloat16",
        "architectures": ["DeepseekV3ForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"},
        "rope_theta": 10000,
        "num_nextn_predict_layers": 1,
        "ep_size": 1,
        "pretraining_tp": 1,
        "transformers_version": "4.46.3",
        "use_cache": True,
        "max_length": 20,
        "attn_implementation": "eager",
        "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128], "fmt": "e4m3"},
    }
    assert _warnings(lambda: DeepseekMoeConfig.from_preset("tiny-v3", **extra)) == ""
    config = DeepseekMoeConfig.from_preset("tiny-v3", **extra)
    assert config.pad_token_id == 2 and config.dtype == torch.bfloat16
    assert not hasattr(config, "ep_size") and config.quantization_config.weight_block_size == [128, 128]


def test_sequence_beyond_max_position_embeddings_warns() -> None:
    model = tiny_model("tiny-v3", max_position_embeddings=12).eval()
    logger = logging.get_logger(modeling_deepseek_moe.__name__)
    with CaptureLogger(logger) as within:
        model(torch.arange(12)[None])
    with CaptureLogger(logger) as beyond:
        model(torch.arange(13)[None])
    assert within.out == ""
    assert "13" in beyond.out and "max_position_embeddings=12" in beyond.out


def test_family_switches() -> None:
    """The named properties every module uses instead of string tests, per official architecture."""
    expected = {  # uses_mla, uses_bias_balancing, uses_group_limited_routing, scales_routing_weights, model_type
        "deepseek-moe-16b": (False, False, False, True, "deepseek"),
        "deepseek-v2-lite": (True, False, False, True, "deepseek_v2"),
        "deepseek-v2": (True, False, True, True, "deepseek_v2"),
        "deepseek-v3": (True, True, True, True, "deepseek_v3"),
    }
    for preset, switches in expected.items():
        config = DeepseekMoeConfig.from_preset(preset)
        actual = (config.uses_mla, config.uses_bias_balancing, config.uses_group_limited_routing,
                  config.scales_routing_weights, config.official_model_type)  # fmt: skip
        assert actual == switches, preset
    normalised = DeepseekMoeConfig.from_preset("tiny-v2", norm_topk_prob=True)
    assert not normalised.scales_routing_weights
    assert normalised.expert_balance_alpha == normalised.aux_loss_alpha == 0.001
    v3 = DeepseekMoeConfig.from_preset("tiny-v3")
    assert v3.expert_balance_alpha == v3.seq_aux_alpha == 1e-4


@pytest.mark.parametrize("preset", ["deepseek-moe-16b", "deepseek-v2-lite", "deepseek-v2", "deepseek-v3"])
def test_official_config_json_loads_without_warnings(preset: str, tmp_path) -> None:
    """DeepSeek's own files (ep_size, pretraining_tp, auto_map, an FP8 quantization_config, ...) are not typos."""
    from test_config import OFFICIAL_CONFIGS

    _write_config(tmp_path, OFFICIAL_CONFIGS[preset])
    loggers = [logging.get_logger(configuration_deepseek_moe.__name__), logging.get_logger("transformers")]
    with CaptureLogger(loggers[0]) as ours, CaptureLogger(loggers[1]) as theirs:
        config = DeepseekMoeConfig.from_pretrained(tmp_path)
    assert ours.out == "" and theirs.out == ""
    # The same architecture as the preset, field by field; nothing of DeepSeek's remote code kept, and an FP8 form
    # handed to our quantizer exactly as written.
    expected = DeepseekMoeConfig.from_preset(preset)
    assert {f: getattr(config, f) for f in OUR_FIELDS} == {f: getattr(expected, f) for f in OUR_FIELDS}
    assert not hasattr(config, "auto_map")
    quantization = OFFICIAL_CONFIGS[preset].get("quantization_config")
    if quantization is None:
        assert getattr(config, "quantization_config", None) is None
    else:
        assert config.quantization_config.to_dict() == quantization


@pytest.mark.parametrize(
    ("override", "field"),
    [({"rms_norm_eps": -1.0}, "rms_norm_eps"), ({"n_group": 3}, "n_group"), ({"kv_lora_rank": 32.5}, "kv_lora_rank")],
)
def test_from_pretrained_overrides_are_checked_before_any_weight(override, field, tmp_path, monkeypatch) -> None:
    """`from_pretrained(path, field=value)` sets fields after the config checked itself; the model checks again."""
    DeepseekMoeForCausalLM(DeepseekMoeConfig.from_preset("tiny-v3")).save_pretrained(tmp_path)
    DeepseekMoeForCausalLM.from_pretrained(tmp_path)  # the saved model itself loads

    def refuse(*args, **kwargs) -> None:
        raise AssertionError("a weight was allocated from an invalid config")

    monkeypatch.setattr(torch.nn.Embedding, "__init__", refuse)
    with pytest.raises(ValueError, match=field):
        DeepseekMoeForCausalLM.from_pretrained(tmp_path, **override)


# ------------------------------------------------------------------------------- plain values (the converter's)

# Only the transformers config checks `hidden_act` against transformers' activations.
TRANSFORMERS_ONLY = [("hidden_act", "no-such-choice"), ("hidden_act", "swishy")]


@pytest.mark.parametrize(("field", "value"), [param for param in FUZZ if param.values not in TRANSFORMERS_ONLY])
def test_plain_values_reject_every_fuzzed_field(field: str, value) -> None:
    """`DeepseekMoeValues`, which conversion reads configs with (no transformers), applies the same field rules."""
    with pytest.raises(ValueError, match=f"DeepseekMoeConfig.{field}"):
        DeepseekMoeValues.from_dict({**_valid_config_json("tiny-v3"), field: value})


# The FP8 `quantization_config` is the transformers config's too: conversion reads the scales themselves and writes
# DeepSeek's entry anew.
PLAIN_CASES = {
    name: case
    for name, case in NAMED_CASES.items()
    if (case[2], case[1].get(case[2])) not in TRANSFORMERS_ONLY and case[2] != "quantization_config"
}


@pytest.mark.parametrize(("preset", "overrides", "field"), PLAIN_CASES.values(), ids=PLAIN_CASES.keys())
def test_plain_values_reject_every_named_case(preset: str, overrides: dict, field: str) -> None:
    """And the same rules between fields, RoPE included."""
    values = {**_valid_config_json(preset), **overrides}
    if "rope_scaling" in overrides or "rope_theta" in overrides:
        values.pop("rope_parameters")
    with pytest.raises(ValueError, match=field):
        DeepseekMoeValues.from_dict(values)


PLAIN_SOURCES = {
    **{f"{name} official": lambda name=name: official_config(DeepseekMoeConfig.from_preset(name)) for name in PRESETS},
    **{f"{name} ours": lambda name=name: _valid_config_json(name) for name in PRESETS},
    "official fp8": lambda: {**PRESETS["tiny-v3"], "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                             "activation_scheme": "dynamic", "weight_block_size": [128, 128]}},
}  # fmt: skip


@pytest.mark.parametrize("source", PLAIN_SOURCES)
def test_plain_values_read_and_write_the_same_config(source: str) -> None:
    """Every field, derived ones included, equals the transformers config's from the same dict, and what the values
    write (the converter's config.json) reads back as that same config."""
    config_dict = PLAIN_SOURCES[source]()
    config = DeepseekMoeConfig.from_dict(copy.deepcopy(config_dict))
    values = DeepseekMoeValues.from_dict(copy.deepcopy(config_dict))
    for field in dataclasses.fields(DeepseekMoeArchitecture):
        if field.name != "rope_parameters":  # transformers standardises it; compared through the written config
            assert getattr(values, field.name) == getattr(config, field.name), field.name
    assert DeepseekMoeConfig.from_dict(json.loads(json.dumps(values.to_dict()))).to_dict() == config.to_dict()
