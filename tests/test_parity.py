"""Logits equal transformers' built-in DeepseekV2/V3 classes on the same random weights, both ways round."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, builtin_config, randomize_
from transformers import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM

from deepseek_moe import DeepseekMoeConfig, DeepseekMoeForCausalLM

# V3 routing (sigmoid, noaux_tc, groups, q-LoRA), V2 (softmax, group-limited, ×16), V2-Lite (greedy, no q-LoRA).
PRESETS = ["tiny-v3", "tiny-v2", "tiny-v2-lite"]


def _builtin_class(config):
    return DeepseekV3ForCausalLM if config.uses_bias_balancing else DeepseekV2ForCausalLM


RTOL = 1e-5  # fp32 logits against the built-in, relative to the largest (DESIGN.md)


@pytest.fixture(params=PRESETS)
def pair(request, tmp_path):
    """(our model loaded from the built-in's checkpoint, the built-in model, our config, checkpoint dir)."""
    config = DeepseekMoeConfig.from_preset(request.param, num_nextn_predict_layers=0)
    builtin = _builtin_class(config)(builtin_config(config)).float().eval()
    randomize_(builtin, seed=PRESETS.index(request.param))
    builtin.save_pretrained(tmp_path / "builtin")
    ours, info = DeepseekMoeForCausalLM.from_pretrained(
        tmp_path / "builtin", config=config, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return ours.eval(), builtin, config, tmp_path


def test_logits_match_builtin(pair):
    ours, builtin, config, _ = pair
    input_ids = torch.randint(0, config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(ours(input_ids).logits, builtin(input_ids).logits, RTOL)


def test_our_checkpoint_loads_into_builtin(pair):
    ours, builtin, config, tmp_path = pair
    ours.save_pretrained(tmp_path / "ours")
    reloaded, info = _builtin_class(config).from_pretrained(
        tmp_path / "ours", config=builtin.config, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    input_ids = torch.randint(0, config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert_close(reloaded.eval()(input_ids).logits, ours(input_ids).logits, RTOL)


def test_sdpa_matches_eager(pair):
    ours, _, config, _ = pair
    input_ids = torch.randint(0, config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours.set_attn_implementation("eager")
        eager = ours(input_ids).logits
        ours.set_attn_implementation("sdpa")
        assert_close(ours(input_ids).logits, eager, RTOL)


def test_left_padded_rows_equal_unpadded(pair):
    ours, _, config, _ = pair
    generator = torch.Generator().manual_seed(4)
    lengths = [9, 5]
    rows = [torch.randint(1, config.vocab_size, (n,), generator=generator) for n in lengths]
    width = max(lengths)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row) :] = row
        attention_mask[i, width - len(row) :] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batched = ours(input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        for i, row in enumerate(rows):
            alone = ours(row[None]).logits[0]
            assert_close(batched[i, width - len(row) :], alone, RTOL)


def test_logits_to_keep(pair):
    ours, _, config, _ = pair
    input_ids = torch.randint(0, config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = ours(input_ids).logits
        last = ours(input_ids, logits_to_keep=1).logits
    assert last.shape[1] == 1
    assert_close(last[:, 0], full[:, -1], RTOL)


def test_experts_implementations_agree(pair):
    """Our eager experts loop and transformers' grouped_mm / batched_mm give the same logits."""
    ours, _, config, _ = pair
    input_ids = torch.randint(0, config.vocab_size, (3, 8), generator=torch.Generator().manual_seed(6))
    results = {}
    with torch.no_grad():
        for implementation in ("eager", "grouped_mm", "batched_mm"):
            ours.set_experts_implementation(implementation)
            results[implementation] = ours(input_ids).logits
    assert_close(results["grouped_mm"], results["eager"], RTOL)
    assert_close(results["batched_mm"], results["eager"], RTOL)
