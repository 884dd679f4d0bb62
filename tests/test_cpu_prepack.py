"""`prepack_cpu_weights`: linears through oneDNN over packed copies of their weights, and latent attention over a
copy of W_UKᵀ and packed cache blocks, give the plain model's outputs, follow weight changes, and leave training,
saving, cache copies and `torch.backends.mkldnn` switches as they were."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_close, tiny_model
from safetensors.torch import load_file
from torch import nn
from torch.profiler import ProfilerActivity, profile

from deepseek_moe import DeepseekMoeForCausalLM
from deepseek_moe.model import cache_deepseek_moe as cache_module
from deepseek_moe.model.cache_deepseek_moe import PACKED_BLOCKS, LatentCache
from deepseek_moe.model.modeling_deepseek_moe import (
    PACKED_WEIGHTS,
    DeepseekMoeExperts,
    DeepseekMoeLatentAttention,
    onednn_dtypes,
)

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"),
    reason="this torch has no oneDNN",
)

INPUT_IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
DECODE_IDS = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))


def _models(
    preset: str = "tiny-v3", dtype: torch.dtype = torch.float32
) -> tuple[DeepseekMoeForCausalLM, DeepseekMoeForCausalLM, int]:
    plain = tiny_model(preset, seed=3, attention_bias=True).to(dtype).eval()  # random biases too
    packed = copy.deepcopy(plain)
    return plain, packed, packed.prepack_cpu_weights(min_bytes=0)


@torch.no_grad()
def _decode_logits(model: nn.Module, cache: LatentCache | None = None, steps: int = 3) -> torch.Tensor:
    """Logits over a `LatentCache` (absorbed attention): a 5-token prefill into an empty cache, then `steps` one-token
    steps, each fed the next token of DECODE_IDS."""
    cache = LatentCache() if cache is None else cache
    logits = [] if cache.get_seq_length() else [model(DECODE_IDS[:, :5], cache=cache, use_cache=True).logits]
    start = cache.get_seq_length()
    for t in range(start, start + steps):
        logits.append(model(DECODE_IDS[:, t : t + 1], cache=cache, use_cache=True).logits)
    return torch.cat(logits, dim=1)


def _onednn_linear_calls(model: nn.Module) -> int:
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(INPUT_IDS)
    return sum(event.count for event in prof.key_averages() if event.key == "mkldnn::_linear_pointwise")


def _linear_calls(model: nn.Module) -> int:
    """Products the forward pass runs: one per linear call, two per expert with tokens in each experts call."""
    calls = []

    def count_experts(module: DeepseekMoeExperts, args: tuple) -> None:
        chosen = args[1][args[1] < module.num_experts]
        calls.extend([1, 1] * len(chosen.unique()))

    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in model.modules() if type(m) is nn.Linear]
    hooks += [m.register_forward_pre_hook(count_experts) for m in model.modules() if isinstance(m, DeepseekMoeExperts)]
    with torch.no_grad():
        model(INPUT_IDS)
    for hook in hooks:
        hook.remove()
    return len(calls)


@pytest.mark.parametrize(
    "preset, dtype",
    [("tiny-v3", torch.float32), ("tiny-16b", torch.float32), ("tiny-v3", torch.bfloat16)],  # MLA, MHA, bf16
)
def test_packed_model_decodes_like_the_plain_model(preset, dtype):
    if dtype not in onednn_dtypes():
        pytest.skip(f"oneDNN does not run {dtype} on this machine")
    plain, packed, packed_bytes = _models(preset, dtype)
    config = packed.config
    w_uk_bytes = config.num_attention_heads * config.qk_nope_head_dim * (config.kv_lora_rank or 0) * dtype.itemsize
    attentions = sum(isinstance(m, DeepseekMoeLatentAttention) for m in packed.modules())
    assert attentions == (0 if preset == "tiny-16b" else config.num_hidden_layers + config.num_nextn_predict_layers)
    linear_bytes = sum(m.weight.nbytes for m in packed.modules() if type(m) is nn.Linear)
    expert_bytes = sum(p.nbytes for m in packed.modules() if isinstance(m, DeepseekMoeExperts) for p in m.parameters())
    assert expert_bytes > 0 and packed_bytes == linear_bytes + expert_bytes + attentions * w_uk_bytes
    # every linear and expert product the forward pass runs went through oneDNN
    assert _onednn_linear_calls(packed) - _onednn_linear_calls(plain) == _linear_calls(plain) > 0
    with torch.no_grad():
        rtol = 1e-5 if dtype == torch.float32 else 1e-2  # the same products, summed in another order
        assert_close(packed(INPUT_IDS).logits, plain(INPUT_IDS).logits, rtol=rtol, what="prefill logits")
    options = {"max_new_tokens": 8, "do_sample": False, "eos_token_id": None}
    assert torch.equal(packed.generate(INPUT_IDS, **options), plain.generate(INPUT_IDS, **options))
    if attentions:
        assert_close(_decode_logits(packed), _decode_logits(plain), rtol=rtol, what="decode logits")


def test_small_weights_stay_unpacked_by_default():
    model = tiny_model("tiny-v3", seed=3).eval()
    with pytest.raises(ValueError, match=r"at least min_bytes=1048576; this model has none \(its weights are"):
        model.prepack_cpu_weights()  # the tiny model's weights are all far below a megabyte
    largest = max(m.weight.nbytes for m in model.modules() if type(m) is nn.Linear)
    w_uk = [m.kv_b_proj.weight.nbytes // 2 for m in model.modules() if isinstance(m, DeepseekMoeLatentAttention)]
    assert model.prepack_cpu_weights(min_bytes=largest) == largest * sum(
        1 for m in model.modules() if type(m) is nn.Linear and m.weight.nbytes == largest
    ) + sum(w_uk)  # the copies of W_UKᵀ (half of kv_b_proj when nope and v head dims are equal) whatever their size
    assert model.config.qk_nope_head_dim == model.config.v_head_dim and w_uk


def test_changed_weights_are_packed_again():
    plain, packed, _ = _models()
    _decode_logits(packed)  # W_UKᵀ copied and used before the change
    for model in (plain, packed):
        with torch.no_grad():
            model.model.layers[0].self_attn.o_proj.weight.mul_(-2.0)  # in place: the same storage, a new version
            model.model.layers[1].self_attn.kv_b_proj.weight.mul_(1.5)  # W_UK (and W_UV) in place
            next(m for m in model.modules() if isinstance(m, DeepseekMoeExperts)).down_proj.mul_(-1.5)
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach() * 0.5)  # a new tensor
    with torch.no_grad():
        assert_close(packed(INPUT_IDS).logits, plain(INPUT_IDS).logits, rtol=1e-5, what="logits after the changes")
    assert_close(_decode_logits(packed), _decode_logits(plain), rtol=1e-5, what="decode logits after the changes")


def test_a_copied_cache_decodes_on_with_blocks_of_its_own(monkeypatch):
    """`copy.deepcopy` of a cache whose blocks are packed (a prompt cache reused): the opaque packed blocks stay
    behind, the copy packs its own, and both caches decode on like the plain model's."""
    monkeypatch.setattr(cache_module, "BLOCK", 2)
    plain, packed, _ = _models()
    plain_cache, packed_cache = LatentCache(), LatentCache()
    expected, actual = _decode_logits(plain, plain_cache), _decode_logits(packed, packed_cache)
    assert [len(blocks) for blocks in PACKED_BLOCKS[packed_cache.layers[0]]["rows"]] == [4, 4]  # 8 rows read
    copied = copy.deepcopy(packed_cache)
    assert copied.layers[0] not in PACKED_BLOCKS
    reference = _decode_logits(plain, plain_cache)
    assert_close(actual, expected, rtol=1e-5, what="decode logits")
    assert_close(_decode_logits(packed, copied), reference, rtol=1e-5, what="the copied cache's logits")
    assert_close(_decode_logits(packed, packed_cache), reference, rtol=1e-5, what="the original cache's logits")


