"""Checkpoint conversion: official DeepSeek checkpoints (bf16 or FP8) ↔ ours, FP8 official form, DeepSeek's
model-parallel inference format, and resharding, streamed one tensor at a time.

Everything that can be wrong with the input (missing shard, weight without scale, shape not matching the config,
unknown dtype, too little disk) is found while planning, from headers alone, before anything is written. The output
is written into a temporary directory next to it and moved into place only when complete (and verified, if asked),
so a failed or interrupted run leaves no partial output; an interrupted one keeps its complete shards for the next run
of the same conversion to resume from (`destination.py`: what may be written or deleted, lock, resume).

Planning needs only headers and the config's values (`architecture_deepseek_moe`, no transformers); a tensor whose
bytes stay the same is copied without torch, which is imported (`tensors.py`) only for a step that computes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import importlib.metadata
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..dtypes import dtype_attribute
from ..model.architecture_deepseek_moe import FP8_BLOCK, DeepseekMoeValues
from ..presets import load_values
from ..remote_code import AUTO_MAP, CONVERSION_RECORD, remote_code_files
from .destination import (
    WorkDirectory,
    check_replaceable,
    destination_lock,
    move_into_place,
    resolve_paths,
    signals_interrupt,
)
from .layouts import (
    INDEX_FILE,
    SCALE_SUFFIX,
    Checkpoint,
    expected_shapes,
    expert_index,
    is_scale,
    layer_index,
    scale_grid,
    to_mp_name,
)
from .safetensors_io import (
    CASTABLE_DTYPES,
    DTYPES,
    FLOAT_DTYPES,
    FP8_DTYPES,
    ConversionError,
    PlannedFile,
    StreamingWriter,
    dtype_named,
    index_json,
    nbytes,
    parse_size,
    plan_shards,
)

if TYPE_CHECKING:
    import torch

TARGETS = ("ours", "fp8", "mp")
FP8_QUANTIZATION_CONFIG = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
}
# Kept in bf16 by official V3 FP8 checkpoints (norms and e_score_correction_bias are 1-D, never quantized).
NOT_QUANTIZED = ("embed_tokens", "lm_head", "shared_head.head", "mlp.gate.weight")
# Copied next to the weights: tokenizer and generation settings, as DeepSeek's own convert.py does.
COPIED_FILES = (
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template*",
    "vocab.*",
    "merges.txt",
    "generation_config.json",
)


@dataclass(frozen=True)
class Output:
    file: str
    name: str
    dtype: str  # safetensors' name
    shape: tuple[int, ...]
    copy_of: str | None = None  # the source tensor this streams from (its bytes as they are, or cast to `dtype`)

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)


@dataclass
class Step:
    """One source weight (and its scale) becomes `outputs`: each streamed from its `copy_of` when `make` is None, else
    produced by `make(weight, scale)` (torch tensors) in the same order."""

    weight: str
    outputs: list[Output]
    make: Callable[[torch.Tensor, torch.Tensor | None], list[torch.Tensor]] | None = None


@dataclass
class ConversionPlan:
    source: Checkpoint
    target: str
    config: DeepseekMoeValues  # the output's
    steps: list[Step]
    files: list[PlannedFile]
    copies: list[Path]
    dropped: list[str] = field(default_factory=list)

    @property
    def data_bytes(self) -> int:
        return sum(planned.data_bytes for planned in self.files)

    @property
    def disk_bytes(self) -> int:
        return sum(planned.file_bytes for planned in self.files) + sum(path.stat().st_size for path in self.copies)


@dataclass
class ConversionReport:
    output: Path
    files: list[str]
    total_bytes: int
    seconds: float
    dropped: list[str]
    logits_error: float | None = None


def resolve_dtype(dtype: str | torch.dtype | None) -> str | None:
    """The requested dtype as safetensors names it (`BF16`), or None."""
    try:
        return None if dtype is None else dtype_named(dtype_attribute(dtype))
    except ValueError as error:
        raise ConversionError(str(error)) from None


def read_source_config(source: Checkpoint, config: str | Path | None) -> DeepseekMoeValues:
    """The source's architecture: `config` (a preset name, a config.json or a directory holding one) or the
    config.json beside the weights. DeepSeek's model-parallel files have none of their own."""
    if config is None and not (source.directory / "config.json").is_file():
        raise ConversionError(f"{source.directory}: no config.json; pass one (or a preset name) as `config`")
    try:
        return load_values(source.directory if config is None else config)
    except ValueError as error:
        raise ConversionError(str(error)) from None


