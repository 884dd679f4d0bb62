"""Load balancing as training state: DeepSeek-V3's auxiliary-loss-free bias update and per-layer load statistics.

Routers count routed (token, expert) pairs during training forwards (`tokens_per_expert`). Once per optimizer step,
after all gradient-accumulation micro-batches, `update_expert_bias` sums the counts over data-parallel ranks and
moves each `e_score_correction_bias` by the sign rule b_i += γ·sign(mean load − load_i) (V3 §2.1.2), then resets
the counts. Call it from exactly one place: `register_bias_update_hook` (any training loop) or
`ExpertBalanceCallback` (transformers Trainer):

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[ExpertBalanceCallback()])
    # or, in a plain loop:
    register_bias_update_hook(optimizer, model)

Counting is exact under gradient accumulation, activation checkpointing and every data/expert-parallel layout: each
rank's routers count the (token, expert) pairs of the tokens that rank routes, over all experts, before any expert
parallel dispatch, so the sum over the ranks that hold distinct batches is the global count. Padding (attention mask 0)
is left out of the counts, as it is of the balance losses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from transformers import PreTrainedModel, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.utils import logging

from ..model.modeling_deepseek_moe import DeepseekMoeTopkRouter

logger = logging.get_logger(__name__)


def moe_routers(model: torch.nn.Module) -> dict[str, DeepseekMoeTopkRouter]:
    """The routers of a model (wrapped by DDP/PEFT or not), keyed by module name, in layer order."""
    return {name: module for name, module in model.named_modules() if isinstance(module, DeepseekMoeTopkRouter)}


def _counts(router: DeepseekMoeTopkRouter) -> torch.Tensor:
    """[E + 1] int64: the router's routed pairs per expert since the last reset, then its dropped pairs."""
    return torch.cat([router.tokens_per_expert, router.dropped_tokens.view(1)])


def _bias_update_speed(model: torch.nn.Module) -> float:
    config = next(module.config for module in model.modules() if isinstance(module, PreTrainedModel))
    return config.bias_update_speed


@torch.no_grad()
def update_expert_bias(
    model: torch.nn.Module, gamma: float | None = None, group: dist.ProcessGroup | None = None
) -> dict[str, torch.Tensor]:
    """Apply one optimizer step's bias update and reset the counts; returns each router's global counts.

    Counts are summed over every micro-batch since the last call and, when torch.distributed is initialised, over
    the ranks of `group` (default: all), so every rank applies the same update. Ranks that see the same tokens
    (tensor parallel) only scale the counts, which the sign rule ignores. γ defaults to the config's
    `bias_update_speed` (0 freezes the bias; the counts are still returned and reset). Routers without a bias
    (V2 family) only report and reset.
    Returns {router name: [E + 1] int64 tensor: counts per expert, then the number of dropped pairs}.
    """
    routers = moe_routers(model)
    if not routers:
        return {}
    gamma = _bias_update_speed(model) if gamma is None else gamma
    device = next(iter(routers.values())).weight.device  # where the collective runs (the accelerator under NCCL)
    counts = torch.stack([_counts(router).to(device) for router in routers.values()])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(counts, group=group)
    loads = {}
    for (name, router), layer_counts in zip(routers.items(), counts, strict=True):
        load = layer_counts[:-1].to(torch.float32)
        if gamma > 0 and hasattr(router, "e_score_correction_bias"):
            if router.e_score_correction_bias.dtype != torch.float32:
                # `model.to(bf16)` casts buffers too, and steps of γ = 1e-3 vanish in bf16 next to a bias near 1.
                logger.warning_once("e_score_correction_bias was not fp32; it is moved back to fp32 for the update")
                router.e_score_correction_bias = router.e_score_correction_bias.float()
            bias = router.e_score_correction_bias
            bias += (gamma * torch.sign(load.mean() - load)).to(bias.device)
        router.reset_counts()
        loads[name] = layer_counts.cpu()
    return loads


