"""Pre-training on Accelerate: `deepseek-moe train`, or from Python:

    from deepseek_moe.training.pretrain import load_train_arguments, train

    args = load_train_arguments("train.yaml", max_steps=100)  # or TrainArguments(model="tiny-v3", data=["a.txt"])
    result = train(args, on_step=lambda record: print(record.step, record.loss, record.load_cv))
    # result.model_path loads with DeepseekMoeForCausalLM.from_pretrained / AutoModelForCausalLM.from_pretrained

One optimizer step consumes one global batch of `global_batch_size` packed rows whatever the number of processes:
each process runs `gradient_accumulation_steps` micro-batches of `micro_batch_size` rows, and
micro_batch_size × gradient_accumulation_steps × processes = global_batch_size. The loss is normalised by the label
tokens of the whole global batch (summed over micro-batches and processes), so the gradients, the balance losses'
weight and the V3 bias update (counts summed over the global batch, once per step) are those of one process running
the same global batch. Checkpoints hold everything a resumed run needs to continue exactly: weights, correction
biases, optimizer, scheduler, data position and RNG states; they are written to a temporary directory and renamed
when complete, so a run killed mid-write resumes from the previous checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# DeepSeek-V3 (reference §3b/§3c): λ = 0.3 for the first 10T of 14.8T tokens, γ = 0.001 until 14.3T, then 0.
MTP_SWITCH_FRACTION = 10.0 / 14.8
BIAS_UPDATE_STOP_FRACTION = 14.3 / 14.8
LR_SCHEDULES = ("cosine", "step", "constant")
FP8_RECIPES = ("none", "blockwise", "torchao")
CHECKPOINT_PREFIX = "step-"
TEMP_PREFIX = ".tmp-"


@dataclass
class TrainArguments:
    """Every pre-training setting. Defaults are DeepSeek-V3's where the paper gives one (docs/TRAINING.md lists each
    with the paper's value); `None` means "derived" as described on the field."""

    # model and data
    model: str = "tiny-v3"
    """A preset name, a config.json (new random model), or a saved model directory (training continues from it)."""
    config_overrides: dict[str, Any] = field(default_factory=dict)
    """Config fields to change on a new model, e.g. {"num_hidden_layers": 2}."""
    data: list[str] = field(default_factory=list)
    """Text (.txt/.md), JSON Lines/JSON, CSV or parquet files, directories of them, or one saved dataset directory."""
    eval_data: list[str] = field(default_factory=list)
    """Evaluation files (same formats); empty = hold out `eval_holdout_rows` packed training rows, or no evaluation."""
    eval_holdout_rows: int = 0
    text_field: str = "text"
    text_sample_by: str = "paragraph"
    """Plain text files: one document per "line", "paragraph" (blank-line separated) or "document" (file)."""
    streaming: bool = False
    """Read the data lazily (for data larger than memory); rows are then taken in file order, not shuffled."""
    tokenizer: str | None = None
    """A tokenizer directory or Hub name, "bytes" (built-in byte-level tokenizer), or None: the model directory's."""
    seq_length: int = 4096
    # batch
    global_batch_size: int | None = None
    """Packed rows per optimizer step over all processes (None = micro_batch_size × accumulation × processes)."""
    micro_batch_size: int = 1
    gradient_accumulation_steps: int | None = None
    """Micro-batches per process per step (None = derived from the global batch; if both are given they must agree)."""
    sync_each_batch: bool = False
    """Synchronise gradients after every micro-batch instead of the last one only (less memory, more traffic)."""
    max_steps: int = 1000
    # optimizer and schedule
    learning_rate: float = 2.2e-4
    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine schedule relative to the peak (V3: 2.2e-5 / 2.2e-4)."""
    lr_schedule: str = "cosine"
    """"cosine" (warm-up then cosine to min_lr_ratio), "step" (DeepSeek-V2/LLM: ×0.316 at 60% and 90% of the steps),
    or "constant" (after warm-up)."""
    warmup_steps: int = 2000
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_epsilon: float = 1e-8
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    # precision and memory
    bf16: bool = False
    fp8: str = "none"
    """"blockwise": deepseek_moe.training.fp8 (DeepSeek-V3's 1×128 / 128×128 recipe); "torchao": Accelerate's FP8."""
    gradient_checkpointing: bool = False
    # balancing and MTP
    bias_update_speed: float | None = None
    """γ of the V3 bias update (None = the config's `bias_update_speed`, 0.001 for V3 presets)."""
    bias_update_stop: float = BIAS_UPDATE_STOP_FRACTION
    """Fraction of the steps after which γ = 0 (V3 froze the bias for the last 500B of 14.8T tokens)."""
    mtp_loss_weight_early: float = 0.3
    mtp_loss_weight_late: float = 0.1
    mtp_switch: float = MTP_SWITCH_FRACTION
    # parallelism (default: data parallel over all processes, DDP through Accelerate)
    fsdp: bool = False
    """FSDP2 through transformers' distributed engine (decoder and MTP layers as units)."""
    ep_size: int = 1
    """Routed experts split over this many processes (all-to-all); needs `fsdp` or `tp_size`."""
    tp_size: int = 1
    """Tensor parallelism of the dense layers."""
    # bookkeeping
    output_dir: str = "runs/deepseek-moe"
    seed: int = 42
    eval_every: int = 0
    """Optimizer steps between evaluations (0 = only at the end, when there is evaluation data)."""
    eval_batches: int = 0
    """Micro-batches per evaluation and process (0 = all evaluation rows)."""
    save_every: int = 0
    """Optimizer steps between checkpoints (0 = none before the final save)."""
    keep_checkpoints: int = 2
    resume: bool = True
    """Continue from the newest complete checkpoint in output_dir/checkpoints when there is one."""
    log_every: int = 1
    tensorboard: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.data, str):
            self.data = [self.data]
        if isinstance(self.eval_data, str):
            self.eval_data = [self.eval_data]
        for name, value, choices in (
            ("lr_schedule", self.lr_schedule, LR_SCHEDULES),
            ("fp8", self.fp8, FP8_RECIPES),
            ("text_sample_by", self.text_sample_by, ("line", "paragraph", "document")),
        ):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        positive = {"seq_length": self.seq_length, "micro_batch_size": self.micro_batch_size}
        positive.update(max_steps=self.max_steps, ep_size=self.ep_size, tp_size=self.tp_size)
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_train_arguments(path: str | os.PathLike | None = None, **overrides: Any) -> TrainArguments:
    """Settings from a YAML or JSON file (keys = TrainArguments fields; dashes allowed), then `overrides` on top
    (None values are ignored, so command-line flags that were not given keep the file's value)."""
    values: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        if str(path).endswith((".yaml", ".yml")):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of settings, got {type(values).__name__}")
        values = {key.replace("-", "_"): value for key, value in values.items()}
    values.update({key: value for key, value in overrides.items() if value is not None})
    known = {f.name for f in dataclasses.fields(TrainArguments)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown training settings {unknown}; see docs/TRAINING.md")
    return TrainArguments(**values)


@dataclass
class StepRecord:
    """One optimizer step, as given to `train(on_step=...)` and logged.

    `loss` is the optimised objective (LM + λ·MTP + balance losses) over the global batch; `lm_loss` its
    cross-entropy part (mean over the label tokens); `mtp_loss` the unweighted MTP loss (mean over depths of each
    depth's cross-entropy sum divided by the same label-token count); `aux_loss` the balance losses (0 for aux-free
    V3 with no sequence-wise loss). `expert_load` maps each router (module name) to its [E] routed-token counts this
    step, over all processes (`update_expert_bias`'s counts without the dropped column); `load_cv` is the mean over
    layers of their coefficient of variation (`layer_cv`: per router; std/mean of the counts, 0 = balanced).
    """

    step: int
    loss: float
    lm_loss: float
    mtp_loss: float
    aux_loss: float
    lr: float
    grad_norm: float
    tokens: int
    tokens_per_second: float
    load_cv: float
    expert_load: dict[str, torch.Tensor]
    layer_cv: dict[str, float]
    mtp_loss_weight: float
    bias_update_speed: float


@dataclass
class TrainResult:
    """What `train` returns: where the final model is, the loss of every step, and the evaluation history."""

    model_path: str
    output_dir: str
    steps: int
    tokens: int
    losses: list[float]
    eval_losses: dict[int, float]
    eval_perplexities: dict[int, float]
    resumed_from: str | None = None
    num_processes: int = 1


# ------------------------------------------------------------------------------------------------- validation


def resolve_batch(args: TrainArguments, world_size: int) -> tuple[int, int]:
    """(global batch, accumulation steps) such that micro × accumulation × world = global; ValueError otherwise."""
    micro = args.micro_batch_size
    if args.global_batch_size is None:
        accumulation = args.gradient_accumulation_steps or 1
        return micro * accumulation * world_size, accumulation
    per_step = micro * world_size
    if args.global_batch_size % per_step:
        raise ValueError(
            f"global batch {args.global_batch_size} is not divisible by processes ({world_size}) × micro-batch "
            f"({micro}) = {per_step}; change --global-batch-size or --micro-batch-size"
        )
    accumulation = args.global_batch_size // per_step
    if args.gradient_accumulation_steps not in (None, accumulation):
        raise ValueError(
            f"--gradient-accumulation-steps {args.gradient_accumulation_steps} contradicts global batch "
            f"{args.global_batch_size} = micro-batch {micro} × processes {world_size} × {accumulation}"
        )
    return args.global_batch_size, accumulation


def check_model_fits(config, tokenizer, seq_length: int) -> None:
    if seq_length > config.max_position_embeddings:
        raise ValueError(
            f"--seq-length {seq_length} exceeds the model's max_position_embeddings {config.max_position_embeddings}"
        )
    if len(tokenizer) > config.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {config.vocab_size}; "
            "use a matching tokenizer or set vocab_size"
        )


# ------------------------------------------------------------------------------------------ model and tokenizer


def _is_pretrained_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").exists() and any(path.glob("*.safetensors*"))


def load_config(model: str, overrides: dict[str, Any]):
    """The config of a preset, a config.json or a model directory (`presets.load_config`), with `overrides` set."""
    from ..presets import load_config as read_config

    config = read_config(model)
    config.update(overrides)
    return config


def load_tokenizer(name: str | None, model: str):
    from .data import byte_tokenizer

    if name == "bytes":
        return byte_tokenizer()
    source = name or model
    path = Path(source).expanduser()
    if name is None and not (path.is_dir() and any(path.glob("tokenizer*"))):
        raise ValueError(
            f"model {model!r} has no tokenizer; give --tokenizer (a tokenizer directory, a Hub name, or 'bytes')"
        )
    from transformers import AutoTokenizer

    # Without tokenizer_config.json transformers reads the folder's config.json, whose `auto_map` would ask on the
    # terminal whether to run the folder's code: given the model's config (ours) it reads none, and it never runs code.
    config = load_config(model, {}) if name is None and (path / "config.json").is_file() else None
    return AutoTokenizer.from_pretrained(str(path) if path.exists() else source, config=config, trust_remote_code=False)


def build_model(args: TrainArguments, config):
    """A new model from `config` (weights from the seed), or the saved model to continue from."""
    from ..model import DeepseekMoeForCausalLM

    path = Path(args.model).expanduser()
    if _is_pretrained_dir(path):
        return DeepseekMoeForCausalLM.from_pretrained(str(path), config=config, dtype=torch.float32)
    return DeepseekMoeForCausalLM(config)


# ---------------------------------------------------------------------------------------------------- schedule


def lr_lambda(schedule: str, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> Callable[[int], float]:
    """The learning-rate multiplier at optimizer step `step` (0-based)."""

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        if schedule == "step":
            return 1.0 if step < 0.6 * max_steps else 0.316 if step < 0.9 * max_steps else 0.316**2
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return multiplier


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices and expert tensors; none on norms (1D)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# --------------------------------------------------------------------------------------------------------- data


class RowOrder:
    """Which packed rows make up each micro-batch: a seeded permutation per epoch over a map-style dataset, or the
    file order of a streaming one. Global position p (rows consumed) fully determines the data, so resuming needs
    only the step. Micro-batch j of a step covers positions step·G + j·m …; process r runs j = a·W + r."""

    def __init__(self, rows, seed: int, micro: int, accumulation: int, world: int, rank: int) -> None:
        self.rows, self.seed, self.micro = rows, seed, micro
        self.accumulation, self.world, self.rank = accumulation, world, rank
        self.global_batch = micro * accumulation * world
        self.streaming = not hasattr(rows, "__len__")
        self._permutations: dict[int, torch.Tensor] = {}

    def _row(self, position: int) -> dict[str, Any]:
        epoch, index = divmod(position, len(self.rows))
        if epoch not in self._permutations:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._permutations = {epoch: torch.randperm(len(self.rows), generator=generator)}
        return self.rows[int(self._permutations[epoch][index])]

    def micro_batches(self, start_step: int) -> Iterator[list[list[dict[str, Any]]]]:
        """For each step from `start_step`: this process's micro-batches (lists of rows)."""
        from itertools import islice

        if self.streaming:
            stream = iter(self.rows)
            for _ in islice(stream, start_step * self.global_batch):
                pass
        step = start_step
        while True:
            if self.streaming:
                batch = list(islice(stream, self.global_batch))
                if len(batch) < self.global_batch:
                    stream = iter(self.rows)  # next epoch
                    batch += list(islice(stream, self.global_batch - len(batch)))
            else:
                base = step * self.global_batch
                batch = [self._row(base + i) for i in range(self.global_batch)]
            mine = [a * self.world + self.rank for a in range(self.accumulation)]
            yield [batch[j * self.micro : (j + 1) * self.micro] for j in mine]
            step += 1


# -------------------------------------------------------------------------------------------------- checkpoints


class TrainState:
    """The loop's own state, saved with each checkpoint through `Accelerator.register_for_checkpointing`."""

    def __init__(self) -> None:
        self.step = 0
        self.tokens = 0
        self.losses: list[float] = []
        self.eval_losses: dict[int, float] = {}

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "losses": self.losses, "eval_losses": self.eval_losses}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens = state["step"], state["tokens"]
        self.losses = list(state["losses"])
        self.eval_losses = {int(k): v for k, v in state["eval_losses"].items()}


def latest_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest complete checkpoint (a renamed `step-N` directory); temporary ones are not candidates."""
    if not checkpoint_dir.is_dir():
        return None
    done = [p for p in checkpoint_dir.iterdir() if p.is_dir() and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)]
    return max(done, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]), default=None)


def remove_partial_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Delete temporary checkpoint directories left by an interrupted save (only ours: `.tmp-step-N`)."""
    removed = []
    if checkpoint_dir.is_dir():
        for path in checkpoint_dir.iterdir():
            if path.is_dir() and re.fullmatch(rf"{re.escape(TEMP_PREFIX)}{CHECKPOINT_PREFIX}\d+", path.name):
                shutil.rmtree(path)
                removed.append(path)
    return removed


def save_checkpoint(accelerator, checkpoint_dir: Path, step: int, keep: int, write: Callable[[Path], None]) -> Path:
    """`write` (every process) into a temporary directory, renamed to `step-N` once every process has written."""
    final = checkpoint_dir / f"{CHECKPOINT_PREFIX}{step:08d}"
    temp = checkpoint_dir / f"{TEMP_PREFIX}{final.name}"
    if accelerator.is_main_process:
        if temp.exists():
            shutil.rmtree(temp)
        temp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    write(temp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(temp, final)
        done = sorted(
            (p for p in checkpoint_dir.iterdir() if re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)),
            key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]),
        )
        for old in done[: max(0, len(done) - keep)]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


