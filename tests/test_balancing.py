"""Load balancing: balance losses against brute force, token dropping, the V3 bias update (accumulation, data
parallel, checkpointing), loss weighting under Trainer's gradient accumulation, and config validation."""

from __future__ import annotations

import copy
import functools
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import CausalLMRows, tiny_model
from torch.utils.checkpoint import checkpoint
from transformers import Trainer, TrainingArguments

from deepseek_moe import DeepseekMoeConfig, DeepseekMoeForCausalLM
from deepseek_moe.training import (
    ExpertBalanceCallback,
    load_statistics,
    moe_routers,
    register_bias_update_hook,
    update_expert_bias,
)

torch.set_num_threads(1)
VOCAB = 512


def main_routers(model: DeepseekMoeForCausalLM) -> dict:
    """The routers of the main layers, whose routing every forward exercises (MTP modules route only for their loss)."""
    return {n: r for n, r in moe_routers(model).items() if int(n.split(".")[2]) < model.config.num_hidden_layers}


def batch(size: int, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (size, length), generator=torch.Generator().manual_seed(seed))


def record_routing(model: DeepseekMoeForCausalLM) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Hooks every router; each forward appends (router logits, expert indices) per MoE layer."""
    records = []
    for router in main_routers(model).values():
        router.register_forward_hook(lambda module, args, out: records.append((out[0].detach(), out[2])))
    return records


def brute_force_losses(
    config: DeepseekMoeConfig, logits: torch.Tensor, idx: torch.Tensor, batch_size: int, mask: list[bool]
) -> dict:
    """The paper's formulas with plain loops over units, experts, devices and tokens; padding (mask False) skipped."""
    num_tokens, E = logits.shape
    K = idx.shape[1]
    if config.scoring_func == "softmax":
        s = logits.softmax(dim=-1)
    else:
        s = logits.sigmoid()
        s = s / s.sum(dim=-1, keepdim=True)
    seq = num_tokens // batch_size
    units = [range(b * seq, (b + 1) * seq) for b in range(batch_size)] if config.seq_aux else [range(num_tokens)]
    units = [[t for t in unit if mask[t]] for unit in units]
    chosen = [set(idx[t].tolist()) for t in range(num_tokens)]
    D, M = config.num_devices, config.device_limit
    totals = {"expert": 0.0, "device": 0.0, "comm": 0.0}
    for unit in units:
        T = len(unit)
        f = [E / (K * T) * sum(1 for t in unit if i in chosen[t]) for i in range(E)]
        P = [sum(s[t, i].item() for t in unit) / T for i in range(E)]
        totals["expert"] += sum(f[i] * P[i] for i in range(E)) / len(units)
        if D:
            per = E // D
            experts_of = [range(d * per, (d + 1) * per) for d in range(D)]
            f1 = [sum(f[j] for j in experts_of[d]) / per for d in range(D)]
            P1 = [sum(P[j] for j in experts_of[d]) for d in range(D)]
            totals["device"] += sum(f1[d] * P1[d] for d in range(D)) / len(units)
            if M:
                sent = [sum(1 for t in unit if any(j in chosen[t] for j in experts_of[d])) for d in range(D)]
                f2 = [D / (M * T) * sent[d] for d in range(D)]
                totals["comm"] += sum(f2[d] * P1[d] for d in range(D)) / len(units)
    alpha = config.seq_aux_alpha if config.uses_bias_balancing else config.aux_loss_alpha
    out = {"expert": alpha * totals["expert"]}
    if D:
        out["device"] = config.aux_loss_device_alpha * totals["device"]
        if M:
            out["comm"] = config.aux_loss_comm_alpha * totals["comm"]
    if config.router_z_loss_coef:
        lse = [math.log(sum(math.exp(v) for v in logits[t].tolist())) for t in range(num_tokens) if mask[t]]
        out["z"] = config.router_z_loss_coef * sum(v * v for v in lse) / len(lse)
    return out


