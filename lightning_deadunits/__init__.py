"""lightning-deadunits: find dead kernels, dead units and the loss spikes that kill them."""

from lightning_deadunits.actions import Action, AlarmHandler
from lightning_deadunits.callbacks import (
    ActivationMonitor,
    BlockLesion,
    DeadUnitRecycler,
    DeadUnits,
    GradNormMonitor,
    KernelNormMonitor,
    LossSpikeMonitor,
    LRWarmup,
    MonitorCallback,
    Rewind,
)
from lightning_deadunits.dumps import LoadedDump, load_dump
from lightning_deadunits.errors import DeadUnitsError, DeadUnitsWarning
from lightning_deadunits.events import read_events
from lightning_deadunits.probes.lesion import lesion_blocks
from lightning_deadunits.readings import AlarmListener, Reading, ReadingListener
from lightning_deadunits.triggers import Alarm, Rule, ThresholdRule, TrendRule

__version__ = "0.1.0"

__all__ = [
    "Action",
    "ActivationMonitor",
    "Alarm",
    "AlarmHandler",
    "AlarmListener",
    "BlockLesion",
    "DeadUnitRecycler",
    "DeadUnits",
    "DeadUnitsError",
    "DeadUnitsWarning",
    "GradNormMonitor",
    "KernelNormMonitor",
    "LRWarmup",
    "LoadedDump",
    "LossSpikeMonitor",
    "MonitorCallback",
    "Reading",
    "ReadingListener",
    "Rewind",
    "Rule",
    "ThresholdRule",
    "TrendRule",
    "__version__",
    "lesion_blocks",
    "load_dump",
    "read_events",
]
