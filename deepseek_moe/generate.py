"""`deepseek-moe generate`: load a local or Hub model (ours or an official DeepSeek checkpoint) and stream a reply."""

from __future__ import annotations

import sys

import torch
from transformers import AutoTokenizer, TextStreamer
from transformers.generation.streamers import BaseStreamer

from .dtypes import load_dtype
from .model.modeling_deepseek_moe import DeepseekMoeForCausalLM


class TokenIdStreamer(BaseStreamer):
    """Prints generated token ids as they arrive, for checkpoints without a tokenizer."""

    def __init__(self, skip_prompt: bool = True) -> None:
        self.skip_prompt = skip_prompt

    def put(self, value: torch.Tensor) -> None:
        if self.skip_prompt:
            self.skip_prompt = False
            return
        print(" ".join(str(i) for i in value.reshape(-1).tolist()), end=" ", flush=True)

    def end(self) -> None:
        print(flush=True)


def load(model: str, dtype: str = "auto", revision: str | None = None):
    """The model and, when the checkpoint has one, its tokenizer."""
    loaded = DeepseekMoeForCausalLM.from_pretrained(model, dtype=load_dtype(dtype), revision=revision).eval()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model, revision=revision)
    except (OSError, ValueError):
        tokenizer = None
    return loaded, tokenizer


def generate(
    model_name: str,
    prompt: str | None,
    prompt_ids: list[int] | None,
    max_new_tokens: int,
    dtype: str = "auto",
    use_mtp: bool = False,
    revision: str | None = None,
) -> int:
    """Greedy generation streamed to stdout (text with a tokenizer, token ids without)."""
    model, tokenizer = load(model_name, dtype, revision)
    if prompt_ids is None:
        if tokenizer is None:
            raise ValueError(f"{model_name} has no tokenizer: pass the prompt as --prompt-ids")
        input_ids = tokenizer(prompt or "", return_tensors="pt").input_ids
    else:
        input_ids = torch.tensor([prompt_ids])
    if input_ids.shape[1] == 0:
        raise ValueError("the prompt is empty")
    input_ids = input_ids.to(model.device)
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False}
    if use_mtp:  # speculative decoding returns the whole sequence at the end
        output = model.generate(input_ids, use_mtp=True, return_dict_in_generate=True, **kwargs)
        new_tokens = output.sequences[0, input_ids.shape[1] :]
        text = tokenizer.decode(new_tokens) if tokenizer is not None else " ".join(map(str, new_tokens.tolist()))
        print(text)
        print(f"[MTP draft acceptance {output.acceptance_rate:.1%}]", file=sys.stderr)
        return 0
    streamer = TextStreamer(tokenizer, skip_prompt=True) if tokenizer is not None else TokenIdStreamer()
    model.generate(input_ids, streamer=streamer, **kwargs)
    return 0
