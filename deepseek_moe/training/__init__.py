"""Training utilities: load balancing, the MTP loss schedule, loops and callbacks."""

from .mtp import MtpLossWeightCallback, mtp_loss_weight

__all__ = ["MtpLossWeightCallback", "mtp_loss_weight"]
