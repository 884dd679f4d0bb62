"""Absorbed MLA decoding over the latent cache equals the expanded path and full recomputation."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, tiny_model
from transformers import DynamicCache

from deepseek_moe import DeepseekMoeConfig, DeepseekMoeForCausalLM
from deepseek_moe.model import cache_deepseek_moe as cache_module
from deepseek_moe.model.cache_deepseek_moe import LatentCache
from deepseek_moe.model.modeling_deepseek_moe import latent_scores, latent_weighted_sum, onednn_serves

TOLERANCE = 1e-5  # fp32, relative to the largest logit


def _model(preset: str = "tiny-v3", attn: str = "sdpa", **overrides) -> DeepseekMoeForCausalLM:
    model = tiny_model(preset, seed=3, num_nextn_predict_layers=0, **overrides).eval()
    model.set_attn_implementation(attn)
    return model


def _decode(model, input_ids, prefill: int, mode: str, attention_mask=None) -> torch.Tensor:
    """Logits of a prefill of `prefill` tokens followed by one-token decode steps in `mode`."""
    cache = DynamicCache(config=model.config)
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    kwargs = {"cache": cache, "use_cache": True, "mla_attention_mode": mode}
    steps = [
        model(
            input_ids[:, :prefill], attention_mask=mask[:, :prefill], position_ids=positions[:, :prefill], **kwargs
        ).logits
    ]
    for t in range(prefill, input_ids.shape[1]):
        steps.append(
            model(
                input_ids[:, t : t + 1], attention_mask=mask[:, : t + 1], position_ids=positions[:, t : t + 1], **kwargs
            ).logits
        )
    return torch.cat(steps, dim=1)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("preset", ["tiny-v3", "tiny-v2-lite"])  # q-LoRA and plain q_proj
@torch.no_grad()
def test_absorbed_decode_equals_expanded_and_full_recompute(preset, attn):
    model = _model(preset, attn)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 14), generator=torch.Generator().manual_seed(0))
    full = model(input_ids, mla_attention_mode="expanded").logits
    absorbed = _decode(model, input_ids, prefill=6, mode="absorbed")
    expanded = _decode(model, input_ids, prefill=6, mode="expanded")
    assert_close(absorbed, expanded, TOLERANCE)
    assert_close(absorbed, full, TOLERANCE)
    assert_close(expanded, full, TOLERANCE)
    assert_close(model(input_ids, mla_attention_mode="absorbed").logits, full, TOLERANCE)  # absorbed prefill too


@torch.no_grad()
def test_absorbed_path_is_exact_in_fp64():
    model = _model("tiny-v3", "eager").double()
    model.set_experts_implementation("eager")  # grouped_mm has no fp64 kernel
    input_ids = torch.randint(0, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    absorbed = _decode(model, input_ids, prefill=4, mode="absorbed")
    expanded = _decode(model, input_ids, prefill=4, mode="expanded")
    assert_close(absorbed, expanded, 1e-12)


@torch.no_grad()
def test_padded_rows_equal_unpadded_runs_in_absorbed_decode():
    model = _model()
    generator = torch.Generator().manual_seed(2)
    rows = [torch.randint(1, model.config.vocab_size, (n,), generator=generator) for n in (10, 6)]
    input_ids = torch.zeros(2, 10, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, 10 - len(row) :], mask[i, 10 - len(row) :] = row, 1
    batched = _decode(model, input_ids, prefill=5, mode="absorbed", attention_mask=mask)
    for i, row in enumerate(rows):
        alone = _decode(model, row[None], prefill=len(row) - 5, mode="absorbed")
        assert_close(batched[i, 10 - len(row) :], alone[0], TOLERANCE)


def test_static_cache_generation_equals_dynamic():
    model = _model()
    prompt = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3))
    kwargs = {"max_new_tokens": 8, "do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    dynamic = model.generate(prompt, **kwargs)
    static = model.generate(prompt, cache_implementation="static", **kwargs)
    expanded = model.generate(prompt, mla_attention_mode="expanded", **kwargs)
    assert torch.equal(static, dynamic) and torch.equal(expanded, dynamic)


def test_beam_search_is_the_same_in_both_modes():
    model = _model()
    prompt = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(4))
    kwargs = {"max_new_tokens": 6, "num_beams": 3, "do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    assert torch.equal(
        model.generate(prompt, mla_attention_mode="absorbed", **kwargs),
        model.generate(prompt, mla_attention_mode="expanded", **kwargs),
    )


@torch.no_grad()
def test_cache_bytes_per_token_per_layer_are_the_latent_width():
    for dtype in (torch.float32, torch.bfloat16):
        model = _model().to(dtype)
        config = model.config
        cache = model(torch.arange(1, 8)[None], use_cache=True).cache
        layer = cache.layers[0]
        per_token = (layer.keys.nbytes + layer.values.nbytes) / 7
        assert per_token == (config.kv_lora_rank + config.qk_rope_head_dim) * torch.finfo(dtype).bits // 8


def test_mode_is_validated_and_forced_absorption_refuses_adapters():
    with pytest.raises(ValueError, match="mla_attention_mode"):
        DeepseekMoeConfig.from_preset("tiny-v3", mla_attention_mode="fast")
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model(), LoraConfig(r=2, target_modules=["kv_b_proj"]))
    with pytest.raises(ValueError, match="kv_b_proj"):
        model(torch.tensor([[1, 2, 3]]), mla_attention_mode="absorbed")
    # auto falls back to the expanded path; the adapter (B = 0 at first) leaves the logits as they were
    with torch.no_grad():
        auto = model(torch.tensor([[1, 2, 3]]), use_cache=True).logits
        expanded = model(torch.tensor([[1, 2, 3]]), mla_attention_mode="expanded").logits
        base = _model()(torch.tensor([[1, 2, 3]])).logits
    assert torch.equal(auto, expanded)
    assert_close(auto, base, TOLERANCE)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
@torch.no_grad()
def test_onednn_products_over_the_latent_cache_equal_fp64(monkeypatch):
    """V3 widths (r = 512, d_r = 64), 3 sequences of 300 cached rows, 32 query rows (16 heads x 2 new tokens)."""
    monkeypatch.setattr(cache_module, "BLOCK", 64)
    generator = torch.Generator().manual_seed(6)
    c_kv, k_pe = torch.randn(3, 1, 300, 512, generator=generator), torch.randn(3, 1, 300, 64, generator=generator)
    cache = LatentCache()
    cache.update(c_kv, k_pe, 0)
    layer = cache.layers[0]
    query = torch.randn(3, 32, 576, generator=generator)
    assert onednn_serves(query, layer.latent)
    joint = torch.cat((c_kv, k_pe), dim=-1)[:, 0].double()
    assert_close(latent_scores(query, layer), query.double() @ joint.transpose(1, 2), 1e-6)
    weights = torch.randn(3, 32, 300, generator=generator).softmax(-1)
    summed = latent_weighted_sum(weights, layer.keys[:, 0], layer)
    assert layer.sealed == 4  # 256 rows through oneDNN in blocks of 64, the last 44 through bmm
    assert_close(summed, weights.double() @ c_kv[:, 0].double(), 1e-6)


@pytest.mark.slow
def test_compiled_static_cache_decode_step_equals_generate():
    """torch.compile(fullgraph=True) of one decode step over a StaticCache (about a minute on two cores)."""
    from transformers import StaticCache

    model = _model()
    model.set_experts_implementation("grouped_mm")
    prompt = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(5))
    expected = model.generate(prompt, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    cache = StaticCache(config=model.config, max_cache_len=16)
    with torch.no_grad():
        token = model(prompt, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        step = torch.compile(lambda t, p: model(t, cache=cache, position_ids=p, use_cache=True).logits, fullgraph=True)
        tokens = [prompt, token]
        for i in range(4):
            token = step(token, torch.tensor([[5 + i]])).argmax(-1)
            tokens.append(token)
    assert torch.equal(torch.cat(tokens, dim=1), expected)


@pytest.mark.slow
@torch.no_grad()
def test_compiled_latent_cache_decode_step_equals_eager():
    """torch.compile of a decode step over a LatentCache keeps bmm (inductor cannot lower oneDNN's linear with an
    unpacked weight); about a minute and a half on two cores."""
    model = _model()
    prompt = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(6))
    caches = [LatentCache(capacity=16), LatentCache(capacity=16)]
    token = model(prompt, cache=caches[0], use_cache=True).logits[:, -1:].argmax(-1)
    model(prompt, cache=caches[1], use_cache=True)
    step = torch.compile(lambda t, p: model(t, cache=caches[1], position_ids=p, use_cache=True).logits)
    position = torch.tensor([[5]])
    eager = model(token, cache=caches[0], position_ids=position, use_cache=True).logits
    assert_close(step(token, position), eager, TOLERANCE)
