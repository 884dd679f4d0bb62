"""The part of a conversion that computes (torch): tensors cast chunk by chunk as they stream, or read whole to be
dequantized from or quantized to FP8 and split across ranks. Imported only by conversions that change bytes; tensors
copied unchanged need no torch (`safetensors_io.StreamingWriter.copy`)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..model.architecture_deepseek_moe import FP8_BLOCK
from .layouts import SCALE_SUFFIX, Checkpoint, LogicalTensor, scale_grid
from .safetensors_io import DTYPES, StreamingWriter, TensorInfo, dtype_named, read_into


def torch_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name."""
    return getattr(torch, DTYPES[dtype][1])


def dtype_of(tensor: torch.Tensor) -> str:
    """The safetensors dtype name of a tensor."""
    return dtype_named(str(tensor.dtype).removeprefix("torch."))


def read_tensor(info: TensorInfo) -> torch.Tensor:
    """One tensor read into its own buffer (no mmap, so nothing stays resident after it is dropped)."""
    buffer = torch.empty(info.nbytes, dtype=torch.uint8)
    read_into(info, memoryview(buffer.numpy()))
    return buffer.view(torch_dtype(info.dtype)).reshape(info.shape)


def load(tensor: LogicalTensor, reader: Callable[[TensorInfo], torch.Tensor] = read_tensor) -> torch.Tensor:
    """A logical tensor: its one stored tensor, or its rank slices concatenated."""
    if tensor.dim is None:
        return reader(tensor.parts[0])
    return torch.cat([reader(part) for part in tensor.parts], dim=tensor.dim)


def load_weight(
    checkpoint: Checkpoint, name: str, reader: Callable[[TensorInfo], torch.Tensor] = read_tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A weight and its FP8 scale (None for plain weights)."""
    scale = checkpoint.tensors.get(name + SCALE_SUFFIX)
    return load(checkpoint.tensors[name], reader), load(scale, reader) if scale is not None else None


def write_cast(writer: StreamingWriter, file_name: str, name: str, source: TensorInfo, dtype: str) -> None:
    """A stored tensor cast to `dtype` as it streams, `writer.chunk_bytes` of source at a time through the writer's
    two reused buffers: an elementwise cast, so the bytes equal those of the whole tensor cast at once, with neither
    held in memory."""
    writer.begin(file_name, name, dtype, source.shape)
    source_size, size = DTYPES[source.dtype][0], DTYPES[dtype][0]
    count, done, step = math.prod(source.shape), 0, max(1, writer.chunk_bytes // source_size)
    while done < count:
        chunk = min(step, count - done)
        read = writer.scratch(0, chunk * source_size)
        read_into(source, read, done * source_size)
        cast = writer.scratch(1, chunk * size)
        values = torch.frombuffer(read, dtype=torch_dtype(source.dtype))
        torch.frombuffer(cast, dtype=torch_dtype(dtype)).copy_(values)
        writer.append(file_name, cast)
        done += chunk
    writer.end(file_name)


def write_tensor(writer: StreamingWriter, file_name: str, name: str, tensor: torch.Tensor) -> None:
    data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
    writer.write(file_name, name, dtype_of(tensor), tuple(tensor.shape), memoryview(data))


def dequantize(weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """The weight's values: FP8 ones times their block scales (in fp32), others as they are."""
    if scale is None:
        return weight
    from ..model.quantization_deepseek_moe import dequantize_fp8_blockwise  # transformers: only for FP8 sources

    return dequantize_fp8_blockwise(weight, scale)


def plain(weight: torch.Tensor, scale: torch.Tensor | None, dtype: str) -> torch.Tensor:
    """The weight in `dtype`, dequantized first if it is FP8."""
    return dequantize(weight, scale).to(torch_dtype(dtype))


def fp8(weight: torch.Tensor, scale: torch.Tensor | None) -> list[torch.Tensor]:
    """FP8 weights keep their own values and scales (as fp32); others are quantized."""
    if scale is not None:
        return [weight, scale.float()]
    return list(quantize_fp8_blockwise(weight))


def quantize_fp8_blockwise(weight: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Official FP8 form: e4m3 values and one fp32 `weight_scale_inv` = amax/448 per 128×128 block (the
    dequantization multiplier). Edge blocks are zero-padded when their amax is taken, as in DeepSeek's release."""
    rows, cols = weight.shape
    grid = scale_grid(weight.shape)
    padded = torch.nn.functional.pad(weight.float(), (0, grid[1] * block - cols, 0, grid[0] * block - rows))
    blocks = padded.view(grid[0], block, grid[1], block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-4) / torch.finfo(torch.float8_e4m3fn).max
    quantized = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn)
    return quantized.view(padded.shape)[:rows, :cols].contiguous(), scale
