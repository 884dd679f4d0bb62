"""The demo's figures, drawn from `train()`'s per-step records with matplotlib (Agg backend, PNG files)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(records: Sequence, perplexities: dict[str, float], path: Path) -> Path:
    """Training loss, its language-model and MTP parts per optimizer step; held-out perplexities in the title."""
    plt = _pyplot()
    steps = [record.step for record in records]
    figure, axes = plt.subplots(figsize=(8, 4.5))
    axes.plot(steps, [record.loss for record in records], label="loss (LM + λ·MTP + balance)", linewidth=1)
    axes.plot(steps, [record.lm_loss for record in records], label="LM cross-entropy", linewidth=1)
    if any(record.mtp_loss for record in records):
        axes.plot(steps, [record.mtp_loss for record in records], label="MTP cross-entropy (depth 1)", linewidth=1)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("nats per token")
    axes.set_title("held-out perplexity " + ", ".join(f"{name} {value:.1f}" for name, value in perplexities.items()))
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path


def expert_load_history(records: Sequence) -> dict[str, torch.Tensor]:
    """Per router: [steps, E] load relative to the mean (1 = an expert gets its fair share)."""
    layers = list(records[0].expert_load)
    history = {}
    for layer in layers:
        counts = torch.stack([record.expert_load[layer].double() for record in records])
        history[layer] = counts / counts.mean(dim=1, keepdim=True).clamp(min=1e-12)
    return history


def plot_expert_load(records: Sequence, path: Path) -> Path:
    """One heatmap per MoE layer: expert (y) by optimizer step (x), coloured by load / mean load."""
    plt = _pyplot()
    history = expert_load_history(records)
    figure, all_axes = plt.subplots(
        len(history), 1, figsize=(9, 2.2 * len(history) + 0.6), squeeze=False, layout="constrained"
    )
    highest = max(float(loads.max()) for loads in history.values())
    for axes, (layer, loads) in zip(all_axes[:, 0], history.items(), strict=True):
        image = axes.imshow(
            loads.T.numpy(), aspect="auto", origin="lower", cmap="magma", vmin=0, vmax=highest, interpolation="nearest"
        )
        axes.set_ylabel("expert")
        axes.set_title(layer.removeprefix("model.").removesuffix(".mlp.gate"), fontsize=9)
    all_axes[-1, 0].set_xlabel("optimizer step")
    figure.colorbar(image, ax=all_axes[:, 0].tolist(), label="load / mean load")
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path


def plot_load_cv(runs: dict[str, Sequence], path: Path) -> Path:
    """Coefficient of variation of the expert loads (mean over MoE layers) per step, one line per run."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(8, 4))
    for label, records in runs.items():
        axes.plot([record.step for record in records], [record.load_cv for record in records], label=label)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("load CV (std / mean over experts)")
    axes.set_title("expert load balance: auxiliary-loss-free bias update on and off")
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path
