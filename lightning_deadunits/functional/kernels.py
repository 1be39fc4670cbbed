"""Pure tensor math on layer weights: per-filter norms, dead-kernel masks, layer kinds, heat maps."""

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "LayerKind",
    "attention_head_blocks",
    "blockwise_filter_l1",
    "dead_kernel_masks",
    "filter_heatmaps",
    "filter_matrix",
    "kernel_norms",
    "layer_kind",
    "median",
    "recurrent_gate_blocks",
    "sorted_quantile",
    "weight_filter_norms",
    "weight_kind",
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
        return weight_kind(module.weight.shape, groups=module.groups, transposed=module.transposed)
    if isinstance(module, nn.Linear):
        return "linear"
    raise TypeError(f"`module` must be a convolution or nn.Linear, got {type(module).__name__}.")


def weight_kind(shape: Sequence[int], groups: int | None = None, transposed: bool = False) -> LayerKind:
    """Classify a layer from its weight's shape: 2-D is ``linear``, 3-D and more a convolution.

    With ``groups`` known (from a module) the answer is exact, as in :func:`layer_kind`. Without it (a bare
    state_dict) a weight of shape ``(out > 1, 1, *k)`` is taken for ``depthwise`` and any other for ``conv``: a
    state_dict does not record ``groups``, so an ordinary convolution on a single input channel looks depthwise,
    a grouped one looks ordinary, and a ConvTranspose (stored ``(in, out / groups, *k)``) cannot be told apart.

    Args:
        shape: the weight's shape, ``(out, in / groups, *kernel)`` or ``(out, in)``.
        groups: the convolution's ``groups``, or ``None`` when unknown.
        transposed: whether the weight belongs to a ConvTranspose.

    Raises:
        ValueError: if ``shape`` has fewer than 2 dimensions.

    Example:
        >>> weight_kind((32, 1, 3, 3)), weight_kind((32, 1, 3, 3), groups=1), weight_kind((10, 64))
        ('depthwise', 'conv', 'linear')
    """
    if len(shape) < 2:
        raise ValueError(f"`shape` must have at least 2 dimensions (out, in, ...), got {tuple(shape)}.")
    if len(shape) == 2:
        return "linear"
    if transposed:
        return "transpose"
    if groups is None:
        return "depthwise" if shape[1] == 1 and shape[0] > 1 else "conv"
    if groups > 1:
        return "depthwise" if shape[1] == 1 else "grouped"
    return "conv"


def filter_matrix(module: nn.Module) -> Tensor:
    """Return the layer's weights as ``(out_features, fan_in)``: one row per output filter (conv) or unit (linear).

    ConvTranspose weights are stored ``(in, out / groups, *k)``; they are regrouped so that row ``o`` holds
    exactly the weights that produce output channel ``o``.
    """
    weight: Tensor = module.weight  # type: ignore[assignment]
    return _output_major(weight, *_conv_layout(module)).flatten(1)


def kernel_norms(module: nn.Module) -> tuple[Tensor, Tensor]:
    """Per-output-filter L1 and L2 norms, in float32, on the weights' device, without autograd."""
    weight: Tensor = module.weight  # type: ignore[assignment]
    return weight_filter_norms(weight, *_conv_layout(module))


def weight_filter_norms(weight: Tensor, groups: int = 1, transposed: bool = False) -> tuple[Tensor, Tensor]:
    """Per-output-filter L1 and L2 norms of a bare weight tensor, in float32, on its device, without autograd.

    Filters run along dimension 0 (``(out, in / groups, *k)`` convolutions, ``(out, in)`` linear layers), except
    for ConvTranspose weights (``transposed=True``), which are regrouped by output channel using ``groups``.

    Args:
        weight: a convolution or linear weight.
        groups: the ConvTranspose's ``groups`` (only used with ``transposed``).
        transposed: whether ``weight`` is stored ``(in, out / groups, *k)``.

    Raises:
        ValueError: if ``weight`` has fewer than 2 dimensions.

    Example:
        >>> l1, l2 = weight_filter_norms(torch.ones(4, 2, 3, 3))
        >>> l1.tolist()
        [18.0, 18.0, 18.0, 18.0]
    """
    if weight.dim() < 2:
        raise ValueError(f"`weight` must have at least 2 dimensions (out, in, ...), got shape {tuple(weight.shape)}.")
    with torch.no_grad():
        rows = _output_major(weight.detach(), groups, transposed).flatten(1).float()
        return rows.abs().sum(dim=1), torch.linalg.vector_norm(rows, ord=2, dim=1)


