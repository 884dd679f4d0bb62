"""Checkpoint conversion: official DeepSeek checkpoints (bf16 or FP8) ↔ ours, FP8 official form, DeepSeek's
model-parallel inference format, and resharding, streamed one tensor at a time.

Everything that can be wrong with the input (missing shard, weight without scale, shape not matching the config,
unknown dtype, too little disk) is found while planning, from headers alone, before anything is written. The output
is written into a temporary directory next to it and moved into place only when complete (and verified, if asked),
so a failed or interrupted run leaves no partial output; an interrupted one keeps its complete shards for the next run
of the same conversion to resume from (`destination.py`: what may be written or deleted, lock, resume).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub.utils import tqdm
from safetensors import safe_open

from ..dtypes import torch_dtype
from ..model.configuration_deepseek_moe import DeepseekMoeConfig
from ..model.quantization_deepseek_moe import FP8_BLOCK, dequantize_fp8_blockwise
from ..presets import load_config
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
    TensorInfo,
    expected_shapes,
    expert_index,
    is_scale,
    layer_index,
    load_weight,
    quantize_fp8_blockwise,
    scale_grid,
    to_mp_name,
)
from .safetensors_io import ConversionError, PlannedFile, StreamingWriter, index_json, parse_size, plan_shards

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
# The logits check holds one layer in fp32 at a time; it is skipped when a layer is larger than this.
LOGITS_CHECK_MAX_BYTES = 2 * 10**9


@dataclass(frozen=True)
class Output:
    file: str
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass
class Step:
    """One source weight (and its scale) becomes `outputs`, produced by `make(weight, scale)` in the same order."""

    weight: str
    outputs: list[Output]
    make: Callable[[torch.Tensor, torch.Tensor | None], list[torch.Tensor]]


@dataclass
class ConversionPlan:
    source: Checkpoint
    target: str
    config: DeepseekMoeConfig  # the output's
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


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    try:
        return None if dtype is None else torch_dtype(dtype)
    except ValueError as error:
        raise ConversionError(str(error)) from None


def read_source_config(source: Checkpoint, config: str | Path | None) -> DeepseekMoeConfig:
    """The source's architecture: `config` (a preset name, a config.json or a directory holding one) or the
    config.json beside the weights. DeepSeek's model-parallel files have none of their own."""
    if config is None and not (source.directory / "config.json").is_file():
        raise ConversionError(f"{source.directory}: no config.json; pass one (or a preset name) as `config`")
    try:
        return load_config(source.directory if config is None else config)
    except ValueError as error:
        raise ConversionError(str(error)) from None


def check_source(source: Checkpoint, config: DeepseekMoeConfig) -> None:
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
        fp8 = tensor.dtype.is_floating_point and tensor.dtype.itemsize == 1
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


def _plain_dtype(name: str, source: torch.dtype, requested: torch.dtype | None) -> torch.dtype:
    """The correction bias stays fp32 (it is compared across experts at 1e-3 resolution); FP8 becomes bf16 unless
    another dtype is asked for; anything else keeps its dtype unless one is asked for."""
    if not source.is_floating_point:
        return source
    if name.endswith("e_score_correction_bias"):
        return torch.float32
    if requested is not None:
        return requested
    return torch.bfloat16 if source.itemsize == 1 else source


