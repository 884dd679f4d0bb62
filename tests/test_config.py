"""Configuration: official config.json files, parameter counts, KV-cache sizes and the CLI (validation is tested in
test_config_validation.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from deepseek_moe import PRESETS, DeepseekMoeConfig
from deepseek_moe.cli import main
from deepseek_moe.info import count_parameters, describe, kv_cache_bytes_per_token, summary
from deepseek_moe.model.modeling_deepseek_moe import DeepseekMoeTopkRouter
from deepseek_moe.presets import load_config

# ------------------------------------------------------------------------------------------------------ spellings


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
    assert config.uses_mla is (preset != "deepseek-moe-16b")
    missing_groups = {"n_group": 1, "topk_group": 1, "topk_method": "greedy", "routed_scaling_factor": 1.0}
    for field in _ROUTING_FIELDS:
        assert getattr(config, field) == official.get(field, missing_groups.get(field)), field
    assert config.rope_parameters["rope_type"] == ("default" if preset == "deepseek-moe-16b" else "yarn")
    if config.uses_mla:
        assert config.rope_parameters["mscale_all_dim"] == official["rope_scaling"]["mscale_all_dim"]
        assert config.q_lora_rank == official["q_lora_rank"]
    assert config.aux_loss_alpha == 0.001
    assert not hasattr(config, "ep_size") and not hasattr(config, "pretraining_tp")  # read by nothing: dropped
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
        DeepseekMoeConfig.from_dict(
            {"quantization_config": {"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}}
        )


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
    # One MoE decoder block: MLA (q_a 7168·1536, q_a_norm 1536, q_b 1536·128·192, kv_a 7168·576, kv_a_norm 512,
    # kv_b 512·128·256, o 16384·7168), 2 norms of 7168, router 256·7168, 257 experts of 3·7168·2048; plus enorm,
    # hnorm, shared_head.norm (7168 each) and eh_proj 14336·7168.
    attention = 7168 * 1536 + 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 + 512 * 128 * 256 + 16384 * 7168
    moe = 256 * 7168 + 257 * 3 * 7168 * 2048
    assert counts["mtp_total"] == attention + 2 * 7168 + moe + 3 * 7168 + 14336 * 7168 == 11_610_067_968
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


# The summary rows of each official architecture, written from the reference (§2.1), not from the code.
DESCRIPTIONS = {
    "deepseek-moe-16b": {
        "architecture": "DeepSeekMoE-style, hidden 2048, vocab 102400",
        "attention": "multi-head, 16 heads (16 KV), head dim 128",
        "layers": "28 (1 dense, 27 MoE)",
        "experts": "64 routed + 2 shared, 6 routed active per token, expert width 1408",
        "routing": "greedy: softmax, top-6; weights unnormalised, scaled by 1",
        "KV cache": "229,376 bytes per token in bf16 (4096 values x 28 layers)",
    },
    "deepseek-v2-lite": {
        "architecture": "DeepSeek-V2-style, hidden 2048, vocab 102400",
        "attention": "MLA, 16 heads, kv_lora_rank 512, q_lora_rank none (q_proj), head dims nope/rope/v 128/64/128",
        "layers": "27 (1 dense, 26 MoE)",
        "experts": "64 routed + 2 shared, 6 routed active per token, expert width 1408",
        "routing": "greedy: softmax, top-6; weights unnormalised, scaled by 1",
        "KV cache": "31,104 bytes per token in bf16 (576 values x 27 layers)",
    },
    "deepseek-v2": {
        "architecture": "DeepSeek-V2-style, hidden 5120, vocab 102400",
        "attention": "MLA, 128 heads, kv_lora_rank 512, q_lora_rank 1536, head dims nope/rope/v 128/64/128",
        "layers": "60 (1 dense, 59 MoE)",
        "experts": "160 routed + 2 shared, 6 routed active per token, expert width 1536",
        "routing": "group_limited_greedy: softmax, top-6, within the best 3 of 8 groups (group score: max); "
        "weights unnormalised, scaled by 16",
        "KV cache": "69,120 bytes per token in bf16 (576 values x 60 layers)",
    },
    "deepseek-v3": {
        "architecture": "DeepSeek-V3-style, hidden 7168, vocab 129280",
        "attention": "MLA, 128 heads, kv_lora_rank 512, q_lora_rank 1536, head dims nope/rope/v 128/64/128",
        "layers": "61 (3 dense, 58 MoE) + 1 MTP",
        "experts": "256 routed + 1 shared, 8 routed active per token, expert width 2048",
        "routing": "noaux_tc: sigmoid + correction bias, top-8, within the best 4 of 8 groups "
        "(group score: top-2 sum); weights normalised, scaled by 2.5",
        "KV cache": "70,272 bytes per token in bf16 (576 values x 61 layers)",
    },
}


@pytest.mark.parametrize("preset", DESCRIPTIONS)
def test_describe_states_the_architecture(preset: str) -> None:
    rows = dict(summary(load_config(preset)))
    for label, expected in DESCRIPTIONS[preset].items():
        assert rows[label] == expected, label
    assert describe(load_config(preset)).splitlines()[0] == f"architecture: {DESCRIPTIONS[preset]['architecture']}"


def test_small_presets_keep_their_family() -> None:
    families = {
        "tiny-16b": "DeepSeekMoE",
        "tiny-v2-lite": "DeepSeek-V2",
        "tiny-v2": "DeepSeek-V2",
        "tiny-v3": "DeepSeek-V3",
    }
    assert sorted(families) == sorted(name for name in PRESETS if name.startswith("tiny-"))
    for name, family in families.items():
        rows = dict(summary(load_config(name)))
        assert rows["architecture"] == f"{family}-style, hidden 64, vocab 512", name
        assert rows["layers"].startswith("3 (1 dense, 2 MoE)"), name


def test_demo_offers_no_preset(capsys) -> None:
    """The demo trains its own small model; a full-size preset would try to allocate hundreds of GB."""
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--preset", "deepseek-v3"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --preset" in capsys.readouterr().err
