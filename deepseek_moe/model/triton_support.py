"""Whether Triton kernels can run, decided in one place for every kernel module of the model code.

triton is optional (imported inside `try:`, which transformers' remote-code import check skips): without it, and on
CPU tensors outside Triton's interpreter (`TRITON_INTERPRET=1`, read once at import as Triton itself does), the
model runs its PyTorch paths.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the PyTorch paths serve everywhere else
    triton = tl = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def triton_runs_on(device: torch.device) -> bool:
    """Triton kernels run on CUDA tensors, or anywhere under the interpreter (slow; for tests)."""
    return triton is not None and (device.type == "cuda" or INTERPRET)


__all__ = ["INTERPRET", "tl", "triton", "triton_runs_on"]
