"""Stateful accumulators that hold sums, counts and maxima, so that a DDP reduction is exact."""

from lightning_deadunits.metrics.activation_stats import ActivationStats, CallSite, SiteSummary
from lightning_deadunits.metrics.kernel_deaths import KernelDeathTracker

__all__ = ["ActivationStats", "CallSite", "KernelDeathTracker", "SiteSummary"]
