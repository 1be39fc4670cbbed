"""Pure tensor math on layer weights: per-filter norms, dead-kernel masks, layer kinds, heat maps."""

from typing import Literal

import torch
from torch import Tensor, nn

__all__ = [
    "LayerKind",
    "dead_kernel_masks",
    "filter_heatmaps",
    "filter_matrix",
    "kernel_norms",
    "layer_kind",
    "median",
]

LayerKind = Literal["conv", "depthwise", "grouped", "transpose", "linear"]

_ConvLike = nn.modules.conv._ConvNd


def layer_kind(module: nn.Module) -> LayerKind:
    """Classify a layer: ``transpose`` (any ConvTranspose), ``depthwise`` (groups == in_channels > 1),
    ``grouped`` (1 < groups < in_channels), ``conv`` or ``linear``.

    Raises:
        TypeError: if ``module`` is neither a convolution nor a linear layer.
    """  # noqa: D205
    if isinstance(module, _ConvLike):
        if module.transposed:
            return "transpose"
        if module.groups > 1 and module.groups == module.in_channels:
            return "depthwise"
        return "grouped" if module.groups > 1 else "conv"
    if isinstance(module, nn.Linear):
        return "linear"
    raise TypeError(f"`module` must be a convolution or nn.Linear, got {type(module).__name__}.")


def filter_matrix(module: nn.Module) -> Tensor:
    """Return the layer's weights as ``(out_features, fan_in)``: one row per output filter (conv) or unit (linear).

    ConvTranspose weights are stored ``(in, out / groups, *k)``; they are regrouped so that row ``o`` holds
    exactly the weights that produce output channel ``o``.
    """
    weight: Tensor = module.weight  # type: ignore[assignment]
    if isinstance(module, _ConvLike) and module.transposed:
        groups = module.groups
        in_per_group = weight.shape[0] // groups
        out_per_group = weight.shape[1]
        grouped = weight.reshape(groups, in_per_group, out_per_group, -1).transpose(1, 2)
        return grouped.reshape(groups * out_per_group, -1)
    return weight.reshape(weight.shape[0], -1)


def kernel_norms(module: nn.Module) -> tuple[Tensor, Tensor]:
    """Per-output-filter L1 and L2 norms, in float32, on the weights' device, without autograd."""
    with torch.no_grad():
        rows = filter_matrix(module).float()
        return rows.abs().sum(dim=1), torch.linalg.vector_norm(rows, ord=2, dim=1)


def median(values: Tensor) -> Tensor:
    """The median as numpy defines it (mean of the two middle values for an even count); 0 when empty."""
    if values.numel() == 0:
        return values.new_zeros(())
    return torch.quantile(values.float(), 0.5)


def dead_kernel_masks(l1: Tensor, abs_threshold: float, rel_threshold: float) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``(dead_abs, dead_rel, layer_median)`` for one layer's per-filter L1 norms.

    ``dead_abs``: ``l1 < abs_threshold``. ``dead_rel``: ``l1 < rel_threshold * median(l1)``. Strict
    comparisons, so float32 subnormals (1e-40) count as dead for any positive threshold and a threshold of 0
    counts nothing. When more than half of a layer is dead the median itself collapses and the relative rule
    undercounts; the absolute rule still sees those filters.
    """
    layer_median = median(l1)
    return l1 < abs_threshold, l1 < rel_threshold * layer_median, layer_median


def filter_heatmaps(module: nn.Module) -> Tensor | None:
    """Per-filter maps of ``|w|`` summed over input channels: ``(out, kH, kW)`` in float32 on the CPU.

    Depthwise filters have one input channel, so their map is the filter itself. 1-D kernels give ``(out, 1, k)``;
    3-D kernels are summed over depth as well. Linear layers have no spatial kernel and give ``None``.
    """
    if not isinstance(module, _ConvLike):
        return None
    with torch.no_grad():
        weight = module.weight.detach().float()
        if module.transposed:
            groups = module.groups
            weight = weight.reshape(groups, weight.shape[0] // groups, *weight.shape[1:]).transpose(1, 2)
            weight = weight.reshape(-1, weight.shape[2], *weight.shape[3:])
        maps = weight.abs().sum(dim=1)
        if maps.dim() == 2:
            maps = maps.unsqueeze(1)
        elif maps.dim() == 4:
            maps = maps.sum(dim=1)
        return maps.cpu()