def _plain(dtype: torch.dtype) -> Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    def make(weight: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        return (dequantize_fp8_blockwise(weight, scale) if scale is not None else weight).to(dtype)

    return make


def _fp8(weight: torch.Tensor, scale: torch.Tensor | None) -> list[torch.Tensor]:
    """FP8 weights keep their own values and scales; others are quantized."""
    if scale is not None:
        return [weight, scale.float()]
    return list(quantize_fp8_blockwise(weight))


def _quantized(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) == 2 and name.endswith(".weight") and not any(key in name for key in NOT_QUANTIZED)


def _hf_steps(source: Checkpoint, names: list[str], target: str, dtype: torch.dtype | None) -> list[Step]:
    steps = []
    for name in names:
        tensor = source.tensors[name]
        if target == "fp8" and _quantized(name, tensor.shape):
            outputs = [
                Output("", name, torch.float8_e4m3fn, tensor.shape),
                Output("", name + SCALE_SUFFIX, torch.float32, scale_grid(tensor.shape)),
            ]
            steps.append(Step(name, outputs, _fp8))
            continue
        # The FP8 form keeps what is not quantized in bf16, as DeepSeek's release does.
        out_dtype = _plain_dtype(name, tensor.dtype, dtype or (torch.bfloat16 if target == "fp8" else None))
        make = _plain(out_dtype)
        steps.append(Step(name, [Output("", name, out_dtype, tensor.shape)], lambda w, s, make=make: [make(w, s)]))
    return steps


def _mp_steps(
    source: Checkpoint, names: list[str], config: DeepseekMoeConfig, mp: int, dtype: torch.dtype | None
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
            pieces.append((to_mp_name(name + SCALE_SUFFIX)[0], torch.float32, scale_grid(tensor.shape)))
        expert = expert_index(name)
        if expert is not None:
            ranks, dim = [expert // local_experts], None
        else:
            ranks = list(range(mp))
        if dim is not None:
            if tensor.shape[dim] % (mp * (FP8_BLOCK if keep_fp8 else 1)):
                raise ConversionError(
                    f"{name}: dimension {dim} of size {tensor.shape[dim]} cannot be split into {mp} ranks"
                    + (" of whole 128-row FP8 blocks" if keep_fp8 else "")
                )
            pieces = [(n, d, s[:dim] + (s[dim] // mp,) + s[dim + 1 :]) for n, d, s in pieces]
        outputs = [Output(files[rank], n, d, s) for rank in ranks for n, d, s in pieces]

        def make(weight, scale, ranks=ranks, dim=dim, keep_fp8=keep_fp8, dtype=pieces[0][1]):
            tensors = [weight, scale.float()] if keep_fp8 else [_plain(dtype)(weight, scale)]
            if dim is None:
                return [t for _ in ranks for t in tensors]
            return [t.chunk(len(ranks), dim=dim)[rank] for rank in ranks for t in tensors]

        steps.append(Step(name, outputs, make))
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
    if hasattr(output_config, "quantization_config"):  # the FP8 target writes DeepSeek's entry itself
        del output_config.quantization_config
    if drop_mtp:
        output_config.num_nextn_predict_layers = 0

    if target == "mp":
        steps, files = _mp_steps(checkpoint, kept, output_config, mp, dtype)
    else:
        steps = _hf_steps(checkpoint, kept, target, dtype)
        files = plan_shards([{o.name: (o.dtype, o.shape) for o in step.outputs} for step in steps], max_bytes)
        where = {name: planned.name for planned in files for name in planned.tensors}
        for step in steps:
            step.outputs = [Output(where[o.name], o.name, o.dtype, o.shape) for o in step.outputs]
        output_config.auto_map = dict(AUTO_MAP)
    head = next(o for step in steps for o in step.outputs if o.name in ("lm_head.weight", "head.weight"))
    output_config.dtype = head.dtype
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
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="Converting", disable=not progress)
    with bar, StreamingWriter(directory, pending, on_complete=work.shard_complete) as writer:
        for step in steps:
            bar.update(_write_step(plan.source, step, writer, names))
        writer.finish()
    written = [planned.name for planned in plan.files]
    if plan.target != "mp" and len(plan.files) > 1:
        (directory / INDEX_FILE).write_text(index_json(plan.files))
        written.append(INDEX_FILE)
    config = json.loads(plan.config.to_json_string())  # only what differs from the defaults, as save_pretrained
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
        "dtype": str(plan.config.dtype).removeprefix("torch."),
        "mtp": f"dropped ({len(plan.dropped)} tensors)" if plan.dropped else "kept",
        "converted_with": tool,
        "files": files,
    }


def _write_step(source: Checkpoint, step: Step, writer: StreamingWriter, files: set[str]) -> int:
    """One step, in its own frame so that its tensors are freed before the next step reads (peak = one step); only
    its outputs into `files` are written."""
    tensors = step.make(*load_weight(source, step.weight))
    written = 0
    for output, tensor in zip(step.outputs, tensors, strict=True):
        if output.file in files:
            writer.write(output.file, output.name, tensor)
            written += tensor.numel() * tensor.element_size()
    return written


def _read_with_safetensors(info: TensorInfo) -> torch.Tensor:
    """The safetensors library's reader, independent of ours, for verification."""
    with safe_open(info.file, framework="pt") as file:
        return file.get_tensor(info.name)


def verify_conversion(plan: ConversionPlan, directory: Path) -> float | None:
    """Re-read the output and compare every tensor with the source: equal after the same cast, or within e4m3
    rounding (half an ulp, 2⁻⁴ relative, or 2⁻¹⁰·scale among subnormals) for FP8 written from other dtypes. On
    Hugging Face layouts, also compare both checkpoints' logits, computed layer by layer; returns that error."""
    from .streamed_logits import largest_layer_bytes  # runs the model code: imported only for `--verify`

    output = Checkpoint.open(directory)
    expected = {step.weight for step in plan.steps}
    written = {name for name in output.tensors if not is_scale(name)}
    if expected != written:
        raise ConversionError(
            f"verification: missing {sorted(expected - written)[:3]}, unexpected {sorted(written - expected)[:3]}"
        )
    exact = True
    for name in sorted(expected):
        weight, scale = load_weight(plan.source, name)
        reference = dequantize_fp8_blockwise(weight, scale) if scale is not None else weight
        out, out_scale = load_weight(output, name, reader=_read_with_safetensors)
        if out_scale is None:
            ok = torch.equal(out, reference.to(out.dtype))
            exact &= torch.equal(out.to(reference.dtype), reference)
        else:
            error = (dequantize_fp8_blockwise(out, out_scale) - reference.float()).abs()
            block_scale = dequantize_fp8_blockwise(torch.ones(out.shape), out_scale)
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
    from .streamed_logits import streamed_logits

    output_config = load_config(output.directory)
    input_ids = torch.randint(0, plan.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    reference = streamed_logits(plan.source, plan.config, input_ids)
    difference = (streamed_logits(output, output_config, input_ids) - reference).abs()
    if exact:
        error, tolerance = (difference.max() / reference.abs().max()).item(), 1e-5
    else:
        error, tolerance = (difference.mean() / reference.abs().mean()).item(), 0.5
    if not error <= tolerance:
        raise ConversionError(f"verification: logits differ by {error:.3g} (relative), more than {tolerance}")
    return error


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
            logits_error = verify_conversion(plan, work.path) if verify else None
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
