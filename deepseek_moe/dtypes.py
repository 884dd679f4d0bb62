"""The dtype names every command accepts (`bf16` and `bfloat16` alike), in one table. Plain strings, so the command
line can offer them without importing torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Accepted spelling -> torch attribute name.
DTYPE_ALIASES: dict[str, str] = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "fp32": "float32",
    "float32": "float32",
}
DTYPE_NAMES = ("auto", *DTYPE_ALIASES)


def dtype_attribute(name: str | torch.dtype) -> str:
    """The torch attribute name (`bfloat16`, `float16`, `float32`) of an accepted spelling (any case) or of a torch
    dtype of those, without importing torch."""
    if isinstance(name, str):
        if name.lower() in DTYPE_ALIASES:
            return DTYPE_ALIASES[name.lower()]
    elif str(name).removeprefix("torch.") in DTYPE_ALIASES.values():
        return str(name).removeprefix("torch.")
    raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPE_ALIASES)}")


def torch_dtype(name: str | torch.dtype) -> torch.dtype:
    """`bf16`/`bfloat16`/`fp16`/`float16`/`fp32`/`float32` (any case) or a torch dtype of those, as a torch dtype."""
    import torch

    return getattr(torch, dtype_attribute(name))


def load_dtype(name: str) -> str | torch.dtype:
    """What `from_pretrained(dtype=...)` takes for a command-line name: `auto` (the checkpoint's own) or a dtype."""
    return "auto" if name == "auto" else torch_dtype(name)


__all__ = ["DTYPE_ALIASES", "DTYPE_NAMES", "dtype_attribute", "load_dtype", "torch_dtype"]
