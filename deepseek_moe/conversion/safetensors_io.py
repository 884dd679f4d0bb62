"""safetensors read and written one tensor at a time, in the standard library alone.

The safetensors library reads through mmap (touched pages stay resident while the file is open) and writes whole
state dicts, so peak memory would grow with shard size. The format is simple (8-byte header length, a JSON header
of dtypes, shapes and byte ranges, then the raw bytes), so headers are planned in advance and a tensor copied
unchanged streams from its file through one reused buffer (no torch, no page faults on fresh memory); tensors that
are computed (`tensors.py`) are written from their own memory: peak memory is about one tensor.

Dtypes are safetensors' names (`BF16`, `F8_E4M3`, ...); `tensors.py` maps them to torch's.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO


class ConversionError(ValueError):
    """A checkpoint cannot be converted as asked; the message names the file, tensor or setting at fault."""


# safetensors dtype -> (bytes per element, torch attribute name).
DTYPES: dict[str, tuple[int, str]] = {
    "F64": (8, "float64"),
    "F32": (4, "float32"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"),
    "I64": (8, "int64"),
    "I32": (4, "int32"),
    "I16": (2, "int16"),
    "I8": (1, "int8"),
    "U8": (1, "uint8"),
    "BOOL": (1, "bool"),
}
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
CASTABLE_DTYPES = ("F64", "F32", "F16", "BF16")  # cast into each other elementwise (FP8 has block scales)
FLOAT_DTYPES = (*CASTABLE_DTYPES, *FP8_DTYPES)
SHARD_METADATA = {"format": "pt"}
# Source bytes read per step of a streamed tensor (copied or cast), into buffers the writer reuses.
COPY_CHUNK = 16 * 2**20


def nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * DTYPES[dtype][0]


def dtype_named(torch_name: str) -> str:
    """The safetensors dtype of a torch attribute name (`bfloat16` -> `BF16`)."""
    return next(name for name, (_, attribute) in DTYPES.items() if attribute == torch_name)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie in a safetensors file."""

    file: Path
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # from the start of the file

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)


# A header longer than this is not a checkpoint's (DeepSeek-V3's largest shard header is about 100 kB).
MAX_HEADER_BYTES = 100 * 10**6


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor name → `TensorInfo`, from the header alone (no tensor data is read). Everything the header claims is
    checked against the file before it is trusted: a JSON object of known dtypes and whole shapes, byte ranges that
    match shape × dtype, lie inside the file and do not overlap. Any failure is one `ConversionError` naming the
    file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            prefix = file.read(8)
            if len(prefix) < 8:
                raise ConversionError(f"{path}: not a safetensors file (truncated: {size} bytes)")
            (length,) = struct.unpack("<Q", prefix)
            if length < 2 or length > min(size - 8, MAX_HEADER_BYTES):
                raise ConversionError(f"{path}: not a safetensors file (header length {length}, file size {size})")
            header = json.loads(file.read(length))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConversionError(f"{path}: not a safetensors file (header is not JSON: {error})") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: not a safetensors file (header is not a JSON object)")
    header.pop("__metadata__", None)
    infos, spans = {}, []
    for name, entry in header.items():
        begin, end, dtype, shape = _header_entry(path, name, entry)
        if 8 + length + end > size:
            raise ConversionError(f"{path}: tensor {name!r} ends at byte {8 + length + end}, the file has {size}")
        infos[name] = TensorInfo(path, name, dtype, shape, 8 + length + begin)
        spans.append((begin, end, name))
    spans.sort()
    for (_, previous_end, previous), (begin, _, name) in zip(spans, spans[1:], strict=False):
        if begin < previous_end:
            raise ConversionError(f"{path}: tensors {previous!r} and {name!r} overlap")
    return infos


