"""Pure tensor math: no state, no Lightning."""

from lightning_deadunits.functional.activations import (
    ChannelStats,
    channel_stats,
    dormant_channels,
    moments,
    reduction_dims,
)
from lightning_deadunits.functional.kernels import (
    LayerKind,
    attention_head_blocks,
    dead_kernel_masks,
    filter_heatmaps,
    filter_matrix,
    kernel_norms,
    layer_kind,
    median,
    recurrent_gate_blocks,
    weight_filter_norms,
    weight_kind,
)
from lightning_deadunits.functional.loss import MAD_TO_SIGMA, robust_baseline, spike_limit, spike_scores
from lightning_deadunits.functional.warmup import WarmupShape, ramp, rewarm_factor, warmup_factor

__all__ = [
    "MAD_TO_SIGMA",
    "ChannelStats",
    "LayerKind",
    "WarmupShape",
    "attention_head_blocks",
    "channel_stats",
    "dead_kernel_masks",
    "dormant_channels",
    "filter_heatmaps",
    "filter_matrix",
    "kernel_norms",
    "layer_kind",
    "median",
    "moments",
    "ramp",
    "recurrent_gate_blocks",
    "reduction_dims",
    "rewarm_factor",
    "robust_baseline",
    "spike_limit",
    "spike_scores",
    "warmup_factor",
    "weight_filter_norms",
    "weight_kind",
]
