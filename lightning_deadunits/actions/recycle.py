"""Recycling dead units (ReDo, Sokar et al. 2023): fresh incoming weights, zero outgoing weights, fresh moments.

A unit is an output filter of a convolution or an output feature of a linear layer. Recycling it

1. redraws its incoming weights and bias from the layer's own ``reset_parameters`` (applied to fresh tensors on
   the CPU from a seeded generator, so every DDP rank draws the same values), copying only the unit's rows;
2. zeroes its outgoing weights in each layer that reads it (the in-channel columns), so that the network's
   function is unchanged at the moment of recycling and the unit grows back in through gradients;
3. resets the per-unit entries of the normalisation layers between (BatchNorm gamma 1, beta 0, running mean 0,
   running variance 1);
4. zeroes the optimizer state of exactly those entries: every state tensor shaped like its parameter (Adam's
   ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, SGD's ``momentum_buffer``); step counters are kept.

Who reads a unit, and which normalisation layers sit between, comes from data flow
(:class:`~lightning_deadunits.probes.unit_flow.UnitFlowTracer`).

Only per-unit normalisation (BatchNorm, InstanceNorm, GroupNorm with one channel per group) can sit between: a
normalisation whose statistics span several units (LayerNorm over the units, GroupNorm with larger groups) would
see the fresh incoming weights change its mean and variance, and so move every other unit's output. Such layers
are refused (:func:`mixing_refusal` says why); nothing keeps the function unchanged through them but leaving the
unit as it is.
"""

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_deadunits.probes.module_kinds import DEFAULT_KERNEL_TYPES, NORM_UNIT_ENTRIES, unit_count
from lightning_deadunits.probes.unit_flow import UnitFlowTracer
from lightning_deadunits.readings import Reading

# UnitFlowTracer (now a probe) and unit_count (now a module kind) stay importable from here, where they were
__all__ = [
    "RECYCLABLE_TYPES",
    "UnitFlowTracer",
    "cap_units",
    "consumer_refusal",
    "flagged_units",
    "fresh_parameters",
    "mixing_refusal",
    "recyclable",
    "recycle_seed",
    "recycle_units",
    "unit_count",
]

RECYCLABLE_TYPES: tuple[type, ...] = DEFAULT_KERNEL_TYPES
"""The layers whose units can be recycled: the kernel layers."""

_SEED_MULTIPLIER = 1_000_003


def recyclable(module: nn.Module) -> bool:
    """Whether ``module`` can be recycled: trainable, with its own initialisation and plain (not parametrized) weights.

    Example:
        >>> recyclable(nn.Linear(2, 3)), recyclable(nn.Linear(2, 3).requires_grad_(False))
        (True, False)
    """
    weight = getattr(module, "weight", None)
    return (
        isinstance(weight, Tensor)
        and weight.requires_grad
        and callable(getattr(module, "reset_parameters", None))
        and not parametrize.is_parametrized(module)
    )


def flagged_units(
    readings: Iterable[Reading], layers: Mapping[str, nn.Module], sites: Mapping[str, str]
) -> tuple[dict[str, Tensor], list[str]]:
    """The units flagged dead by ``readings``, as one bool mask per layer of ``layers`` (or-ed over the readings).

    A mask's name is a layer of ``layers`` or a call site that ``sites`` (a :class:`UnitFlowTracer`'s) maps to one;
    a mask of any other name, or of another size than its layer's units, is left out with a note saying why.

    Args:
        readings: readings with ``dead_masks`` (``{name: bool mask over units}``).
        layers: the recyclable layers by name.
        sites: ``{call site: layer}``.

    Returns:
        ``({layer: mask}, notes)``.

    Example:
        >>> reading = Reading("p", "kernels", 0, {}, dead_masks={"fc": torch.tensor([True, False])})
        >>> flagged_units([reading], {"fc": nn.Linear(3, 2)}, {})
        ({'fc': tensor([ True, False])}, [])
    """
    flagged: dict[str, Tensor] = {}
    notes: list[str] = []
    for reading in readings:
        for site, mask in reading.dead_masks.items():
            layer = site if site in layers else sites.get(site)
            if layer is None or layer not in layers:
                notes.append(
                    f"cannot recycle {site!r} ({reading.source}): no recyclable convolution or linear layer "
                    "reaches it through elementwise, normalisation or pooling modules"
                )
            elif mask.shape != (unit_count(layers[layer]),):
                notes.append(
                    f"cannot recycle {site!r} ({reading.source}): its mask has shape {tuple(mask.shape)}, "
                    f"layer {layer!r} has {unit_count(layers[layer])} units"
                )
            else:
                flagged[layer] = flagged[layer] | mask.bool() if layer in flagged else mask.bool()
    return flagged, notes


