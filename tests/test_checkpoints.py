"""Official checkpoint directories load: per-expert keys, MTP layers, FP8 with block scales, bf16 routers."""

from __future__ import annotations

import json
import warnings

import torch
from checkpoint_utils import QUANTIZATION_CONFIG, official_v3_config, to_official_fp8, write_sharded
from conftest import assert_close, builtin_config, tiny_model
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3ForCausalLM
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging

from deepseek_moe import DeepseekMoeConfig, DeepseekMoeForCausalLM


def test_fp8_checkpoint_with_partial_blocks_loads_dequantized(tmp_path):
    # kv_a_proj_with_mqa has 136 + 8 = 144 rows (one full and one partial block), the dense MLP 200.
    config = DeepseekMoeConfig.from_preset(
        "tiny-v3", hidden_size=136, intermediate_size=200, kv_lora_rank=136, num_nextn_predict_layers=1
    )
    source = tiny_model(config, seed=5)
    source.save_pretrained(tmp_path / "source")
    state = load_file(tmp_path / "source" / "model.safetensors")

    fp8_state, dequantized = to_official_fp8(state)
    assert fp8_state["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"].shape == (2, 2)
    (tmp_path / "fp8").mkdir()
    write_sharded(fp8_state, tmp_path / "fp8", official_v3_config(config, quantization_config=QUANTIZATION_CONFIG))

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. unexpected MTP keys or leftover scales would warn
        model, info = DeepseekMoeForCausalLM.from_pretrained(
            tmp_path / "fp8", dtype=torch.float32, output_loading_info=True
        )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert not hasattr(model.config, "quantization_config")

    # Reference: transformers' built-in V3 on the dequantized weights (computed here, not by our loader).
    (tmp_path / "reference").mkdir()
    save_file({k: v.float().contiguous() for k, v in dequantized.items()}, tmp_path / "reference" / "model.safetensors")
    reference_config = builtin_config(DeepseekMoeConfig.from_preset(
        "tiny-v3", hidden_size=136, intermediate_size=200, kv_lora_rank=136, num_nextn_predict_layers=0
    ))  # fmt: skip
    reference_config.save_pretrained(tmp_path / "reference")
    reference = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "reference")
    input_ids = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, expected = model.eval()(input_ids).logits, reference.float().eval()(input_ids).logits
    assert_close(ours, expected, 1e-5)
    # The MTP layer's own weights were dequantized into place too.
    eh_proj = dequantized[f"model.layers.{config.num_hidden_layers}.eh_proj.weight"]
    assert torch.equal(model.model.layers[config.num_hidden_layers].eh_proj.weight, eh_proj.float())


def test_official_v3_directory_with_mtp_copies_loads_cleanly(tmp_path):
    config = DeepseekMoeConfig.from_preset("tiny-v3")
    source = tiny_model(config, seed=1)
    source.save_pretrained(tmp_path / "source")
    state = load_file(tmp_path / "source" / "model.safetensors")
    mtp = f"model.layers.{config.num_hidden_layers}."
    assert mtp + "eh_proj.weight" in state and mtp + "mlp.experts.0.gate_proj.weight" in state
    # DeepSeek's checkpoint stores copies of the shared embedding and head inside each MTP layer.
    state[mtp + "embed_tokens.weight"] = state["model.embed_tokens.weight"].clone()
    state[mtp + "shared_head.head.weight"] = state["lm_head.weight"].clone()
    (tmp_path / "official").mkdir()
    write_sharded(state, tmp_path / "official", official_v3_config(config), shards=2)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, info = DeepseekMoeForCausalLM.from_pretrained(
            tmp_path / "official", dtype=torch.float32, output_loading_info=True
        )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert model.config.model_type == "deepseek_moe" and model.config.num_nextn_predict_layers == 1
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, source.state_dict()[name]), name


def test_bf16_load_keeps_router_in_fp32(tmp_path):
    config = DeepseekMoeConfig.from_preset("tiny-v3", num_nextn_predict_layers=0)
    tiny_model(config).save_pretrained(tmp_path)
    model = DeepseekMoeForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    gate = model.model.layers[1].mlp.gate
    assert gate.weight.dtype == torch.float32 and gate.e_score_correction_bias.dtype == torch.float32
    assert model.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    reference = DeepseekMoeForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
        expected = reference(torch.tensor([[1, 2, 3]])).logits
    assert logits.dtype == torch.bfloat16
    # bf16 rounding can flip a near-tie in top-k routing (it does for the first token here), so the logits agree as a
    # whole rather than entry by entry: 13% relative (Frobenius) here; a wrong weight or a bf16 router gives ~100%.
    assert (logits.float() - expected).norm() <= 0.2 * expected.norm()
    assert torch.equal(logits[0, 1:].argmax(-1), expected[0, 1:].argmax(-1))


def test_save_writes_official_per_expert_layout(tmp_path):
    config = DeepseekMoeConfig.from_preset("tiny-v2", num_nextn_predict_layers=0)
    model = tiny_model(config)
    model.save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "model.safetensors"))
    fused = model.model.layers[1].mlp.experts
    for e in range(config.n_routed_experts):
        for projection in ("gate_proj", "up_proj", "down_proj"):
            assert f"model.layers.1.mlp.experts.{e}.{projection}.weight" in keys
    assert not any("gate_up_proj" in key for key in keys)
    gate = load_file(tmp_path / "model.safetensors")["model.layers.1.mlp.experts.3.gate_proj.weight"]
    assert torch.equal(gate, fused.gate_up_proj[3, : config.moe_intermediate_size])


def test_official_16b_directory_loads_as_multi_head_attention(tmp_path):
    config = DeepseekMoeConfig.from_preset("tiny-16b")
    source = tiny_model(config, seed=2)
    source.save_pretrained(tmp_path)
    official = json.loads((tmp_path / "config.json").read_text())
    for key in ("kv_lora_rank", "q_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "topk_method",
                "n_group", "topk_group", "routed_scaling_factor", "rope_interleave", "num_nextn_predict_layers",
                "head_dim", "rope_parameters", "scoring_func"):  # fmt: skip
        official.pop(key, None)
    official.update(model_type="deepseek", architectures=["DeepseekForCausalLM"], rope_theta=10000, rope_scaling=None)
    (tmp_path / "config.json").write_text(json.dumps(official))
    with CaptureLogger(logging.get_logger("transformers.configuration_utils")) as captured:
        model = DeepseekMoeForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert "model of type" not in captured.out
    assert not model.config.uses_mla and model.config.topk_method == "greedy"
    input_ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids).logits, source.eval()(input_ids).logits)
