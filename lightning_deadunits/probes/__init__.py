"""What is measured, and on which steps."""

from lightning_deadunits.probes.activations import DEFAULT_EPS, ActivationProbe
from lightning_deadunits.probes.kernel_norms import KernelNormProbe, LayerKernels
from lightning_deadunits.probes.module_kinds import (
    DEFAULT_ACTIVATION_TYPES,
    DEFAULT_KERNEL_TYPES,
    POOLING_TYPES,
    PRE_ACTIVATION_TYPES,
    unit_count,
)
from lightning_deadunits.probes.selection import ModuleSelector
from lightning_deadunits.probes.tracing import ForwardTracer
from lightning_deadunits.probes.unit_flow import UnitFlowTracer

__all__ = [
    "DEFAULT_ACTIVATION_TYPES",
    "DEFAULT_EPS",
    "DEFAULT_KERNEL_TYPES",
    "POOLING_TYPES",
    "PRE_ACTIVATION_TYPES",
    "ActivationProbe",
    "ForwardTracer",
    "KernelNormProbe",
    "LayerKernels",
    "ModuleSelector",
    "UnitFlowTracer",
    "unit_count",
]
