"""Random checkpoints of any size in the official layout, written as streamed as conversion itself, so memory tests
and benchmarks can make multi-GB inputs without holding them."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from deepseek_moe import DeepseekMoeConfig
from deepseek_moe.conversion.layouts import INDEX_FILE, expected_shapes
from deepseek_moe.conversion.safetensors_io import StreamingWriter, index_json, parse_size, plan_shards
from deepseek_moe.conversion.tensors import dtype_of, write_tensor


def write_random_checkpoint(
    directory: str | Path,
    config: DeepseekMoeConfig,
    dtype: torch.dtype = torch.float32,
    max_shard_size: int | str = "5GB",
    seed: int = 0,
) -> int:
    """Every tensor `config` implies (normal values, std 0.02; norms 1), sharded like `save_pretrained`, with the
    config beside it. Returns the bytes of tensor data written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shapes, optional = expected_shapes(config)
    groups = [
        {name: (dtype_of(torch.empty(0, dtype=dtype)), shape)} for name, shape in shapes.items() if name not in optional
    ]
    files = plan_shards(groups, parse_size(max_shard_size))
    generator = torch.Generator().manual_seed(seed)
    with StreamingWriter(directory, files) as writer:
        for planned in files:
            for name, (_, shape) in planned.tensors.items():
                values = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=generator) * 0.02
                write_tensor(writer, planned.name, name, values.to(dtype))
        writer.finish()
    if len(files) > 1:
        (directory / INDEX_FILE).write_text(index_json(files))
    (directory / "config.json").write_text(json.dumps(json.loads(config.to_json_string()), indent=2))
    return sum(planned.data_bytes for planned in files)
