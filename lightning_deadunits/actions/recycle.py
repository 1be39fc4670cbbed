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

Who reads a unit, and which normalisation layers sit between, comes from data flow (:class:`UnitFlowTracer`).
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

__all__ = [
    "RECYCLABLE_TYPES",
    "UnitFlowTracer",
    "cap_units",
    "fresh_parameters",
    "recycle_seed",
    "recycle_units",
    "unit_count",
]

RECYCLABLE_TYPES: tuple[type, ...] = (nn.modules.conv._ConvNd, nn.Linear)

_NORM_TYPES: tuple[type, ...] = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
_ELEMENTWISE_TYPES: tuple[type, ...] = (
    *_NORM_TYPES,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Softplus,
    nn.Threshold,
    nn.modules.dropout._DropoutNd,
    nn.Identity,
)
_POOLING_TYPES: tuple[type, ...] = (
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._LPPoolNd,
)
_NORM_RESETS = (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0))
_SEED_MULTIPLIER = 1_000_003


def unit_count(layer: nn.Module) -> int:
    """Output filters (convolution) or output features (linear) of ``layer``."""
    if isinstance(layer, nn.Linear):
        return layer.out_features
    return int(layer.out_channels)  # type: ignore[arg-type]


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
            for name, value in _NORM_RESETS:
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


