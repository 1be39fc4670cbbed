"""Lightning callbacks: thin wiring of probes, triggers and actions."""

from lightning_deadunits.callbacks.activation_monitor import ActivationMonitor
from lightning_deadunits.callbacks.kernel_norm_monitor import KernelNormMonitor
from lightning_deadunits.callbacks.lr_warmup import LRWarmup

__all__ = ["ActivationMonitor", "KernelNormMonitor", "LRWarmup"]