@pytest.mark.parametrize("preset", ["tiny-v2", "tiny-v3", "tiny-16b"])
@pytest.mark.parametrize("seq_aux", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_losses_match_brute_force(preset: str, seq_aux: bool, padded: bool) -> None:
    model = tiny_model(preset, seq_aux=seq_aux, num_devices=4, device_limit=2, router_z_loss_coef=1e-3)
    model.eval()
    records = record_routing(model)
    ids = batch(3)
    attention_mask = torch.ones_like(ids)
    if padded:
        attention_mask[0, 7:] = 0
        attention_mask[2, 4:] = 0
    out = model(ids, attention_mask=attention_mask, labels=ids, output_router_logits=True)
    expected: dict[str, float] = {}
    mask = attention_mask.reshape(-1).bool().tolist()
    for logits, idx in records:
        for kind, value in brute_force_losses(model.config, logits.double(), idx, 3, mask).items():
            expected[kind] = expected.get(kind, 0.0) + value
    assert set(out.aux_losses) == set(expected) == {"expert", "device", "comm", "z"}
    for kind, value in expected.items():
        assert out.aux_losses[kind].item() == pytest.approx(value, rel=1e-5), kind
    assert out.aux_loss.item() == pytest.approx(sum(expected.values()), rel=1e-5)
    plain = model(ids, attention_mask=attention_mask, labels=ids)
    assert plain.aux_loss is None and plain.aux_losses is None  # inference computes nothing unasked
    assert out.loss.item() == pytest.approx(plain.loss.item() + out.aux_loss.item(), rel=1e-6)
    model.config.add_aux_loss_to_loss = False
    unadded = model(ids, attention_mask=attention_mask, labels=ids, output_router_logits=True)
    assert unadded.loss.item() == pytest.approx(plain.loss.item())


def test_remote_code_seq_aux_formula() -> None:
    """DeepSeek-V2 remote code: ce[b, e] = count_b(e) / (S·K/E); aux = mean_b Σ_e ce·mean_t scores · α."""
    model = tiny_model("tiny-v2-lite", aux_loss_alpha=0.01)
    model.eval()
    records = record_routing(model)
    ids = batch(2, 10)
    out = model(ids, output_router_logits=True)
    total = 0.0
    for logits, idx in records:
        E, K = logits.shape[1], idx.shape[1]
        scores = logits.softmax(-1).view(2, 10, E)
        ce = torch.zeros(2, E).scatter_add_(1, idx.view(2, -1), torch.ones(2, 10 * K)).div_(10 * K / E)
        total += ((ce * scores.mean(dim=1)).sum(dim=1).mean() * 0.01).item()
    assert out.aux_losses["expert"].item() == pytest.approx(total, rel=1e-5)


def test_aux_loss_gradient_reaches_router_but_not_bias() -> None:
    model = tiny_model("tiny-v3", seq_aux_alpha=1.0)
    model.train()
    out = model(batch(2))
    out.aux_loss.backward()
    router = model.model.layers[1].mlp.gate
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0
    assert "e_score_correction_bias" not in dict(router.named_parameters())
    assert not router.e_score_correction_bias.requires_grad and router.e_score_correction_bias.grad is None


def test_capacity_dropping_matches_brute_force() -> None:
    model = tiny_model(
        "tiny-v2", num_devices=4, capacity_factor=0.6, capacity_protected_fraction=0.25, aux_loss_alpha=0.0
    )
    router = model.model.layers[1].mlp.gate
    B, S = 4, 10
    hidden = torch.randn(B, S, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    router.eval()  # no dropping at inference unless asked
    logits, full_weights, idx = router(hidden)
    router.train()
    with torch.no_grad():  # not counted
        _, weights, idx_train = router(hidden)
    assert torch.equal(idx, idx_train)

    E, K, D = router.num_experts, idx.shape[1], 4
    s = logits.softmax(dim=-1)
    capacity = math.ceil(0.6 * B * S * K / D)
    protected_tokens = set(range(round(0.25 * B) * S))
    keep = torch.zeros_like(idx, dtype=torch.bool)
    for d in range(D):
        pairs = [(t, j) for t in range(B * S) for j in range(K) if idx[t, j].item() // (E // D) == d]
        protected = [p for p in pairs if p[0] in protected_tokens]
        others = sorted((p for p in pairs if p[0] not in protected_tokens), key=lambda p: -s[p[0], idx[p]].item())
        for t, j in protected + others[: max(0, capacity - len(protected))]:
            keep[t, j] = True
    assert (~keep).sum() > 0 and keep[: round(0.25 * B) * S].all()
    torch.testing.assert_close(weights, full_weights * keep)
    router(hidden)
    assert router.dropped_tokens.item() == (~keep).sum().item()
    assert load_statistics(update_expert_bias(model)["model.layers.1.mlp.gate"])["dropped"] == pytest.approx(
        (~keep).sum().item() / idx.numel()
    )
    model.eval()
    model.config.drop_tokens_at_inference = True
    torch.testing.assert_close(router(hidden)[1], full_weights * keep)


def test_counting_only_in_training_forwards_with_grad() -> None:
    model = tiny_model("tiny-v3")
    ids = batch(2)
    routers = list(main_routers(model).values())
    model.eval()
    model(ids)
    model.train()
    with torch.no_grad():
        model(ids)
    assert all(r.tokens_per_expert.sum() == 0 for r in routers)
    model(ids).logits.sum().backward()
    assert all(r.tokens_per_expert.sum() == 2 * 12 * model.config.num_experts_per_tok for r in routers)


def _checkpoint_under_saved_tensor_hooks(function, *args, **kwargs):
    """What `activation_checkpointing_enable(offload=True)` does (`save_on_cpu` around the checkpoint), on CPU."""
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        return checkpoint(function, *args, **kwargs)


@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointing_counts_once(reentrant: bool, offload: bool) -> None:
    reference = tiny_model("tiny-v3")
    model = copy.deepcopy(reference)
    if offload:
        func = functools.partial(_checkpoint_under_saved_tensor_hooks, use_reentrant=reentrant)
        model._set_gradient_checkpointing(enable=True, gradient_checkpointing_func=func)
    else:
        model.activation_checkpointing_enable({"use_reentrant": reentrant})
    ids = batch(2)
    for m in (reference, model):
        m.train()
        m(ids, labels=ids).loss.backward()
    for a, b in zip(main_routers(reference).values(), main_routers(model).values(), strict=True):
        assert a.tokens_per_expert.sum() > 0
        assert torch.equal(a.tokens_per_expert, b.tokens_per_expert)


def test_gradient_accumulation_moves_bias_once_like_combined_batch() -> None:
    ids = batch(4)
    combined = tiny_model("tiny-v3", bias_update_speed=0.01)
    accumulated = copy.deepcopy(combined)
    start = {n: r.e_score_correction_bias.clone() for n, r in main_routers(combined).items()}
    for model, micro_batches in ((combined, [ids]), (accumulated, [ids[:2], ids[2:]])):
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        register_bias_update_hook(optimizer, model)
        for micro in micro_batches:
            model(micro, labels=micro).loss.backward()
            for name, router in main_routers(model).items():  # nothing moves before the optimizer step
                assert torch.equal(router.e_score_correction_bias, start[name])
        optimizer.step()
    for name, router in main_routers(accumulated).items():
        moved = router.e_score_correction_bias - start[name]
        assert moved.abs().max() == pytest.approx(0.01)
        assert ((moved == 0) | ((moved.abs() - 0.01).abs() < 1e-6)).all()  # one step of ±γ (or 0 at the mean)
        assert torch.equal(router.e_score_correction_bias, main_routers(combined)[name].e_score_correction_bias)
        assert router.tokens_per_expert.sum() == 0


@pytest.fixture
def fresh_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_hook_on_accelerate_optimizer_runs_once_per_accumulated_step(fresh_accelerate_state) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = tiny_model("tiny-v3", bias_update_speed=0.01)
    expected = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    register_bias_update_hook(optimizer, model)
    model.train()
    ids = batch(4)
    start = {n: r.e_score_correction_bias.clone() for n, r in main_routers(model).items()}
    for i, micro in enumerate((ids[:2], ids[2:])):
        with accelerator.accumulate(model):
            accelerator.backward(model(micro, labels=micro).loss)
            optimizer.step()
            optimizer.zero_grad()
        moved = [not torch.equal(r.e_score_correction_bias, start[n]) for n, r in main_routers(model).items()]
        assert all(moved) if i == 1 else not any(moved)
    expected.train()
    expected(ids, labels=ids).loss.backward()
    update_expert_bias(expected)
    for name, router in main_routers(model).items():
        assert torch.equal(router.e_score_correction_bias, main_routers(expected)[name].e_score_correction_bias)


def test_zero_gamma_freezes_bias() -> None:
    model = tiny_model("tiny-v3", bias_update_speed=0.0)
    model.train()
    before = [r.e_score_correction_bias.clone() for r in main_routers(model).values()]
    model(batch(2)).logits.sum().backward()
    loads = update_expert_bias(model)
    assert all(loads[name].sum() > 0 for name in main_routers(model))
    for b, r in zip(before, main_routers(model).values(), strict=True):
        assert torch.equal(b, r.e_score_correction_bias) and r.tokens_per_expert.sum() == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _data_parallel_worker(rank: int, world_size: int, port: int, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        model = tiny_model("tiny-v3", bias_update_speed=0.01)
        model.train()
        ids = batch(4)[2 * rank : 2 * rank + 2]
        model(ids, labels=ids).loss.backward()
        update_expert_bias(model)
        if rank == 0:
            torch.save({n: r.e_score_correction_bias for n, r in main_routers(model).items()}, path)
    finally:
        dist.destroy_process_group()


def test_data_parallel_bias_equals_single_process(tmp_path) -> None:
    path = str(tmp_path / "bias.pt")
    mp.spawn(_data_parallel_worker, args=(2, _free_port(), path), nprocs=2, join=True)
    model = tiny_model("tiny-v3", bias_update_speed=0.01)
    start = {n: r.e_score_correction_bias.clone() for n, r in main_routers(model).items()}
    model.train()
    ids = batch(4)
    model(ids, labels=ids).loss.backward()
    update_expert_bias(model)
    distributed = torch.load(path)
    for name, router in main_routers(model).items():
        assert not torch.equal(router.e_score_correction_bias, start[name])
        assert torch.equal(distributed[name], router.e_score_correction_bias)


def _skewed_run(gamma: float, steps: int = 30) -> float:
    """Routing skewed toward experts 0-3 of every layer; returns the load CV over the last 5 steps."""
    model = tiny_model("tiny-v3", bias_update_speed=gamma, n_group=1, topk_group=1)
    with torch.no_grad():
        direction = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(5))
        model.model.embed_tokens.weight.add_(direction)  # a component every token shares
        for router in main_routers(model).values():
            router.e_score_correction_bias.zero_()
            router.weight[:4] += 0.5 * direction / direction.norm()
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    register_bias_update_hook(optimizer, model)
    recent: list[dict[str, torch.Tensor]] = []
    for step in range(steps):
        ids = batch(4, 16, seed=100 + step)
        model(ids, labels=ids).loss.backward()
        if step >= steps - 5:
            recent.append({n: r.tokens_per_expert.clone() for n, r in main_routers(model).items()})
        optimizer.step()
        optimizer.zero_grad()
    cvs = [
        load_statistics(torch.cat([sum(r[n] for r in recent), torch.zeros(1, dtype=torch.int64)]))["cv"]
        for n in recent[0]
    ]
    return sum(cvs) / len(cvs)


def test_bias_update_balances_skewed_routing() -> None:
    frozen, balanced = _skewed_run(0.0), _skewed_run(0.02)
    assert frozen > 1.0
    assert balanced < 0.5 * frozen


def _train(model, tmp_path, batch_size: int, accumulation: int, steps: int = 1, callbacks=None) -> Trainer:
    args = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=steps,
        learning_rate=1.0,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=CausalLMRows(batch(4 * steps)), callbacks=callbacks)
    trainer.train()
    return trainer


def test_trainer_accumulation_keeps_aux_weight(tmp_path) -> None:
    """One SGD step on 4 sequences equals 2 accumulated micro-batches of 2, aux losses included (weighted large
    enough that counting them twice, as a per-micro-batch mean under `num_items_in_batch` would, shows)."""
    base = tiny_model("tiny-v3", seq_aux_alpha=1.0, router_z_loss_coef=0.1, num_devices=4, device_limit=2)
    start = copy.deepcopy(base.state_dict())
    one, two = copy.deepcopy(base), copy.deepcopy(base)
    _train(one, tmp_path / "a", batch_size=4, accumulation=1)
    _train(two, tmp_path / "b", batch_size=2, accumulation=2)
    router = "model.layers.1.mlp.gate.weight"
    step_one = one.state_dict()[router] - start[router]
    step_two = two.state_dict()[router] - start[router]
    assert step_one.abs().max() > 0
    torch.testing.assert_close(step_two, step_one, rtol=1e-4, atol=1e-6)
    for name, value in one.state_dict().items():
        torch.testing.assert_close(two.state_dict()[name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_trainer_callback_updates_once_per_step_and_logs(tmp_path) -> None:
    model = tiny_model("tiny-v3", bias_update_speed=0.01)
    expected = copy.deepcopy(model)
    callback = ExpertBalanceCallback()
    trainer = _train(model, tmp_path, batch_size=2, accumulation=2, callbacks=[callback])
    expected.train()
    ids = batch(4)
    expected(ids, labels=ids).loss.backward()
    update_expert_bias(expected)
    for name, router in main_routers(model).items():
        torch.testing.assert_close(router.e_score_correction_bias, main_routers(expected)[name].e_score_correction_bias)
    assert len(callback.history) == 1
    logged = [entry for entry in trainer.state.log_history if "moe/cv" in entry]
    assert logged and {"moe/layers.1/cv", "moe/max_over_mean", "moe/dropped"} <= set(logged[0])


def test_plot_expert_load(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from deepseek_moe.training import plot_expert_load

    history = [{"layer": torch.softmax(torch.randn(8), 0)} for _ in range(5)]
    plot_expert_load(history, "layer", str(tmp_path / "load.png"))
    assert (tmp_path / "load.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"bias_update_speed": -0.001}, "bias_update_speed"),
        ({"num_devices": 4, "device_limit": 5}, "device_limit"),
        ({"device_limit": 2}, "device_limit"),
        ({"num_devices": 3}, "num_devices"),
        ({"aux_loss_device_alpha": -1.0}, "aux_loss_device_alpha"),
        ({"seq_aux_alpha": -1e-4}, "seq_aux_alpha"),
        ({"capacity_factor": 0.0}, "capacity_factor"),
        ({"capacity_protected_fraction": 1.5}, "capacity_protected_fraction"),
    ],
)
def test_bad_balancing_settings_raise(overrides: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"DeepseekMoeConfig.{field}"):
        DeepseekMoeConfig.from_preset("tiny-v3", **overrides)


def test_bias_stays_fp32_after_casting_the_model() -> None:
    model = tiny_model("tiny-v3", bias_update_speed=1e-3).to(torch.bfloat16)
    router = main_routers(model)["model.layers.1.mlp.gate"]
    with torch.no_grad():
        router.e_score_correction_bias.fill_(2.0)
    model.train()
    model(batch(2)).logits.float().sum().backward()
    update_expert_bias(model)
    assert router.e_score_correction_bias.dtype == torch.float32
    assert (router.e_score_correction_bias - 2.0).abs().max().item() == pytest.approx(1e-3, rel=1e-3)


def test_counts_are_training_state_not_checkpoint_content(tmp_path) -> None:
    model = tiny_model("tiny-v3")
    model.train()
    model(batch(2)).logits.sum().backward()
    assert not any("tokens_per_expert" in key or "dropped_tokens" in key for key in model.state_dict())
    model.save_pretrained(tmp_path)
    loaded = DeepseekMoeForCausalLM.from_pretrained(tmp_path)
    for name, router in moe_routers(loaded).items():
        assert router.tokens_per_expert.dtype == torch.int64 and router.tokens_per_expert.sum() == 0
        assert router.dropped_tokens == 0
        torch.testing.assert_close(router.e_score_correction_bias, moe_routers(model)[name].e_score_correction_bias)
