"""The MTP loss weight λ over training: DeepSeek-V3 used 0.3 for the first 10T of 14.8T tokens, then 0.1."""

from __future__ import annotations

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

V3_SWITCH_FRACTION = 10.0 / 14.8


def mtp_loss_weight(
    progress: float, early: float = 0.3, late: float = 0.1, switch_at: float = V3_SWITCH_FRACTION
) -> float:
    """λ for a training `progress` in [0, 1]: `early` before `switch_at`, `late` after it."""
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"progress must be in [0, 1], got {progress}")
    return early if progress < switch_at else late


class MtpLossWeightCallback(TrainerCallback):
    """Sets `model.config.mtp_loss_weight` before every optimizer step from the fraction of `max_steps` done."""

    def __init__(self, early: float = 0.3, late: float = 0.1, switch_at: float = V3_SWITCH_FRACTION) -> None:
        self.early, self.late, self.switch_at = early, late, switch_at

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ) -> None:
        progress = state.global_step / state.max_steps if state.max_steps else 0.0
        model.config.mtp_loss_weight = mtp_loss_weight(min(progress, 1.0), self.early, self.late, self.switch_at)
