"""Training utilities: load balancing (bias update, Trainer callback, load statistics) and the MTP loss schedule."""

from .balancing import (
    ExpertBalanceCallback,
    current_load,
    expert_load_matrix,
    load_statistics,
    moe_routers,
    plot_expert_load,
    register_bias_update_hook,
    update_expert_bias,
)
from .mtp import MtpLossWeightCallback, mtp_loss_weight

__all__ = [
    "ExpertBalanceCallback",
    "MtpLossWeightCallback",
    "current_load",
    "expert_load_matrix",
    "load_statistics",
    "moe_routers",
    "mtp_loss_weight",
    "plot_expert_load",
    "register_bias_update_hook",
    "update_expert_bias",
]
