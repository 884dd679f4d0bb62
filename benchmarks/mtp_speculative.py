"""MTP self-speculative decoding: speed-up and acceptance against plain decoding, greedy and sampling, on a briefly
trained model and on an untrained one (whose drafts are never accepted, so adaptive drafting must pause).

A small V3-style model (D MTP modules) is trained briefly with the MTP loss on Python's standard-library sources,
byte-level (vocabulary 256); an untrained copy of the same architecture is the no-acceptance case. Each round runs
every arm once per prompt, arms alternating, so load on a shared machine hits them alike; times are medians over
rounds. Greedy MTP outputs must equal plain greedy outputs. Besides wall-clock tokens/s, each arm's CPU time (this
thread's, `time.thread_time`) is reported: on a shared machine other processes take the CPU in the middle of steps,
which wall time counts and CPU time does not, so the CPU-time ratios show what a quiet machine would.

    OMP_NUM_THREADS=1 python benchmarks/mtp_speculative.py --steps 300 --depth 1

The MTP arms draft adaptively (the default: as many tokens per step as pay, up to D + 2, pausing when none pays);
`--draft-tokens 1 2 3` adds trained-model arms drafting exactly that many tokens at every step (`num_draft_tokens=N,
mtp_adaptive=False`; beyond the model's D modules the last module runs again).

`--baseline-loop FILE` adds an arm running `mtp_greedy_generate` from an older `speculative.py` (the hand-written
greedy loop this package had before MTP went through transformers' assisted generation) on the same model:
`git show 7acead3:deepseek_moe/model/speculative.py > /tmp/old_speculative.py` (that file needs the model code of
its time: `mtp_hidden_states` returning one tensor, and `mtp_logits`).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import platform
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch

from deepseek_moe import DeepseekMoeConfig, DeepseekMoeForCausalLM


def corpus_bytes(limit: int) -> torch.Tensor:
    """Bytes of the standard library's .py files (sorted, so every run reads the same text)."""
    data = bytearray()
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        data += path.read_bytes()
        if len(data) >= limit:
            break
    return torch.tensor(list(data[:limit]), dtype=torch.long)


def train(model: DeepseekMoeForCausalLM, data: torch.Tensor, steps: int, batch: int, length: int) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(data) - length, (batch,), generator=generator)
        input_ids = torch.stack([data[s : s + length] for s in starts])
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return float(loss.detach())


