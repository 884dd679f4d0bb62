"""Configuration: validation messages, official config.json files, parameter counts, KV-cache sizes and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from deepseek_moe import PRESETS, DeepseekMoeConfig
from deepseek_moe.cli import main
from deepseek_moe.info import count_parameters, describe, kv_cache_bytes_per_token, load_config
from deepseek_moe.model.modeling_deepseek_moe import DeepseekMoeTopkRouter

# ----------------------------------------------------------------------------------------------------- validation

INVALID = {
    "n_group_divides_experts": ("tiny-v2", {"n_routed_experts": 15}, "n_group"),
    "topk_group_above_n_group": ("tiny-v2", {"topk_group": 5}, "topk_group"),
    "top_k_beyond_kept_groups": (
        "tiny-v2",
        {"n_routed_experts": 16, "n_group": 4, "topk_group": 1, "num_experts_per_tok": 5},
        "num_experts_per_tok",
    ),
    "unknown_topk_method": ("tiny-v3", {"topk_method": "top_p"}, "topk_method"),
    "unknown_scoring_func": ("tiny-v3", {"scoring_func": "tanh"}, "scoring_func"),
    "unknown_rope_type": ("tiny-16b", {"rope_scaling": {"type": "ntk", "factor": 2.0}}, "rope_scaling"),
    "rope_factor_below_1": ("tiny-16b", {"rope_scaling": {"type": "linear", "factor": 0.5}}, "rope_scaling"),
    "yarn_bad_original_length": (
        "tiny-v2",
        {"rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": -1}},
        "original_max_position_embeddings",
    ),
    # transformers' own RoPE check only rejects odd rotary widths above 4, raising a non-ValueError (see below).
    "odd_rope_head_dim": ("tiny-v2", {"qk_rope_head_dim": 3}, "qk_rope_head_dim"),
    "mha_hidden_not_divisible": ("tiny-16b", {"hidden_size": 66}, "num_attention_heads"),
    "mha_from_mla_preset_not_divisible": ("tiny-v2", {"kv_lora_rank": None, "hidden_size": 66}, "num_attention_heads"),
    "kv_heads_do_not_divide_heads": ("tiny-16b", {"num_key_value_heads": 3}, "num_key_value_heads"),
    "negative_mtp_layers": ("tiny-v3", {"num_nextn_predict_layers": -1}, "num_nextn_predict_layers"),
    "too_many_dense_layers": ("tiny-v3", {"first_k_dense_replace": 4}, "first_k_dense_replace"),
}


@pytest.mark.parametrize(("preset", "overrides", "field"), INVALID.values(), ids=INVALID.keys())
def test_invalid_config_names_the_field(preset: str, overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        DeepseekMoeConfig.from_preset(preset, **overrides)


# Checked before transformers' own RoPE standardisation, which would fill the length in or fail less clearly.
def test_yarn_without_original_length_is_rejected() -> None:
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        DeepseekMoeConfig.from_preset("tiny-v2", rope_scaling={"type": "yarn", "factor": 40})


def test_odd_rope_head_dim_above_4_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="qk_rope_head_dim"):
        DeepseekMoeConfig.from_preset("tiny-v2", qk_rope_head_dim=7)


def test_gready_spelling_is_greedy() -> None:
    """Early V2 remote code spelled it `gready`. Greedy ignores groups, so a top-k that 1 kept group of 4 could not
    hold is valid, and the router picks the plain top-k over all experts."""
    config = DeepseekMoeConfig.from_preset("tiny-v2-lite", topk_method="gready", n_group=4, topk_group=1)
    assert config.topk_method == "greedy"
    assert config.num_experts_allowed == config.n_routed_experts
    router = DeepseekMoeTopkRouter(config)
    torch.nn.init.normal_(router.weight, generator=torch.Generator().manual_seed(0))
    hidden = torch.randn(32, config.hidden_size, generator=torch.Generator().manual_seed(1))
    logits, weights, indices = router(hidden)
    expected = logits.softmax(-1).topk(config.num_experts_per_tok, dim=-1)
    torch.testing.assert_close(indices.sort(-1).values, expected.indices.sort(-1).values)
    torch.testing.assert_close(weights.sort(-1).values, expected.values.sort(-1).values)


# ------------------------------------------------------------------------------------------- official config.json

_COMMON = {
    "attention_bias": False,
    "attention_dropout": 0.0,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "moe_layer_freq": 1,
    "first_k_dense_replace": 1,
    "norm_topk_prob": False,
    "scoring_func": "softmax",
    "vocab_size": 102400,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
}
_V2_YARN = {
    "type": "yarn",
    "factor": 40,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
    "original_max_position_embeddings": 4096,
}
_V2_COMMON = {
    **_COMMON,
    "architectures": ["DeepseekV2ForCausalLM"],
    "model_type": "deepseek_v2",
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekV2Config",
        "AutoModel": "modeling_deepseek.DeepseekV2Model",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM",
    },
    "aux_loss_alpha": 0.001,
    "seq_aux": True,
    "ep_size": 1,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "max_position_embeddings": 163840,
    "rope_scaling": _V2_YARN,
    "transformers_version": "4.39.3",
}
# Reference §2.1, keyed by the preset describing the same model.
OFFICIAL_CONFIGS: dict[str, dict] = {
    "deepseek-moe-16b": {
        **_COMMON,
        "architectures": ["DeepseekForCausalLM"],
        "model_type": "deepseek",
        "auto_map": {
            "AutoConfig": "configuration_deepseek.DeepseekConfig",
            "AutoModel": "modeling_deepseek.DeepseekModel",
            "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM",
        },
        "hidden_size": 2048,
        "intermediate_size": 10944,
        "moe_intermediate_size": 1408,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "num_experts_per_tok": 6,
        "max_position_embeddings": 4096,
        "rope_scaling": None,
        "transformers_version": "4.36.0",
    },
    "deepseek-v2-lite": {
        **_V2_COMMON,
        "hidden_size": 2048,
        "intermediate_size": 10944,
        "moe_intermediate_size": 1408,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "q_lora_rank": None,
        "n_routed_experts": 64,
        "n_shared_experts": 2,
        "num_experts_per_tok": 6,
        "n_group": 1,
        "topk_group": 1,
        "topk_method": "greedy",
        "routed_scaling_factor": 1.0,
    },
    "deepseek-v2": {
        **_V2_COMMON,
        "hidden_size": 5120,
        "intermediate_size": 12288,
        "moe_intermediate_size": 1536,
        "num_hidden_layers": 60,
        "num_attention_heads": 128,
        "num_key_value_heads": 128,
        "q_lora_rank": 1536,
        "n_routed_experts": 160,
        "n_shared_experts": 2,
        "num_experts_per_tok": 6,
        "n_group": 8,
        "topk_group": 3,
        "topk_method": "group_limited_greedy",
        "routed_scaling_factor": 16.0,
    },
    "deepseek-v3": {
        **_V2_COMMON,
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "auto_map": {
            "AutoConfig": "configuration_deepseek.DeepseekV3Config",
            "AutoModel": "modeling_deepseek.DeepseekV3Model",
            "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
        },
        "vocab_size": 129280,
        "hidden_size": 7168,
        "intermediate_size": 18432,
        "moe_intermediate_size": 2048,
        "num_hidden_layers": 61,
        "num_nextn_predict_layers": 1,
        "num_attention_heads": 128,
        "num_key_value_heads": 128,
        "q_lora_rank": 1536,
        "n_routed_experts": 256,
        "n_shared_experts": 1,
        "num_experts_per_tok": 8,
        "n_group": 8,
        "topk_group": 4,
        "topk_method": "noaux_tc",
        "routed_scaling_factor": 2.5,
        "first_k_dense_replace": 3,
        "norm_topk_prob": True,
        "scoring_func": "sigmoid",
        "rope_scaling": {**_V2_YARN, "mscale": 1.0, "mscale_all_dim": 1.0},
        "bos_token_id": 0,
        "eos_token_id": 1,
        "quantization_config": {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [128, 128],
        },
        "transformers_version": "4.46.3",
    },
}
_ROUTING_FIELDS = (
    "n_routed_experts",
    "n_shared_experts",
    "num_experts_per_tok",
    "topk_method",
    "scoring_func",
    "n_group",
    "topk_group",
    "norm_topk_prob",
    "routed_scaling_factor",
    "first_k_dense_replace",
    "moe_layer_freq",
)


def _official_config(preset: str, directory: str) -> DeepseekMoeConfig:
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(OFFICIAL_CONFIGS[preset], f)
    return DeepseekMoeConfig.from_pretrained(directory)


@pytest.mark.parametrize("preset", OFFICIAL_CONFIGS)
def test_official_config_json_loads(preset: str, tmp_dir: str) -> None:
    config = _official_config(preset, tmp_dir)
    official = OFFICIAL_CONFIGS[preset]
    assert config.use_mla is (preset != "deepseek-moe-16b")
    missing_groups = {"n_group": 1, "topk_group": 1, "topk_method": "greedy", "routed_scaling_factor": 1.0}
    for field in _ROUTING_FIELDS:
        assert getattr(config, field) == official.get(field, missing_groups.get(field)), field
    assert config.rope_parameters["rope_type"] == ("default" if preset == "deepseek-moe-16b" else "yarn")
    if config.use_mla:
        assert config.rope_parameters["mscale_all_dim"] == official["rope_scaling"]["mscale_all_dim"]
        assert config.q_lora_rank == official["q_lora_rank"]
    assert (config.aux_loss_alpha, config.ep_size) == (0.001, 1)
    # The same architecture as the preset: identical parameter counts down to the last weight.
    assert count_parameters(config) == count_parameters(DeepseekMoeConfig.from_preset(preset))
    assert load_config(tmp_dir).to_dict() == config.to_dict()


@pytest.mark.parametrize("preset", OFFICIAL_CONFIGS)
def test_official_config_round_trips(preset: str, tmp_dir: str) -> None:
    config = _official_config(preset, tmp_dir)
    assert DeepseekMoeConfig.from_dict(config.to_dict()).to_dict() == config.to_dict()
    config.save_pretrained(os.path.join(tmp_dir, "saved"))
    assert DeepseekMoeConfig.from_pretrained(os.path.join(tmp_dir, "saved")).to_dict() == config.to_dict()


def test_official_fp8_quantization_config_goes_to_our_quantizer(tmp_dir: str) -> None:
    """Our quantizer (registered as `deepseek_fp8`) loads official FP8 checkpoints, transformers' `fp8` one stays
    for other models; the entry is written back exactly as DeepSeek's config.json has it."""
    config = _official_config("deepseek-v3", tmp_dir)
    assert type(config.quantization_config).__name__ == "DeepseekFp8Config"
    assert config.quantization_config.quant_method == "deepseek_fp8"
    assert config.to_dict()["quantization_config"] == OFFICIAL_CONFIGS["deepseek-v3"]["quantization_config"]
    with pytest.raises(ValueError, match="fmt"):
        DeepseekMoeConfig(quantization_config={"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]})


# -------------------------------------------------------------------------------------------------- sizes

# Reference §3e: (total, activated) in billions, embedding and head included.
REFERENCE_PARAMETERS = {
    "deepseek-v3": (671.03, 37.55),
    "deepseek-v2": (235.74, 21.38),
    "deepseek-v2-lite": (15.71, None),
    "deepseek-moe-16b": (16.38, 2.83),
}


@pytest.mark.parametrize("preset", REFERENCE_PARAMETERS)
def test_parameter_counts_match_reference(preset: str) -> None:
    counts = count_parameters(DeepseekMoeConfig.from_preset(preset))
    total, activated = REFERENCE_PARAMETERS[preset]
    assert counts["total"] == pytest.approx(total * 1e9, rel=1e-3)
    if activated is not None:
        assert counts["activated"] == pytest.approx(activated * 1e9, rel=1e-3)
    assert counts["total_with_mtp"] == counts["total"] + counts["mtp_total"]


def test_v3_mtp_counts() -> None:
    """11.61B unique MTP parameters; DeepSeek's "685B" upload adds one copy of embedding and head per MTP layer."""
    config = DeepseekMoeConfig.from_preset("deepseek-v3")
    counts = count_parameters(config)
    assert counts["mtp_total"] == pytest.approx(11.61e9, rel=1e-2)
    embedding = config.vocab_size * config.hidden_size
    assert counts["checkpoint_total"] == counts["total_with_mtp"] + 2 * embedding
    assert round(counts["checkpoint_total"] / 1e9, 2) == 684.49  # the hub's "685B" adds 0.04B FP8 scale entries
    # One token uses the MTP block's attention, eh_proj, router, shared expert and 8 of 256 routed experts.
    routed = 3 * config.hidden_size * config.moe_intermediate_size
    assert counts["mtp_total"] - counts["mtp_activated"] == routed * (config.n_routed_experts - 8)


def test_counts_without_mtp_or_moe() -> None:
    tiny = DeepseekMoeConfig.from_preset("tiny-v3")
    no_mtp = count_parameters(DeepseekMoeConfig.from_preset("tiny-v3", num_nextn_predict_layers=0))
    assert no_mtp["mtp_total"] == no_mtp["mtp_activated"] == 0
    assert no_mtp["total"] == count_parameters(tiny)["total"]
    dense = count_parameters(DeepseekMoeConfig.from_preset("tiny-16b", first_k_dense_replace=3))
    assert dense["activated"] == dense["total"]


@pytest.mark.parametrize(
    ("preset", "expected"), [("deepseek-v3", 70_272), ("deepseek-v2", 69_120), ("deepseek-v2-lite", 31_104)]
)
def test_kv_cache_bytes_per_token(preset: str, expected: int) -> None:
    kv = kv_cache_bytes_per_token(DeepseekMoeConfig.from_preset(preset))
    assert kv["bytes_all_layers"] == expected
    assert kv["bytes_per_layer"] == 576 * 2


def test_kv_cache_bytes_per_token_mha() -> None:
    kv = kv_cache_bytes_per_token(DeepseekMoeConfig.from_preset("deepseek-moe-16b"), dtype_bytes=4)
    assert kv["bytes_per_layer"] == 2 * 16 * 128 * 4
    assert kv["bytes_all_layers"] == 28 * kv["bytes_per_layer"]


def test_describe_summarises_v3() -> None:
    text = describe(DeepseekMoeConfig.from_preset("deepseek-v3"))
    for fragment in ("MLA", "58 MoE", "256 routed", "noaux_tc", "671.03B", "37.55B", "70,272"):
        assert fragment in text


def test_load_config_rejects_unknown_names() -> None:
    with pytest.raises(ValueError, match="tiny-v3"):
        load_config("deepseek-v4")


# --------------------------------------------------------------------------------------------------------- CLI


def test_cli_info_prints_counts(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "deepseek-v3"]) == 0
    out = capsys.readouterr().out
    assert "671.03B" in out and "37.55B" in out


def test_cli_info_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "deepseek-v2-lite", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kv_cache_bytes_per_token"]["bytes_all_layers"] == 31_104
    assert report["parameters"] == count_parameters(DeepseekMoeConfig.from_preset("deepseek-v2-lite"))


@pytest.mark.parametrize("name", ["deepseek-v4", "/nonexistent/model/dir"])
def test_cli_bad_input_exits_2(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", name]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_cli_module_runs() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "deepseek_moe.cli", "info", "tiny-v3"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "MTP" in result.stdout and "KV cache" in result.stdout


def test_every_preset_describes() -> None:
    for name in PRESETS:
        assert describe(load_config(name))


def test_demo_command_generates_and_checks_the_cache(capsys) -> None:
    assert main(["demo", "--preset", "tiny-v2", "--new-tokens", "5"]) == 0
    assert "equals full recomputation: OK" in capsys.readouterr().out
