"""Generation with the latent (MLA) or K/V (MHA) cache equals recomputing the whole sequence."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, randomize_, tiny_model
from transformers import DynamicCache

from deepseek_moe import DeepseekMoeConfig, DeepseekMoeForCausalLM


@pytest.fixture(params=["tiny-v3", "tiny-v2-lite", "tiny-16b"])
def model(request):
    config = DeepseekMoeConfig.from_preset(request.param, num_nextn_predict_layers=0)
    return tiny_model(config, seed=11).eval()


def test_greedy_generation_with_cache_equals_full_recompute(model):
    prompt = torch.randint(0, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    generated = model.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    tokens = prompt
    with torch.no_grad():
        for _ in range(8):
            next_token = model(tokens).logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, next_token], dim=1)
    assert torch.equal(generated, tokens)


def test_prefill_then_decode_equals_one_pass(model):
    input_ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(input_ids).logits
        cache = DynamicCache(config=model.config)
        prefill = model(input_ids[:, :7], cache=cache, use_cache=True)
        steps = [prefill.logits]
        for t in range(7, 10):
            steps.append(model(input_ids[:, t : t + 1], cache=prefill.cache, use_cache=True).logits)
    incremental = torch.cat(steps, dim=1)
    assert_close(incremental, full, 1e-5)


def test_mla_cache_holds_the_latent_not_expanded_keys():
    config = DeepseekMoeConfig.from_preset("tiny-v3", num_nextn_predict_layers=0)
    model = tiny_model(config).eval()
    with torch.no_grad():
        cache = model(torch.tensor([[1, 2, 3, 4, 5]]), use_cache=True).cache
    keys, values = cache.layers[0].keys, cache.layers[0].values
    assert keys.shape == (1, 1, 5, config.kv_lora_rank)  # c_kv after its norm
    assert values.shape == (1, 1, 5, config.qk_rope_head_dim)  # rotated k_pe


def test_left_padded_batch_generation_matches_single_rows():
    config = DeepseekMoeConfig.from_preset("tiny-v3", num_nextn_predict_layers=0, pad_token_id=0)
    model = tiny_model(config, seed=3).eval()
    generator = torch.Generator().manual_seed(2)
    rows = [torch.randint(1, config.vocab_size, (n,), generator=generator) for n in (7, 4)]
    input_ids = torch.zeros(2, 7, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, 7 - len(row) :], attention_mask[i, 7 - len(row) :] = row, 1
    batched = model.generate(
        input_ids, attention_mask=attention_mask, max_new_tokens=6, do_sample=False, eos_token_id=None
    )
    for i, row in enumerate(rows):
        alone = model.generate(row[None], max_new_tokens=6, do_sample=False, eos_token_id=None)
        assert torch.equal(batched[i, 7:], alone[0, len(row) :])


@pytest.mark.parametrize("mode", ["auto", "absorbed", "expanded"])
def test_generation_with_half_the_layers_offloaded_to_disk_equals_in_memory(tmp_path, mode):
    """accelerate's hooks load an offloaded module's weights only around its own forward: the absorbed path, which
    reads kv_b_proj's weight directly, must still find it (once: 'Cannot copy out of meta tensor')."""
    config = DeepseekMoeConfig.from_preset("tiny-v3", num_nextn_predict_layers=0, num_hidden_layers=4)
    model = randomize_(DeepseekMoeForCausalLM(config), seed=5).eval()
    model.save_pretrained(tmp_path / "model")
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    device_map |= {f"model.layers.{i}": "cpu" if i < 2 else "disk" for i in range(4)}
    offloaded = DeepseekMoeForCausalLM.from_pretrained(
        tmp_path / "model", device_map=device_map, offload_folder=str(tmp_path / "offload")
    ).eval()
    assert offloaded.model.layers[3].self_attn.kv_b_proj.weight.device.type == "meta"  # really offloaded
    prompt = torch.tensor([[5, 3, 8, 1, 9, 2]])
    options = {"max_new_tokens": 6, "do_sample": False, "eos_token_id": None, "mla_attention_mode": mode}
    assert torch.equal(offloaded.generate(prompt, **options), model.generate(prompt, **options))


def test_generation_with_max_memory_offloading_equals_in_memory(tmp_path):
    config = DeepseekMoeConfig.from_preset("tiny-v3", num_nextn_predict_layers=0)
    model = randomize_(DeepseekMoeForCausalLM(config), seed=6).eval()
    model.save_pretrained(tmp_path / "model")
    offloaded = DeepseekMoeForCausalLM.from_pretrained(
        tmp_path / "model", device_map="auto", max_memory={"cpu": "200KB"}, offload_folder=str(tmp_path / "offload")
    ).eval()
    assert "disk" in offloaded.hf_device_map.values()
    prompt = torch.tensor([[5, 3, 8, 1, 9, 2]])
    options = {"max_new_tokens": 6, "do_sample": False, "eos_token_id": None}
    assert torch.equal(offloaded.generate(prompt, **options), model.generate(prompt, **options))
