"""Multi-process layouts for training, on the engines that provide them; this module only chooses and validates.

- Data parallel (DDP): nothing to do here. Whoever runs the loop wraps the model (Accelerate, Trainer, or
  `torch.nn.parallel.DistributedDataParallel`); the routers' token counts are plain tensors, not buffers, so DDP's
  buffer broadcast leaves every rank's counts alone.
- FSDP2, expert parallelism (routed experts split over ranks, tokens exchanged with all-to-all) and tensor parallelism:
  transformers' distributed engine (`DistributedConfig`), driven by the config's `base_model_tp_plan` /
  `base_model_ep_plan` and the default FSDP plan (embedding, each decoder and MTP layer, final norm with `lm_head`,
  the fp32 routers in their own groups).

Whatever the layout, `update_expert_bias` (or `ExpertBalanceCallback`) sums the counts over all ranks once per
optimizer step: each rank's routers count the tokens that rank routes, over all experts, before any expert-parallel
dispatch, so the sum over ranks holding distinct batches is the global count; ranks that share a batch (a tensor- or
expert-parallel group without FSDP) count the same tokens, which multiplies every count by the group size and
leaves the sign rule and the load statistics (shares, CV, max/mean, dropped fraction) unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from transformers import PreTrainedModel

EP_IMPLEMENTATIONS = ("all_to_all", "all_reduce", "auto")


@dataclass(frozen=True)
class DataParallelLayout:
    """How the ranks split the data: `size` groups see distinct batches; this rank belongs to group `rank`."""

    size: int
    rank: int


def world_size() -> int:
    """Processes in the job: the initialised process group, else the launcher's `WORLD_SIZE`, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def distributed_config(
    config, *, fsdp: bool = False, ep_size: int = 1, tp_size: int = 1, ep_implementation: str = "all_to_all", **extra
):
    """The `DistributedConfig` for these flags on this job's world size, or None for plain data parallelism.

    - `fsdp`: FSDP2 over the ranks left once tensor parallelism is taken (`fsdp_size = world / tp_size`).
    - `ep_size`: routed experts split over `ep_size` ranks, tokens exchanged with all-to-all. With FSDP the
      expert-parallel ranks hold distinct batches (FSDP2 + EP). Without it the engine needs the expert group to be a
      tensor-parallel group, whose ranks share one batch (it has no expert parallelism with replicated dense
      layers): `tp_size` 1 becomes `ep_size` (dense layers split by TP over the same ranks), and `ep_size` must then
      be the world size.
    - `tp_size`: tensor parallelism of the dense layers (and of the experts when `ep_size` is 1); without FSDP it
      must be the world size.
    Raises ValueError naming the flag for sizes that cannot work (before any weight is touched). `extra` goes to
    `DistributedConfig` (e.g. `fsdp_cpu_offload=True`).
    """
    world = world_size()
    for name, size in (("ep_size", ep_size), ("tp_size", tp_size)):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"{name} must be a positive integer, got {size!r}")
    if ep_implementation not in EP_IMPLEMENTATIONS:
        raise ValueError(f"ep_implementation must be one of {EP_IMPLEMENTATIONS}, got {ep_implementation!r}")
    if world % tp_size:
        raise ValueError(f"tp_size={tp_size} does not divide the world size {world}")
    if ep_size > 1:
        if config.n_routed_experts % ep_size:
            raise ValueError(f"ep_size={ep_size} does not divide the {config.n_routed_experts} routed experts")
        if world % ep_size:
            raise ValueError(f"ep_size={ep_size} does not divide the world size {world}")
        if ep_size % tp_size:
            raise ValueError(f"ep_size={ep_size} must be a multiple of tp_size={tp_size}")
    if not fsdp and ep_size == 1 and tp_size == 1:
        return None
    from transformers.distributed import DistributedConfig

    if fsdp:
        return DistributedConfig(
            fsdp_size=world // tp_size,
            tp_size=tp_size,
            ep_size=ep_size,
            ep_implementation=ep_implementation,
            **extra,
        )
    if ep_size > tp_size == 1:
        tp_size = ep_size
    elif ep_size > tp_size:
        raise ValueError(
            f"ep_size={ep_size} needs fsdp (FSDP2 + EP) or tp_size={ep_size} (TP + EP): transformers' distributed "
            "engine has no expert parallelism with replicated dense layers"
        )
    if tp_size != world:
        raise ValueError(
            f"without fsdp, tp_size={tp_size} (or ep_size) must be the world size {world} (the ranks of a tensor- or "
            "expert-parallel group share one batch); add fsdp for data parallelism across groups"
        )
    return DistributedConfig(tp_size=tp_size, ep_size=ep_size, ep_implementation=ep_implementation, **extra)


