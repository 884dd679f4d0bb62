"""`convert --verify`: the output re-read with the safetensors library and compared with the source, tensor by tensor
and through both checkpoints' logits computed layer by layer, in bounded memory."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open

from ..model.configuration_deepseek_moe import DeepseekMoeConfig
from ..presets import load_config
from .layouts import Checkpoint, is_scale
from .safetensors_io import ConversionError, TensorInfo
from .streamed_logits import largest_layer_bytes, streamed_logits
from .tensors import dequantize, load_weight

if TYPE_CHECKING:
    from .convert import ConversionPlan

# The logits check holds one layer in fp32 at a time; it is skipped when a layer is larger than this.
LOGITS_CHECK_MAX_BYTES = 2 * 10**9


def _read_with_safetensors(info: TensorInfo) -> torch.Tensor:
    """The safetensors library's reader, independent of ours, for verification."""
    with safe_open(info.file, framework="pt") as file:
        return file.get_tensor(info.name)


def verify_conversion(plan: ConversionPlan, directory: Path) -> float | None:
    """Re-read the output and compare every tensor with the source: equal after the same cast, or within e4m3
    rounding (half an ulp, 2⁻⁴ relative, or 2⁻¹⁰·scale among subnormals) for FP8 written from other dtypes. On
    Hugging Face layouts, also compare both checkpoints' logits, computed layer by layer; returns that error."""
    output = Checkpoint.open(directory)
    expected = {step.weight for step in plan.steps}
    written = {name for name in output.tensors if not is_scale(name)}
    if expected != written:
        raise ConversionError(
            f"verification: missing {sorted(expected - written)[:3]}, unexpected {sorted(written - expected)[:3]}"
        )
    exact = True
    for name in sorted(expected):
        reference = dequantize(*load_weight(plan.source, name))
        out, out_scale = load_weight(output, name, reader=_read_with_safetensors)
        if out_scale is None:
            ok = torch.equal(out, reference.to(out.dtype))
            exact &= torch.equal(out.to(reference.dtype), reference)
        else:
            error = (dequantize(out, out_scale) - reference.float()).abs()
            block_scale = dequantize(torch.ones(out.shape), out_scale)
            ok = bool((error <= (reference.float().abs() * 2**-4 + block_scale * 2**-10) * 1.0001).all())
            exact &= bool((error == 0).all())
        if not ok:
            raise ConversionError(f"verification: {name} in {directory} does not match the source")
    if plan.target == "mp" or plan.source.layout != "hf" or largest_layer_bytes(output) > LOGITS_CHECK_MAX_BYTES:
        return None
    return _compare_logits(plan, output, exact)


def _compare_logits(plan: ConversionPlan, output: Checkpoint, exact: bool) -> float:
    """Both checkpoints' fp32 logits on a fixed batch, computed layer by layer (`streamed_logits`), the output's with
    the config.json written beside it. Equal weights must give max |Δ| within 1e-5 of max |logit|. After rounding
    (bf16, FP8) near-ties route some tokens to other experts and errors compound through small random models (FP8
    gives 10-20%), so there the mean |Δ| only has to stay under half the mean |logit|: a coarse end-to-end check
    against gross errors, the per-tensor checks being the precise ones."""
    output_config = load_config(output.directory)
    input_ids = torch.randint(0, plan.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    reference = streamed_logits(plan.source, DeepseekMoeConfig.from_dict(plan.config.to_dict()), input_ids)
    difference = (streamed_logits(output, output_config, input_ids) - reference).abs()
    if exact:
        error, tolerance = (difference.max() / reference.abs().max()).item(), 1e-5
    else:
        error, tolerance = (difference.mean() / reference.abs().mean()).item(), 0.5
    if not error <= tolerance:
        raise ConversionError(f"verification: logits differ by {error:.3g} (relative), more than {tolerance}")
    return error
