"""`deepseek-moe generate`: load a local or Hub model (ours or an official DeepSeek checkpoint) and stream a reply.

Everything that can be wrong with the request (a missing folder, a truncated shard, token ids outside the vocabulary,
no tokenizer for a text prompt, `--use-mtp` without MTP modules, a device this machine lacks) is found from the config,
the tokenizer files and the shard headers, before any weight is loaded."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, TextStreamer
from transformers.generation.streamers import BaseStreamer

from .conversion.safetensors_io import read_header
from .dtypes import load_dtype
from .model.configuration_deepseek_moe import DeepseekMoeConfig
from .model.modeling_deepseek_moe import DeepseekMoeForCausalLM
from .model.quantization_deepseek_moe import SPREADING_DEVICE_MAPS


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


def resolve_source(model: str) -> str:
    """A local folder as a path (checked), anything that cannot be a local path as a Hub repo id.

    transformers reads a missing folder as a repo id and answers "Repo id must be in the form…"; a name that can
    only be a path (absolute, relative with ./ or ~, or more than one slash) gets a plain "no such directory"."""
    path = Path(model).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise ValueError(f"{model}: not a directory")
    if model.startswith((".", "/", "~")) or model.count("/") > 1 or model.endswith("/"):
        raise ValueError(f"{model}: no such directory")
    return model


def device_map_for(name: str | None) -> str:
    """The `device_map` for `from_pretrained`: by default the first GPU where there is one (an FP8 checkpoint then
    keeps its E4M3 weights and runs the FP8 kernels), else the CPU; `auto`, `balanced`, `balanced_low_0` and
    `sequential` spread the layers over the GPUs and the CPU as Accelerate does."""
    if name is None:
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if name == "cpu" or name in SPREADING_DEVICE_MAPS:
        return name
    try:
        device = torch.device(name)
    except RuntimeError:
        *others, last = SPREADING_DEVICE_MAPS
        raise ValueError(f"--device-map {name!r}: expected cpu, cuda, cuda:N, {', '.join(others)} or {last}") from None
    if device.type != "cuda":
        raise ValueError(f"--device-map {name!r}: expected cpu, cuda, cuda:N or a spreading strategy such as auto")
    if not torch.cuda.is_available():
        raise ValueError(f"--device-map {name}: this machine has no CUDA device")
    index = device.index or 0
    if index >= torch.cuda.device_count():
        raise ValueError(f"--device-map {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return f"cuda:{index}"


def check_shards(folder: Path) -> None:
    """Every safetensors file in `folder` has a sound header and all the bytes it promises (the converter's header
    reader checks both and names the file, e.g. a copy cut short)."""
    for shard in sorted(folder.glob("*.safetensors")):
        read_header(shard)


def load_tokenizer(source: str, revision: str | None = None, config: DeepseekMoeConfig | None = None):
    """The tokenizer saved with `source`, or None when there is none (transformers' fallback then blames missing
    sentencepiece/tiktoken, which only means that no tokenizer files were found). Without tokenizer files
    transformers reads the model's config: given `config` (the model's, already read), it reads none, and it never
    runs a folder's code (its `auto_map` would ask on the terminal whether to)."""
    try:
        return AutoTokenizer.from_pretrained(source, revision=revision, config=config, trust_remote_code=False)
    except (OSError, ValueError):
        return None


