"""Pure tensor math: no state, no Lightning."""

from lightning_deadunits.functional.kernels import (
    LayerKind,
    dead_kernel_masks,
    filter_heatmaps,
    filter_matrix,
    kernel_norms,
    layer_kind,
    median,
    weight_filter_norms,
    weight_kind,
)

__all__ = [
    "LayerKind",
    "dead_kernel_masks",
    "filter_heatmaps",
    "filter_matrix",
    "kernel_norms",
    "layer_kind",
    "median",
    "weight_filter_norms",
    "weight_kind",
]