def mixing_refusal(layer: str, mixers: Sequence[tuple[str, nn.Module]]) -> str:
    """Why the units of ``layer`` are not recycled: they pass through the ``(name, module)`` normalisations
    ``mixers``, whose statistics span several units.

    Example:
        >>> mixing_refusal("fc1", [("norm", nn.LayerNorm(8))])  # doctest: +NORMALIZE_WHITESPACE
        "does not recycle 'fc1': its units pass through 'norm' (LayerNorm), which normalises over several units,
        so fresh incoming weights would change its mean and variance and every other unit's output; only per-unit
        normalisation (BatchNorm, InstanceNorm, GroupNorm with one channel per group) keeps the network's function
        unchanged"
    """  # noqa: D205
    through = ", ".join(f"{name!r} ({type(module).__name__})" for name, module in mixers)
    return (
        f"does not recycle {layer!r}: its units pass through {through}, which normalises over several units, so "
        "fresh incoming weights would change its mean and variance and every other unit's output; only per-unit "
        "normalisation (BatchNorm, InstanceNorm, GroupNorm with one channel per group) keeps the network's function "
        "unchanged"
    )


def consumer_refusal(layer: str, required: bool) -> str:
    """What happens to ``layer`` whose readers were not found: not recycled if they are ``required``, else recycled
    with its outgoing weights left as they are (the network's function changes at once).

    Example:
        >>> consumer_refusal("fc2", required=True)  # doctest: +NORMALIZE_WHITESPACE
        "does not recycle 'fc2': no layer reading its units through elementwise, normalisation or pooling modules
        only was found"
    """  # noqa: D205
    return (
        f"{'does not recycle' if required else 'leaves the outgoing weights of'} {layer!r}: "
        "no layer reading its units through elementwise, normalisation or pooling modules only was found"
    )


def recycle_seed(seed: int, step: int, layer_index: int) -> int:
    """One seed per (run seed, global step, layer): the same on every rank, different for every recycling."""
    return ((seed * _SEED_MULTIPLIER + step) * _SEED_MULTIPLIER + layer_index) % (2**63)


def cap_units(flagged: Tensor, max_units: int, seed: int) -> Tensor:
    """At most ``max_units`` of the ``flagged`` units (a bool mask), chosen at random from ``seed``, on device.

    The random priorities are drawn on the CPU, so every rank and device picks the same units.
    """
    priority = torch.rand(flagged.numel(), generator=torch.Generator().manual_seed(seed)).to(flagged.device)
    priority = priority.masked_fill(~flagged, 2.0)
    chosen = torch.zeros_like(flagged)
    chosen[priority.argsort()[:max_units]] = True
    return chosen & flagged


def fresh_parameters(layer: nn.Module, seed: int) -> dict[str, Tensor]:
    """The ``weight`` and ``bias`` that ``layer.reset_parameters()`` would draw now, as float32 CPU tensors.

    The layer's own parameters are swapped for fresh CPU tensors during the call and put back, whatever happens;
    the global CPU random state is left as it was.

    Raises:
        TypeError: if ``layer`` has no ``reset_parameters`` or is parametrized (e.g. weight norm).
    """
    if not callable(getattr(layer, "reset_parameters", None)) or parametrize.is_parametrized(layer):
        raise TypeError(
            f"`layer` must have its own `reset_parameters` and no parametrization, got {type(layer).__name__}."
        )
    originals = {name: param for name, param in layer.named_parameters(recurse=False) if name in ("weight", "bias")}
    try:
        for name, param in originals.items():
            setattr(layer, name, nn.Parameter(torch.empty(param.shape, dtype=torch.float32), requires_grad=False))
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            layer.reset_parameters()  # type: ignore[operator]
        return {name: getattr(layer, name).detach() for name in originals}
    finally:
        for name, param in originals.items():
            setattr(layer, name, param)