# ---------------------------------------------------------------------------------------------------- layouts


def data_parallel_size(args: TrainArguments, world: int) -> int:
    """Processes that read distinct batches: all of them with DDP; world / tp with FSDP; one batch shared by an
    expert- or tensor-parallel group without FSDP (which must then span every process)."""
    if args.fsdp:
        return world // args.tp_size
    return 1 if args.ep_size > 1 or args.tp_size > 1 else world


class Layout:
    """How the loop talks to the processes: DDP through Accelerate, or FSDP2 / expert / tensor parallelism laid out
    by transformers' distributed engine (`deepseek_moe.training.parallel`). `dp` processes read distinct batches,
    `replicas` processes share each batch; sums over processes are divided by `replicas` to count each batch once.
    """

    def __init__(self, accelerator, engine: bool, dp: int, dp_rank: int) -> None:
        self.accelerator, self.engine = accelerator, engine
        self.dp, self.dp_rank = dp, dp_rank
        self.replicas = accelerator.num_processes // dp

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        total = self.accelerator.reduce(tensor.to(self.accelerator.device), reduction="sum")
        return total / self.replicas if total.is_floating_point() else total // self.replicas

    def gradient_sync(self, model, sync: bool):
        """No gradient all-reduce / reduce-scatter for this micro-batch unless `sync`."""
        import contextlib

        if sync:
            return contextlib.nullcontext()
        if not self.engine:
            return self.accelerator.no_sync(model)
        return _fsdp_no_sync(model)

    def backward(self, loss: torch.Tensor) -> None:
        # Data-parallel gradients are averaged over the `dp` processes; the loss is already a share of the global
        # token mean, so it is scaled back to a sum.
        if self.engine:
            (loss * self.dp).backward()
        else:
            self.accelerator.backward(loss * self.dp)

    def save_state(self, directory: Path, model, optimizer, extras: tuple) -> None:
        """The training state: `Accelerator.save_state` (model, optimizer, RNG, registered `extras`), or for engine
        layouts torch's distributed checkpoint of the sharded model and optimizer plus the `extras`."""
        if not self.engine:
            self.accelerator.save_state(str(directory))
            return
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory))
        if self.accelerator.is_main_process:
            torch.save([extra.state_dict() for extra in extras], directory / "loop_state.pt")

    def load_state(self, directory: Path, model, optimizer, extras: tuple) -> None:
        if not self.engine:
            self.accelerator.load_state(str(directory))
            return
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optimizer_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(state, checkpoint_id=str(directory))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        for extra, saved in zip(extras, torch.load(directory / "loop_state.pt", weights_only=False), strict=True):
            extra.load_state_dict(saved)

    def clip_grad_norm_(self, model, max_norm: float) -> torch.Tensor:
        """Clip to a global 2-norm: Accelerate's for DDP; for engine layouts, whose parameters live on different
        device meshes, `parallel.clip_grad_norm`."""
        if not self.engine:
            return self.accelerator.clip_grad_norm_(model.parameters(), max_norm)
        from .parallel import clip_grad_norm

        return clip_grad_norm(model, max_norm)


