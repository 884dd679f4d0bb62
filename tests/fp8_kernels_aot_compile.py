"""Compile the FP8 Triton kernels (`model/fp8_kernels.py` and the FP8 MoE kernels of `model/moe_kernels.py`) to a
cubin for FP8 GPUs (sm_89, sm_90) ahead of time, no GPU: every variant, both BLOCK_M of the MoE kernels, the GEMM's
row tiles and every GPU autotune config, through triton's real pipeline down to its bundled ptxas (`--quick`: one
variant of each kernel). Run it outside `TRITON_INTERPRET=1` (the tests run it in a subprocess):

    python tests/fp8_kernels_aot_compile.py 90 bf16 89 fp16
"""

from __future__ import annotations

import sys

import triton  # noqa: E402
from kernels_aot_compile import INDEX_POINTERS, _compile  # also refuses to run under TRITON_INTERPRET=1

from deepseek_moe.model import fp8_kernels, moe_kernels  # noqa: E402

FP8 = "fp8e4nv"


def main(targets: list[tuple[int, str]], quick: bool) -> None:
    single = triton.Config({}, num_warps=4, num_stages=3)
    first = slice(-1, None) if quick else slice(None)  # the last variant of each list below
    for arch, dtype in targets:
        for ue8m0 in (False, True)[first]:
            constexprs = {"UE8M0": ue8m0, "BLOCK_M": 16, "BLOCK_K": 128}
            pointers = {"x_ptr": dtype, "q_ptr": FP8, "s_ptr": "fp32"}
            _compile(fp8_kernels._act_quant_kernel, constexprs, single, arch, dtype, pointers)
        for out_dtype, has_bias, b_rows, block_m in (
            ("fp32", False, 1, 64),  # the training recipe's Wgrad operand layout
            (dtype, False, 128, 64),
            (dtype, True, 128, 16),
        )[first]:
            constexprs = {"HAS_BIAS": has_bias, "B_ROWS": b_rows, "BLOCK_M": block_m, "BLOCK_K": 128, "UPCAST": False}
            pointers = {"a_ptr": FP8, "b_ptr": FP8, "c_ptr": out_dtype, "bias_ptr": out_dtype}
            pointers |= {"a_scale_ptr": "fp32", "b_scale_ptr": "fp32"}
            for config in fp8_kernels.fp8_gemm_configs()[first]:
                _compile(fp8_kernels._block_scaled_gemm_kernel, constexprs, config, arch, dtype, pointers)
        index = dict.fromkeys(INDEX_POINTERS, "i32")
        gate_up = {"x_ptr": FP8, "w_ptr": FP8, "h_ptr": FP8, "x_scale_ptr": "fp32", "w_scale_ptr": "fp32"}
        gate_up |= {"h_scale_ptr": "fp32", **index}
        down = {"a_ptr": FP8, "w_ptr": FP8, "a_scale_ptr": "fp32", "w_scale_ptr": "fp32", "out_ptr": dtype}
        down |= {"weights_ptr": dtype, **index}
        for block_m in (moe_kernels.BLOCK_M_DECODE, moe_kernels.BLOCK_M_TRAIN)[first]:
            base = {"UPCAST": False, "BLOCK_M": block_m, "BLOCK_K": 128}
            for config in fp8_kernels.fp8_gemm_configs((128,))[first]:
                for ue8m0 in (False, True)[first]:
                    kernel = moe_kernels._gate_up_swiglu_fp8_kernel
                    _compile(kernel, {**base, "UE8M0": ue8m0}, config, arch, dtype, gate_up)
            for config in fp8_kernels.fp8_gemm_configs((64, 128))[first]:
                _compile(moe_kernels._grouped_gemm_scatter_fp8_kernel, base, config, arch, dtype, down)
        print(f"sm_{arch} {dtype}: all FP8 kernels compiled")


if __name__ == "__main__":
    arguments = [a for a in sys.argv[1:] if a != "--quick"] or ["90", "bf16"]
    targets = [(int(arch), dtype) for arch, dtype in zip(arguments[::2], arguments[1::2], strict=True)]
    main(targets, quick="--quick" in sys.argv)