def prepare_model_for_parallelism(
    model_or_path: PreTrainedModel | str | os.PathLike,
    *,
    fsdp: bool = False,
    ep_size: int = 1,
    tp_size: int = 1,
    ep_implementation: str = "all_to_all",
    fsdp_cpu_offload: bool = False,
    **from_pretrained_kwargs,
) -> PreTrainedModel:
    """A model laid out for FSDP2 / expert / tensor parallelism on every rank (call it on all ranks).

    A path (or Hub id) loads with `from_pretrained(..., distributed_config=...)`, each rank reading its shard. A model
    in memory (e.g. built from a preset) is laid out in place by the same engine, after every rank has taken rank 0's
    weights and buffers. Without `fsdp`/`ep_size`/`tp_size` the model is returned as is, ready for DDP. The
    process group is created from the launcher's environment (torchrun, `accelerate launch`) when needed: NCCL on
    GPUs, gloo on CPUs.
    """
    if isinstance(model_or_path, PreTrainedModel):
        model, config = model_or_path, model_or_path.config
    else:
        from transformers import AutoConfig

        model, config = None, AutoConfig.from_pretrained(model_or_path, **_config_kwargs(from_pretrained_kwargs))
    parallel = distributed_config(
        config,
        fsdp=fsdp,
        ep_size=ep_size,
        tp_size=tp_size,
        ep_implementation=ep_implementation,
        fsdp_cpu_offload=fsdp_cpu_offload,
    )
    if model is None:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(
            model_or_path, distributed_config=parallel, **from_pretrained_kwargs
        )
    if parallel is None:
        return model
    model_class = type(model)
    parallel, device, mesh_manager = model_class.prepare_distribute_model(parallel)
    if mesh_manager is None:  # a single process: nothing to lay out
        return model
    if device is not None:
        model.to(device)
    _broadcast_from_rank_zero(model)
    return model_class.maybe_distribute_model(model, parallel, mesh_manager)


def _config_kwargs(from_pretrained_kwargs: dict) -> dict:
    keys = ("revision", "token", "trust_remote_code", "cache_dir", "local_files_only")
    return {key: from_pretrained_kwargs[key] for key in keys if key in from_pretrained_kwargs}


@torch.no_grad()
def _broadcast_from_rank_zero(model: torch.nn.Module) -> None:
    """Every rank starts from rank 0's parameters and buffers (the engine shards each rank's own copy)."""
    for tensor in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(tensor.data, src=0)


@torch.no_grad()
def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """`clip_grad_norm_` for gradients that live on several device meshes, which torch's cannot combine (FSDP2 + EP:
    dense weights on the FSDP mesh, experts on the expert mesh; TP + EP: some weights not sharded at all). Each mesh's
    norm is reduced over that mesh, the total is their 2-norm, and every gradient is scaled by the same factor.
    Returns the total norm before clipping; `max_norm=inf` only measures."""
    from torch.distributed.tensor import DTensor
    from torch.nn.utils import clip_grads_with_norm_, get_total_norm

    by_mesh: dict = {}
    for param in model.parameters():
        if param.grad is not None:
            mesh = param.grad.device_mesh if isinstance(param.grad, DTensor) else None
            by_mesh.setdefault(mesh, []).append(param)
    norms = [get_total_norm([param.grad for param in params]) for params in by_mesh.values()]
    norms = [norm.full_tensor() if isinstance(norm, DTensor) else norm for norm in norms]
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    if max_norm != float("inf"):
        for params in by_mesh.values():
            clip_grads_with_norm_(params, max_norm, total)
    return total


def data_parallel_layout(model: torch.nn.Module) -> DataParallelLayout:
    """Which batch this rank must read: ranks of one tensor- or expert-parallel group without FSDP share a batch.

    For a model laid out by `prepare_model_for_parallelism` (or `from_pretrained(distributed_config=...)`) the
    data-parallel groups are the engine's `dp_replicate × fsdp` mesh; otherwise every rank is its own group."""
    parallel = getattr(model.config, "distributed_config", None)
    mesh_manager = getattr(model, "_mesh_manager", None)
    if parallel is None or mesh_manager is None:
        world = world_size()
        return DataParallelLayout(world, dist.get_rank() if world > 1 and dist.is_initialized() else 0)
    mesh = mesh_manager.get_mesh(("dp_replicate", "fsdp"))
    coordinate = mesh.get_coordinate()
    return DataParallelLayout(parallel.dp_size, coordinate[0] * parallel.fsdp_size + coordinate[1])
