"""Lightning callbacks: thin wiring of probes, triggers and actions."""

from lightning_deadunits.callbacks.kernel_norm_monitor import KernelNormMonitor
from lightning_deadunits.callbacks.lr_warmup import LRWarmup

__all__ = ["KernelNormMonitor", "LRWarmup"]