def register_bias_update_hook(
    optimizer: torch.optim.Optimizer,
    model: torch.nn.Module,
    gamma: float | None = None,
    group: dist.ProcessGroup | None = None,
) -> torch.utils.hooks.RemovableHandle:
    """Run `update_expert_bias(model, gamma, group)` after every real optimizer step, i.e. once per optimizer step
    whatever the gradient accumulation (torchtitan uses the same seam). Wrappers such as Accelerate's
    `AcceleratedOptimizer` (which calls the inner step only when gradients sync) are unwrapped to the torch
    optimizer. Returns the handle to remove the hook."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer

    def hook(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        update_expert_bias(model, gamma, group)

    return optimizer.register_step_post_hook(hook)


def load_statistics(counts: torch.Tensor) -> dict[str, float | torch.Tensor] | None:
    """Balance of one layer from `[E + 1]` counts (per expert, then dropped pairs), as `update_expert_bias` returns;
    None when the layer routed nothing (e.g. an MTP module that did not run).

    `fraction` [E] is each expert's share of the routed pairs, `cv` the coefficient of variation std/mean of the
    loads (0 = perfectly balanced), `max_over_mean` the most loaded expert relative to the mean, `dropped` the
    fraction of routed pairs dropped by the capacity limit.
    """
    load = counts[:-1].double()
    total = load.sum().item()
    if total == 0:
        return None
    mean = load.mean()
    return {
        "fraction": load / total,
        "cv": (load.std(unbiased=False) / mean).item(),
        "max_over_mean": (load.max() / mean).item(),
        "dropped": counts[-1].item() / total,
    }


def current_load(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The counts accumulated on this rank since the last bias update, in `update_expert_bias`'s format; feed them
    to `load_statistics` for a layer's balance."""
    return {name: _counts(router).cpu() for name, router in moe_routers(model).items()}


class ExpertBalanceCallback(TrainerCallback):
    """Trainer callback: the V3 bias update once per optimizer step (`on_step_end` runs after the optimizer step and
    after all accumulation micro-batches), and load statistics per MoE layer in the Trainer logs.

    Logs `moe/cv`, `moe/max_over_mean`, `moe/dropped` (averaged over layers) and `moe/<layer>/<stat>` for the loads
    since the previous log. `history` keeps each step's token fraction per expert per layer for `plot_expert_load`.
    Add it with `trainer.add_callback(...)`; to let reporting integrations see the statistics, put it first:
    `trainer.callback_handler.callbacks.insert(0, callback)`.
    """

    def __init__(self, gamma: float | None = None, update_bias: bool = True, keep_history: bool = True) -> None:
        self.gamma = gamma
        self.update_bias = update_bias
        self.keep_history = keep_history
        self.history: list[dict[str, torch.Tensor]] = []
        self._since_log: dict[str, torch.Tensor] = {}

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ) -> None:
        loads = update_expert_bias(model, self.gamma if self.update_bias else 0.0)
        for name, counts in loads.items():
            self._since_log[name] = self._since_log.get(name, 0) + counts
        if self.keep_history:
            stats = {name: load_statistics(counts) for name, counts in loads.items()}
            self.history.append({name: s["fraction"] for name, s in stats.items() if s is not None})

    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs
    ) -> None:
        if logs is None or not self._since_log:
            return
        per_layer = {name: load_statistics(counts) for name, counts in self._since_log.items()}
        per_layer = {name: layer_stats for name, layer_stats in per_layer.items() if layer_stats is not None}
        self._since_log = {}
        if not per_layer:
            return
        stats = {}
        for key in ("cv", "max_over_mean", "dropped"):
            stats[f"moe/{key}"] = sum(s[key] for s in per_layer.values()) / len(per_layer)
            for name, layer_stats in per_layer.items():
                layer = name.removeprefix("model.").removesuffix(".mlp.gate")
                stats[f"moe/{layer}/{key}"] = layer_stats[key]
        logs.update(stats)
        if state.log_history:
            state.log_history[-1].update(stats)


def expert_load_matrix(history: Sequence[dict[str, torch.Tensor]], layer: str) -> torch.Tensor:
    """[steps, E] token fractions of one router (name as in `moe_routers`) over the recorded steps."""
    return torch.stack([step[layer] for step in history])


def plot_expert_load(history: Sequence[dict[str, torch.Tensor]], layer: str, path: str | None = None):
    """Heatmap of one layer's expert load over steps (x: step, y: expert, colour: load / mean load).

    Needs matplotlib (optional: `pip install matplotlib`). Saves to `path` if given; returns the figure.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("plot_expert_load needs matplotlib: pip install matplotlib") from error
    fractions = expert_load_matrix(history, layer)
    relative = (fractions * fractions.shape[1]).T.numpy()
    figure, axes = plt.subplots(figsize=(8, 4))
    image = axes.imshow(relative, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("expert")
    axes.set_title(f"{layer}: load / mean load")
    figure.colorbar(image, ax=axes)
    if path is not None:
        figure.savefig(path, dpi=100, bbox_inches="tight")
    return figure
