"""Model-side training behaviour: Trainer resume restores fused experts and the V3 bias, per-expert state dicts load,
balance losses keep their gradients under activation checkpointing, the MTP loss without targets, `shift_labels`,
runtime capacity settings and padding left out of the expert loads."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import CausalLMRows, randomize_
from transformers import Trainer, TrainerCallback, TrainingArguments

from deepseek_moe import DeepseekMoeConfig, DeepseekMoeForCausalLM
from deepseek_moe.training import ExpertBalanceCallback, moe_routers, update_expert_bias

torch.set_num_threads(1)


def tiny(preset: str = "tiny-v3", seed: int = 0, **overrides) -> DeepseekMoeForCausalLM:
    config = DeepseekMoeConfig.from_preset(preset, **overrides)
    return randomize_(DeepseekMoeForCausalLM(config), seed=seed)


def tokens(size: int, length: int = 12, seed: int = 1, vocab: int = 512) -> torch.Tensor:
    return torch.randint(0, vocab, (size, length), generator=torch.Generator().manual_seed(seed))


class _StopAt(TrainerCallback):
    """Ends a run after `step` optimizer steps, as a killed job would (its checkpoint at `step` is written first)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if state.global_step == self.step:
            control.should_training_stop = True


def _trainer(model, output_dir, stop_at: int | None = None) -> Trainer:
    args = TrainingArguments(
        output_dir=str(output_dir),
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=4,
        learning_rate=1e-2,
        lr_scheduler_type="cosine",
        warmup_steps=1,
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    callbacks = [ExpertBalanceCallback(gamma=0.01, keep_history=False)] + ([_StopAt(stop_at)] if stop_at else [])
    return Trainer(model=model, args=args, train_dataset=CausalLMRows(tokens(16, seed=7)), callbacks=callbacks)


def test_trainer_resume_restores_experts_and_bias_exactly(tmp_path) -> None:
    base = tiny()
    uninterrupted = copy.deepcopy(base)
    _trainer(uninterrupted, tmp_path / "a").train()
    _trainer(copy.deepcopy(base), tmp_path / "b", stop_at=2).train()  # stops after writing checkpoint-2
    resumed = tiny(seed=5)  # different weights and bias: everything must come from the checkpoint
    _trainer(resumed, tmp_path / "b").train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    expected = uninterrupted.state_dict()
    assert set(resumed.state_dict()) == set(expected)
    for name, value in resumed.state_dict().items():
        assert torch.equal(value, expected[name]), name
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert not torch.equal(expected[bias], base.state_dict()[bias])  # the bias did move


def test_load_state_dict_fuses_per_expert_tensors(tmp_path) -> None:
    model = tiny()
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    on_disk = load_file(tmp_path / "model.safetensors")
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in on_disk and len(on_disk) > len(model.state_dict())
    target = tiny(seed=9)
    result = target.load_state_dict(on_disk, strict=True)  # MTP copies of embedding and head are dropped
    assert not result.missing_keys and not result.unexpected_keys
    for name, value in model.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), name


def test_sharded_checkpoint_loads_experts_split_across_shards(tmp_path) -> None:
    """Trainer resumes a sharded checkpoint shard by shard (`load_sharded_checkpoint`: `load_state_dict` per file),
    and official checkpoints split a layer's experts across files: each piece goes to its rows of the fused weights."""
    import json

    from safetensors.torch import load_file, save_file
    from transformers.trainer_utils import load_sharded_checkpoint

    model = tiny()
    model.save_pretrained(tmp_path / "single")
    tensors = load_file(tmp_path / "single" / "model.safetensors")
    first_half = {k: v for k, v in tensors.items() if ".experts." not in k or int(k.split(".")[5]) < 8}
    shards = {"model-00001-of-00002.safetensors": first_half}
    shards["model-00002-of-00002.safetensors"] = {k: v for k, v in tensors.items() if k not in first_half}
    for name, shard in shards.items():
        save_file(shard, tmp_path / name)
    weight_map = {key: name for name, shard in shards.items() for key in shard}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    target = tiny(seed=9)
    load_sharded_checkpoint(target, tmp_path, strict=False)
    for name, value in model.state_dict().items():
        assert torch.equal(target.state_dict()[name], value), name


def test_partial_per_expert_set_fills_its_rows_only() -> None:
    model = tiny()
    before = model.model.layers[1].mlp.experts.down_proj.detach().clone()
    state = {f"model.layers.1.mlp.experts.{e}.down_proj.weight": torch.full((64, 32), float(e)) for e in range(3)}
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    after = model.model.layers[1].mlp.experts.down_proj
    assert all((after[e] == e).all() for e in range(3)) and torch.equal(after[3:], before[3:])


