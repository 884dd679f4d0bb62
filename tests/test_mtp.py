"""Multi-token prediction: the loss against a hand computation, gradients, official layout, speculative decoding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_, tiny_model
from safetensors.torch import load_file
from transformers.generation.streamers import BaseStreamer

from deepseek_moe import DeepseekMoeConfig, DeepseekMoeForCausalLM


def _model(depth: int, seed: int = 0, **overrides) -> DeepseekMoeForCausalLM:
    return tiny_model("tiny-v3", seed=seed, num_nextn_predict_layers=depth, **overrides)


def _block(layer, x: torch.Tensor, model: DeepseekMoeForCausalLM) -> torch.Tensor:
    """One decoder block by hand (pre-norm attention and MoE with residuals), causal over the whole sequence."""
    seq = x.shape[1]
    cos_sin = model.model.rotary_emb(x, torch.arange(seq)[None])
    causal = torch.full((seq, seq), float("-inf")).triu(1)[None, None]
    h = x + layer.self_attn(layer.input_layernorm(x), position_embeddings=cos_sin, attention_mask=causal)[0]
    return h + layer.mlp(layer.post_attention_layernorm(h))[0]


def test_mtp_loss_equals_hand_computation_for_two_depths():
    model = _model(depth=2).eval()
    config = model.config
    input_ids = torch.randint(0, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = input_ids.clone()
    labels[1, 5] = -100  # ignored target
    out = model(input_ids, labels=labels)

    hidden = model.model(input_ids).last_hidden_state
    embeds = model.model.embed_tokens(input_ids)
    seq, losses = input_ids.shape[1], []
    for k in (1, 2):
        layer = model.model.layers[config.num_hidden_layers + k - 1]
        # h'_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h_i)]) for i < T - k
        combined = layer.eh_proj(torch.cat([layer.enorm(embeds[:, k:]), layer.hnorm(hidden[:, : seq - k])], -1))
        hidden = _block(layer, combined, model)
        logits = model.lm_head(layer.shared_head.norm(hidden))  # position i predicts t_{i+k+1}
        targets = labels[:, k + 1 :]
        losses.append(F.cross_entropy(logits[:, : seq - k - 1].reshape(-1, config.vocab_size), targets.reshape(-1)))
    expected_mtp = torch.stack(losses).mean()
    main = F.cross_entropy(out.logits[:, :-1].reshape(-1, config.vocab_size), labels[:, 1:].reshape(-1))
    assert out.mtp_loss.item() == pytest.approx(expected_mtp.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx((main + config.mtp_loss_weight * expected_mtp).item(), rel=1e-5)


def test_gradients_reach_every_mtp_parameter():
    model = _model(depth=2).train()
    input_ids = torch.randint(0, model.config.vocab_size, (4, 12), generator=torch.Generator().manual_seed(1))
    model(input_ids, labels=input_ids).loss.backward()
    for k in range(2):
        prefix = f"model.layers.{model.config.num_hidden_layers + k}."
        for name, parameter in model.named_parameters():
            if name.startswith(prefix) and parameter.requires_grad:
                assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_no_mtp_work_without_labels_or_depth():
    model = _model(depth=1).eval()
    out = model(torch.tensor([[1, 2, 3, 4]]))
    assert out.loss is None and out.mtp_loss is None
    plain = _model(depth=0).eval()
    assert plain(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).mtp_loss is None


def test_save_and_load_keep_mtp_weights_under_official_names(tmp_path):
    model = _model(depth=1)
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    prefix = f"model.layers.{model.config.num_hidden_layers}."
    for name in ("enorm", "hnorm", "eh_proj", "shared_head.norm", "shared_head.head", "embed_tokens"):
        assert prefix + name + ".weight" in state, name
    assert torch.equal(state[prefix + "shared_head.head.weight"], model.lm_head.weight)
    reloaded, info = DeepseekMoeForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def _arithmetic_batch(rows: int, length: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """Sequences t_i = (a + s·i) mod vocab: the next tokens are predictable, so a trained draft gets accepted."""
    start = torch.randint(0, vocab, (rows, 1), generator=generator)
    step = torch.randint(1, 4, (rows, 1), generator=generator)
    return (start + step * torch.arange(length)) % vocab


@pytest.fixture(scope="module")
def trained_model() -> DeepseekMoeForCausalLM:
    """A tiny D=2 model trained briefly with the MTP loss, so drafts are partly accepted (a random model's drafts
    are all rejected and would leave the acceptance paths untested)."""
    torch.manual_seed(0)
    config = DeepseekMoeConfig.from_preset("tiny-v3", num_nextn_predict_layers=2, vocab_size=64, pad_token_id=0)
    model = DeepseekMoeForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        input_ids = _arithmetic_batch(16, 16, config.vocab_size, generator)
        model(input_ids, labels=input_ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.mark.parametrize("num_draft_tokens", [1, 2, 3])  # 3: the last of the D=2 modules drafts twice
def test_speculative_greedy_equals_plain_greedy(trained_model, num_draft_tokens):
    prompt = _arithmetic_batch(3, 5, 64, torch.Generator().manual_seed(3))
    prompt[2, 2:] = torch.tensor([7, 50, 9])  # an irregular row, so some drafts are rejected
    plain = trained_model.generate(prompt, max_new_tokens=15, do_sample=False, eos_token_id=None)
    out = trained_model.generate(
        prompt,
        max_new_tokens=15,
        use_mtp=True,
        num_draft_tokens=num_draft_tokens,
        mtp_adaptive=False,  # draft at every step, whether or not it pays on this machine
        eos_token_id=None,
        return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences, plain)
    assert out.acceptance_rate > 0.0
    assert out.tokens_per_step > 1.0  # the drafts saved main-model passes


def test_speculative_greedy_with_left_padding_equals_plain(trained_model):
    rows = [_arithmetic_batch(1, n, 64, torch.Generator().manual_seed(n))[0] + 1 for n in (6, 3)]
    input_ids = torch.zeros(2, 6, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, 6 - len(row) :], attention_mask[i, 6 - len(row) :] = row % 64, 1
    kwargs = {"attention_mask": attention_mask, "max_new_tokens": 10, "eos_token_id": None}
    plain = trained_model.generate(input_ids, do_sample=False, **kwargs)
    speculative = trained_model.generate(input_ids, use_mtp=True, **kwargs)
    assert torch.equal(speculative, plain)


def test_speculative_stops_like_generate_at_eos(trained_model):
    prompt = torch.tensor([[10, 11, 12, 13]])
    plain = trained_model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=20, pad_token_id=0)
    speculative = trained_model.generate(prompt, max_new_tokens=12, use_mtp=True, eos_token_id=20, pad_token_id=0)
    assert 20 in plain[0, 4:].tolist() and plain.shape[1] < 4 + 12  # it did stop early
    assert torch.equal(speculative, plain)


def test_use_mtp_needs_mtp_modules_and_a_valid_draft_length():
    with pytest.raises(ValueError, match="has none"):
        _model(depth=0).generate(torch.tensor([[1, 2]]), use_mtp=True)
    for bad in (0, 1.5, "2", True):
        with pytest.raises(ValueError, match="num_draft_tokens to be a positive integer"):
            _model(depth=1).generate(torch.tensor([[1, 2]]), use_mtp=True, num_draft_tokens=bad)
    with pytest.raises(ValueError, match="beam search"):
        _model(depth=1).generate(torch.tensor([[1, 2]]), use_mtp=True, num_beams=2)


class _Collect(BaseStreamer):
    def __init__(self) -> None:
        self.chunks: list[list[int]] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.chunks.append(value.reshape(-1).tolist())

    def end(self) -> None:
        self.ended = True


@pytest.mark.parametrize(
    "options",
    [
        {"min_new_tokens": 10, "max_new_tokens": 14, "eos_token_id": 20, "pad_token_id": 0},
        {"max_length": 13, "eos_token_id": None},
        {"max_new_tokens": 12, "repetition_penalty": 1.5, "eos_token_id": None},
        {"max_new_tokens": 8, "eos_token_id": None, "output_hidden_states": True},  # transformers' loop serves it
    ],
    ids=["min_new_tokens", "max_length", "repetition_penalty", "hidden_states"],
)
def test_speculative_greedy_equals_plain_greedy_with_generate_options(trained_model, options):
    prompt = torch.tensor([[10, 11, 12, 13]])
    plain = trained_model.generate(prompt, do_sample=False, **options)
    speculative = trained_model.generate(
        prompt, use_mtp=True, mtp_adaptive=False, return_dict_in_generate=True, **options
    )
    assert torch.equal(speculative.sequences, plain)
    assert speculative.accepted_tokens > 0


def test_speculative_streams_the_same_tokens(trained_model):
    prompt = torch.tensor([[10, 11, 12, 13]])
    plain, speculative = _Collect(), _Collect()
    trained_model.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, streamer=plain)
    out = trained_model.generate(
        prompt,
        max_new_tokens=12,
        use_mtp=True,
        mtp_adaptive=False,
        eos_token_id=None,
        streamer=speculative,
        return_dict_in_generate=True,
    )
    assert speculative.ended and sum(speculative.chunks, []) == sum(plain.chunks, [])
    assert any(len(chunk) > 1 for chunk in speculative.chunks[1:])  # accepted drafts arrive several at a time
    assert out.tokens_per_step > 1.0


def test_adaptive_drafting_pauses_on_an_untrained_model_and_keeps_greedy_output():
    model = _model(depth=2, seed=4).eval()
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    plain = model.generate(prompt, max_new_tokens=45, do_sample=False, eos_token_id=None)
    adaptive = model.generate(prompt, max_new_tokens=45, use_mtp=True, eos_token_id=None, return_dict_in_generate=True)
    always = model.generate(
        prompt, max_new_tokens=45, use_mtp=True, mtp_adaptive=False, eos_token_id=None, return_dict_in_generate=True
    )
    assert torch.equal(adaptive.sequences, plain) and torch.equal(always.sequences, plain)
    assert adaptive.acceptance_rate == 0.0  # random drafts: none accepted
    assert adaptive.mtp_decisions[0].startswith("pause") and "probe" in adaptive.mtp_decisions[1]
    assert adaptive.plain_steps > adaptive.draft_steps
    assert always.mtp_decisions == [] and always.draft_steps >= 42  # every step drafts but the last ones


@pytest.mark.parametrize("modules, draft_tokens", [(2, 2), (1, 3)], ids=["one-module-per-draft", "module-reused"])
def test_speculative_sampling_keeps_the_model_distribution(modules, draft_tokens):
    """Speculative sampling (drafts from the MTP chain, accepted with probability min(1, p/q), else resampled from
    (p - q)+) must sample the main model's own distribution. With a random model the drafts' q differs from p, so both
    acceptances and rejections happen. The first three sampled tokens of 400 runs (temperature 1.5, every token but
    0 and 1 suppressed, so 8 outcomes) are compared with the exact p(t1) p(t2|t1) p(t3|t1,t2) by a chi-square test:
    the statistic must stay below 24.32, the 0.999 quantile of chi-square with 7 degrees of freedom (fixed seed)."""
    config = DeepseekMoeConfig.from_preset(
        "tiny-v3", num_nextn_predict_layers=modules, vocab_size=16, num_hidden_layers=1, n_routed_experts=4,
        n_group=1, topk_group=1, num_experts_per_tok=2,
    )  # fmt: skip
    model = randomize_(DeepseekMoeForCausalLM(config), seed=0).eval()
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    options = {"do_sample": True, "temperature": 1.5, "suppress_tokens": list(range(2, 16)), "eos_token_id": None}
    outcomes = torch.tensor([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)])
    with torch.no_grad():
        logits = model(torch.cat([prompt.expand(8, -1), outcomes], 1)).logits[:, 4:7, :2].double() / 1.5
    exact = logits.log_softmax(-1).gather(-1, outcomes[..., None]).sum((1, 2)).exp()

    def chi_square(samples: torch.Tensor) -> float:
        counts = torch.bincount(samples[:, 0] * 4 + samples[:, 1] * 2 + samples[:, 2], minlength=8).double()
        expected = exact * len(samples)
        return float(((counts - expected) ** 2 / expected).sum())

    torch.manual_seed(0)
    options |= {"use_mtp": True, "num_draft_tokens": draft_tokens, "mtp_adaptive": False}
    options |= {"return_dict_in_generate": True}
    runs = [model.generate(prompt, max_new_tokens=4, **options) for _ in range(400)]
    speculative = torch.cat([run.sequences[:, 5:8] for run in runs])
    plain = model.generate(
        prompt.expand(400, -1),
        max_new_tokens=3,
        do_sample=True,
        temperature=1.5,
        suppress_tokens=list(range(2, 16)),
        eos_token_id=None,
    )[:, 5:8]
    accepted, drafted = sum(run.accepted_tokens for run in runs), sum(run.drafted_tokens for run in runs)
    assert 0.1 < accepted / drafted < 0.9, accepted / drafted
    assert chi_square(plain) < 24.32  # the exact distribution is what plain sampling draws from
    assert chi_square(speculative) < 24.32


def test_mtp_loss_weight_schedule_follows_the_paper(tmp_path):
    from transformers import Trainer, TrainingArguments

    from deepseek_moe.training import MtpLossWeightCallback, mtp_loss_weight

    assert mtp_loss_weight(0.0) == 0.3 and mtp_loss_weight(0.6) == 0.3 and mtp_loss_weight(0.7) == 0.1
    with pytest.raises(ValueError, match="progress"):
        mtp_loss_weight(1.5)

    model = _model(depth=1)
    seen = []

    class Record(MtpLossWeightCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen.append(model.config.mtp_loss_weight)

    data = [{"input_ids": torch.arange(8), "labels": torch.arange(8)} for _ in range(8)]
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, use_cpu=True, report_to=[],
        save_strategy="no", logging_strategy="no",
    )  # fmt: skip
    Trainer(model=model, args=args, train_dataset=data, callbacks=[Record(switch_at=0.5)]).train()
    assert seen == [0.3, 0.3, 0.1, 0.1]


@pytest.mark.parametrize("modules, draft_tokens", [(2, 2), (1, 3)], ids=["one-module-per-draft", "module-reused"])
def test_drafts_equal_the_mtp_chain_recomputed_without_cache(monkeypatch, modules, draft_tokens):
    """Each step's drafts must be what the MTP chain gives over the whole verified sequence, recomputed from scratch:
    depth k reads h^{k-1} and the embedding k tokens ahead at every position (through module min(k, D)), then drafts
    from the last one. Checked through pauses (an untrained model pauses, and each probe catches the MTP caches up on
    the skipped positions)."""
    from deepseek_moe.model import speculative

    model = _model(depth=modules, seed=6).eval()
    recorded = []
    draft = speculative.MtpCandidateGenerator.draft

    def recording_draft(self, input_ids, *args):
        candidates, logits = draft(self, input_ids, *args)
        recorded.append((input_ids, candidates[:, input_ids.shape[1] :]))
        return candidates, logits

    monkeypatch.setattr(speculative.MtpCandidateGenerator, "draft", recording_draft)
    out = model.generate(
        torch.tensor([[3, 1, 4, 1, 5]]),
        max_new_tokens=40,
        use_mtp=True,
        num_draft_tokens=draft_tokens,
        eos_token_id=None,
        return_dict_in_generate=True,
    )
    assert any(d.startswith("probe") for d in out.mtp_decisions) and len(recorded) >= 3
    with torch.no_grad():
        for input_ids, drafts in recorded:
            n = input_ids.shape[1] - 1
            positions = torch.arange(n)[None]
            previous, known = model.model(input_ids[:, :n]).last_hidden_state, input_ids
            assert 1 <= drafts.shape[1] <= draft_tokens  # adaptive drafting chooses how many
            for k in range(1, drafts.shape[1] + 1):
                embeds = model.model.embed_tokens(known[:, k : n + k])
                previous, head_input = model.mtp_hidden_states(
                    min(k, modules), previous, embeds, torch.ones_like(positions), positions
                )
                token = model.lm_head(head_input[:, -1]).argmax(-1, keepdim=True)
                known = torch.cat([known, token], 1)
            assert torch.equal(known[:, n + 1 :], drafts)


@pytest.mark.parametrize(
    "options",
    [
        {"do_sample": False, "repetition_penalty": 1.3},
        {"do_sample": True, "temperature": 1.3, "top_k": 20},
    ],
    ids=["greedy", "sampling"],
)
def test_mtp_loop_equals_transformers_assisted_loop(trained_model, monkeypatch, options):
    """`generate(use_mtp=True)` runs a decoding loop of its own; it must do exactly what transformers' assisted
    decoding does with the same candidate generator: the same tokens and the same random draws (one seed), the same
    scores and logits, the same acceptance. Drafting at every step, so both loops draft alike."""
    from transformers.generation import GenerationMixin

    from deepseek_moe.model.speculative import MtpGenerationMixin

    prompt = _arithmetic_batch(1, 5, 64, torch.Generator().manual_seed(5))
    prompt[0, 3] = 40  # an irregular token, so some drafts are rejected
    options |= {"max_new_tokens": 14, "eos_token_id": None, "use_mtp": True, "mtp_adaptive": False}
    options |= {"return_dict_in_generate": True, "output_scores": True, "output_logits": True}
    transformers_loop = GenerationMixin._assisted_decoding
    calls = []
    monkeypatch.setattr(
        GenerationMixin, "_assisted_decoding", lambda *a, **k: calls.append(1) or transformers_loop(*a, **k)
    )
    torch.manual_seed(0)
    ours = trained_model.generate(prompt, **options)
    assert calls == []  # our loop ran
    monkeypatch.setattr(MtpGenerationMixin, "_assisted_decoding", GenerationMixin._assisted_decoding)
    torch.manual_seed(0)
    theirs = trained_model.generate(prompt, **options)
    assert calls == [1]
    assert torch.equal(ours.sequences, theirs.sequences)
    assert 0 < ours.accepted_tokens < ours.drafted_tokens
    assert (ours.accepted_tokens, ours.drafted_tokens) == (theirs.accepted_tokens, theirs.drafted_tokens)
    assert len(ours.scores) == len(theirs.scores) == ours.sequences.shape[1] - prompt.shape[1]
    for mine, reference in zip(ours.scores + ours.logits, theirs.scores + theirs.logits, strict=True):
        assert torch.equal(mine, reference)


def test_step_counts_are_the_main_model_passes_after_the_prefill(trained_model):
    passes = []
    hook = trained_model.model.register_forward_pre_hook(lambda module, args: passes.append(1))
    try:
        out = trained_model.generate(
            torch.tensor([[10, 11, 12, 13]]), max_new_tokens=15, use_mtp=True, eos_token_id=None,
            return_dict_in_generate=True,
        )  # fmt: skip
    finally:
        hook.remove()
    assert out.draft_steps + out.plain_steps == len(passes) - 1
    assert out.tokens_per_step == pytest.approx((15 - 1) / (len(passes) - 1))


def test_time_taken_by_other_processes_does_not_pause_drafting(trained_model, monkeypatch):
    """On a busy machine other processes take the CPU in the middle of steps; drafting is judged on this thread's
    own time, so a draft stalled by the machine (a sleep stands in for it) is not taken for an expensive one."""
    import time

    stall = trained_model.mtp_hidden_states

    def stalled(*args, **kwargs):
        time.sleep(0.02)  # ten times a step of this model: a pause if wall time were the measure
        return stall(*args, **kwargs)

    monkeypatch.setattr(trained_model, "mtp_hidden_states", stalled)
    prompt = _arithmetic_batch(1, 6, 64, torch.Generator().manual_seed(2))
    out = trained_model.generate(
        prompt, max_new_tokens=12, use_mtp=True, eos_token_id=None, return_dict_in_generate=True
    )
    assert out.acceptance_rate > 0.5
    assert not any(decision.startswith("pause") for decision in out.mtp_decisions)
    assert out.plain_steps <= 1  # at most the last step, with no room for a draft


def test_adaptive_drafting_judges_catch_up_steps_by_their_tokens_only():
    from deepseek_moe.model.speculative import AdaptiveDrafting

    rule = AdaptiveDrafting(enabled=True)
    rule.record(True, tokens=1, seconds=9.0, drafting_seconds=8.0, timed=False)  # catch-up over the prompt
    assert rule.decide(10) == (True, None)  # no timed step yet
    rule.record(True, tokens=2, seconds=1.3, drafting_seconds=0.3, timed=True)
    assert rule.decide(12) == (True, None)  # 1.5 tokens per draft step >= cost 1.3: keeps drafting
    rule.record(True, tokens=1, seconds=1.3, drafting_seconds=0.3, timed=True)
    drafting, decision = rule.decide(13)  # 1.33 tokens per step >= 1.3
    assert drafting and decision is None
    rule.record(True, tokens=1, seconds=1.3, drafting_seconds=0.3, timed=True)
    drafting, decision = rule.decide(14)  # 1.25 < 1.3
    assert not drafting and decision.startswith("pause at length 14")
    for length in range(15, 15 + AdaptiveDrafting.FIRST_PAUSE - 1):
        rule.record(False, tokens=1, seconds=1.0, drafting_seconds=0.0, timed=True)
        assert rule.decide(length) == (False, None)
    rule.record(False, tokens=1, seconds=1.0, drafting_seconds=0.0, timed=True)
    assert rule.decide(46) == (True, "probe at length 46")
    rule.record(True, tokens=2, seconds=5.0, drafting_seconds=4.0, timed=False)  # the probe catches up: 2 tokens
    drafting, decision = rule.decide(50)  # (2 + 1 + 1 + 2) / 4 = 1.5 tokens >= 1.3 from the earlier timed steps
    assert drafting and decision.startswith("drafting resumes at length 50")


def test_draft_length_follows_expected_tokens_per_second():
    """Tokens per second of a draft step of L tokens: (1 + a_1 + a_1 a_2 + ...) / (v + L·δ), from the recorded
    acceptances per depth, the verify time v and the time per depth δ (here v = 1.0 s, δ = 0.2 s)."""
    from deepseek_moe.model.speculative import DraftLength

    rule = DraftLength(start=1, most=3, enabled=True)
    assert rule.decide(10) is None and rule.length == 1  # nothing timed yet
    rule.record(drafted=1, accepted=1, seconds=1.2, drafting_seconds=0.2, timed=True)
    # L=1: 2 / 1.2 = 1.67; L=2 (depth 2 never drafted: taken as good as depth 1): 3 / 1.4 = 2.14; L=3 unknown
    assert rule.decide(12).startswith("2 drafts per step from length 12: 3.00 tokens per 1400.00 ms expected")
    rule.record(drafted=2, accepted=2, seconds=1.4, drafting_seconds=0.4, timed=True)
    assert rule.decide(15).startswith("3 drafts per step from length 15") and rule.length == 3  # 4 / 1.6 = 2.5
    for _ in range(8):  # depth 2 now fails half the time, depth 3 is never reached after a failure
        rule.record(drafted=3, accepted=1, seconds=1.6, drafting_seconds=0.6, timed=True)
        rule.record(drafted=3, accepted=3, seconds=1.6, drafting_seconds=0.6, timed=True)
    # the last 16 judged: depth 1 all accepted, depth 2 8 of 16, depth 3 8 of 8; v = 1.0, δ = 0.2:
    # L=1: 2 / 1.2 = 1.667; L=2: (2 + 0.5) / 1.4 = 1.786; L=3: (2 + 0.5 + 0.5) / 1.6 = 1.875
    assert rule.decide(40) is None and rule.length == 3
    for _ in range(8):  # depth 2 now always fails
        rule.record(drafted=3, accepted=1, seconds=1.6, drafting_seconds=0.6, timed=True)
    # depth 2: 4 of its last 16 accepted, depth 3 still 8 of 8: L=2 (2 + 0.25) / 1.4 = 1.607,
    # L=3 (2 + 0.25 + 0.25) / 1.6 = 1.5625, L=1 2 / 1.2 = 1.667 wins
    assert rule.decide(60).startswith("1 drafts per step from length 60") and rule.length == 1


@pytest.mark.parametrize("bound", [{"num_draft_tokens": 1}, {"num_assistant_tokens": 1}])
def test_the_bound_on_drafts_holds_while_drafting_adapts(trained_model, bound):
    prompt = _arithmetic_batch(1, 6, 64, torch.Generator().manual_seed(2))
    out = trained_model.generate(
        prompt, max_new_tokens=30, use_mtp=True, eos_token_id=None, return_dict_in_generate=True, **bound
    )
    assert out.drafted_tokens == out.draft_steps > 0  # one draft per step, however well they are accepted
    assert out.mtp_decisions == []


def test_draft_length_is_fixed_without_adaptive_drafting():
    from deepseek_moe.model.speculative import DraftLength

    rule = DraftLength(start=1, most=3, enabled=False)
    rule.record(drafted=3, accepted=0, seconds=9.0, drafting_seconds=8.0, timed=True)
    assert rule.decide(10) is None and rule.length == 3


def test_adaptive_drafting_chains_the_module_on_a_well_trained_model(trained_model):
    """The trained D=2 model's drafts are mostly accepted on regular rows, so drafting adapts past its two modules."""
    prompt = _arithmetic_batch(1, 6, 64, torch.Generator().manual_seed(2))
    plain = trained_model.generate(prompt, max_new_tokens=40, do_sample=False, eos_token_id=None)
    out = trained_model.generate(
        prompt, max_new_tokens=40, use_mtp=True, eos_token_id=None, return_dict_in_generate=True
    )
    assert torch.equal(out.sequences, plain)
    assert any(decision.startswith(("3 drafts", "4 drafts")) for decision in out.mtp_decisions), out.mtp_decisions


