"""Self-speculative decoding with the model's own multi-token prediction (MTP) modules as the draft, run as
transformers' assisted generation.

`generate(use_mtp=True)` goes through `GenerationMixin.generate`: each step the MTP chain drafts up to D tokens after
the last known one, the main model verifies them in one forward pass, and they are accepted as transformers'
assisted decoding accepts them (greedy: the longest prefix equal to the main model's choices; sampling: speculative
sampling, which keeps the main model's distribution). Logits processors, stopping criteria and streamers are
transformers' own. The loop is `MtpGenerationMixin._assisted_decoding`: transformers' steps without the per-step
bookkeeping that outweighs the draft's gain on a small model; transformers' own loop runs where ours does not serve.

transformers' `MTPCandidateGenerator` cannot serve this model (why `GenerationMixin.generate(use_mtp=True)` fails
for it): it reads `num_mtp_layers` from the config ("Could not find `num_mtp_layers`"; our config, like DeepSeek's,
says `num_nextn_predict_layers`), and given that, it rebuilds the MTP layers as its own `MtpLayer` around the class of
`layers[-1]` and reloads their weights from the checkpoint files named by `name_or_path` (an `AttributeError` for a
model built in memory). Ours are DeepSeek's modules (embedding first in `eh_proj`, a MoE block, `shared_head.norm`),
already loaded with the model. So the draft chain here is a `CandidateGenerator` of our own that runs
`DeepseekMoeForCausalLM.mtp_hidden_states` and the shared head, plugged in through `_get_candidate_generator`.

Drafting adapts: a draft step pays only if it emits more tokens than it costs in plain steps (its time over the time of
its own verify pass, on a CPU in the thread's own CPU time, so other processes on a busy machine do not count). The
generator measures both, pauses drafting when drafts do not pay, and probes again after a pause that doubles after
every failed probe. While drafting, each step drafts the number of tokens with the most expected tokens per second,
from one per MTP module up to `EXTRA_DEPTHS` more (the last module run again), judged from the acceptance measured at
each depth. The acceptance rate and every decision are reported on the output of
`generate(..., return_dict_in_generate=True)`.

Model-code sibling (imported by the modeling file), so it only depends on torch and transformers.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationConfig, GenerationMixin
from transformers.generation.candidate_generator import CandidateGenerator
from transformers.generation.logits_process import LogitsProcessorList
from transformers.generation.stopping_criteria import StoppingCriteriaList
from transformers.generation.utils import GenerateDecoderOnlyOutput, _speculative_sampling

from .cache_deepseek_moe import LatentCache


@dataclass
class MtpGenerateOutput(GenerateDecoderOnlyOutput):
    """transformers' generate output plus how the MTP draft did.

    `acceptance_rate`: drafted tokens the main model accepted, over drafted tokens.
    `draft_steps` / `plain_steps`: main-model passes after the prefill that verified drafts / ran without (paused).
    `tokens_per_step`: tokens emitted per main-model pass after the prefill (1.0 = plain decoding).
    `mtp_decisions`: when drafting paused or resumed, and why (one line each).
    """

    acceptance_rate: float | None = None
    drafted_tokens: int | None = None
    accepted_tokens: int | None = None
    draft_steps: int | None = None
    plain_steps: int | None = None
    tokens_per_step: float | None = None
    mtp_decisions: list[str] | None = None


@dataclass
class DraftStatistics:
    drafted: int = 0
    accepted: int = 0
    draft_steps: int = 0
    plain_steps: int = 0
    emitted: int = 0
    decisions: list[str] = field(default_factory=list)

    def merge(self, other: DraftStatistics, label: str) -> None:
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.draft_steps += other.draft_steps
        self.plain_steps += other.plain_steps
        self.emitted += other.emitted
        self.decisions += [label + decision for decision in other.decisions]


class AdaptiveDrafting:
    """When to draft: while a draft step emits more tokens than it costs, in units of its own verify pass.

    A draft step costs its drafting plus one main-model pass over D + 1 tokens; a plain step costs one pass over one
    token, which the verify pass of the same step stands in for (timed at the same moment, so a busy machine's
    changing load cancels out; it is an over-estimate, so borderline drafts are kept rather than dropped). Drafting
    pays while the mean tokens per draft step is at least the median of (step time / verify time), both over the
    last `WINDOW` draft steps. A draft step that first runs the MTP modules over the prompt or over the positions
    passed while paused (one batched pass per depth) counts for its tokens but not for its time, which is not
    typical. The first decision comes after `FIRST_STEPS` draft steps (one of them timed at least); a pause lasts
    `FIRST_PAUSE` plain steps, then one draft step probes (judged with the draft steps before it: it is the one
    that catches up, so drafting a model whose drafts are never accepted costs that one step per pause) and the
    pause doubles (up to `MAX_PAUSE`) after every probe that still does not pay."""

    FIRST_STEPS = 2
    PROBE_STEPS = 1
    WINDOW = 8
    FIRST_PAUSE = 32
    MAX_PAUSE = 512

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.drafting = True
        self.steps_in_mode = 0
        self.steps_before_decision = self.FIRST_STEPS
        self.pause = self.FIRST_PAUSE
        self.tokens: deque[int] = deque(maxlen=self.WINDOW)  # tokens emitted per draft step
        self.costs: deque[float] = deque(maxlen=self.WINDOW)  # step time / verify time of the timed ones

    def record(self, drafted: bool, tokens: int, seconds: float, drafting_seconds: float, timed: bool) -> None:
        self.steps_in_mode += 1
        if drafted:
            self.tokens.append(tokens)
            if timed:
                self.costs.append(seconds / max(seconds - drafting_seconds, 1e-9))

    def decide(self, position: int) -> tuple[bool, str | None]:
        """Whether to draft this step, and a line saying why when the decision changes."""
        if not self.enabled:
            return True, None
        if self.drafting and self.steps_in_mode >= self.steps_before_decision and self.costs:
            tokens = sum(self.tokens) / len(self.tokens)
            cost = statistics.median(self.costs)
            if tokens < cost:
                self.drafting, self.steps_in_mode = False, 0
                return False, (
                    f"pause at length {position}: {tokens:.2f} tokens per draft step < its cost of {cost:.2f} "
                    f"plain steps; probe again after {self.pause} steps"
                )
            if self.steps_before_decision == self.PROBE_STEPS:  # the first decision after a probe
                self.pause, self.steps_before_decision = self.FIRST_PAUSE, 0
                return True, f"drafting resumes at length {position}: {tokens:.2f} tokens per draft step >= {cost:.2f}"
        elif not self.drafting and self.steps_in_mode >= self.pause:
            self.drafting, self.steps_in_mode, self.steps_before_decision = True, 0, self.PROBE_STEPS
            self.pause = min(2 * self.pause, self.MAX_PAUSE)
            return True, f"probe at length {position}"
        return self.drafting, None


class DraftLength:
    """How many tokens a draft step drafts, from 1 to `most`: the number with the most expected tokens per second.

    Drafting L tokens emits 1 + Σ_{k<=L} a_1···a_k tokens on average, a_k being how often depth k's draft is accepted
    once the drafts before it were, and costs v + L·δ: the verify pass with the loop (v) and one MTP pass per depth
    (δ), medians over the last `WINDOW` timed draft steps (in the same clock as `AdaptiveDrafting`). Each a_k is the
    mean over the last `WINDOW` steps that reached depth k. A depth not drafted yet counts as good as the one before
    it, so the length grows one depth at a time while that pays, and shrinks when a depth stops paying. It starts at
    `start` (one draft per MTP module); without `enabled` it stays at `most`."""

    WINDOW = 16

    def __init__(self, start: int, most: int, enabled: bool) -> None:
        self.enabled = enabled
        self.most = most
        self.length = min(start, most) if enabled else most
        self.accepted = [deque(maxlen=self.WINDOW) for _ in range(most)]  # per depth, when its draft was judged
        self.verify_seconds: deque[float] = deque(maxlen=self.WINDOW)
        self.depth_seconds: deque[float] = deque(maxlen=self.WINDOW)

    def record(self, drafted: int, accepted: int, seconds: float, drafting_seconds: float, timed: bool) -> None:
        for depth in range(min(accepted + 1, drafted)):  # the depths judged: up to the first rejected draft
            self.accepted[depth].append(depth < accepted)
        if timed and drafted:
            self.verify_seconds.append(seconds - drafting_seconds)
            self.depth_seconds.append(drafting_seconds / drafted)

    def decide(self, position: int) -> str | None:
        """Sets `length` for this step; a line saying why when it changes."""
        if not self.enabled or not self.verify_seconds:
            return None
        verify, per_depth = statistics.median(self.verify_seconds), statistics.median(self.depth_seconds)
        options, tokens, reach, rate = {}, 1.0, 1.0, None  # length -> (expected tokens, seconds) of a draft step
        for depth, judged in enumerate(self.accepted):
            if judged:
                rate = sum(judged) / len(judged)
            elif depth == 0 or not self.accepted[depth - 1]:
                break  # neither this depth nor the one before it was judged: no rate to go on
            reach *= rate
            tokens += reach
            options[depth + 1] = tokens, verify + (depth + 1) * per_depth
        best = max(options, key=lambda length: options[length][0] / options[length][1])
        if best == self.length or self.length not in options:
            return None
        (tokens, seconds), (old_tokens, old_seconds) = options[best], options[self.length]
        self.length = best
        return (
            f"{best} drafts per step from length {position}: {tokens:.2f} tokens per {seconds * 1e3:.2f} ms expected, "
            f"against {old_tokens:.2f} per {old_seconds * 1e3:.2f} ms"
        )


def _crop_layer(cache: Cache, index: int, length: int) -> None:
    """Keep the first `length` positions of one cache layer (MTP depths each keep a different length)."""
    if index < len(cache.layers):
        extra = cache.layers[index].get_seq_length() - length
        if extra > 0:
            cache.layers[index].crop(-extra)


class PositionBuffer:
    """Hidden states of the positions [start, end), written in place into spare rows; when the rows run out, the live
    ones (those from `start`, few) move to the front of a buffer at least twice their number. So a step copies only
    its own rows, and a long generation neither copies nor keeps its whole history."""

    SPARE_ROWS = 64

    def __init__(self) -> None:
        self.buffer: torch.Tensor | None = None
        self.offset = 0  # the position of the buffer's first row
        self.start = 0
        self.end = 0

    def write(self, position: int, states: torch.Tensor) -> None:
        """Replaces the positions from `position` on with `states`."""
        if self.buffer is None:
            self.start = self.offset = position
        end = position + states.shape[1]
        if self.buffer is None or end - self.offset > self.buffer.shape[1]:
            live = None if self.buffer is None else self.read(self.start, position).clone()
            rows = 2 * (end - self.start) + self.SPARE_ROWS
            self.buffer = states.new_empty(states.shape[0], rows, states.shape[2])
            self.offset = self.start
            if live is not None:
                self.buffer[:, : live.shape[1]] = live
        self.buffer[:, position - self.offset : end - self.offset] = states
        self.end = end

    def read(self, begin: int, end: int) -> torch.Tensor:
        return self.buffer[:, begin - self.offset : end - self.offset]

    def drop_before(self, position: int) -> None:
        self.start = position


class MtpCandidateGenerator(CandidateGenerator):
    """Drafts with the MTP chain: depth k turns h^{k-1} and the embedding of the token k steps ahead into h^k and
    predicts the token k + 1 steps ahead; the last position of each depth drafts one token. Depths beyond the
    model's D modules run module D again (its h^{k-1} standing in for h^{D-1}), so a model with one module, like
    DeepSeek-V3, can draft several tokens a step.

    Each depth keeps its own cache over the positions whose inputs are all real (verified) tokens; drafted positions
    are recomputed next step. The main model's final hidden states h^0 are read by a forward hook on its final norm
    (cheaper than `output_hidden_states`, which records every layer); `close` removes the hook."""

    requires_model_outputs = True
    model_kwargs_overrides: dict = {}

    def __init__(
        self,
        model,
        max_length: int,
        do_sample: bool,
        logits_processor: LogitsProcessorList | None,
        num_draft_tokens: int,
        adaptive: bool,
    ) -> None:
        self.model = model
        self.max_length = max_length
        self.do_sample = do_sample
        self.logits_processor = logits_processor
        # as generate's; a depth that runs module D again keeps its keys in a cache of its own, at module D's index
        self.caches = [
            LatentCache(capacity=max_length) if model.config.uses_mla else DynamicCache()
            for _ in range(max(num_draft_tokens - model.config.num_nextn_predict_layers, 0) + 1)
        ]
        self.main_hidden = PositionBuffer()  # h^0 up to position n-1, from the first one depth 1 has not processed
        self.mtp_hidden = [PositionBuffer() for _ in range(num_draft_tokens)]  # h^k, from where depth k+1 resumes
        self.processed = [0] * num_draft_tokens
        self.schedule = AdaptiveDrafting(adaptive)
        self.length = DraftLength(model.config.num_nextn_predict_layers, num_draft_tokens, adaptive)
        self.statistics = DraftStatistics()
        # What other processes take from this one must not count: on a CPU the thread's own time, on an accelerator
        # the wall time (the loop waits for the device at every step).
        self.clock = time.thread_time if model.device.type == "cpu" else time.perf_counter
        self.step_start: float | None = None
        self.step_drafted = False
        self.step_drafting_seconds = 0.0
        self.step_tokens = 0
        self.step_drafts = 0
        self.last_hidden: torch.Tensor | None = None
        self.inference_mode = not any(hasattr(module, "_hf_hook") for module in model.modules())
        self.hook = model.model.norm.register_forward_hook(self.keep_last_hidden)

    def keep_last_hidden(self, module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.last_hidden = output

    def close(self) -> None:
        self.hook.remove()

    def get_candidates(
        self,
        input_ids: torch.LongTensor,
        model_kwargs: dict,
        model_outputs,
        is_first_iteration: bool,
        n_last_matches: int,
        **kwargs,
    ) -> tuple[torch.LongTensor, torch.Tensor | None]:
        now = self.clock()
        if is_first_iteration:  # the main model's prefill comes first: drafts need its hidden states
            return input_ids, None
        if self.step_start is not None:
            seconds, timed = now - self.step_start, self.step_drafted != "catching up"
            self.schedule.record(bool(self.step_drafted), self.step_tokens, seconds, self.step_drafting_seconds, timed)
            if self.step_drafted:
                self.length.record(self.step_drafts, self.step_tokens - 1, seconds, self.step_drafting_seconds, timed)
        self.step_start, self.step_drafted, self.step_drafting_seconds = now, False, 0.0

        hidden = self.last_hidden  # the prefill's positions, else [t_n, accepted drafts, rejected ones]
        if self.main_hidden.buffer is not None:
            hidden = hidden[:, : n_last_matches + 1]
        self.main_hidden.write(self.main_hidden.end, hidden)
        if self.main_hidden.end != input_ids.shape[1] - 1:
            raise RuntimeError("MTP drafting lost track of the main model's positions (chunked prefill?)")

        draft, decision = self.schedule.decide(input_ids.shape[1])
        if decision is not None:
            self.statistics.decisions.append(decision)
        if draft and (decision := self.length.decide(input_ids.shape[1])) is not None:
            self.statistics.decisions.append(decision)
        depths = min(self.length.length, self.max_length - input_ids.shape[1] - 1)
        if not draft or depths < 1:
            return input_ids, None
        # A step that first runs an MTP depth over the prompt or over positions passed while it did not run (paused,
        # or drafting fewer tokens) is not timed.
        behind = max(input_ids.shape[1] - k - self.processed[k - 1] for k in range(1, depths + 1))
        self.step_drafted = "catching up" if behind > depths + 1 else True
        self.step_drafts = depths
        # Drafting state (the depths' cache and hidden states) never leaves the generator, and what it returns is only
        # read, so it runs in inference mode, which spares each op autograd's bookkeeping (15% of a draft on CPU);
        # not under accelerate's offloading hooks, whose weights loaded for the draft would become inference tensors.
        with torch.inference_mode(self.inference_mode):
            candidate_ids, candidate_logits = self.draft(
                input_ids, model_kwargs.get("attention_mask"), model_kwargs["position_ids"], depths
            )
        self.step_drafting_seconds = self.clock() - now
        return candidate_ids, candidate_logits

    def draft(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.LongTensor,
        depths: int,
    ) -> tuple[torch.LongTensor, torch.Tensor]:
        """Runs depths 1..`depths` over every position not yet processed and drafts one token per depth.
        `attention_mask` (None without padding) and `position_ids` cover the sequence so far, as `generate` keeps
        them."""
        model, embed = self.model, self.model.model.embed_tokens
        n = input_ids.shape[1] - 1  # t_n is known, not yet cached by the main model
        mask = None if attention_mask is None else attention_mask[:, :n]
        previous, known, logits = self.main_hidden, input_ids, []
        modules = model.config.num_nextn_predict_layers
        for k in range(1, depths + 1):
            start, module = self.processed[k - 1], min(k, modules)
            cache = self.caches[k - module]
            _crop_layer(cache, model.config.num_hidden_layers + module - 1, start)
            hidden_k, head_input = model.mtp_hidden_states(
                module,
                previous.read(start, n),
                embed(known[:, start + k : n + k]),
                mask,
                position_ids[:, start:n],
                cache=cache,
            )
            previous.drop_before(n - k + 1)  # depth k resumes there next step; nothing reads h^{k-1} before it
            previous = self.mtp_hidden[k - 1]
            previous.write(start, hidden_k)
            self.processed[k - 1] = n - k + 1  # position i used t_{i+k}, real only while i + k <= n
            next_logits = model.lm_head(head_input[:, -1]).float()
            if self.logits_processor:
                next_logits = self.logits_processor(known, next_logits)
            if self.do_sample:
                token = torch.multinomial(next_logits.softmax(-1), num_samples=1)
            else:
                token = next_logits.argmax(-1, keepdim=True)
            logits.append(next_logits)
            known = torch.cat([known, token], 1)
        return known, torch.stack(logits, 1)

    def update_candidate_strategy(self, input_ids: torch.LongTensor, scores: torch.Tensor, num_matches: int) -> None:
        if self.main_hidden.buffer is None:  # the prefill's token: not a step of the draft's
            return
        statistics, drafted = self.statistics, scores.shape[1] - 1
        self.step_tokens = int(num_matches) + 1
        statistics.emitted += self.step_tokens
        if drafted:
            statistics.draft_steps += 1
            statistics.drafted += drafted
            statistics.accepted += int(num_matches)
        else:
            statistics.plain_steps += 1


# Depths beyond the model's modules that adaptive drafting may try by default (SGLang's NEXTN mode likewise runs
# DeepSeek-V3's one module for several draft steps, `--speculative-num-steps`).
EXTRA_DEPTHS = 2


class MtpGenerationMixin(GenerationMixin):
    """`generate(use_mtp=True, num_draft_tokens=None, mtp_adaptive=True)`: transformers' assisted generation with the
    MTP draft (see the module docstring). `num_draft_tokens` (or transformers' `num_assistant_tokens`, when passed)
    bounds the drafts per step; beyond the model's MTP modules the last module runs again. By default: one per module
    (`num_nextn_predict_layers`), plus `EXTRA_DEPTHS` when drafting adapts. Adaptive drafting
    (the default) starts at one draft per module and drafts the number that pays (`DraftLength`), and pauses when
    none does (`AdaptiveDrafting`); `mtp_adaptive=False` drafts `num_draft_tokens` at every step.

    transformers' assisted loop serves one sequence at a time, so a batch is generated row by row (each row with its
    own padding) and the rows are right-padded with `pad_token_id` to a common length, as `generate` pads rows that
    ended early. With `return_dict_in_generate=True` the output is an `MtpGenerateOutput`."""

    def generate(self, inputs: torch.Tensor | None = None, *args, **kwargs):
        num_draft_tokens = kwargs.pop("num_draft_tokens", None)
        adaptive = kwargs.pop("mtp_adaptive", True)
        generation_config = kwargs.get("generation_config", args[0] if args else None) or self.generation_config
        if not kwargs.get("use_mtp", generation_config.use_mtp):
            if num_draft_tokens is not None:
                raise ValueError("num_draft_tokens needs use_mtp=True")
            return super().generate(inputs, *args, **kwargs)
        depth = self.config.num_nextn_predict_layers
        if depth == 0:
            raise ValueError(
                "use_mtp needs multi-token prediction modules, and this model has none (num_nextn_predict_layers=0)"
            )
        if (kwargs.get("num_beams") or generation_config.num_beams or 1) > 1:
            raise ValueError("use_mtp drafts for greedy decoding and sampling; beam search (num_beams > 1) takes none")
        if num_draft_tokens is None:
            num_draft_tokens = kwargs.get("num_assistant_tokens") or depth + (EXTRA_DEPTHS if adaptive else 0)
        if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int) or num_draft_tokens < 1:
            raise ValueError(f"use_mtp needs num_draft_tokens to be a positive integer, got {num_draft_tokens!r}")
        self._mtp_options = {"num_draft_tokens": num_draft_tokens, "adaptive": adaptive, "generators": []}
        try:
            input_ids = kwargs.get("input_ids", inputs)
            if input_ids is not None and input_ids.shape[0] > 1:
                output = self._generate_rows(input_ids, args, kwargs)
            else:
                output = super().generate(inputs, *args, **kwargs)
        finally:
            generators = self._mtp_options["generators"]
            for generator in generators:
                generator.close()
            del self._mtp_options
        statistics = DraftStatistics()
        for row, generator in enumerate(generators):
            label = f"row {row}: " if len(generators) > 1 else ""
            statistics.merge(generator.statistics, label)
        if not isinstance(output, GenerateDecoderOnlyOutput):
            return output
        steps = statistics.draft_steps + statistics.plain_steps
        return MtpGenerateOutput(
            **output,
            acceptance_rate=statistics.accepted / statistics.drafted if statistics.drafted else 0.0,
            drafted_tokens=statistics.drafted,
            accepted_tokens=statistics.accepted,
            draft_steps=statistics.draft_steps,
            plain_steps=statistics.plain_steps,
            tokens_per_step=statistics.emitted / steps if steps else 0.0,
            mtp_decisions=statistics.decisions,
        )

    def _generate_rows(self, input_ids: torch.LongTensor, args: tuple, kwargs: dict):
        """One `generate` per row, right-padded to a common length with the pad (else end-of-sequence) token."""
        generation_config = kwargs.get("generation_config", args[0] if args else None) or self.generation_config
        for name in ("output_scores", "output_logits", "output_attentions", "output_hidden_states"):
            if kwargs.get(name, getattr(generation_config, name)):
                raise ValueError(f"generate(use_mtp=True) with {name} serves one sequence at a time (batch size 1)")
        if "inputs_embeds" in kwargs:
            raise ValueError("generate(use_mtp=True) with inputs_embeds serves one sequence at a time (batch size 1)")
        attention_mask = kwargs.pop("attention_mask", None)
        kwargs.pop("input_ids", None)
        outputs = [
            super(MtpGenerationMixin, self).generate(
                input_ids[row : row + 1],
                *args,
                attention_mask=None if attention_mask is None else attention_mask[row : row + 1],
                **kwargs,
            )
            for row in range(input_ids.shape[0])
        ]
        rows = [out.sequences if isinstance(out, GenerateDecoderOnlyOutput) else out for out in outputs]
        pad = kwargs.get("pad_token_id", generation_config.pad_token_id)
        if pad is None:
            eos = kwargs.get("eos_token_id", generation_config.eos_token_id)
            pad = eos[0] if isinstance(eos, list) else eos
        length = max(row.shape[1] for row in rows)
        if pad is None and any(row.shape[1] < length for row in rows):
            raise ValueError("rows of different lengths need a pad_token_id (or eos_token_id) to be padded")
        sequences = torch.cat([torch.nn.functional.pad(row, (0, length - row.shape[1]), value=pad) for row in rows])
        if isinstance(outputs[0], GenerateDecoderOnlyOutput):
            return GenerateDecoderOnlyOutput(sequences=sequences)
        return sequences

    def _assisted_decoding(
        self,
        input_ids: torch.LongTensor,
        logits_processor: LogitsProcessorList,
        stopping_criteria: StoppingCriteriaList,
        generation_config: GenerationConfig,
        synced_gpus: bool = False,
        streamer=None,
        inputs_tensor: torch.Tensor | None = None,
        assistant_model=None,
        assistant_tokenizer=None,
        tokenizer=None,
        **model_kwargs,
    ):
        """The decoding loop of `generate(use_mtp=True)`: transformers' assisted decoding (the same steps, results and
        random draws) without the per-step work an MTP draft does not need and a small model feels (copying and
        re-growing the model kwargs, re-slicing the mask and position ids, cloning logits nobody asked for, the
        encoder-decoder and assistant-model branches): the mask and position ids up to `max_length` are made once
        and sliced. transformers' own loop runs where this one does not serve: another candidate generator,
        `synced_gpus`, attentions or hidden states in the output, `assistant_ensemble_weight`, `inputs_embeds`,
        inputs on another device than the model's."""
        config = generation_config
        if (
            getattr(self, "_mtp_options", None) is None
            or synced_gpus
            or config.output_attentions
            or config.output_hidden_states
            or config.assistant_ensemble_weight is not None
            or model_kwargs.get("inputs_embeds") is not None
            or model_kwargs.get("cache") is None
            or (self.device.type != "meta" and input_ids.device != self.device)
        ):
            return super()._assisted_decoding(
                input_ids,
                logits_processor,
                stopping_criteria,
                generation_config,
                synced_gpus=synced_gpus,
                streamer=streamer,
                inputs_tensor=inputs_tensor,
                assistant_model=assistant_model,
                assistant_tokenizer=assistant_tokenizer,
                tokenizer=tokenizer,
                **model_kwargs,
            )
        cache = model_kwargs["cache"]
        cache.activate_past_recording()
        generator = self._get_candidate_generator(config, input_ids, inputs_tensor, logits_processor, model_kwargs)
        scores = () if config.return_dict_in_generate and config.output_scores else None
        raw_logits = () if config.return_dict_in_generate and config.output_logits else None
        model_forward = (
            self.get_compiled_call(config.compile_config)
            if self._valid_auto_compile_criteria(model_kwargs, config)
            else self.__call__
        )
        # The mask (present only with padding) and the position ids of the sequence once it reaches max_length.
        prompt_length, max_length = input_ids.shape[1], config.max_length
        positions = model_kwargs.pop("position_ids", None)
        if positions is None:  # a forward without position ids (wrapped): generate made none
            positions = self._prepare_position_ids_for_generation(input_ids, model_kwargs)
        steps = torch.arange(1, max_length - prompt_length + 1, device=positions.device)
        positions = torch.cat([positions, positions[:, -1:] + steps], -1)
        attention_mask = model_kwargs.pop("attention_mask", None)
        if attention_mask is not None:
            attention_mask = torch.nn.functional.pad(attention_mask, (0, max_length - prompt_length), value=1)

        def sequence_inputs(length: int) -> dict:  # the mask and position ids of the first `length` tokens
            mask = None if attention_mask is None else attention_mask[:, :length]
            return {"attention_mask": mask, "position_ids": positions[:, :length]}

        def step_inputs(ids: torch.LongTensor, new: int) -> dict:
            """The model inputs for the last `new` tokens of `ids`, as `prepare_inputs_for_generation` makes them
            (which runs where it does more: the 4D mask of a compilable cache)."""
            if cache.is_compileable:
                inputs = self.prepare_inputs_for_generation(
                    ids, next_sequence_length=new, **model_kwargs, **sequence_inputs(ids.shape[1])
                )
                return inputs | {"logits_to_keep": new}
            length = ids.shape[1]
            return model_kwargs | {
                "input_ids": ids[:, -new:],
                "position_ids": positions[:, length - new : length],
                "attention_mask": None if attention_mask is None else attention_mask[:, :length],
                "logits_to_keep": new,
            }

        prefill = self.prepare_inputs_for_generation(
            input_ids, is_first_iteration=True, **model_kwargs, **sequence_inputs(prompt_length)
        )
        outputs = self(**prefill)
        if not outputs.cache.is_croppable:
            raise ValueError("assisted decoding needs a cache that can be cropped back after rejected drafts")
        candidate_ids, candidate_logits = input_ids, None
        with self._optimize_model_for_decode():
            while True:
                candidate_length = candidate_ids.shape[1] - input_ids.shape[1]
                new_logits = outputs.logits[:, -candidate_length - 1 :].to(dtype=torch.float32, device=input_ids.device)
                unprocessed = new_logits.clone() if raw_logits is not None else None
                valid_tokens = self._mtp_valid_tokens(
                    config, logits_processor, input_ids.shape[1], candidate_ids, candidate_logits, new_logits
                )
                n_matches = valid_tokens.shape[1] - 1
                input_ids = torch.cat((input_ids, valid_tokens), dim=-1)
                if streamer is not None:
                    streamer.put(valid_tokens.cpu())
                if candidate_length > n_matches:
                    outputs.cache.crop(n_matches - candidate_length)
                generator.update_candidate_strategy(input_ids, new_logits, n_matches)
                if scores is not None:
                    scores += tuple(new_logits[:, : n_matches + 1].unbind(1))
                if raw_logits is not None:
                    raw_logits += tuple(unprocessed[:, : n_matches + 1].unbind(1))
                if stopping_criteria(input_ids, scores).all():
                    break
                candidate_ids, candidate_logits = generator.get_candidates(
                    input_ids,
                    sequence_inputs(input_ids.shape[1]),
                    outputs,
                    is_first_iteration=False,
                    n_last_matches=n_matches,
                )
                outputs = model_forward(**step_inputs(candidate_ids, candidate_ids.shape[1] - input_ids.shape[1] + 1))
        if streamer is not None:
            streamer.end()
        if not config.return_dict_in_generate:
            return input_ids
        return GenerateDecoderOnlyOutput(sequences=input_ids, scores=scores, logits=raw_logits, cache=cache)

    @staticmethod
    def _mtp_valid_tokens(
        config: GenerationConfig,
        logits_processor: LogitsProcessorList,
        length: int,
        candidate_ids: torch.LongTensor,
        candidate_logits: torch.Tensor | None,
        new_logits: torch.Tensor,
    ) -> torch.LongTensor:
        """The accepted drafts and the main model's next token, chosen as transformers' assisted decoding does:
        `new_logits` (the main model's, one position per draft + 1) go through the logits processors in place; with
        sampling and draft logits, speculative sampling decides; else the main model's choices are kept up to the
        first that differs from a draft. Nothing past `max_length` or the first end-of-sequence token is kept."""
        candidate_length = candidate_ids.shape[1] - length
        for i in range(candidate_length + 1) if logits_processor else ():
            new_logits[:, i] = logits_processor(candidate_ids[:, : length + i], new_logits[:, i])
        if config.do_sample and candidate_logits is not None:
            valid_tokens = _speculative_sampling(candidate_ids, candidate_logits, candidate_length, new_logits)[0]
        else:
            if config.do_sample:
                selected = torch.multinomial(new_logits[0].softmax(dim=-1), num_samples=1).squeeze(1)[None, :]
            else:
                selected = new_logits.argmax(dim=-1)
            drafts_kept = (candidate_ids[:, length:] == selected[:, :-1]).cumprod(dim=-1).sum()
            valid_tokens = selected[:, : int(drafts_kept) + 1]
        valid_tokens = valid_tokens[:, : config.max_length - length]
        eos_token_id = getattr(config, "_eos_token_tensor", None)
        if eos_token_id is not None:
            eos_positions = torch.isin(valid_tokens[0], eos_token_id.to(valid_tokens.device)).nonzero()
            if eos_positions.numel() > 0:
                valid_tokens = valid_tokens[:, : int(eos_positions[0]) + 1]
        return valid_tokens

    def _get_candidate_generator(
        self, generation_config, input_ids, inputs_tensor, logits_processor, model_kwargs, **kwargs
    ):
        options = getattr(self, "_mtp_options", None)
        if not generation_config.use_mtp or options is None:
            return super()._get_candidate_generator(
                generation_config, input_ids, inputs_tensor, logits_processor, model_kwargs, **kwargs
            )
        generator = MtpCandidateGenerator(
            self,
            max_length=generation_config.max_length,
            do_sample=generation_config.do_sample,
            logits_processor=logits_processor,
            num_draft_tokens=options["num_draft_tokens"],
            adaptive=options["adaptive"],
        )
        options["generators"].append(generator)
        return generator