def _router_grads(model: DeepseekMoeForCausalLM, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    out = model(ids, labels=ids)
    assert out.aux_loss is not None and out.aux_loss.requires_grad
    out.loss.backward()
    return {name: router.weight.grad.clone() for name, router in moe_routers(model).items()}


@pytest.mark.parametrize("preset", ["tiny-v2", "tiny-16b"])
@pytest.mark.parametrize("reentrant", [True, False])
def test_balance_losses_keep_gradients_under_activation_checkpointing(preset: str, reentrant: bool) -> None:
    """The routers' gradients with checkpointing equal those without; with α large the aux term dominates them, so a
    lost aux gradient shows (compared against the LM-only gradient too)."""
    plain = tiny(preset, aux_loss_alpha=1.0)
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    lm_only = copy.deepcopy(plain)
    lm_only.config.add_aux_loss_to_loss = False
    ids = tokens(2)
    expected, got, without_aux = (_router_grads(m, ids) for m in (plain, checkpointed, lm_only))
    for name, grad in expected.items():
        assert (grad - without_aux[name]).abs().max() > 1e-4, name
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_mtp_loss_without_targets_is_zero_with_zero_gradient() -> None:
    model = tiny().train()
    ids = tokens(2, length=6)
    labels = ids.clone()
    labels[:, 2:] = -100  # the main loss has one target per row (t_1); MTP depth 1 (targets t_{i+2}) has none
    out = model(ids, labels=labels)
    assert out.mtp_loss.item() == 0.0 and torch.isfinite(out.loss)
    out.loss.backward()
    mtp_prefix = f"model.layers.{model.config.num_hidden_layers}."
    for name, param in model.named_parameters():
        assert param.grad is None or torch.isfinite(param.grad).all(), name
        if name.startswith(mtp_prefix + "eh_proj"):
            assert param.grad is None or param.grad.abs().max() == 0, name


def test_shift_labels_replace_labels() -> None:
    model = tiny().eval()
    ids = tokens(2)
    labels = ids.clone()
    labels[0, 4] = -100
    expected = model(ids, labels=labels, num_items_in_batch=torch.tensor(17))
    shift_labels = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    for given in ({"shift_labels": shift_labels}, {"labels": labels, "shift_labels": shift_labels}):
        out = model(ids, num_items_in_batch=torch.tensor(17), **given)
        torch.testing.assert_close(out.loss, expected.loss, rtol=0, atol=0)
        torch.testing.assert_close(out.mtp_loss, expected.mtp_loss, rtol=0, atol=0)


def test_capacity_factor_is_read_at_forward_time() -> None:
    model = tiny("tiny-v2").train()
    ids = tokens(4)
    model(ids).logits.sum().backward()
    assert all(router.dropped_tokens == 0 for router in moe_routers(model).values())
    model.config.capacity_factor = 0.5
    model(ids).logits.sum().backward()
    dropped = sum(int(router.dropped_tokens) for router in moe_routers(model).values())
    assert dropped > 0


def test_padding_is_left_out_of_expert_loads() -> None:
    """Counts of a right-padded batch equal the counts of its rows run alone without padding (main and MTP routers)."""
    model = tiny().train()
    ids = tokens(2, length=10)
    lengths = (10, 6)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        mask[row, :length] = 1
    labels = ids.masked_fill(mask == 0, -100)
    model(ids, attention_mask=mask, labels=labels).loss.backward()
    padded = update_expert_bias(model, gamma=0.0)
    alone = {}
    for row, length in enumerate(lengths):
        row_ids = ids[row : row + 1, :length]
        model(row_ids, labels=row_ids).loss.backward()
    alone = update_expert_bias(model, gamma=0.0)
    mtp_router = f"model.layers.{model.config.num_hidden_layers}.mlp.gate"
    assert alone[mtp_router].sum() > 0
    for name, counts in alone.items():
        assert torch.equal(padded[name], counts), name


def test_counts_are_not_buffers() -> None:
    """DDP broadcasts every buffer from rank 0 at each synchronised forward; the counts must not be among them."""
    model = tiny()
    names = {name for name, _ in model.named_buffers()}
    assert not any("tokens_per_expert" in n or "dropped_tokens" in n for n in names)
    assert any("e_score_correction_bias" in n for n in names)


def test_packed_rows_give_the_mtp_loss_of_their_documents() -> None:
    """Two documents packed in one row (positions restarting, the second's first label masked, no attention mask)
    give the MTP loss of the documents run alone: no MTP target crosses the boundary, attention stays per document."""
    model = tiny().eval()
    first, second = tokens(1, length=5, seed=11), tokens(1, length=6, seed=12)
    packed = torch.cat([first, second], dim=1)
    positions = torch.cat([torch.arange(5), torch.arange(6)])[None]
    labels = packed.clone()
    labels[0, 5] = -100  # the second document's first token is not predicted from the first document
    total = torch.tensor(17)  # any fixed count: each loss is then a sum over targets divided by it
    options = {"num_items_in_batch": total, "use_cache": False}  # without a cache, position resets mark documents
    together = model(packed, position_ids=positions, labels=labels, **options).mtp_loss
    alone = sum(model(doc, labels=doc, **options).mtp_loss for doc in (first, second))
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)
