"""Training utilities: load balancing (bias update, Trainer callback, load statistics), the MTP loss schedule and the
multi-process layouts (FSDP2, expert and tensor parallelism on transformers' distributed engine)."""

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
from .parallel import (
    DataParallelLayout,
    clip_grad_norm,
    data_parallel_layout,
    distributed_config,
    prepare_model_for_parallelism,
)

__all__ = [
    "DataParallelLayout",
    "ExpertBalanceCallback",
    "MtpLossWeightCallback",
    "clip_grad_norm",
    "current_load",
    "data_parallel_layout",
    "distributed_config",
    "expert_load_matrix",
    "load_statistics",
    "moe_routers",
    "mtp_loss_weight",
    "plot_expert_load",
    "prepare_model_for_parallelism",
    "register_bias_update_hook",
    "update_expert_bias",
]
