"""Lightning callbacks: thin wiring of probes, triggers and actions."""

from lightning_deadunits.callbacks.activation_monitor import ActivationMonitor
from lightning_deadunits.callbacks.block_lesion import BlockLesion
from lightning_deadunits.callbacks.dead_unit_recycler import DeadUnitRecycler
from lightning_deadunits.callbacks.dead_units import DeadUnits
from lightning_deadunits.callbacks.grad_norm_monitor import GradNormMonitor
from lightning_deadunits.callbacks.kernel_norm_monitor import KernelNormMonitor
from lightning_deadunits.callbacks.loss_spike_monitor import LossSpikeMonitor
from lightning_deadunits.callbacks.lr_warmup import LRWarmup
from lightning_deadunits.callbacks.monitor import MonitorCallback
from lightning_deadunits.callbacks.rewind import Rewind

__all__ = [
    "ActivationMonitor",
    "BlockLesion",
    "DeadUnitRecycler",
    "DeadUnits",
    "GradNormMonitor",
    "KernelNormMonitor",
    "LRWarmup",
    "LossSpikeMonitor",
    "MonitorCallback",
    "Rewind",
]