def check_source(source: Checkpoint, config: DeepseekMoeValues) -> None:
    """Every tensor the config implies is there with its planned shape, nothing else is, and every FP8 weight has a
    scale of the right grid."""
    shapes, optional = expected_shapes(config)
    for name, tensor in source.tensors.items():
        if is_scale(name):
            if name.removesuffix(SCALE_SUFFIX) not in source.tensors:
                raise ConversionError(f"{source.directory}: scale {name} has no weight")
            continue
        if name not in shapes:
            raise ConversionError(f"{source.directory}: tensor {name} is not part of the model the config describes")
        if tensor.shape != shapes[name]:
            raise ConversionError(
                f"{source.directory}: tensor {name} has shape {list(tensor.shape)}, the config implies "
                f"{list(shapes[name])}"
            )
        scale = source.tensors.get(name + SCALE_SUFFIX)
        fp8 = tensor.dtype in FP8_DTYPES
        if fp8 and scale is None:
            raise ConversionError(f"{source.directory}: FP8 tensor {name} has no {name + SCALE_SUFFIX}")
        if scale is not None and not fp8:
            raise ConversionError(f"{source.directory}: {name} has a scale but is {tensor.dtype}, not FP8")
        if scale is not None and scale.shape != scale_grid(tensor.shape):
            raise ConversionError(
                f"{source.directory}: {name + SCALE_SUFFIX} has shape {list(scale.shape)}, 128x128 blocks of "
                f"{list(tensor.shape)} need {list(scale_grid(tensor.shape))}"
            )
    missing = sorted(set(shapes) - optional - set(source.tensors))
    if missing:
        raise ConversionError(f"{source.directory}: {len(missing)} tensors of the model are missing, e.g. {missing[0]}")


def _plain_dtype(name: str, source: str, requested: str | None) -> str:
    """The correction bias stays fp32 (it is compared across experts at 1e-3 resolution); FP8 becomes bf16 unless
    another dtype is asked for; anything else keeps its dtype unless one is asked for."""
    if source not in FLOAT_DTYPES:
        return source
    if name.endswith("e_score_correction_bias"):
        return "F32"
    if requested is not None:
        return requested
    return "BF16" if source in FP8_DTYPES else source


def _plain(dtype: str) -> Callable[[torch.Tensor, torch.Tensor | None], list[torch.Tensor]]:
    def make(weight: torch.Tensor, scale: torch.Tensor | None) -> list[torch.Tensor]:
        from .tensors import plain

        return [plain(weight, scale, dtype)]

    return make


def _fp8(weight: torch.Tensor, scale: torch.Tensor | None) -> list[torch.Tensor]:
    from .tensors import fp8

    return fp8(weight, scale)


def _copies(source: Checkpoint, names: list[str], dtypes: list[str]) -> list[str | None]:
    """For each output (source tensor `names[i]` in `dtypes[i]`, unsliced), the name of the source tensor it streams
    from: all of them when each is one stored tensor already in that dtype or in one that casts elementwise to it
    (not FP8, which has block scales), else none."""
    tensors = [source.tensors[name] for name in names]
    pairs = zip(tensors, dtypes, strict=True)
    streamed = all(
        tensor.stored is not None and (tensor.dtype == dtype or {tensor.dtype, dtype} <= set(CASTABLE_DTYPES))
        for tensor, dtype in pairs
    )
    return list(names) if streamed else [None] * len(names)


def _quantized(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) == 2 and name.endswith(".weight") and not any(key in name for key in NOT_QUANTIZED)


def _hf_steps(source: Checkpoint, names: list[str], target: str, dtype: str | None) -> list[Step]:
    steps = []
    for name in names:
        tensor, scaled = source.tensors[name], name + SCALE_SUFFIX in source.tensors
        if target == "fp8" and _quantized(name, tensor.shape):
            pieces = [(name, "F8_E4M3", tensor.shape), (name + SCALE_SUFFIX, "F32", scale_grid(tensor.shape))]
            copies = _copies(source, [n for n, _, _ in pieces], [d for _, d, _ in pieces]) if scaled else [None] * 2
            outputs = [Output("", n, d, s, c) for (n, d, s), c in zip(pieces, copies, strict=True)]
            steps.append(Step(name, outputs, None if copies[0] else _fp8))
            continue
        # The FP8 form keeps what is not quantized in bf16, as DeepSeek's release does.
        out_dtype = _plain_dtype(name, tensor.dtype, dtype or ("BF16" if target == "fp8" else None))
        (copy_of,) = _copies(source, [name], [out_dtype]) if not scaled else [None]
        output = Output("", name, out_dtype, tensor.shape, copy_of)
        steps.append(Step(name, [output], None if copy_of else _plain(out_dtype)))
    return steps