def median(values: Tensor) -> Tensor:
    """The median as numpy defines it (mean of the two middle values for an even count); 0 when empty."""
    if values.numel() == 0:
        return values.new_zeros(())
    return sorted_quantile(values.detach().float().flatten().sort().values, 0.5)


def sorted_quantile(ordered: Tensor, q: float) -> Tensor:
    """``torch.quantile(values, q)`` (linear interpolation, NaN if any value is NaN), bit for bit, from the
    values already sorted ascending as a non-empty 1-D tensor; on the device, without a host sync.

    Several quantiles of one tensor then share one sort, and each costs two lookups instead of
    ``torch.quantile``'s sort, checks and gathers (several times faster on the small tensors monitors see).

    Example:
        >>> values = torch.tensor([4.0, 1.0, 3.0, 2.0])
        >>> float(sorted_quantile(values.sort().values, 0.95)) == float(torch.quantile(values, 0.95))
        True
    """  # noqa: D205
    last = ordered.numel() - 1
    # torch.quantile computes the rank and the weight in the tensor's float32, so do the same.
    rank = np.float32(q) * np.float32(last)
    below = int(rank)
    weight = float(rank - np.float32(below))
    above = below + 1 if weight > 0 else below  # torch.quantile's ceil(rank): never lerp towards an inf neighbour
    value = torch.lerp(ordered[below], ordered[above], weight)
    return torch.where(ordered[last].isnan(), ordered[last], value)  # sort puts NaN last


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
        weight = _output_major(module.weight.detach().float(), module.groups, module.transposed)
        maps = weight.abs().sum(dim=1)
        if maps.dim() == 2:
            maps = maps.unsqueeze(1)
        elif maps.dim() == 4:
            maps = maps.sum(dim=1)
        return maps.cpu()


def _conv_layout(module: nn.Module) -> tuple[int, bool]:
    """``(groups, transposed)`` of a convolution; ``(1, False)`` for anything else."""
    if isinstance(module, _ConvLike):
        return module.groups, module.transposed
    return 1, False


def _output_major(weight: Tensor, groups: int, transposed: bool) -> Tensor:
    """The weight with output channels first: ConvTranspose's ``(in, out / g, *k)`` becomes ``(out, in / g, *k)``."""
    if not transposed:
        return weight
    in_per_group, out_per_group = weight.shape[0] // groups, weight.shape[1]
    grouped = weight.reshape(groups, in_per_group, out_per_group, *weight.shape[2:]).transpose(1, 2)
    return grouped.reshape(groups * out_per_group, in_per_group, *weight.shape[2:])


