"""Training-facing behaviour of the model classes: loss, router logits, checkpointing, init, classification."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, tiny_model
from transformers.masking_utils import create_causal_mask

from deepseek_moe import DeepseekMoeConfig, DeepseekMoeForCausalLM, DeepseekMoeForSequenceClassification


def _model(preset: str = "tiny-v3", **overrides) -> DeepseekMoeForCausalLM:
    return tiny_model(preset, seed=4, num_nextn_predict_layers=0, **overrides)


def test_loss_is_shifted_cross_entropy_and_honours_num_items_in_batch():
    model = _model().eval()
    input_ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    labels = input_ids.clone()
    labels[0, :3] = -100
    out = model(input_ids, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, model.config.vocab_size)
    targets = labels[:, 1:].reshape(-1)
    assert out.loss.item() == pytest.approx(F.cross_entropy(logits, targets, ignore_index=-100).item(), rel=1e-5)
    summed = model(input_ids, labels=labels, num_items_in_batch=torch.tensor(40)).loss
    expected = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum") / 40
    assert summed.item() == pytest.approx(expected.item(), rel=1e-5)


def test_router_logits_are_recorded_for_every_moe_layer():
    model = _model().eval()
    config = model.config
    out = model(torch.tensor([[1, 2, 3, 4]]), output_router_logits=True)
    moe_layers = [i for i in range(config.num_hidden_layers) if config.is_moe_layer(i)]
    assert len(out.router_logits) == len(moe_layers) > 0
    assert out.router_logits[0].shape == (4, config.n_routed_experts)
    gate = model.model.layers[moe_layers[0]].mlp.gate
    hidden = model.model.embed_tokens(torch.tensor([[1, 2, 3, 4]]))
    # The first MoE layer is layer 1: recompute its input to check the recorded logits are the gate's.
    with torch.no_grad():
        layer0 = model.model.layers[0]
        position_embeddings = model.model.rotary_emb(hidden, torch.arange(4)[None])
        mask = create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=None, cache=None,
                                  position_ids=torch.arange(4)[None])  # fmt: skip
        h1, _ = layer0(hidden, attention_mask=mask, position_embeddings=position_embeddings)
        x = model.model.layers[1].self_attn(
            model.model.layers[1].input_layernorm(h1), position_embeddings=position_embeddings, attention_mask=mask
        )[0]
        x = model.model.layers[1].post_attention_layernorm(h1 + x)
        assert_close(out.router_logits[0], gate(x)[0], 1e-5)


def test_moe_layer_frequency_and_dense_first_layers():
    config = DeepseekMoeConfig.from_preset("tiny-v2", num_hidden_layers=5, first_k_dense_replace=1, moe_layer_freq=2)
    model = DeepseekMoeForCausalLM(config)
    kinds = [type(layer.mlp).__name__ for layer in model.model.layers]
    assert kinds == [
        "DeepseekMoeMLP",
        "DeepseekMoeMLP",
        "DeepseekMoeSparseBlock",
        "DeepseekMoeMLP",
        "DeepseekMoeSparseBlock",
    ]


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = _model().train()
        if checkpointing:
            model.activation_checkpointing_enable()
        input_ids = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
        model(input_ids, labels=input_ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        assert_close(grads[1][name], grads[0][name], 1e-4, name)
    assert "model.layers.1.mlp.experts.gate_up_proj" in grads[0]


def test_init_weights_covers_every_parameter_and_buffer():
    """Norms start at 1, every matrix (experts, router, embedding included) is N(0, initializer_range²), the V3 bias
    and the load counters start at 0, the rotary frequencies are θ^(−2i/d)."""
    config = DeepseekMoeConfig.from_preset("tiny-v3")
    torch.manual_seed(0)  # the bounds below hold for this draw with margin (about 3 standard errors)
    model = DeepseekMoeForCausalLM(config)
    std = config.initializer_range
    for name, parameter in model.named_parameters():
        if parameter.dim() == 1:
            assert "norm" in name and torch.equal(parameter, torch.ones_like(parameter)), name
        else:  # at least 1024 draws each: mean and std within a few standard errors
            assert parameter.numel() >= 1024, name
            assert abs(parameter.mean().item()) < 0.1 * std and 0.9 * std < parameter.std().item() < 1.1 * std, name
    rotary_dim, theta = config.qk_rope_head_dim, config.rope_parameters["rope_theta"]
    plain = theta ** -(torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
    for name, buffer in model.named_buffers():
        if "inv_freq" in name:  # YaRN blends these with plain/factor; the first (highest) frequency stays plain
            assert buffer.shape == plain.shape and buffer[0].item() == pytest.approx(plain[0].item()), name
            assert torch.all(buffer <= plain * (1 + 1e-6)) and torch.all(buffer >= plain / 40 * (1 - 1e-6)), name
        else:
            assert torch.count_nonzero(buffer) == 0, name  # e_score_correction_bias, tokens_per_expert, dropped


def test_sequence_classification_pools_last_non_pad_token():
    model = tiny_model("tiny-v2-lite", seed=2, model_class=DeepseekMoeForSequenceClassification, num_labels=3,
                       pad_token_id=0).eval()  # fmt: skip
    input_ids = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]])
    labels = torch.tensor([1, 2])
    out = model(input_ids, labels=labels)
    assert out.logits.shape == (2, 3)
    assert out.loss.item() == pytest.approx(F.cross_entropy(out.logits, labels).item(), rel=1e-6)
    with torch.no_grad():
        alone = model(input_ids[:1, :3]).logits
    assert_close(out.logits[0], alone[0], 1e-5)