class _fsdp_no_sync:
    """FSDP2's `set_requires_gradient_sync(False)` for a block; nothing for modules without it."""

    def __init__(self, model) -> None:
        self.model = model

    def __enter__(self) -> None:
        if hasattr(self.model, "set_requires_gradient_sync"):
            self.model.set_requires_gradient_sync(False)

    def __exit__(self, *exc) -> None:
        if hasattr(self.model, "set_requires_gradient_sync"):
            self.model.set_requires_gradient_sync(True)


def _full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full CPU tensors of a possibly sharded model (collective: every process calls it)."""
    from torch.distributed.tensor import DTensor

    return {
        name: (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().cpu()
        for name, tensor in model.state_dict().items()
    }


# ------------------------------------------------------------------------------------------------------- train


def train(
    args: TrainArguments,
    *,
    model: torch.nn.Module | None = None,
    tokenizer=None,
    on_step: Callable[[StepRecord], None] | None = None,
) -> TrainResult:
    """Pre-train (or continue training) a model as `args` says; returns where the final model was saved.

    `model` / `tokenizer` replace the ones `args.model` / `args.tokenizer` would load (the model's config is then
    the one checked against the data). `on_step(record)` is called on the main process after every optimizer step
    with a `StepRecord`. Bad settings raise ValueError / FileNotFoundError before any training step.
    """
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import is_tensorboard_available

    kwargs_handlers: list[Any] = [DistributedDataParallelKwargs(broadcast_buffers=False)]
    mixed_precision = "bf16" if args.bf16 else "no"
    if args.fp8 == "torchao":
        import importlib.util

        from accelerate.utils import AORecipeKwargs

        if importlib.util.find_spec("torchao") is None:
            raise ValueError("--fp8 torchao needs torchao: pip install torchao")

        mixed_precision = "fp8"
        kwargs_handlers.append(AORecipeKwargs())
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=mixed_precision,
        kwargs_handlers=kwargs_handlers,
        log_with="tensorboard" if args.tensorboard and is_tensorboard_available() else None,
        project_dir=args.output_dir,
    )
    try:
        return _train(accelerator, args, model, tokenizer, on_step)
    finally:
        accelerator.end_training()
        if accelerator.num_processes == 1:
            _reset_accelerate_state()


def _reset_accelerate_state() -> None:
    """Let a later `train` in the same process choose other precision settings (Accelerate's state is global)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _train(accelerator, args: TrainArguments, model, tokenizer, on_step) -> TrainResult:
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from .balancing import load_statistics, update_expert_bias
    from .data import check_data_paths, collate_packed, load_documents, pack_dataset
    from .mtp import mtp_loss_weight

    # Every check that can fail runs before data is tokenized or a step is taken.
    world = accelerator.num_processes
    engine = args.fsdp or args.ep_size > 1 or args.tp_size > 1
    dp = data_parallel_size(args, world)
    global_batch, accumulation = resolve_batch(args, dp)
    if not args.data:
        raise ValueError("no training data; give --data FILE [FILE ...]")
    check_data_paths(args.data)
    if args.eval_data:
        check_data_paths(args.eval_data)
    config = model.config if model is not None else load_config(args.model, args.config_overrides)
    from .parallel import data_parallel_layout, distributed_config, prepare_model_for_parallelism

    distributed_config(config, fsdp=args.fsdp, ep_size=args.ep_size, tp_size=args.tp_size)  # validates the sizes
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(args.tokenizer, args.model)
    check_model_fits(config, tokenizer, args.seq_length)
    fp8_training = None
    if args.fp8 == "blockwise":
        try:
            from .fp8 import enable_fp8_training as fp8_training
        except ImportError as error:
            raise ValueError(f"--fp8 blockwise needs deepseek_moe.training.fp8: {error}") from error
    if args.tensorboard and not accelerator.log_with:  # said only once the settings are known to be good
        from transformers.utils import logging

        logger = logging.get_logger(__name__)
        logger.warning("no TensorBoard logs: tensorboard is not installed (pip install tensorboard)")

    output_dir = Path(args.output_dir)
    checkpoint_dir = output_dir / "checkpoints"
    set_seed(args.seed)
    if model is None:
        model = build_model(args, config)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if fp8_training is not None:
        fp8_training(model, recipe="blockwise")

    with accelerator.main_process_first():
        documents = load_documents(args.data, streaming=args.streaming, text_sample_by=args.text_sample_by)
        train_rows = pack_dataset(documents, tokenizer, args.seq_length, args.text_field)
        eval_rows = None
        if args.eval_data:
            eval_documents = load_documents(args.eval_data, text_sample_by=args.text_sample_by)
            eval_rows = pack_dataset(eval_documents, tokenizer, args.seq_length, args.text_field)
        elif args.eval_holdout_rows > 0:
            if args.streaming:
                raise ValueError("--eval-holdout-rows needs a non-streaming dataset; give --eval-data instead")
            if args.eval_holdout_rows >= len(train_rows):
                raise ValueError(f"--eval-holdout-rows {args.eval_holdout_rows} leaves none of {len(train_rows)} rows")
            cut = len(train_rows) - args.eval_holdout_rows
            eval_rows, train_rows = train_rows.select(range(cut, len(train_rows))), train_rows.select(range(cut))

    if engine:
        model = prepare_model_for_parallelism(model, fsdp=args.fsdp, ep_size=args.ep_size, tp_size=args.tp_size)
        placement = data_parallel_layout(model)
        layout = Layout(accelerator, True, placement.size, placement.rank)
    else:
        layout = Layout(accelerator, False, world, accelerator.process_index)
    if layout.dp != dp:
        raise RuntimeError(f"data-parallel size {layout.dp} differs from the expected {dp}")
    optimizer = torch.optim.AdamW(
        parameter_groups(model, args.weight_decay),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
    )
    # Not prepared by Accelerate: its wrapper would step the schedule once per process.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(args.lr_schedule, args.warmup_steps, args.max_steps, args.min_lr_ratio)
    )
    if not engine:
        with warnings.catch_warnings():
            # Buffers (the correction bias, RoPE tables) are equal on every rank by construction, so DDP need not
            # broadcast them each forward; it calls broadcast_buffers deprecated, and Accelerate has no other switch.
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            model, optimizer = accelerator.prepare(model, optimizer)
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state)

    resumed_from = None
    if accelerator.is_main_process:
        remove_partial_checkpoints(checkpoint_dir)
    accelerator.wait_for_everyone()
    if args.resume and (latest := latest_checkpoint(checkpoint_dir)) is not None:
        layout.load_state(latest, model, optimizer, (scheduler, state))
        resumed_from = str(latest)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "train_args.json").write_text(json.dumps(args.to_dict(), indent=2))
    if accelerator.trackers == [] and accelerator.log_with:
        accelerator.init_trackers("logs", config=_scalar_settings(args))

    unwrapped = accelerator.unwrap_model(model)
    gamma_base = config.bias_update_speed if args.bias_update_speed is None else args.bias_update_speed
    has_mtp = config.num_nextn_predict_layers > 0
    update_expert_bias(unwrapped, 0.0)  # start from zero counts
    order = RowOrder(train_rows, args.seed, args.micro_batch_size, accumulation, layout.dp, layout.dp_rank)
    batches = order.micro_batches(state.step)
    tokens_per_step = global_batch * args.seq_length
    bar = tqdm(
        total=args.max_steps,
        initial=state.step,
        disable=not (args.progress and accelerator.is_local_main_process),
        desc="train",
        unit="step",
    )
    model.train()
    while state.step < args.max_steps:
        progress = state.step / args.max_steps
        mtp_weight = mtp_loss_weight(progress, args.mtp_loss_weight_early, args.mtp_loss_weight_late, args.mtp_switch)
        unwrapped.config.mtp_loss_weight = mtp_weight
        gamma = gamma_base if progress < args.bias_update_stop else 0.0
        micro_batches = [collate_packed(rows) for rows in next(batches)]
        started = time.perf_counter()
        local_items = sum(batch["labels"][:, 1:].ne(-100).sum() for batch in micro_batches)
        num_items = layout.sum(local_items)
        totals = torch.zeros(4, dtype=torch.float64)  # loss, lm, mtp, aux
        for index, batch in enumerate(micro_batches):
            batch = {key: value.to(accelerator.device) for key, value in batch.items()}
            last = index == len(micro_batches) - 1
            with layout.gradient_sync(model, last or args.sync_each_batch), accelerator.autocast():
                outputs = model(**batch, num_items_in_batch=num_items)
                layout.backward(outputs.loss)
            totals += _loss_parts(outputs, batch["labels"], num_items, mtp_weight, unwrapped.config)
        totals = layout.sum(totals).cpu()
        grad_norm = layout.clip_grad_norm_(model, args.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loads = update_expert_bias(unwrapped, gamma)
        elapsed = time.perf_counter() - started
        state.step += 1
        state.tokens += tokens_per_step
        state.losses.append(totals[0].item())
        loads = {name: counts // layout.replicas for name, counts in loads.items()}  # shared batches counted once
        expert_load = {name: counts[:-1] for name, counts in loads.items()}
        stats = {name: load_statistics(counts) for name, counts in loads.items()}
        layer_cv = {name: layer["cv"] for name, layer in stats.items() if layer is not None}
        record = StepRecord(
            step=state.step,
            loss=totals[0].item(),
            lm_loss=totals[1].item(),
            mtp_loss=totals[2].item() if has_mtp else 0.0,
            aux_loss=totals[3].item(),
            lr=lr,
            grad_norm=float(grad_norm),
            tokens=state.tokens,
            tokens_per_second=tokens_per_step / elapsed,
            load_cv=sum(layer_cv.values()) / len(layer_cv) if layer_cv else 0.0,
            expert_load=expert_load,
            layer_cv=layer_cv,
            mtp_loss_weight=mtp_weight,
            bias_update_speed=gamma,
        )
        bar.update(1)
        bar.set_postfix(loss=f"{record.loss:.4f}", tok_s=f"{record.tokens_per_second:.0f}", cv=f"{record.load_cv:.3f}")
        if accelerator.log_with and state.step % args.log_every == 0:
            accelerator.log(_log_values(record), step=state.step)
        if on_step is not None and accelerator.is_main_process:
            on_step(record)
        if eval_rows is not None and args.eval_every and state.step % args.eval_every == 0:
            _record_eval(layout, model, eval_rows, args, state)
        if args.save_every and state.step % args.save_every == 0 and state.step < args.max_steps:
            write = functools.partial(layout.save_state, model=model, optimizer=optimizer, extras=(scheduler, state))
            save_checkpoint(accelerator, checkpoint_dir, state.step, args.keep_checkpoints, write)
    bar.close()
    if eval_rows is not None and state.step not in state.eval_losses:
        _record_eval(layout, model, eval_rows, args, state)
    model_path = save_final_model(accelerator, model, tokenizer, output_dir, full_state=engine)
    result = TrainResult(
        model_path=str(model_path),
        output_dir=str(output_dir),
        steps=state.step,
        tokens=state.tokens,
        losses=list(state.losses),
        eval_losses=dict(state.eval_losses),
        eval_perplexities={step: math.exp(loss) for step, loss in state.eval_losses.items()},
        resumed_from=resumed_from,
        num_processes=world,
    )
    if accelerator.is_main_process:
        (output_dir / "train_result.json").write_text(json.dumps(dataclasses.asdict(result), indent=2))
    return result


def _loss_parts(outputs, labels: torch.Tensor, num_items: torch.Tensor, mtp_weight: float, config) -> torch.Tensor:
    """This micro-batch's (loss, LM, MTP, balance) shares of the global-batch values: they sum to the step's."""
    loss = outputs.loss.detach().double()
    mtp = outputs.mtp_loss.detach().double() if outputs.mtp_loss is not None else loss.new_zeros(())
    aux = loss.new_zeros(())
    if outputs.aux_loss is not None:
        aux = outputs.aux_loss.detach().double() * labels[:, 1:].ne(-100).sum() / num_items
    added_aux = aux if config.add_aux_loss_to_loss else 0.0
    return torch.stack([loss, loss - mtp_weight * mtp - added_aux, mtp, aux]).cpu()


def _record_eval(layout: Layout, model, eval_rows, args: TrainArguments, state: TrainState) -> None:
    """Mean next-token cross-entropy over the evaluation rows (whole micro-batches per process), perplexity exp."""
    import torch.nn.functional as F

    from .data import collate_packed

    micro, world = args.micro_batch_size, layout.dp
    batches = len(eval_rows) // (micro * world)
    if args.eval_batches:
        batches = min(batches, args.eval_batches)
    if batches == 0:
        raise ValueError(f"{len(eval_rows)} evaluation rows are fewer than processes × micro-batch ({world * micro})")
    sums = torch.zeros(2, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        for index in range(batches):
            first = (index * world + layout.dp_rank) * micro
            batch = collate_packed([eval_rows[i] for i in range(first, first + micro)])
            batch = {key: value.to(layout.accelerator.device) for key, value in batch.items()}
            inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
            logits = model(**inputs).logits.float()
            targets = batch["labels"][:, 1:]
            sums[0] += F.cross_entropy(
                logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum"
            ).item()
            sums[1] += targets.ne(-100).sum().item()
    model.train()
    sums = layout.sum(sums).cpu()
    loss = (sums[0] / sums[1]).item()
    state.eval_losses[state.step] = loss
    if layout.accelerator.log_with:
        layout.accelerator.log({"eval/loss": loss, "eval/perplexity": math.exp(loss)}, step=state.step)


def save_final_model(accelerator, model, tokenizer, output_dir: Path, full_state: bool = False) -> Path:
    """`save_pretrained` of the trained model and its tokenizer into output_dir/final (temporary dir, then rename).
    With `full_state` (a sharded model) the full weights are gathered into an unsharded copy first."""
    final = output_dir / "final"
    temp = output_dir / f"{TEMP_PREFIX}final"
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    state = _full_state_dict(unwrapped) if full_state else None
    if accelerator.is_main_process:
        if temp.exists():
            shutil.rmtree(temp)
        if state is not None:
            config = copy.deepcopy(unwrapped.config)
            config.distributed_config = None  # a plain model: building a distributed one would run collectives
            unsharded = type(unwrapped)(config)
            unsharded.load_state_dict(state)
            unwrapped = unsharded
        unwrapped.save_pretrained(str(temp))
        tokenizer.save_pretrained(str(temp))
        if final.exists():
            shutil.rmtree(final)
        os.replace(temp, final)
    accelerator.wait_for_everyone()
    return final


def _scalar_settings(args: TrainArguments) -> dict[str, Any]:
    return {k: v for k, v in args.to_dict().items() if isinstance(v, (int, float, str, bool))}


def _log_values(record: StepRecord) -> dict[str, float]:
    values = {
        "train/loss": record.loss,
        "train/lm_loss": record.lm_loss,
        "train/mtp_loss": record.mtp_loss,
        "train/aux_loss": record.aux_loss,
        "train/lr": record.lr,
        "train/grad_norm": record.grad_norm,
        "train/tokens_per_second": record.tokens_per_second,
        "moe/load_cv": record.load_cv,
    }
    for name, cv in record.layer_cv.items():
        values[f"moe/{name.removeprefix('model.').removesuffix('.mlp.gate')}/cv"] = cv
    return values