def prepare(
    model_name: str,
    prompt: str | None,
    prompt_ids: list[int] | None,
    use_mtp: bool,
    revision: str | None,
    tokenizer_name: str | None,
    draft_tokens: int | None = None,
):
    """The source, the prompt as ids and the tokenizer (or None), with every check that needs no weights."""
    if draft_tokens is not None and not use_mtp:
        raise ValueError("--draft-tokens needs --use-mtp")
    if draft_tokens is not None and draft_tokens < 1:
        raise ValueError(f"--draft-tokens must be at least 1, got {draft_tokens}")
    source = resolve_source(model_name)
    if Path(source).is_dir():
        if not (Path(source) / "config.json").is_file():
            raise ValueError(f"{model_name}: no config.json in this directory (not a saved model)")
        check_shards(Path(source))
    config = DeepseekMoeConfig.from_pretrained(source, revision=revision)
    if use_mtp and config.num_nextn_predict_layers == 0:
        raise ValueError(f"{model_name} has no MTP modules (num_nextn_predict_layers=0): drop --use-mtp")
    if tokenizer_name:
        tokenizer = load_tokenizer(resolve_source(tokenizer_name), revision)
    else:
        tokenizer = load_tokenizer(source, revision, config)
    if prompt_ids is None:
        if tokenizer is None:
            where = tokenizer_name or model_name
            raise ValueError(
                f"{where} has no tokenizer: pass the prompt as --prompt-ids (comma-separated token ids) "
                "or a tokenizer with --tokenizer PATH"
            )
        input_ids = tokenizer(prompt or "", return_tensors="pt").input_ids
    else:
        outside = [i for i in prompt_ids if not 0 <= i < config.vocab_size]
        if outside:
            raise ValueError(f"--prompt-ids {outside} outside the vocabulary (0..{config.vocab_size - 1})")
        input_ids = torch.tensor([prompt_ids])
    if input_ids.shape[1] == 0:
        raise ValueError("the prompt is empty")
    return source, input_ids, tokenizer


def generate(
    model_name: str,
    prompt: str | None,
    prompt_ids: list[int] | None,
    max_new_tokens: int,
    dtype: str = "auto",
    use_mtp: bool = False,
    revision: str | None = None,
    tokenizer_name: str | None = None,
    draft_tokens: int | None = None,
    device_map: str | None = None,
    prepack: bool = False,
) -> int:
    """Greedy generation streamed to stdout (text with a tokenizer, token ids without). With `use_mtp`, the MTP
    modules draft (self-speculative decoding, same tokens; `draft_tokens` per step, default one per module) and the
    draft acceptance is reported on stderr. `prepack` runs CPU inference over oneDNN-packed copies
    (`prepack_cpu_weights`), their size reported on stderr."""
    device_map = device_map_for(device_map)
    if prepack and device_map != "cpu":
        raise ValueError(f"--prepack is for inference on the CPU, not --device-map {device_map}: add --device-map cpu")
    if prepack and load_dtype(dtype) not in ("auto", torch.float32, torch.bfloat16):
        raise ValueError(f"--prepack runs float32 or bfloat16, not --dtype {dtype}")
    source, input_ids, tokenizer = prepare(
        model_name, prompt, prompt_ids, use_mtp, revision, tokenizer_name, draft_tokens
    )
    model = DeepseekMoeForCausalLM.from_pretrained(
        source, dtype=load_dtype(dtype), revision=revision, device_map=device_map
    ).eval()
    if prepack:
        try:
            packed_bytes = model.prepack_cpu_weights()
        except (RuntimeError, ValueError) as error:  # a torch without oneDNN, no weight to pack
            raise ValueError(f"--prepack: {error}") from None
        print(f"[prepacked {packed_bytes / 1e6:.1f} MB of weight copies for oneDNN]", file=sys.stderr)
    streamer = TextStreamer(tokenizer, skip_prompt=True) if tokenizer is not None else TokenIdStreamer()
    kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, "streamer": streamer}
    if not use_mtp:
        model.generate(input_ids.to(model.device), **kwargs)
        return 0
    output = model.generate(
        input_ids.to(model.device),
        use_mtp=True,
        num_draft_tokens=draft_tokens,
        return_dict_in_generate=True,
        **kwargs,
    )
    print(
        f"[MTP draft acceptance {output.acceptance_rate:.1%} ({output.accepted_tokens}/{output.drafted_tokens}), "
        f"{output.tokens_per_step:.2f} tokens per step, {output.draft_steps} draft steps, "
        f"{output.plain_steps} without drafts]",
        file=sys.stderr,
    )
    for decision in output.mtp_decisions:
        print(f"[MTP {decision}]", file=sys.stderr)
    return 0