def recycle_units(
    layer: nn.Module,
    units: Tensor,
    seed: int,
    consumers: Iterable[nn.Module] = (),
    norms: Iterable[nn.Module] = (),
    optimizers: Iterable[torch.optim.Optimizer] = (),
) -> None:
    """Recycle the ``units`` (bool mask over :func:`unit_count`) of ``layer``, as the module docstring says.

    Args:
        layer: a convolution or linear layer.
        units: which units to recycle.
        seed: seed of the fresh weights (use :func:`recycle_seed` so every rank draws the same).
        consumers: convolutions and linear layers whose input channels are ``layer``'s units; their columns of
            the recycled units are zeroed.
        norms: normalisation layers with one entry per unit of ``layer``; those entries are reset.
        optimizers: optimizers whose state entries of the touched weights are zeroed.

    Raises:
        ValueError: if ``units`` does not have one entry per unit of ``layer``.
        TypeError: if ``layer`` cannot be re-initialised (see :func:`fresh_parameters`).
    """
    count = unit_count(layer)
    if units.shape != (count,):
        raise ValueError(f"`units` must have shape ({count},) for {type(layer).__name__}, got {tuple(units.shape)}.")
    optimizers = list(optimizers)
    fresh = fresh_parameters(layer, seed)
    with torch.no_grad():
        units = units.bool()
        for name, new in fresh.items():
            param: Tensor = getattr(layer, name)
            mask = _incoming_mask(layer, param, units.to(param.device))
            param.copy_(torch.where(mask, new.to(param), param))
            _reset_optimizer_state(optimizers, param, mask)
        for consumer in consumers:
            weight: Tensor = consumer.weight  # type: ignore[assignment]
            mask = _outgoing_mask(consumer, weight, units.to(weight.device))
            weight.masked_fill_(mask, 0.0)
            _reset_optimizer_state(optimizers, weight, mask)
        for norm in norms:
            for name, value in NORM_UNIT_ENTRIES.items():
                tensor = getattr(norm, name, None)
                if isinstance(tensor, Tensor) and tensor.shape == units.shape:
                    tensor.masked_fill_(units.to(tensor.device), value)
                    _reset_optimizer_state(optimizers, tensor, units.to(tensor.device))


def _incoming_mask(layer: nn.Module, param: Tensor, units: Tensor) -> Tensor:
    """The entries of ``param`` (weight or bias) that produce ``units``."""
    if param.dim() == 1:
        return units
    if isinstance(layer, nn.modules.conv._ConvNd) and layer.transposed:
        # ConvTranspose weights are (in, out / groups, *k): unit o = g * out_per_group + j is column j of group g
        groups, out_per_group = layer.groups, param.shape[1]
        in_per_group = param.shape[0] // groups
        rows = units.view(groups, 1, out_per_group).expand(groups, in_per_group, out_per_group)
        return _spread(rows.reshape(param.shape[0], out_per_group), param)
    return _spread(units.view(-1, 1), param)


def _outgoing_mask(consumer: nn.Module, weight: Tensor, units: Tensor) -> Tensor:
    """The entries of ``consumer.weight`` that read input channels (or features) ``units``."""
    if isinstance(consumer, nn.Linear):
        return _spread(units.view(1, -1), weight)
    if consumer.transposed:
        return _spread(units.view(-1, 1), weight)
    # (out, in / groups, *k): input channel c = g * in_per_group + j feeds column j of group g's output rows
    groups = int(consumer.groups)  # type: ignore[arg-type]
    in_per_group = weight.shape[1]
    out_per_group = weight.shape[0] // groups
    columns = units.view(groups, 1, in_per_group).expand(groups, out_per_group, in_per_group)
    return _spread(columns.reshape(weight.shape[0], in_per_group), weight)


def _spread(mask: Tensor, like: Tensor) -> Tensor:
    return mask.reshape(*mask.shape, *([1] * (like.dim() - mask.dim()))).expand_as(like)


def _reset_optimizer_state(optimizers: Sequence[torch.optim.Optimizer], param: Tensor, mask: Tensor) -> None:
    for optimizer in optimizers:
        for value in optimizer.state.get(param, {}).values():
            if isinstance(value, Tensor) and value.shape == param.shape:
                value.masked_fill_(mask, 0)
