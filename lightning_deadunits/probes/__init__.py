"""What is measured, and on which steps."""

from lightning_deadunits.probes.kernel_norms import KernelNormProbe, LayerKernels
from lightning_deadunits.probes.selection import ModuleSelector

__all__ = ["KernelNormProbe", "LayerKernels", "ModuleSelector"]
