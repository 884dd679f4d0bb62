"""MTP self-speculative decoding: acceptance rate and tokens/s against plain greedy decoding.

A small V3-style model (D MTP modules) is trained briefly with the MTP loss on Python's standard-library sources,
byte-level (vocabulary 256), then both decoders generate from the same prompts; their outputs must be identical.

    python benchmarks/mtp_speculative.py --steps 300 --depth 1
"""

from __future__ import annotations

import argparse
import platform
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


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--depth", type=int, default=1, help="num_nextn_predict_layers")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=8)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = DeepseekMoeConfig.from_preset(
        "tiny-v3", vocab_size=256, hidden_size=128, num_hidden_layers=4, num_nextn_predict_layers=args.depth
    )
    model = DeepseekMoeForCausalLM(config)
    data = corpus_bytes(2_000_000)
    train_time, loss = timed(lambda: train(model, data, args.steps, batch=16, length=128))
    model.eval()

    generator = torch.Generator().manual_seed(1)
    starts = torch.randint(0, len(data) - 32, (args.prompts,), generator=generator)
    prompts = [data[s : s + 32][None] for s in starts]
    plain_time = mtp_time = 0.0
    accepted = drafted = 0
    for prompt in prompts:
        seconds, plain = timed(
            lambda p=prompt: model.generate(p, max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None)
        )
        plain_time += seconds
        seconds, out = timed(
            lambda p=prompt: model.generate(
                p, max_new_tokens=args.new_tokens, use_mtp=True, eos_token_id=None, return_dict_in_generate=True
            )
        )
        mtp_time += seconds
        assert torch.equal(out.sequences, plain), "speculative output differs from plain greedy"
        accepted, drafted = accepted + out.accepted_tokens, drafted + out.drafted_tokens

    tokens = args.prompts * args.new_tokens
    machine = platform.processor() or platform.machine()
    print(f"machine: {machine}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"model: tiny-v3 h128 L4 D={args.depth}, trained {args.steps} steps in {train_time:.0f} s (loss {loss:.3f})")
    print(f"acceptance rate {accepted / drafted:.1%} ({accepted}/{drafted} drafted tokens)")
    print(
        f"plain greedy {tokens / plain_time:.1f} tok/s, MTP speculative {tokens / mtp_time:.1f} tok/s, "
        f"speed-up {plain_time / mtp_time:.2f}x (batch 1, {args.new_tokens} new tokens, outputs identical)"
    )


if __name__ == "__main__":
    main()
