"""Run by tests/test_moe_kernels.py in a fresh process: with triton unimportable, the kernel modules still import,
the kernels are not the default and never claim a device."""

import sys

sys.modules["triton"] = None  # makes `import triton` raise ImportError

import torch  # noqa: E402

from deepseek_moe.model import moe_kernels, triton_support  # noqa: E402

if __name__ == "__main__":
    assert triton_support.triton is None and moe_kernels.triton is None
    assert not moe_kernels.kernels_default()
    assert not triton_support.triton_runs_on(torch.device("cuda"))
    print("ok")