def test_position_buffer_keeps_what_the_drafts_read():
    from deepseek_moe.model.speculative import PositionBuffer

    buffer, reference = PositionBuffer(), {}
    generator = torch.Generator().manual_seed(0)
    position = 0
    for step in range(300):
        rows = 40 if step == 0 else int(torch.randint(1, 4, (1,), generator=generator))
        states = torch.randn(1, rows, 3, generator=generator)
        buffer.write(position, states)
        reference.update({position + i: states[0, i] for i in range(rows)})
        end = position + rows
        assert buffer.end == end
        start = max(buffer.start, end - 5)
        assert torch.equal(buffer.read(start, end)[0], torch.stack([reference[i] for i in range(start, end)]))
        buffer.drop_before(end - 2)
        position = end - int(torch.randint(0, 2, (1,), generator=generator))  # rewrite the last row at times
    assert buffer.buffer.shape[1] < 200  # the history was not kept


def test_drafting_with_the_mtp_layer_offloaded_to_disk_equals_in_memory(tmp_path):
    """Drafts run in inference mode; accelerate's hooks load an offloaded MTP layer's weights around its forward, so
    the tokens must not change and no inference tensor may be left in the model (it could not be trained after)."""
    model = _model(depth=1, seed=7, num_hidden_layers=2).eval()
    model.save_pretrained(tmp_path / "model")
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    device_map |= {"model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "disk"}
    offloaded = DeepseekMoeForCausalLM.from_pretrained(
        tmp_path / "model", device_map=device_map, offload_folder=str(tmp_path / "offload")
    ).eval()
    assert offloaded.model.layers[2].eh_proj.weight.device.type == "meta"  # the MTP layer is really offloaded
    prompt = torch.tensor([[5, 3, 8, 1, 9, 2]])
    options = {"max_new_tokens": 8, "eos_token_id": None, "use_mtp": True, "mtp_adaptive": False}
    plain = model.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert torch.equal(offloaded.generate(prompt, **options), plain)
    assert torch.equal(model.generate(prompt, **options), plain)
    assert not any(p.is_inference() for p in [*model.parameters(), *offloaded.parameters()])
    model.train()(prompt, labels=prompt).loss.backward()  # drafting left the model trainable
