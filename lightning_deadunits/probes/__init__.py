"""What is measured, and on which steps."""

from lightning_deadunits.probes.activations import (
    DEFAULT_ACTIVATION_TYPES,
    DEFAULT_EPS,
    POOLING_TYPES,
    PRE_ACTIVATION_TYPES,
    ActivationProbe,
)
from lightning_deadunits.probes.kernel_norms import KernelNormProbe, LayerKernels
from lightning_deadunits.probes.selection import ModuleSelector

__all__ = [
    "DEFAULT_ACTIVATION_TYPES",
    "DEFAULT_EPS",
    "POOLING_TYPES",
    "PRE_ACTIVATION_TYPES",
    "ActivationProbe",
    "KernelNormProbe",
    "LayerKernels",
    "ModuleSelector",
]
