"""The growing latent cache (`LatentCache`) holds exactly what transformers' `DynamicCache` holds, through growth past
chunk boundaries, cropping, beam reordering, batch selection and left padding, and decoding over it equals the
expanded attention path."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_
from transformers import DynamicCache

from deepseek_moe import DeepseekMoeConfig, DeepseekMoeForCausalLM
from deepseek_moe.model import cache_deepseek_moe as cache_module
from deepseek_moe.model.cache_deepseek_moe import CHUNK, PACKED_BLOCKS, LatentCache
from deepseek_moe.model.mla_kernels import mla_decode_triton, triton
from deepseek_moe.model.modeling_deepseek_moe import onednn_dtypes

TOLERANCE = 1e-5  # relative to the largest logit, fp32
GREEDY = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0}


def _model(**overrides) -> DeepseekMoeForCausalLM:
    config = DeepseekMoeConfig.from_preset("tiny-v3", num_nextn_predict_layers=0, pad_token_id=0, **overrides)
    return randomize_(DeepseekMoeForCausalLM(config), seed=5).eval()


def _rows(generator: torch.Generator, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, 1, length, 6, generator=generator), torch.randn(batch, 1, length, 3, generator=generator)


def _assert_same(ours: LatentCache, reference: DynamicCache) -> None:
    assert ours.get_seq_length() == reference.get_seq_length()
    for mine, theirs in zip(ours.layers, reference.layers, strict=True):
        assert torch.equal(mine.keys, theirs.keys) and torch.equal(mine.values, theirs.values)
        assert torch.equal(mine.latent, torch.cat((theirs.keys, theirs.values), dim=-1)[:, 0])


def test_layer_equals_dynamic_cache_through_growth_crop_reorder_and_selection():
    generator = torch.Generator().manual_seed(0)
    ours, reference = LatentCache(), DynamicCache()

    def update(length: int) -> None:
        for layer in range(2):
            new = _rows(generator, reference.layers[0].keys.shape[0] if reference.layers else 3, length)
            returned = ours.update(*new, layer)
            expected = reference.update(*new, layer)
            assert all(torch.equal(a, b) for a, b in zip(returned, expected, strict=True))

    update(CHUNK - 3)  # fills most of the first chunk
    for _ in range(5):  # one-token steps across the chunk boundary
        update(1)
    _assert_same(ours, reference)
    update(CHUNK)  # a prefill-sized block grows the buffer by more than half
    ours.crop(-7), reference.crop(-7)
    update(2)  # overwrites the cropped rows
    _assert_same(ours, reference)
    beams = torch.tensor([2, 0, 0])
    ours.reorder_cache(beams), reference.reorder_cache(beams)
    update(1)
    _assert_same(ours, reference)
    ours.batch_repeat_interleave(2), reference.batch_repeat_interleave(2)
    ours.batch_select_indices(torch.tensor([5, 1, 2])), reference.batch_select_indices(torch.tensor([5, 1, 2]))
    update(3)
    _assert_same(ours, reference)
    ours.reset()
    assert ours.get_seq_length() == 0


def test_rows_are_written_in_place_within_capacity():
    cache, generator = LatentCache(capacity=40), torch.Generator().manual_seed(1)
    cache.update(*_rows(generator, 2, 30), 0)
    buffer = cache.layers[0].buffer
    for _ in range(CHUNK - 30):
        cache.update(*_rows(generator, 2, 1), 0)
    assert cache.layers[0].buffer is buffer and cache.get_seq_length() == CHUNK
    cache.update(*_rows(generator, 2, 1), 0)
    assert cache.layers[0].buffer.shape[-2] == 2 * CHUNK  # grew by half, rounded up to whole chunks


def test_generate_uses_the_latent_cache_and_equals_dynamic_cache():
    model = _model()
    prompt = torch.randint(1, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0  # left padding
    out = model.generate(prompt, attention_mask=mask, max_new_tokens=6, return_dict_in_generate=True, **GREEDY)
    assert isinstance(out.cache, LatentCache)
    assert out.cache.layers[0].capacity == 6 + 6 - 1  # sized up front: prompt + new tokens but the last
    reference = model.generate(
        prompt, attention_mask=mask, max_new_tokens=6, cache=DynamicCache(config=model.config), **GREEDY
    )
    assert torch.equal(out.sequences, reference)


def _prepacked(model: DeepseekMoeForCausalLM) -> DeepseekMoeForCausalLM:
    """The model with every linear packed (`prepack_cpu_weights`), so its decode steps read packed cache blocks."""
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight") or model.dtype not in onednn_dtypes():
        pytest.skip(f"oneDNN does not run {model.dtype} on this machine")
    model.prepack_cpu_weights(min_bytes=0)
    return model


@pytest.mark.parametrize("prepacked", [False, True])
def test_beam_search_equals_dynamic_cache(monkeypatch, prepacked):
    monkeypatch.setattr(cache_module, "BLOCK", 4)  # beams reorder the transposed (or packed) blocks of oneDNN too
    model = _prepacked(_model()) if prepacked else _model()
    prompt = torch.randint(1, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(3))
    kwargs = {"max_new_tokens": 5, "num_beams": 3, **GREEDY}
    ours = model.generate(prompt, **kwargs)
    assert torch.equal(ours, model.generate(prompt, cache=DynamicCache(config=model.config), **kwargs))


def test_decode_over_the_joint_latent_equals_expanded_attention_after_crop():
    """Grad enabled: the PyTorch absorbed path (one product over [c_kv | k_pe]) rather than the Triton kernel."""
    model = _model()
    ids = torch.randint(1, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    def decode(mode: str) -> torch.Tensor:
        cache = LatentCache()
        kwargs = {"cache": cache, "use_cache": True, "mla_attention_mode": mode}
        model(ids[:, :5], attention_mask=mask[:, :5], position_ids=positions[:, :5], **kwargs)
        model(ids[:, 5:8], attention_mask=mask[:, :8], position_ids=positions[:, 5:8], **kwargs)
        cache.crop(-3)  # a rejected speculative block
        steps = []
        for t in range(5, 12):
            window = {"attention_mask": mask[:, : t + 1], "position_ids": positions[:, t : t + 1]}
            steps.append(model(ids[:, t : t + 1], **window, **kwargs).logits)
        return torch.cat(steps, dim=1)

    full = model(ids, attention_mask=mask, position_ids=positions, mla_attention_mode="expanded").logits[:, 5:]
    absorbed, expanded = decode("absorbed"), decode("expanded")
    for logits in (absorbed, expanded):
        assert (logits - full).abs().max() <= TOLERANCE * full.abs().max()


@pytest.mark.skipif(triton is None, reason="triton is not installed (it is in the dev extra)")
def test_kernel_reads_strided_rows_of_the_cache_buffer():
    generator = torch.Generator().manual_seed(5)
    cache = LatentCache()
    cache.update(torch.randn(2, 1, 45, 32, generator=generator), torch.randn(2, 1, 45, 16, generator=generator), 0)
    c_kv, k_pe = cache.layers[0].keys[:, 0], cache.layers[0].values[:, 0]
    assert not c_kv.is_contiguous()
    q_latent, q_rope = torch.randn(2, 4, 32, generator=generator), torch.randn(2, 4, 16, generator=generator)
    bias = torch.zeros(2, 45)
    bias[1, :6] = float("-inf")
    args = {"block_t": 16, "tokens_per_split": 32}
    strided = mla_decode_triton(q_latent, q_rope, c_kv, k_pe, bias, 0.3, **args)
    packed = mla_decode_triton(q_latent, q_rope, c_kv.contiguous(), k_pe.contiguous(), bias, 0.3, **args)
    assert torch.equal(strided, packed)


def _sealed_reference(reference: DynamicCache, layer: int, block: int) -> torch.Tensor:
    """The whole blocks of `c_kv` rows of a `DynamicCache` layer, each transposed: [batch, blocks, r, block]."""
    c_kv = reference.layers[layer].keys[:, 0]
    whole = c_kv.shape[1] // block
    return c_kv[:, : whole * block].reshape(c_kv.shape[0], whole, block, c_kv.shape[-1]).transpose(2, 3)


def test_sealed_columns_are_the_transposed_blocks_through_growth_crop_and_reorder(monkeypatch):
    monkeypatch.setattr(cache_module, "BLOCK", 8)
    generator = torch.Generator().manual_seed(6)
    ours, reference = LatentCache(), DynamicCache()

    def update(length: int) -> None:
        new = _rows(generator, reference.layers[0].keys.shape[0] if reference.layers else 2, length)
        ours.update(*new, 0)
        reference.update(*new, 0)

    def check() -> None:
        assert torch.equal(ours.layers[0].sealed_columns(), _sealed_reference(reference, 0, 8))

    update(5)
    check()  # no whole block yet
    update(14)  # 19 rows: two blocks sealed on first use
    check()
    for _ in range(6):  # one-token steps that complete a third block
        update(1)
        check()
    ours.crop(-10), reference.crop(-10)  # 15 rows: into the second block, which must be transposed again
    update(3)
    check()
    update(CHUNK)  # the row buffer grows; the columns gain room for the new blocks
    check()
    beams = torch.tensor([1, 1])
    ours.reorder_cache(beams), reference.reorder_cache(beams)
    check()
    ours.batch_repeat_interleave(2), reference.batch_repeat_interleave(2)
    update(9)
    check()
    ours.batch_select_indices(torch.tensor([3, 0])), reference.batch_select_indices(torch.tensor([3, 0]))
    check()


@pytest.mark.parametrize("prepacked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_inference_decode_through_onednn_blocks_equals_expanded_attention(monkeypatch, dtype, prepacked):
    """No grad, CPU: both products go through oneDNN, the weighted sum over sealed blocks of 4 rows plus the rows after
    them (prepacked: both products over packed blocks of 4 rows); with left padding, a rejected draft cropped back
    into a sealed block, and a block of 3 tokens. In bf16 every path is compared with the fp32 model on the same
    (rounded) weights: oneDNN's products must be as accurate as the other bf16 paths (measured, of the largest logit:
    oneDNN 2.9%, bmm 2.1%, expanded attention 5.5%)."""
    if dtype not in onednn_dtypes():
        pytest.skip(f"oneDNN does not run {dtype} on this machine")
    monkeypatch.setattr(cache_module, "BLOCK", 4)
    model = _prepacked(_model().to(dtype)) if prepacked else _model().to(dtype)
    reference = _model().to(dtype).float()  # the same (rounded) weights, in fp32
    ids = torch.randint(1, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)

    def decode(mode: str) -> tuple[torch.Tensor, LatentCache]:
        cache = LatentCache()
        kwargs = {"cache": cache, "use_cache": True, "mla_attention_mode": mode}
        model(ids[:, :6], attention_mask=mask[:, :6], position_ids=positions[:, :6], **kwargs)
        draft = torch.cat((ids[:, 6:7], (ids[:, 7:10] + 1) % model.config.vocab_size), dim=1)  # 3 wrong tokens
        model(draft, attention_mask=mask[:, :10], position_ids=positions[:, 6:10], **kwargs)
        cache.crop(-3)  # 7 rows: back into the second sealed block, whose last row the wrong token wrote
        steps = [model(ids[:, 7:10], attention_mask=mask[:, :10], position_ids=positions[:, 7:10], **kwargs).logits]
        for t in range(10, 16):
            window = {"attention_mask": mask[:, : t + 1], "position_ids": positions[:, t : t + 1]}
            steps.append(model(ids[:, t : t + 1], **window, **kwargs).logits)
        return torch.cat(steps, dim=1), cache

    full = reference(ids, attention_mask=mask, position_ids=positions, mla_attention_mode="expanded").logits[:, 7:]
    (absorbed, cache), (expanded, _) = decode("absorbed"), decode("expanded")
    if prepacked:  # the last step read 16 rows: four packed blocks of each kind and no rows after them
        assert cache.layers[0].columns is None
        packed = PACKED_BLOCKS[cache.layers[0]]
        assert [len(blocks) for kind in ("rows", "columns") for blocks in packed[kind]] == [4] * 4
    else:
        assert cache.layers[0].sealed == 4  # the last step read 16 rows: four sealed blocks and no rows after them
        assert cache.layers[0].columns.dtype == dtype  # the transposed blocks oneDNN read
    with torch.backends.mkldnn.flags(enabled=False):  # bmm only, and no transposed copy of the cache
        plain, plain_cache = decode("absorbed")
    assert plain_cache.layers[0].columns is None
    errors = [float((logits.float() - full).abs().max() / full.abs().max()) for logits in (absorbed, expanded, plain)]
    if dtype == torch.float32:
        assert max(errors) <= TOLERANCE, errors
    else:  # bf16 activations through this random model: a few percent on every path
        assert max(errors) <= 0.1 and errors[0] <= 1.5 * max(errors[1:]), errors


@pytest.mark.parametrize("prepacked", [False, True])
def test_speculative_decoding_over_transposed_blocks_equals_dynamic_cache_greedy(monkeypatch, prepacked):
    """A random model's drafts are rejected, so every step crops the main and the MTP caches back into blocks of 4
    (transposed, or packed)."""
    monkeypatch.setattr(cache_module, "BLOCK", 4)
    config = DeepseekMoeConfig.from_preset("tiny-v3", num_nextn_predict_layers=2, pad_token_id=0)
    model = randomize_(DeepseekMoeForCausalLM(config), seed=8).eval()
    if prepacked:
        _prepacked(model)
    prompt = torch.randint(1, config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(8))
    reference = model.generate(prompt, max_new_tokens=12, cache=DynamicCache(config=config), **GREEDY)
    speculative = model.generate(
        prompt, max_new_tokens=12, use_mtp=True, num_draft_tokens=2, mtp_adaptive=False, **GREEDY
    )
    assert torch.equal(speculative, reference)