def test_training_and_saving_see_the_plain_weights(tmp_path):
    plain, packed, _ = _models()
    for model in (plain, packed):
        model.train()
        model(INPUT_IDS, labels=INPUT_IDS).loss.backward()
    for (name, expected), actual in zip(plain.named_parameters(), packed.parameters(), strict=True):
        if expected.grad is not None:
            torch.testing.assert_close(actual.grad, expected.grad, rtol=1e-5, atol=1e-6, msg=name)
    plain.save_pretrained(tmp_path / "plain")
    packed.save_pretrained(tmp_path / "packed")
    expected, saved = (load_file(tmp_path / name / "model.safetensors") for name in ("plain", "packed"))
    assert saved.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(saved[name], tensor), name


def test_switches_turn_it_off():
    plain, packed, _ = _models()
    with torch.no_grad():
        expected = plain(INPUT_IDS).logits
        with torch.backends.mkldnn.flags(enabled=False):
            assert torch.equal(packed(INPUT_IDS).logits, expected)  # F.linear, the plain model's own kernel
    assert packed.prepack_cpu_weights(enabled=False) == 0
    assert not any("forward" in m.__dict__ or m in PACKED_WEIGHTS for m in packed.modules())
    assert not any(getattr(m, "cpu_prepacked", False) for m in packed.modules())
    assert _onednn_linear_calls(packed) == _onednn_linear_calls(plain)
    with torch.no_grad():
        assert torch.equal(packed(INPUT_IDS).logits, expected)


def test_float16_weights_are_refused():
    model = tiny_model("tiny-v3", seed=3).to(torch.float16)
    with pytest.raises(ValueError, match=r"packs float32.* \(its weights are torch.float16 on cpu\)"):
        model.prepack_cpu_weights(min_bytes=0)


def test_a_deep_copy_packs_its_own_weights():
    plain, packed, _ = _models()
    copied = copy.deepcopy(packed)
    with torch.no_grad():
        copied.lm_head.weight.mul_(3.0)  # the copy's own weights, not the original's packed ones
        plain.lm_head.weight.mul_(3.0)
        assert_close(copied(INPUT_IDS).logits, plain(INPUT_IDS).logits, rtol=1e-5, what="the copy's logits")
    assert _onednn_linear_calls(copied) - _onednn_linear_calls(plain) == _linear_calls(plain)
