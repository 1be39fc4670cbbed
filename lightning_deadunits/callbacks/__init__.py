"""Lightning callbacks: thin wiring of probes, triggers and actions."""

from lightning_deadunits.callbacks.kernel_norm_monitor import KernelNormMonitor

__all__ = ["KernelNormMonitor"]