def run_arms(
    arms: dict, prompts: list[torch.Tensor], rounds: int, new_tokens: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median over rounds of each arm's wall and CPU seconds for all prompts; within a round the arms alternate per
    prompt."""
    wall, cpu = ({name: [] for name in arms} for _ in range(2))
    for _ in range(rounds):
        wall_totals, cpu_totals = dict.fromkeys(arms, 0.0), dict.fromkeys(arms, 0.0)
        for prompt in prompts:
            for name, (model, options) in arms.items():
                torch.manual_seed(0)
                start, start_cpu = time.perf_counter(), time.thread_time()
                model.generate(prompt, max_new_tokens=new_tokens, eos_token_id=None, **options)
                wall_totals[name] += time.perf_counter() - start
                cpu_totals[name] += time.thread_time() - start_cpu
        for name in arms:
            wall[name].append(wall_totals[name])
            cpu[name].append(cpu_totals[name])
    median = {name: statistics.median(times) for name, times in wall.items()}
    return median, {name: statistics.median(times) for name, times in cpu.items()}


def cost_breakdown(
    model: DeepseekMoeForCausalLM, prompts: list[torch.Tensor], new_tokens: int, draft_tokens: list[int]
) -> None:
    """Where a greedy step's CPU time goes, plain and with MTP: the main model's forward passes, the MTP drafts
    (`MtpCandidateGenerator.draft`) and the rest (the decoding loop), timed by wrapping the two functions."""
    from deepseek_moe.model import speculative

    spent = {"forward": 0.0, "draft": 0.0}

    def timed(function, key: str):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            start = time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                spent[key] += time.thread_time() - start

        return wrapper

    forward, draft = type(model).forward, speculative.MtpCandidateGenerator.draft
    type(model).forward, speculative.MtpCandidateGenerator.draft = timed(forward, "forward"), timed(draft, "draft")
    try:
        fixed = ({"use_mtp": True, "num_draft_tokens": n, "mtp_adaptive": False} for n in draft_tokens)
        for options in ({}, {"use_mtp": True}, *fixed):
            spent.update(forward=0.0, draft=0.0)
            steps = drafts = 0
            start = time.thread_time()
            for prompt in prompts:
                out = model.generate(
                    prompt, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, **options,
                    return_dict_in_generate=True,
                )  # fmt: skip
                steps += getattr(out, "draft_steps", new_tokens - 1) + getattr(out, "plain_steps", 0)
                drafts += getattr(out, "draft_steps", 0)
            total = time.thread_time() - start
            rest = total - spent["forward"] - spent["draft"]
            per_draft = f"{spent['draft'] / drafts * 1e3:.3f} ms per draft, " if drafts else ""
            drafting = f"MTP ({options['num_draft_tokens']} drafts)" if "num_draft_tokens" in options else "MTP"
            print(
                f"{drafting if options else 'plain'} greedy, trained model: {total * 1e3:.0f} ms CPU for "
                f"{len(prompts) * new_tokens} tokens in {steps} steps after the prefills; forward passes "
                f"(prefills included) {spent['forward'] * 1e3:.0f} ms, drafts {spent['draft'] * 1e3:.0f} ms "
                f"({per_draft}{drafts} drafts), the rest {rest * 1e3:.0f} ms ({rest / steps * 1e3:.3f} ms per step)"
            )
    finally:
        type(model).forward, speculative.MtpCandidateGenerator.draft = forward, draft


class BaselineLoop:
    """`generate`-like access to an older file's `mtp_greedy_generate`, so it runs as one more arm."""

    def __init__(self, path: str, model: DeepseekMoeForCausalLM) -> None:
        spec = importlib.util.spec_from_file_location("old_speculative", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # its dataclasses look their module up
        spec.loader.exec_module(module)
        self.loop, self.model = module.mtp_greedy_generate, model

    def generate(self, prompt: torch.Tensor, max_new_tokens: int, eos_token_id=None, **options):
        return self.loop(self.model, prompt, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--depth", type=int, default=1, help="num_nextn_predict_layers")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--baseline-loop", metavar="FILE", help="an older speculative.py to time as one more arm")
    parser.add_argument("--breakdown", action="store_true", help="also print where a step's CPU time goes")
    parser.add_argument(
        "--draft-tokens", type=int, nargs="+", default=[], metavar="N", help="more arms drafting N tokens per step"
    )
    parser.add_argument(
        "--trained", metavar="DIR", help="load the trained model from DIR, else train it and save it there"
    )
    args = parser.parse_args()

    torch.manual_seed(0)
    config = DeepseekMoeConfig.from_preset(
        "tiny-v3", vocab_size=256, hidden_size=128, num_hidden_layers=4, num_nextn_predict_layers=args.depth
    )
    untrained = DeepseekMoeForCausalLM(config).eval()
    data = corpus_bytes(2_000_000)
    start = time.perf_counter()
    if args.trained and Path(args.trained, "config.json").exists():
        model, loss = DeepseekMoeForCausalLM.from_pretrained(args.trained), float("nan")
    else:
        model = DeepseekMoeForCausalLM(config)
        loss = train(model, data, args.steps, batch=16, length=128)
        if args.trained:
            model.save_pretrained(args.trained)
    train_time = time.perf_counter() - start
    model.eval()

    generator = torch.Generator().manual_seed(1)
    starts = torch.randint(0, len(data) - 32, (args.prompts,), generator=generator)
    prompts = [data[s : s + 32][None] for s in starts]
    sample = {"do_sample": True, "temperature": 0.7, "top_k": 0}
    arms = {
        "trained greedy plain": (model, {"do_sample": False}),
        "trained greedy MTP": (model, {"do_sample": False, "use_mtp": True}),
    }
    fixed = {"use_mtp": True, "mtp_adaptive": False}
    for n in args.draft_tokens:
        arms[f"trained greedy MTP, {n} drafts every step"] = (
            model,
            {"do_sample": False, **fixed, "num_draft_tokens": n},
        )
    if args.baseline_loop:
        arms["trained greedy MTP (older loop)"] = (BaselineLoop(args.baseline_loop, model), {})
    arms |= {
        "trained sampling plain": (model, sample),
        "trained sampling MTP": (model, {**sample, "use_mtp": True}),
        **{
            f"trained sampling MTP, {n} drafts every step": (model, {**sample, **fixed, "num_draft_tokens": n})
            for n in args.draft_tokens
        },
        "untrained greedy plain": (untrained, {"do_sample": False}),
        "untrained greedy MTP adaptive": (untrained, {"do_sample": False, "use_mtp": True}),
        "untrained greedy MTP always": (untrained, {"do_sample": False, "use_mtp": True, "mtp_adaptive": False}),
    }
    # Correctness first: greedy MTP equals plain greedy, and the MTP statistics of one pass over the prompts.
    stats = {name: [0, 0, 0, 0] for name in arms if "MTP" in name}
    for prompt in prompts:
        plain = {id(m): m.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None)
                 for m in (model, untrained)}  # fmt: skip
        for name in stats:
            model_, options = arms[name]
            model_ = model_.model if isinstance(model_, BaselineLoop) else model_
            torch.manual_seed(0)
            out = arms[name][0].generate(
                prompt, max_new_tokens=args.new_tokens, eos_token_id=None, return_dict_in_generate=True, **options
            )
            if "greedy" in name:
                assert torch.equal(out.sequences, plain[id(model_)]), f"{name}: output differs from plain greedy"
            counts = stats[name]
            counts[0] += out.accepted_tokens
            counts[1] += out.drafted_tokens
            counts[2] += getattr(out, "draft_steps", None) or 0  # the older loop drafts at every step
            counts[3] += getattr(out, "plain_steps", None) or 0
    timings, cpu_timings = run_arms(arms, prompts, args.rounds, args.new_tokens)

    tokens = args.prompts * args.new_tokens
    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    trained = f"loaded from {args.trained}" if loss != loss else f"trained {args.steps} steps (loss {loss:.3f})"
    print(f"model: tiny-v3 h128 L4 D={args.depth}, {trained} in {train_time:.0f} s")
    print(f"{args.prompts} prompts x {args.new_tokens} new tokens, batch 1, {args.rounds} rounds, medians")
    print("| arm | tokens/s | vs plain | CPU tokens/s | vs plain | acceptance | draft steps / plain steps |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, seconds in timings.items():
        plain = name.split(" MTP")[0].removesuffix(" plain") + " plain"
        ratio, cpu_ratio = timings[plain] / seconds, cpu_timings[plain] / cpu_timings[name]
        acceptance = steps = "—"
        if name in stats:
            accepted, drafted, draft_steps, plain_steps = stats[name]
            acceptance = f"{accepted / drafted:.1%} ({accepted}/{drafted})" if drafted else "no drafts"
            steps = f"{draft_steps} / {plain_steps}"
        cpu = f"{tokens / cpu_timings[name]:.1f} | {cpu_ratio:.2f}x"
        print(f"| {name} | {tokens / seconds:.1f} | {ratio:.2f}x | {cpu} | {acceptance} | {steps} |")
    if args.breakdown:
        cost_breakdown(model, prompts, args.new_tokens, args.draft_tokens)


if __name__ == "__main__":
    main()