def _header_entry(path: Path, name: str, entry: object) -> tuple[int, int, str, tuple[int, ...]]:
    """(begin, end, dtype, shape) of one header entry, or a `ConversionError` saying what is wrong with it."""
    if not isinstance(entry, dict):
        raise ConversionError(f"{path}: header entry {name!r} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ConversionError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise ConversionError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(n) is int for n in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise ConversionError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
    if offsets[1] - offsets[0] != nbytes(dtype, tuple(shape)):
        raise ConversionError(
            f"{path}: tensor {name!r} spans {offsets[1] - offsets[0]} bytes, its shape {shape} of {dtype} needs "
            f"{nbytes(dtype, tuple(shape))}"
        )
    return offsets[0], offsets[1], dtype, tuple(shape)


def read_into(info: TensorInfo, buffer: memoryview, offset: int = 0) -> int:
    """Bytes of `info` from `offset` on into `buffer` (as many as fit; no mmap, so nothing stays resident); the
    count read. A file shorter than its header says is a `ConversionError`."""
    wanted = min(len(buffer), info.nbytes - offset)
    with open(info.file, "rb", buffering=0) as file:
        read = os.preadv(file.fileno(), [buffer[:wanted]], info.offset + offset)
    if read != wanted:
        raise ConversionError(f"{info.file}: truncated, a tensor needs {info.nbytes} bytes and fewer are there")
    return read


@dataclass
class PlannedFile:
    """An output file whose header is fixed before any tensor is written: names in writing order."""

    name: str
    tensors: dict[str, tuple[str, tuple[int, ...]]] = field(default_factory=dict)

    @property
    def data_bytes(self) -> int:
        return sum(nbytes(dtype, shape) for dtype, shape in self.tensors.values())

    def header(self) -> bytes:
        entries, offset = {}, 0
        for name, (dtype, shape) in self.tensors.items():
            size = nbytes(dtype, shape)
            span = [offset, offset + size]
            entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": span}
            offset += size
        text = json.dumps({"__metadata__": SHARD_METADATA, **entries}, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
        return struct.pack("<Q", len(text)) + text

    @property
    def file_bytes(self) -> int:
        return len(self.header()) + self.data_bytes


class StreamingWriter:
    """Writes planned files tensor by tensor, in planned order; a file is opened at its first tensor and closed at
    its last, so several can be filled at once (model-parallel ranks) or one after the other (size shards). Each
    file's CRC-32 is computed as it is written and passed with its size to `on_complete` once it is closed (the resume
    manifest's record that the file is whole)."""

    def __init__(
        self,
        directory: Path,
        files: list[PlannedFile],
        on_complete: Callable[[str, int, int], None] | None = None,
    ) -> None:
        self.directory = directory
        self.files = {planned.name: planned for planned in files}
        self.pending = {planned.name: list(planned.tensors) for planned in files}
        self.open_files: dict[str, tuple[BinaryIO, int]] = {}  # file -> (handle, CRC-32 so far)
        self.on_complete = on_complete
        self.chunk_bytes = COPY_CHUNK
        self._scratch: list[bytearray] = []

    def write(self, file_name: str, name: str, dtype: str, shape: tuple[int, ...], data: memoryview) -> None:
        """A computed tensor: its bytes, `dtype` and `shape`."""
        self.begin(file_name, name, dtype, shape)
        self.append(file_name, data)
        self.end(file_name)

    def copy(self, file_name: str, name: str, source: TensorInfo) -> None:
        """A tensor unchanged: its bytes streamed from the source file through one reused buffer."""
        self.begin(file_name, name, source.dtype, source.shape)
        buffer, done = self.scratch(0, self.chunk_bytes), 0
        while done < source.nbytes:
            read = read_into(source, buffer, done)
            self.append(file_name, buffer[:read])
            done += read
        self.end(file_name)

    def scratch(self, index: int, nbytes: int) -> memoryview:
        """Reused buffer `index` (0: source bytes read, 1: bytes computed from them), at least `nbytes` long; it lives
        as long as the writer, so no streamed chunk faults in fresh memory and none is held after the conversion."""
        while len(self._scratch) <= index:
            self._scratch.append(bytearray())
        if len(self._scratch[index]) < nbytes:
            self._scratch[index] = bytearray(nbytes)
        return memoryview(self._scratch[index])[:nbytes]

    def begin(self, file_name: str, name: str, dtype: str, shape: tuple[int, ...]) -> None:
        """Start the next planned tensor of `file_name` (its bytes follow in `append` calls, then `end`)."""
        planned, pending = self.files[file_name], self.pending[file_name]
        expected = planned.tensors.get(name)
        if not pending or pending[0] != name or expected != (dtype, tuple(shape)):
            raise RuntimeError(
                f"{file_name}: wrote {name} {dtype} {tuple(shape)}, planned {pending[0] if pending else None} "
                f"{expected}"
            )
        if file_name not in self.open_files:
            handle = open(self.directory / file_name, "wb", buffering=0)  # noqa: SIM115 (closed in `end`)
            self.open_files[file_name] = handle, 0
            self.append(file_name, memoryview(planned.header()))

    def append(self, file_name: str, data: memoryview) -> None:
        handle, crc = self.open_files[file_name]
        written = 0
        while written < len(data):  # an unbuffered write may take only part
            written += handle.write(data[written:])
        self.open_files[file_name] = handle, zlib.crc32(data, crc)

    def end(self, file_name: str) -> None:
        pending = self.pending[file_name]
        pending.pop(0)
        if not pending:
            handle, crc = self.open_files.pop(file_name)
            handle.close()
            if self.on_complete is not None:
                self.on_complete(file_name, self.files[file_name].file_bytes, crc)

    def finish(self) -> None:
        """Raises if a planned tensor was never written."""
        missing = {name: names[0] for name, names in self.pending.items() if names}
        if missing:
            raise RuntimeError(f"planned tensors never written: {missing}")

    def __enter__(self) -> StreamingWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle, _ in self.open_files.values():
            handle.close()
        self.open_files.clear()


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string with decimal units ("5GB" = 5·10⁹), as `huggingface_hub` and `save_pretrained`
    read `max_shard_size`."""
    if isinstance(size, int):
        value = size
    else:
        match = _SIZE.match(size)
        if not match:
            raise ConversionError(f"max_shard_size: cannot read {size!r}; use decimal units like '5GB' or '100MB'")
        value = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])
    if value <= 0:
        raise ConversionError(f"max_shard_size: must be positive, got {size!r}")
    return value


def plan_shards(groups: list[dict[str, tuple[str, tuple[int, ...]]]], max_bytes: int) -> list[PlannedFile]:
    """Fill shards greedily in order with whole groups (a weight and its scale stay together); a group larger than
    the limit gets a shard of its own. One shard is `model.safetensors`, more are `model-0000k-of-0000N`."""
    shards: list[PlannedFile] = []
    filled = 0
    for group in groups:
        size = sum(nbytes(dtype, shape) for dtype, shape in group.values())
        if not shards or (shards[-1].tensors and filled + size > max_bytes):
            shards.append(PlannedFile(""))
            filled = 0
        shards[-1].tensors.update(group)
        filled += size
    if not shards:
        raise ConversionError("nothing to write: the conversion keeps no tensor")
    for k, shard in enumerate(shards):
        shard.name = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
    return shards


def index_json(shards: list[PlannedFile]) -> str:
    """`model.safetensors.index.json` as transformers writes it (sorted keys, indent 2)."""
    weight_map = {name: shard.name for shard in shards for name in shard.tensors}
    index = {"metadata": {"total_size": sum(shard.data_bytes for shard in shards)}, "weight_map": weight_map}
    return json.dumps(index, indent=2, sort_keys=True) + "\n"