def blockwise_filter_l1(
    weight: Tensor, groups: int = 1, transposed: bool = False, block_elements: int = 1 << 20
) -> Tensor:
    """The per-output-filter L1 norms of :func:`weight_filter_norms`, without ever copying the weight whole.

    A float32 weight is reduced where it lies (one ``vector_norm(ord=1)`` pass, no temporary), so a memory-mapped
    weight is only read. Other dtypes are cast to float32 a block of whole filters at a time (about
    ``block_elements`` values, 4 MiB by default, or one filter when a filter is larger) into one buffer allocated
    once and reused: block-sized temporaries allocated and freed in turn fragment the C allocator's heap, which then
    keeps growing (measured on an 800 MB state_dict: 96 MB more anonymous memory with a fresh ``abs()`` per block,
    4 MB with the buffer).

    Args:
        weight: a convolution or linear weight, laid out as for :func:`weight_filter_norms`.
        groups: the ConvTranspose's ``groups`` (only used with ``transposed``).
        transposed: whether ``weight`` is stored ``(in, out / groups, *k)``.
        block_elements: values per block (>= 1).

    Returns:
        Per-output-filter L1 norms, in float32, on the weight's device.

    Raises:
        ValueError: if ``weight`` has fewer than 2 dimensions.

    Example:
        >>> l1 = blockwise_filter_l1(torch.ones(1000, 30, dtype=torch.bfloat16), block_elements=64)
        >>> l1.shape, float(l1[999])
        (torch.Size([1000]), 30.0)
    """
    if weight.dim() < 2:
        raise ValueError(f"`weight` must have at least 2 dimensions (out, in, ...), got shape {tuple(weight.shape)}.")
    # Views with output filters first: the weight itself, or each group's (in / g, out / g, *k) slice transposed.
    if transposed:
        output_major = [group.transpose(0, 1) for group in torch.split(weight, weight.shape[0] // groups)]
    else:
        output_major = [weight]
    filter_dims = tuple(range(1, weight.dim()))
    l1 = weight.new_empty(sum(view.shape[0] for view in output_major), dtype=torch.float32)
    if weight.dtype == torch.float32:
        blocks = output_major
        buffer = None
    else:
        filters_per_block = max(1, block_elements // max(math.prod(output_major[0].shape[1:]), 1))
        blocks = [block for view in output_major for block in torch.split(view, filters_per_block)]
        buffer = weight.new_empty(max(block.numel() for block in blocks), dtype=torch.float32)
    start = 0
    with torch.no_grad():
        for block in blocks:
            values = block if buffer is None else buffer[: block.numel()].view(block.shape).copy_(block)
            torch.linalg.vector_norm(values, ord=1, dim=filter_dims, out=l1[start : start + block.shape[0]])
            start += block.shape[0]
    return l1


def attention_head_blocks(module: nn.MultiheadAttention) -> dict[str, Tensor]:
    """The input-projection rows of a ``nn.MultiheadAttention``, one ``(head_dim, fan_in)`` block per projection
    and head, named ``"in_proj.<q|k|v>.head<h>"``.

    The rows come from the packed ``in_proj_weight`` (query, key and value blocks stacked, in that order) or from
    the separate ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` used when ``kdim``/``vdim`` differ from
    ``embed_dim``; head ``h`` owns rows ``h * head_dim`` to ``(h + 1) * head_dim`` of each projection. The blocks are
    views of the weights (detach before any in-place use).

    Example:
        >>> blocks = attention_head_blocks(nn.MultiheadAttention(8, 2))
        >>> list(blocks), tuple(blocks["in_proj.k.head1"].shape)
        (['in_proj.q.head0', 'in_proj.q.head1', 'in_proj.k.head0', 'in_proj.k.head1', 'in_proj.v.head0', \
'in_proj.v.head1'], (4, 8))
    """  # noqa: D205
    packed = module.in_proj_weight
    if packed is not None:
        projections = dict(zip("qkv", packed.chunk(3), strict=True))
    else:
        projections = {"q": module.q_proj_weight, "k": module.k_proj_weight, "v": module.v_proj_weight}
    return {
        f"in_proj.{projection}.head{head}": rows
        for projection, weight in projections.items()
        for head, rows in enumerate(weight.chunk(module.num_heads))
    }


_GATES = {"LSTM": "ifgo", "GRU": "rzn"}


def recurrent_gate_blocks(module: nn.RNNBase) -> dict[str, Tensor]:
    """The incoming weights of each gate of an ``nn.LSTM`` or ``nn.GRU`` (one ``(hidden, in + hidden)`` block of
    ``[weight_ih | weight_hh]`` rows per layer, direction and gate), named ``"l<k>[_reverse].gate_<g>"``.

    PyTorch stacks the gate rows of ``weight_ih_l<k>`` and ``weight_hh_l<k>`` as ``i, f, g, o`` (LSTM) and
    ``r, z, n`` (GRU); a unit of a gate reads both the layer's input and the hidden state, so its row is the two
    rows side by side. A plain ``nn.RNN`` has one gate, ``h``. LSTM projections (``proj_size``) are left out.

    Example:
        >>> blocks = recurrent_gate_blocks(nn.GRU(3, 4, bidirectional=True))
        >>> list(blocks)[:4], tuple(blocks["l0.gate_z"].shape)
        (['l0.gate_r', 'l0.gate_z', 'l0.gate_n', 'l0_reverse.gate_r'], (4, 7))
    """  # noqa: D205
    gates = _GATES.get(module.mode, "h")
    blocks: dict[str, Tensor] = {}
    for layer in range(module.num_layers):
        for suffix in ("", "_reverse")[: 2 if module.bidirectional else 1]:
            weight_ih = getattr(module, f"weight_ih_l{layer}{suffix}")
            weight_hh = getattr(module, f"weight_hh_l{layer}{suffix}")
            rows = torch.cat([weight_ih.detach(), weight_hh.detach()], dim=1)
            for gate, block in zip(gates, rows.chunk(len(gates)), strict=True):
                blocks[f"l{layer}{suffix}.gate_{gate}"] = block
    return blocks
