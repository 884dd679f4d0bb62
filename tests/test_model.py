"""Training-facing behaviour of the model classes: loss, router logits, checkpointing, init, classification."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from conftest import randomize_
from transformers.masking_utils import create_causal_mask

from deepseek_moe import DeepseekMoeConfig, DeepseekMoeForCausalLM, DeepseekMoeForSequenceClassification


def _model(preset: str = "tiny-v3", **overrides) -> DeepseekMoeForCausalLM:
    config = DeepseekMoeConfig.from_preset(preset, num_nextn_predict_layers=0, **overrides)
    return randomize_(DeepseekMoeForCausalLM(config), seed=4)


def test_loss_is_shifted_cross_entropy_and_honours_num_items_in_batch():
    model = _model().eval()
    input_ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    labels = input_ids.clone()
    labels[0, :3] = -100
    out = model(input_ids, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, model.config.vocab_size)
    targets = labels[:, 1:].reshape(-1)
    assert torch.allclose(out.loss, F.cross_entropy(logits, targets, ignore_index=-100), rtol=1e-5)
    summed = model(input_ids, labels=labels, num_items_in_batch=torch.tensor(40)).loss
    assert torch.allclose(summed, F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum") / 40, rtol=1e-5)


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
        assert torch.allclose(out.router_logits[0], gate(x)[0], rtol=1e-5, atol=1e-6)


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
        assert torch.allclose(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6), name
    assert "model.layers.1.mlp.experts.gate_up_proj" in grads[0]


def test_init_weights_covers_every_parameter_and_buffer():
    config = DeepseekMoeConfig.from_preset("tiny-v3")
    model = DeepseekMoeForCausalLM(config)
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        assert torch.isfinite(tensor).all(), name
    gate = model.model.layers[1].mlp.gate
    assert torch.count_nonzero(gate.e_score_correction_bias) == 0 and gate.weight.std() > 0
    experts = model.model.layers[1].mlp.experts
    assert 0.5 * config.initializer_range < experts.gate_up_proj.std() < 2 * config.initializer_range


def test_sequence_classification_pools_last_non_pad_token():
    config = DeepseekMoeConfig.from_preset("tiny-v2-lite", num_labels=3, pad_token_id=0)
    model = randomize_(DeepseekMoeForSequenceClassification(config), seed=2).eval()
    input_ids = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]])
    out = model(input_ids, labels=torch.tensor([1, 2]))
    assert out.logits.shape == (2, 3) and out.loss.ndim == 0
    with torch.no_grad():
        alone = model(input_ids[:1, :3]).logits
    assert torch.allclose(out.logits[0], alone[0], rtol=1e-5, atol=1e-6)