def _mp_steps(
    source: Checkpoint, names: list[str], config: DeepseekMoeValues, mp: int, dtype: str | None
) -> tuple[list[Step], list[PlannedFile]]:
    """DeepSeek's `convert.py`: routed experts split by rank, other weights sliced along their dimension on every
    rank (scales with them) or replicated. FP8 stays FP8 unless a dtype is asked for."""
    if not config.uses_mla:
        raise ConversionError("DeepSeekMoE-16B (multi-head attention) has no DeepSeek inference-format counterpart")
    if mp < 1 or config.n_routed_experts % mp:
        raise ConversionError(f"mp={mp} must be positive and divide n_routed_experts={config.n_routed_experts}")
    files = [f"model{i}-mp{mp}.safetensors" for i in range(mp)]
    local_experts = config.n_routed_experts // mp
    steps = []
    for name in names:
        tensor, keep_fp8 = source.tensors[name], name + SCALE_SUFFIX in source.tensors and dtype is None
        mp_name, dim = to_mp_name(name)
        pieces = [(mp_name, tensor.dtype if keep_fp8 else _plain_dtype(name, tensor.dtype, dtype), tensor.shape)]
        if keep_fp8:
            pieces.append((to_mp_name(name + SCALE_SUFFIX)[0], "F32", scale_grid(tensor.shape)))
        expert = expert_index(name)
        if expert is not None:
            ranks, dim = [expert // local_experts], None
        else:
            ranks = list(range(mp))
        if dim is not None:
            if mp > 1 and tensor.shape[dim] % (mp * (FP8_BLOCK if keep_fp8 else 1)):  # one rank: nothing to split
                raise ConversionError(
                    f"{name}: dimension {dim} of size {tensor.shape[dim]} cannot be split into {mp} ranks"
                    + (" of whole 128-row FP8 blocks" if keep_fp8 else "")
                )
            pieces = [(n, d, s[:dim] + (s[dim] // mp,) + s[dim + 1 :]) for n, d, s in pieces]
        sources = [name, name + SCALE_SUFFIX][: len(pieces)]
        copies = [None] * len(pieces)
        if (dim is None or mp == 1) and (keep_fp8 or sources[0] + SCALE_SUFFIX not in source.tensors):
            copies = _copies(source, sources, [d for _, d, _ in pieces])
        copied = list(zip(pieces, copies, strict=True))
        outputs = [Output(files[rank], n, d, s, c) for rank in ranks for (n, d, s), c in copied]

        def make(weight, scale, ranks=ranks, dim=dim, keep_fp8=keep_fp8, dtype=pieces[0][1]):
            tensors = [weight, scale.float()] if keep_fp8 else _plain(dtype)(weight, scale)
            if dim is None:
                return [t for _ in ranks for t in tensors]
            return [t.chunk(len(ranks), dim=dim)[rank] for rank in ranks for t in tensors]

        steps.append(Step(name, outputs, None if copies[0] else make))
    planned = {file: PlannedFile(file) for file in files}
    for step in steps:
        for output in step.outputs:
            planned[output.file].tensors[output.name] = (output.dtype, output.shape)
    return steps, list(planned.values())


def plan_conversion(
    source: str | Path,
    *,
    target: str = "ours",
    dtype: str | torch.dtype | None = None,
    drop_mtp: bool = False,
    mp: int = 1,
    max_shard_size: int | str = "5GB",
    config: str | Path | None = None,
) -> ConversionPlan:
    """Everything the conversion will write (files, tensor names, dtypes, shapes), from safetensors headers."""
    if target not in TARGETS:
        raise ConversionError(f"unknown target {target!r}; expected one of {TARGETS}")
    dtype = resolve_dtype(dtype)
    max_bytes = parse_size(max_shard_size)
    checkpoint = Checkpoint.open(source)
    source_config = read_source_config(checkpoint, config)
    # The inference format has no MTP layers: DeepSeek's convert.py drops them.
    if checkpoint.layout == "mp":
        source_config.num_nextn_predict_layers = 0
    check_source(checkpoint, source_config)

    drop_mtp = drop_mtp or target == "mp"
    weights = [name for name in checkpoint.tensors if not is_scale(name)]
    is_mtp = [drop_mtp and (layer_index(name) or 0) >= source_config.num_hidden_layers for name in weights]
    dropped = [name for name, mtp in zip(weights, is_mtp, strict=True) if mtp]
    kept = [name for name, mtp in zip(weights, is_mtp, strict=True) if not mtp]
    output_config = copy.deepcopy(source_config)
    output_config.extra.pop("quantization_config", None)  # the FP8 target writes DeepSeek's entry itself
    if drop_mtp:
        output_config.num_nextn_predict_layers = 0

    if target == "mp":
        steps, files = _mp_steps(checkpoint, kept, output_config, mp, dtype)
    else:
        steps = _hf_steps(checkpoint, kept, target, dtype)
        files = plan_shards([{o.name: (o.dtype, o.shape) for o in step.outputs} for step in steps], max_bytes)
        where = {name: planned.name for planned in files for name in planned.tensors}
        for step in steps:
            step.outputs = [dataclasses.replace(o, file=where[o.name]) for o in step.outputs]
        output_config.extra["auto_map"] = dict(AUTO_MAP)
        output_config.extra["architectures"] = [AUTO_MAP["AutoModelForCausalLM"].rpartition(".")[2]]
    head = next(o for step in steps for o in step.outputs if o.name in ("lm_head.weight", "head.weight"))
    output_config.extra.pop("torch_dtype", None)  # transformers' older name for `dtype`
    output_config.extra["dtype"] = DTYPES[head.dtype][1]
    copies = sorted({path for pattern in COPIED_FILES for path in checkpoint.directory.glob(pattern)})
    return ConversionPlan(checkpoint, target, output_config, steps, files, copies, dropped)


def check_disk_space(output: Path, needed: int) -> None:
    """Fail before writing anything when the output's file system cannot hold it."""
    existing = output.parent
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise ConversionError(
            f"not enough disk space at {existing}: the conversion writes {needed / 1e9:.3f} GB, "
            f"{free / 1e9:.3f} GB are free"
        )


def plan_fingerprint(plan: ConversionPlan) -> str:
    """What a resumed run must share with the interrupted one: the same source files (name, size, modification time)
    and the same planned output headers (names, dtypes, shapes, target)."""
    sources = sorted({part.file for tensor in plan.source.tensors.values() for part in tensor.parts})
    description = {
        "source": str(plan.source.directory),
        "target": plan.target,
        "sources": [[path.name, path.stat().st_size, path.stat().st_mtime_ns] for path in sources],
        "files": [[planned.name, hashlib.sha256(planned.header()).hexdigest()] for planned in plan.files],
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def write_conversion(plan: ConversionPlan, work: WorkDirectory, progress: bool = True) -> None:
    """Stream every step that still has a file to fill (shards `work` already holds complete are skipped): read one
    weight (and scale), write its outputs, drop them. Then the small files, rewritten on every run."""
    directory = work.path
    pending = [planned for planned in plan.files if planned.name not in work.complete]
    names = {planned.name for planned in pending}
    steps = [step for step in plan.steps if any(output.file in names for output in step.outputs)]
    total = sum(planned.data_bytes for planned in pending)
    writer = StreamingWriter(directory, pending, on_complete=work.shard_complete)
    with _progress_bar(total, progress) as bar, writer:
        for step in steps:
            bar.update(_write_step(plan.source, step, writer, names))
        writer.finish()
    written = [planned.name for planned in plan.files]
    if plan.target != "mp" and len(plan.files) > 1:
        (directory / INDEX_FILE).write_text(index_json(plan.files))
        written.append(INDEX_FILE)
    config = plan.config.to_dict()
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):  # as save_pretrained records it
        config["transformers_version"] = importlib.metadata.version("transformers")
    if plan.target == "fp8":
        config["quantization_config"] = FP8_QUANTIZATION_CONFIG
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    written.append("config.json")
    copies = list(plan.copies)
    if plan.target != "mp":  # the auto_map's remote code, so trust_remote_code works without this package
        copies += remote_code_files()
    for path in copies:
        shutil.copyfile(path, directory / path.name)
    written += [path.name for path in copies]
    record = conversion_record(plan, sorted(written))
    (directory / CONVERSION_RECORD).write_text(json.dumps(record, indent=2) + "\n")


class _NoProgress(contextlib.AbstractContextManager):
    def update(self, n: int) -> None:
        pass

    def __exit__(self, *exc_info: object) -> None:
        pass


def _progress_bar(total: int, progress: bool) -> Any:
    """huggingface_hub's tqdm (it honours HF_HUB_DISABLE_PROGRESS_BARS), imported only when shown."""
    if not progress:
        return _NoProgress()
    from huggingface_hub.utils import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="Converting")


def source_name(directory: Path) -> str:
    """How a record names the source without publishing a local path: the Hub id of a Hugging Face cache snapshot
    (`.../models--org--name/snapshots/<sha>`), else the folder's name."""
    parts = directory.parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3].removeprefix("models--").replace("--", "/")
    return directory.name


def conversion_record(plan: ConversionPlan, files: list[str]) -> dict:
    """How the output was made, kept beside it (`conversion.json`; the Hub model card shows it), and the files the
    conversion wrote (so `--overwrite` knows what it may replace)."""
    source = plan.source
    scaled = any(is_scale(name) for name in source.tensors)
    try:
        tool = f"deepseek-moe {importlib.metadata.version('deepseek-moe')}"
    except importlib.metadata.PackageNotFoundError:
        tool = "deepseek-moe"
    return {
        "source": source_name(source.directory),
        "source_format": f"{'model-parallel' if source.layout == 'mp' else 'Hugging Face'}{' FP8' if scaled else ''}",
        "target": {"ours": "deepseek_moe", "fp8": "official FP8 (128x128 blocks)", "mp": "model-parallel"}[plan.target],
        "dtype": plan.config.extra["dtype"],
        "mtp": f"dropped ({len(plan.dropped)} tensors)" if plan.dropped else "kept",
        "converted_with": tool,
        "files": files,
    }


def _write_step(source: Checkpoint, step: Step, writer: StreamingWriter, files: set[str]) -> int:
    """One step, in its own frame so that its tensors are freed before the next step reads (peak = one step); only
    its outputs into `files` are written. Returns the bytes written."""
    wanted = [index for index, output in enumerate(step.outputs) if output.file in files]
    if step.make is None:
        for output in (step.outputs[index] for index in wanted):
            stored = source.tensors[output.copy_of].stored
            if stored.dtype == output.dtype:
                writer.copy(output.file, output.name, stored)
            else:
                from .tensors import write_cast

                write_cast(writer, output.file, output.name, stored, output.dtype)
    else:
        from .tensors import load_weight, write_tensor

        tensors = step.make(*load_weight(source, step.weight))
        for index in wanted:
            write_tensor(writer, step.outputs[index].file, step.outputs[index].name, tensors[index])
    return sum(step.outputs[index].nbytes for index in wanted)


def convert_checkpoint(
    source: str | Path,
    output: str | Path,
    *,
    target: str = "ours",
    dtype: str | torch.dtype | None = None,
    drop_mtp: bool = False,
    mp: int = 1,
    max_shard_size: int | str = "5GB",
    config: str | Path | None = None,
    verify: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> ConversionReport:
    """Convert `source` into `output`.

    target: `ours` (plain weights; FP8 dequantized), `fp8` (DeepSeek's FP8 form with 128×128 block scales) or
    `mp` (DeepSeek's inference-repo files `model{i}-mp{mp}.safetensors`; MTP layers dropped as its convert.py does).
    dtype: `bf16`/`fp16`/`fp32` for plain weights; None keeps each tensor's dtype (FP8 → bf16 for `ours`).
    overwrite: replace `output` if it is an earlier conversion's output (files no conversion wrote are never deleted).
    An interrupted run (Ctrl-C, SIGTERM, SIGHUP, SIGKILL) keeps its complete shards; running the same conversion
    again resumes from them (see `destination.py`).
    """
    start = time.perf_counter()
    source, output = resolve_paths(source, output)
    plan = plan_conversion(
        source, target=target, dtype=dtype, drop_mtp=drop_mtp, mp=mp, max_shard_size=max_shard_size, config=config
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    with destination_lock(output), signals_interrupt():
        check_replaceable(output, overwrite)
        work = WorkDirectory.create(output, plan_fingerprint(plan))
        try:  # the shards a resumed run keeps are on the disk already
            check_disk_space(output, plan.disk_bytes - work.complete_bytes)
        except ConversionError:
            work.keep_for_resume()
            raise
        try:
            write_conversion(plan, work, progress=progress)
            logits_error = None
            if verify:
                from .verify import verify_conversion  # torch and the model code: only when asked

                logits_error = verify_conversion(plan, work.path)
            work.finish()
        except KeyboardInterrupt as interruption:
            raise work.interrupted(str(interruption) or "Ctrl-C", len(plan.files)) from None
        except BaseException:
            shutil.rmtree(work.path, ignore_errors=True)
            raise
        move_into_place(work.path, output)
    return ConversionReport(
        output,
        [planned.name for planned in plan.files],
        plan.data_bytes,
        time.perf_counter() - start,
        plan.dropped,
        logits_error,
    )
