"""Compile every Triton kernel of `deepseek_moe.model.moe_kernels` to a cubin for NVIDIA GPUs ahead of time, no GPU.

The interpreter accepts programs the GPU compiler rejects (tiny or odd `tl.dot` shapes, mixed dot dtypes, …); this
runs triton's real pipeline, down to its bundled ptxas, for every kernel variant, every GPU autotune config and both
BLOCK_M values (`--quick`: the first autotune config only). Run it outside `TRITON_INTERPRET=1` (the tests run it
in a subprocess):

    python tests/kernels_aot_compile.py 90 bf16 80 fp16
"""

from __future__ import annotations

import os
import sys

if os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("run without TRITON_INTERPRET=1: interpreted kernels cannot be compiled")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from deepseek_moe.model import moe_kernels  # noqa: E402

INDEX_POINTERS = ("sorted_slots_ptr", "tile_expert_ptr", "tile_row_start_ptr", "expert_offsets_ptr")
FP32_POINTERS = ("scale_ptr", "weights_ptr", "d_weights_partial_ptr")


def _jit_function(kernel) -> triton.runtime.jit.JITFunction:
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn  # through the autotuner
    return kernel


def _compile(
    kernel, constexprs: dict, config: triton.Config, arch: int, dtype: str, pointers: dict[str, str] | None = None
) -> None:
    """`pointers` gives the element type of named pointer arguments (else: index, fp32 or `dtype` by name)."""
    fn = _jit_function(kernel)
    constexprs = {**constexprs, **config.kwargs}
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in (pointers or {}):
            signature[name] = f"*{pointers[name]}"
        elif name in INDEX_POINTERS:
            signature[name] = "*i32"
        elif name in FP32_POINTERS:
            signature[name] = "*fp32"
        else:
            signature[name] = f"*{dtype}" if name.endswith("_ptr") else "i32"
    source = ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def main(targets: list[tuple[int, str]], quick: bool) -> None:
    variants = [
        (moe_kernels._gate_up_swiglu_kernel, {"STORE_GATE_UP": True}),
        (moe_kernels._gate_up_swiglu_kernel, {"STORE_GATE_UP": False}),
        (moe_kernels._grouped_gemm_scatter_kernel, {"HAS_SCALE": True}),
        (moe_kernels._grouped_gemm_scatter_kernel, {"HAS_SCALE": False}),
        (moe_kernels._swiglu_backward_kernel, {}),
        (moe_kernels._grouped_wgrad_kernel, {"GATHER_A": True, "GATHER_B": False}),
        (moe_kernels._grouped_wgrad_kernel, {"GATHER_A": False, "GATHER_B": True}),
    ]
    gemm_configs = moe_kernels._gemm_configs()[: 1 if quick else None]
    for arch, dtype in targets:
        for config in moe_kernels._combine_configs():
            _compile(moe_kernels._combine_kernel, {}, config, arch, dtype)
        for kernel, constexprs in variants:
            for block_m in (moe_kernels.BLOCK_M_DECODE, moe_kernels.BLOCK_M_TRAIN):
                for config in gemm_configs:
                    _compile(kernel, {**constexprs, "UPCAST": False, "BLOCK_M": block_m}, config, arch, dtype)
        print(f"sm_{arch} {dtype}: all kernels compiled")


if __name__ == "__main__":
    arguments = [a for a in sys.argv[1:] if a != "--quick"] or ["90", "bf16"]
    targets = [(int(arch), dtype) for arch, dtype in zip(arguments[::2], arguments[1::2], strict=True)]
    main(targets, quick="--quick" in sys.argv)
