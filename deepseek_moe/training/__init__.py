"""Training utilities: load balancing (bias update, Trainer callback, load statistics)."""

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

__all__ = [
    "ExpertBalanceCallback",
    "current_load",
    "expert_load_matrix",
    "load_statistics",
    "moe_routers",
    "plot_expert_load",
    "register_bias_update_hook",
    "update_expert_bias",
]
