"""`prepack_cpu_weights`: linears through oneDNN over packed copies of their weights give the plain model's outputs,
follow weight changes, and leave training, saving and `torch.backends.mkldnn` switches as they were."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_close, tiny_model
from safetensors.torch import load_file
from torch import nn
from torch.profiler import ProfilerActivity, profile

from deepseek_moe import DeepseekMoeForCausalLM
from deepseek_moe.model.modeling_deepseek_moe import PACKED_WEIGHTS, onednn_dtypes

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"),
    reason="this torch has no oneDNN",
)

INPUT_IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))


def _models(
    preset: str = "tiny-v3", dtype: torch.dtype = torch.float32
) -> tuple[DeepseekMoeForCausalLM, DeepseekMoeForCausalLM, int]:
    plain = tiny_model(preset, seed=3, attention_bias=True).to(dtype).eval()  # random biases too
    packed = copy.deepcopy(plain)
    return plain, packed, packed.prepack_cpu_weights(min_bytes=0)


def _onednn_linear_calls(model: nn.Module) -> int:
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(INPUT_IDS)
    return sum(event.count for event in prof.key_averages() if event.key == "mkldnn::_linear_pointwise")


def _linear_calls(model: nn.Module) -> int:
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for m in model.modules() if type(m) is nn.Linear]
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
    assert packed_bytes == sum(m.weight.nbytes for m in packed.modules() if type(m) is nn.Linear) > 0
    # every linear the forward pass runs went through oneDNN
    assert _onednn_linear_calls(packed) - _onednn_linear_calls(plain) == _linear_calls(plain) > 0
    with torch.no_grad():
        rtol = 1e-5 if dtype == torch.float32 else 1e-2  # the same products, summed in another order
        assert_close(packed(INPUT_IDS).logits, plain(INPUT_IDS).logits, rtol=rtol, what="prefill logits")
    options = {"max_new_tokens": 8, "do_sample": False, "eos_token_id": None}
    assert torch.equal(packed.generate(INPUT_IDS, **options), plain.generate(INPUT_IDS, **options))


def test_small_weights_stay_unpacked_by_default():
    model = tiny_model("tiny-v3", seed=3).eval()
    with pytest.raises(ValueError, match=r"at least min_bytes=1048576; this model has none \(its weights are"):
        model.prepack_cpu_weights()  # the tiny model's weights are all far below a megabyte
    largest = max(m.weight.nbytes for m in model.modules() if type(m) is nn.Linear)
    assert model.prepack_cpu_weights(min_bytes=largest) == largest * sum(
        1 for m in model.modules() if type(m) is nn.Linear and m.weight.nbytes == largest
    )


def test_changed_weights_are_packed_again():
    plain, packed, _ = _models()
    for model in (plain, packed):
        with torch.no_grad():
            model.model.layers[0].self_attn.o_proj.weight.mul_(-2.0)  # in place: the same storage, a new version
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach() * 0.5)  # a new tensor
    with torch.no_grad():
        assert_close(packed(INPUT_IDS).logits, plain(INPUT_IDS).logits, rtol=1e-5, what="logits after the changes")


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
