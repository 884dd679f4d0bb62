"""The Triton MLA decode kernel (grouped heads, split sequence, log-sum-exp merge) against the PyTorch path: on a GPU
when there is one, else on CPU through Triton's interpreter (conftest sets TRITON_INTERPRET=1 before any import)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, tiny_model
from transformers import DynamicCache

from deepseek_moe.model import modeling_deepseek_moe as modeling
from deepseek_moe.model.mla_kernels import mla_decode_triton, triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(triton is None, reason="triton is not installed (it is in the dev extra)")


def reference(q_latent, q_rope, latent, rope, bias, scale):
    scores = q_latent.double() @ latent.double().transpose(1, 2) + q_rope.double() @ rope.double().transpose(1, 2)
    weights = (scores * scale + bias.double()[:, None]).softmax(-1)
    return weights @ latent.double()


@pytest.mark.parametrize(
    ("heads", "kv_length", "split", "dtype"),
    [
        (20, 100, 48, torch.float32),
        (16, 37, 256, torch.float32),
        (5, 64, 16, torch.float16),
        (16, 70, 32, torch.bfloat16),
    ],
)
def test_kernel_matches_reference(heads, kv_length, split, dtype):
    generator = torch.Generator().manual_seed(heads + kv_length)
    batch, rank, rope_dim = 3, 32, 16
    q_latent = torch.randn(batch, heads, rank, generator=generator).to(DEVICE, dtype)
    q_rope = torch.randn(batch, heads, rope_dim, generator=generator).to(DEVICE, dtype)
    latent = torch.randn(batch, kv_length, rank, generator=generator).to(DEVICE, dtype)
    rope = torch.randn(batch, kv_length, rope_dim, generator=generator).to(DEVICE, dtype)
    bias = torch.zeros(batch, kv_length, device=DEVICE)
    bias[1, :9] = float("-inf")  # left padding
    bias[2, : kv_length - 1] = float("-inf")  # a single visible key
    out = mla_decode_triton(q_latent, q_rope, latent, rope, bias, 0.125, block_t=16, tokens_per_split=split)
    expected = reference(q_latent, q_rope, latent, rope, bias, 0.125)
    assert_close(out, expected, rtol={torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype])
    assert out.shape == (batch, heads, rank)


def test_kernel_rejects_tiles_a_gpu_cannot_compile():
    tensors = [torch.randn(1, 2, 8), torch.randn(1, 2, 16), torch.randn(1, 4, 8), torch.randn(1, 4, 16)]
    with pytest.raises(ValueError, match="kv_lora_rank"):
        mla_decode_triton(*tensors, torch.zeros(1, 4), 1.0)


def test_model_decode_through_the_kernel_equals_expanded_path(monkeypatch):
    """Decoding step by step with the kernel (absorbed MLA) gives the logits of one expanded pass, left padding
    included (conftest selects Triton's interpreter before the model code is imported when there is no GPU)."""
    calls = []
    monkeypatch.setattr(modeling, "mla_decode_triton", lambda *a, **k: calls.append(1) or mla_decode_triton(*a, **k))
    model = tiny_model("tiny-v3", num_nextn_predict_layers=0, qk_rope_head_dim=16).eval().to(DEVICE)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=positions, mla_attention_mode="expanded").logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, :5], attention_mask=mask[:, :5], position_ids=positions[:, :5], cache=cache).logits]
        for t in range(5, 9):
            step = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], position_ids=positions[:, t : t + 1],
                         cache=cache, mla_attention_mode="absorbed")  # fmt: skip
            steps.append(step.logits)
    decoded = torch.cat(steps, 1)
    assert len(calls) == 4 * model.config.num_hidden_layers  # every decode step of every layer used the kernel
    assert_close(decoded[0], full[0], rtol=1e-5, what="unpadded row")
    assert_close(decoded[1, 2:], full[1, 2:], rtol=1e-5, what="left-padded row")
