"""Worker of `test_distributed.py`: a few optimizer steps of a tiny V3 model (MTP on, V3 bias update on) under each
parallel layout, in one `torchrun --nproc-per-node 2` job (gloo, one thread per process), so the processes are
started once for all layouts. Rank 0 saves each layout's losses, final bias and final weights for the test, which
compares them with `run_single_process` over the same global batches.

    torchrun --nproc-per-node 2 tests/distributed_worker.py OUTPUT.pt LAYOUT [LAYOUT ...]
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from conftest import randomize_  # noqa: E402

from deepseek_moe import DeepseekMoeConfig, DeepseekMoeForCausalLM  # noqa: E402
from deepseek_moe.training import moe_routers, update_expert_bias  # noqa: E402
from deepseek_moe.training.parallel import (  # noqa: E402
    clip_grad_norm,
    data_parallel_layout,
    prepare_model_for_parallelism,
)

STEPS, MICRO_BATCHES, ROWS, LENGTH = 3, 2, 4, 12  # ROWS: the global micro-batch, split over data-parallel ranks
MAX_GRAD_NORM = 1.0  # below the gradient norms of these runs, so clipping acts

# name: (prepare_model_for_parallelism flags, wrap in DDP, synchronise gradients at every micro-batch)
LAYOUTS = {
    "ddp": ({}, True, False),
    "ddp_sync_each": ({}, True, True),
    "fsdp": ({"fsdp": True}, False, False),
    "fsdp_sync_each": ({"fsdp": True}, False, True),
    "tp": ({"tp_size": 2}, False, True),
    "ep": ({"ep_size": 2}, False, True),  # without FSDP the engine runs EP over a TP group sharing the batch
    "fsdp_ep": ({"fsdp": True, "ep_size": 2}, False, False),
    "fsdp_ep_sync_each": ({"fsdp": True, "ep_size": 2}, False, True),
    "fsdp_ep_from_folder": ({"fsdp": True, "ep_size": 2, "from_folder": True}, False, False),
}
# Accelerate's own wrapping: DDP or its FSDP2 plugin (decoder and MTP layers as units, from `_no_split_modules`),
# gradient accumulation by `accelerator.accumulate`, the bias update on the optimizer's post-step hook.
ACCELERATE_LAYOUTS = {
    "accelerate_ddp_sync_each": {"fsdp": False, "sync_each_batch": True},
    "accelerate_fsdp2": {"fsdp": True, "sync_each_batch": False},
    "accelerate_fsdp2_sync_each": {"fsdp": True, "sync_each_batch": True},
}


def build_model() -> DeepseekMoeForCausalLM:
    """The tiny V3 every run starts from: random weights, norms and bias; MTP and the balance losses on."""
    config = DeepseekMoeConfig.from_preset("tiny-v3", bias_update_speed=0.01, seq_aux_alpha=0.01)
    torch.manual_seed(0)
    return randomize_(DeepseekMoeForCausalLM(config), seed=0).train()


def global_batches() -> list[list[torch.Tensor]]:
    """[step][micro-batch] -> token ids [ROWS, LENGTH]."""
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 512, (STEPS, MICRO_BATCHES, ROWS, LENGTH), generator=generator)
    return [list(step) for step in ids]


def optimizer_for(model: torch.nn.Module) -> torch.optim.Optimizer:
    """Plain SGD: AdamW's first steps are lr·sign(g), which turns rounding-level differences of near-zero gradient
    entries into lr-sized weight differences and would hide what the weight comparison checks."""
    return torch.optim.SGD(model.parameters(), lr=0.1)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """A full CPU copy of a possibly sharded (DTensor) parameter."""
    from torch.distributed.tensor import DTensor

    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().cpu().clone()


def snapshot(model: torch.nn.Module, losses: list[float]) -> dict:
    return {
        "losses": losses,
        "bias": {name: full(r.e_score_correction_bias) for name, r in moe_routers(model).items()},
        "params": {name: full(p) for name, p in model.named_parameters()},
    }


def run_single_process() -> dict:
    """The reference: one process over the whole global batch of every micro-batch."""
    model = build_model()
    optimizer = optimizer_for(model)
    losses = []
    for step in global_batches():
        for ids in step:
            loss = model(ids, labels=ids).loss
            (loss / MICRO_BATCHES).backward()
            losses.append(loss.item())
        assert torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM) > MAX_GRAD_NORM
        optimizer.step()
        update_expert_bias(model)
        optimizer.zero_grad()
    return snapshot(model, losses)


def run_layout(name: str, folder: str) -> dict:
    flags, use_ddp, sync_each = LAYOUTS[name]
    flags = dict(flags)
    if flags.pop("from_folder", False):  # each rank loads its shard with from_pretrained(distributed_config=...)
        if dist.get_rank() == 0:
            build_model().save_pretrained(folder)
        dist.barrier()
        model = prepare_model_for_parallelism(folder, **flags).train()
    else:
        model = prepare_model_for_parallelism(build_model(), **flags)
    layout = data_parallel_layout(model)
    rows = slice(layout.rank * ROWS // layout.size, (layout.rank + 1) * ROWS // layout.size)
    if use_ddp:
        # broadcast_buffers=True (the default) copies rank 0's buffers at every synchronised forward
        model = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=True)
    optimizer = optimizer_for(model)
    losses = []
    for step in global_batches():
        for micro, ids in enumerate(step):
            last = micro == MICRO_BATCHES - 1
            with defer_gradient_sync(model, enabled=not (sync_each or last)):
                local = ids[rows]
                loss = model(local, labels=local).loss
                (loss / MICRO_BATCHES).backward()
            reported = loss.detach().clone()
            dist.all_reduce(reported)
            losses.append(reported.item() / dist.get_world_size())
        clip_grad_norm(model, MAX_GRAD_NORM)
        optimizer.step()
        update_expert_bias(model)
        optimizer.zero_grad()
    return snapshot(model.module if use_ddp else model, losses)


def run_accelerate(name: str) -> dict:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import FullyShardedDataParallelPlugin, GradientAccumulationPlugin

    from deepseek_moe.training import register_bias_update_hook

    options = ACCELERATE_LAYOUTS[name]
    fsdp_plugin = None
    if options["fsdp"]:
        fsdp_plugin = FullyShardedDataParallelPlugin(
            fsdp_version=2,
            auto_wrap_policy="transformer_based_wrap",
            transformer_cls_names_to_wrap=list(DeepseekMoeForCausalLM._no_split_modules),
            reshard_after_forward=True,
            state_dict_type="SHARDED_STATE_DICT",
        )
    accumulation = GradientAccumulationPlugin(num_steps=MICRO_BATCHES, sync_each_batch=options["sync_each_batch"])
    accelerator = Accelerator(cpu=True, gradient_accumulation_plugin=accumulation, fsdp_plugin=fsdp_plugin)
    model = build_model()
    optimizer = optimizer_for(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    register_bias_update_hook(optimizer, model)
    rows = slice(dist.get_rank() * ROWS // 2, (dist.get_rank() + 1) * ROWS // 2)
    losses = []
    for step in global_batches():
        for ids in step:
            with accelerator.accumulate(model):
                local = ids[rows]
                loss = model(local, labels=local).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
                optimizer.step()
                optimizer.zero_grad()
            losses.append(accelerator.reduce(loss.detach(), reduction="mean").item())
    result = snapshot(accelerator.unwrap_model(model), losses)
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    return result


class defer_gradient_sync:
    """`no_sync` for DDP, `set_requires_gradient_sync(False)` for FSDP2; nothing when not `enabled`."""

    def __init__(self, model: torch.nn.Module, enabled: bool) -> None:
        self.model, self.enabled, self.context = model, enabled, None

    def __enter__(self) -> None:
        if not self.enabled:
            return
        if isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            self.context = self.model.no_sync()
            self.context.__enter__()
        elif hasattr(self.model, "set_requires_gradient_sync"):
            self.model.set_requires_gradient_sync(False)

    def __exit__(self, *exc) -> None:
        if self.context is not None:
            self.context.__exit__(*exc)
        elif self.enabled and hasattr(self.model, "set_requires_gradient_sync"):
            self.model.set_requires_gradient_sync(True)


def main(output: str, names: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results = {}
    try:
        for name in names:
            if name in ACCELERATE_LAYOUTS:
                results[name] = run_accelerate(name)
            else:
                results[name] = run_layout(name, os.path.join(os.path.dirname(output), f"{name}-model"))
            dist.barrier()
    finally:
        if dist.get_rank() == 0:
            torch.save(results, output)
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