class UnitFlowTracer:
    """Follows, during one forward, where the units of the watched layers go.

    A layer's output carries its units on dim 1 (convolutions) or the last dim (linear layers). The output keeps
    carrying them through modules that keep that dim: elementwise activations, normalisation, dropout and
    ``nn.Identity`` (same shape out as in), and pooling (convolution units only). Whatever reads a carried tensor
    is recorded:

    - a watched convolution or linear layer whose input channels (features) are the units: a **consumer**;
    - a normalisation layer with one entry per unit: a **norm** of the layer;
    - any module call passing the units through: a **site** named as
      :meth:`~lightning_deadunits.probes.activations.ActivationProbe.site_name` names it (``"<module>"``, or
      ``"<module>#<k>"`` when the module runs several times per forward of its parent), mapped to the layer. This
      is how a dead activation channel (``features.3``, ``layer1.0.relu#0``) finds the layer that produces it.

    Functional operations (``F.relu``, ``x + residual``, ``torch.flatten``), reshapes and channel mixing end the
    trail: a layer read only through them has no consumer, and a site fed by them maps to nothing.

    Example:
        >>> model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
        >>> tracer = UnitFlowTracer()
        >>> tracer.start(model, {"0": model[0], "3": model[3]})
        >>> _ = model(torch.randn(1, 1, 5, 5))
        >>> tracer.finish()
        >>> tracer.consumers, tracer.norms, tracer.sites["2"]
        ({'0': ['3']}, {'0': ['1']}, '0')
    """

    def __init__(self) -> None:
        self.consumers: dict[str, list[str]] = {}
        self.norms: dict[str, list[str]] = {}
        self.sites: dict[str, str] = {}
        self.traced = False
        self._handles: list[RemovableHandle] = []
        self._carried: dict[int, tuple[Tensor, str, int]] = {}
        self._calls: dict[str, int] = {}
        self._calls_per_forward: dict[str, int] = {}
        self._site_calls: list[tuple[str, int, str]] = []

    @property
    def pending(self) -> bool:
        """Whether no forward has been traced yet and none is being traced."""
        return not self.traced and not self._handles

    @property
    def hooks_attached(self) -> int:
        """How many hooks this tracer currently holds on the model."""
        return len(self._handles)

    def start(self, model: nn.Module, layers: Mapping[str, nn.Module]) -> None:
        """Attach the hooks that trace the next forward of ``model``; ``layers`` are the watched layers by name."""
        self.finish()
        self.traced = False
        self.consumers, self.norms, self.sites = {}, {}, {}
        watched = {id(module) for module in layers.values()}
        parents: dict[str, list[str]] = {}
        for name, module in model.named_modules():
            if not name or (id(module) not in watched and any(True for _ in module.children())):
                continue
            parents.setdefault(name.rpartition(".")[0], []).append(name)
            if id(module) in watched:
                self._handles.append(module.register_forward_pre_hook(self._consume(name)))
                self._handles.append(module.register_forward_hook(self._produce(name)))
            else:
                self._handles.append(module.register_forward_hook(self._pass_through(name)))
        for parent, children in parents.items():
            self._handles.append(model.get_submodule(parent).register_forward_pre_hook(self._restart_calls(children)))

    def finish(self) -> None:
        """Remove the hooks, name the sites seen and drop every tensor held. Safe to call at any time."""
        if self._handles:
            self.traced = True
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._carried.clear()
        for name, call, layer in self._site_calls:
            self.sites[name if self._calls_per_forward.get(name, 1) <= 1 else f"{name}#{call}"] = layer
        self._site_calls.clear()
        self._calls.clear()
        self._calls_per_forward.clear()

    def state_dict(self) -> dict[str, Any]:
        """The traced flow, so a resumed run need not trace again."""
        return {"consumers": self.consumers, "norms": self.norms, "sites": self.sites, "traced": self.traced}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""
        self.consumers = {k: list(v) for k, v in state_dict.get("consumers", {}).items()}
        self.norms = {k: list(v) for k, v in state_dict.get("norms", {}).items()}
        self.sites = dict(state_dict.get("sites", {}))
        self.traced = bool(state_dict.get("traced", False))

    def _restart_calls(self, children: list[str]) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any) -> None:
            for name in children:
                self._calls[name] = 0

        return hook

    def _count_call(self, name: str) -> int:
        call = self._calls.get(name, 0)
        self._calls[name] = call + 1
        self._calls_per_forward[name] = max(self._calls_per_forward.get(name, 1), call + 1)
        return call

    def _carrier(self, inputs: Any) -> tuple[Tensor, str, int] | None:
        if not inputs or not isinstance(inputs[0], Tensor):
            return None
        found = self._carried.get(id(inputs[0]))
        return found if found is not None and found[0] is inputs[0] else None

    def _consume(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any) -> None:
            found = self._carrier(inputs)
            if found is None or found[1] == name:
                return
            tensor, layer, unit_dim = found
            reads_units = False
            if isinstance(module, nn.Linear):
                reads_units = unit_dim == tensor.dim() - 1 and module.in_features == tensor.shape[-1]
            elif isinstance(module, nn.modules.conv._ConvNd):
                reads_units = unit_dim == 1 and tensor.dim() > 2 and module.in_channels == tensor.shape[1]
            if reads_units and name not in self.consumers.get(layer, []):
                self.consumers.setdefault(layer, []).append(name)

        return hook

    def _produce(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            call = self._count_call(name)
            if isinstance(output, Tensor) and output.dim() >= 1:
                unit_dim = output.dim() - 1 if isinstance(module, nn.Linear) else 1
                self._carried[id(output)] = (output, name, unit_dim)
                self._site_calls.append((name, call, name))

        return hook

    def _pass_through(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            call = self._count_call(name)
            found = self._carrier(inputs)
            if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
                output = output[0]  # pooling with return_indices=True
            if found is None or not isinstance(output, Tensor):
                return
            tensor, layer, unit_dim = found
            if not _keeps_units(module, tensor, output, unit_dim):
                return
            self._carried[id(output)] = (output, layer, unit_dim)
            self._site_calls.append((name, call, layer))
            if _has_unit_entries(module, tensor, unit_dim) and name not in self.norms.get(layer, []):
                self.norms.setdefault(layer, []).append(name)

        return hook


def _keeps_units(module: nn.Module, tensor: Tensor, output: Tensor, unit_dim: int) -> bool:
    """Whether ``output`` carries the units of ``tensor`` at the same dim (elementwise, or pooled over space)."""
    if isinstance(module, _ELEMENTWISE_TYPES):
        return output.shape == tensor.shape
    pooled = unit_dim == 1 and output.dim() == tensor.dim() > 2 and output.shape[:2] == tensor.shape[:2]
    return isinstance(module, _POOLING_TYPES) and pooled


def _has_unit_entries(module: nn.Module, tensor: Tensor, unit_dim: int) -> bool:
    """Whether ``module`` normalises ``tensor`` with one parameter or statistic entry per unit."""
    if isinstance(module, nn.LayerNorm):
        per_unit_dim = unit_dim == tensor.dim() - 1 and module.normalized_shape == (tensor.shape[-1],)
    else:
        per_unit_dim = isinstance(module, _NORM_TYPES) and unit_dim == 1
    units = (tensor.shape[unit_dim],)
    return per_unit_dim and any(
        isinstance(getattr(module, name, None), Tensor) and getattr(module, name).shape == units
        for name, _ in _NORM_RESETS
    )
