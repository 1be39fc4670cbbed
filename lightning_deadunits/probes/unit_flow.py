"""Where the units of kernel layers go: the readers, normalisation layers and call sites their outputs reach."""

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from lightning_deadunits.metrics.activation_stats import CallSite
from lightning_deadunits.probes.module_kinds import (
    ELEMENTWISE_TYPES,
    NORM_UNIT_ENTRIES,
    NORMALIZATION_TYPES,
    POOLING_TYPES,
)
from lightning_deadunits.probes.tracing import ForwardTracer

__all__ = ["UnitFlowTracer", "mixes_units"]

Carrier = tuple[str, int]
"""``(layer, unit dim)``: the layer whose units a tensor carries, and on which dim."""


class UnitFlowTracer:
    """Follows, during one forward, where the units of the watched layers go.

    A layer's output carries its units on dim 1 (convolutions) or the last dim (linear layers). The output keeps
    carrying them through modules that keep that dim: elementwise activations, normalisation, dropout and
    ``nn.Identity`` (same shape out as in), and pooling (convolution units only). Whatever reads a carried tensor
    is recorded:

    - a watched convolution or linear layer whose input channels (features) are the units: a **consumer**;
    - a normalisation layer with one entry per unit: a **norm** of the layer;
    - a normalisation layer whose statistics span several units (``nn.LayerNorm`` over the unit dim,
      ``nn.GroupNorm`` with more than one channel per group; see :func:`mixes_units`): a **mixer** of the layer,
      through which no unit can be changed without moving the others;
    - any module call passing the units through: a **site** named as
      :meth:`~lightning_deadunits.probes.activations.ActivationProbe.site_name` names it (``"<module>"``, or
      ``"<module>#<k>"`` when the module runs several times per forward of its parent), mapped to the layer. This
      is how a dead activation channel (``features.3``, ``layer1.0.relu#0``) finds the layer that produces it.

    Functional operations (``F.relu``, ``x + residual``, ``torch.flatten``), reshapes and channel mixing end the
    trail: a layer read only through them has no consumer, and a site fed by them maps to nothing.

    Example:
        >>> import torch
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
        self.mixers: dict[str, list[str]] = {}
        self.sites: dict[str, str] = {}
        self.traced = False
        self._tracer: ForwardTracer[Carrier] = ForwardTracer(self._follow)
        self._layers: set[str] = set()
        self._site_calls: list[tuple[CallSite, str]] = []

    @property
    def pending(self) -> bool:
        """Whether no forward has been traced yet and none is being traced."""
        return not self.traced and not self._tracer.hooks_attached

    @property
    def hooks_attached(self) -> int:
        """How many hooks this tracer currently holds on the model."""
        return self._tracer.hooks_attached

    def start(self, model: nn.Module, layers: Mapping[str, nn.Module]) -> None:
        """Attach the hooks that trace the next forward of ``model``; ``layers`` are the watched layers by name."""
        self.finish()
        self.traced = False
        self.consumers, self.norms, self.mixers, self.sites = {}, {}, {}, {}
        watched = {id(module) for module in layers.values()}
        # leaves are where data flow is seen; a watched layer with children is still a producer and a reader
        traced = {
            name: module
            for name, module in model.named_modules()
            if name and (id(module) in watched or not any(True for _ in module.children()))
        }
        self._layers = {name for name, module in traced.items() if id(module) in watched}
        # call counts restart with every trace: sites are named from this forward alone
        self._tracer = ForwardTracer(self._follow)
        self._tracer.attach(model, traced)
        self._tracer.start()

    def finish(self) -> None:
        """Remove the hooks, name the sites seen and drop every tensor held. Safe to call at any time."""
        if self._tracer.hooks_attached:
            self.traced = True
        self._tracer.stop()
        for site, layer in self._site_calls:
            self.sites[self._tracer.site_name(site)] = layer
        self._site_calls.clear()

    def state_dict(self) -> dict[str, Any]:
        """The traced flow, so a resumed run need not trace again."""
        return {
            "consumers": self.consumers,
            "norms": self.norms,
            "mixers": self.mixers,
            "sites": self.sites,
            "traced": self.traced,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""
        self.consumers = {k: list(v) for k, v in state_dict.get("consumers", {}).items()}
        self.norms = {k: list(v) for k, v in state_dict.get("norms", {}).items()}
        self.mixers = {k: list(v) for k, v in state_dict.get("mixers", {}).items()}
        self.sites = dict(state_dict.get("sites", {}))
        self.traced = bool(state_dict.get("traced", False))

    def _follow(self, site: CallSite, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Carrier | None:
        """Record what this call does with the units its input carries; return the units its output carries."""
        name = site[0]
        carrier = self._tracer.mark_of(inputs)
        if name in self._layers:
            if carrier is not None and carrier[0] != name:
                self._note_consumer(name, module, inputs[0], carrier)
            if not isinstance(output, Tensor) or output.dim() == 0:
                return None
            self._site_calls.append((site, name))
            return name, output.dim() - 1 if isinstance(module, nn.Linear) else 1
        if carrier is None or not isinstance(output, Tensor):
            return None
        tensor: Tensor = inputs[0]
        layer, unit_dim = carrier
        if not _keeps_units(module, tensor, output, unit_dim):
            return None
        self._site_calls.append((site, layer))
        if _has_unit_entries(module, tensor, unit_dim) and name not in self.norms.get(layer, []):
            self.norms.setdefault(layer, []).append(name)
        if mixes_units(module, tensor, unit_dim) and name not in self.mixers.get(layer, []):
            self.mixers.setdefault(layer, []).append(name)
        return carrier

    def _note_consumer(self, name: str, module: nn.Module, tensor: Tensor, carrier: Carrier) -> None:
        """Record ``name`` as a consumer of the carrier's layer if its input channels (features) are the units."""
        layer, unit_dim = carrier
        reads_units = False
        if isinstance(module, nn.Linear):
            reads_units = unit_dim == tensor.dim() - 1 and module.in_features == tensor.shape[-1]
        elif isinstance(module, nn.modules.conv._ConvNd):
            reads_units = unit_dim == 1 and tensor.dim() > 2 and module.in_channels == tensor.shape[1]
        if reads_units and name not in self.consumers.get(layer, []):
            self.consumers.setdefault(layer, []).append(name)


def _keeps_units(module: nn.Module, tensor: Tensor, output: Tensor, unit_dim: int) -> bool:
    """Whether ``output`` carries the units of ``tensor`` at the same dim (elementwise, or pooled over space)."""
    if isinstance(module, ELEMENTWISE_TYPES):
        return output.shape == tensor.shape
    pooled = unit_dim == 1 and output.dim() == tensor.dim() > 2 and output.shape[:2] == tensor.shape[:2]
    return isinstance(module, POOLING_TYPES) and pooled


def _has_unit_entries(module: nn.Module, tensor: Tensor, unit_dim: int) -> bool:
    """Whether ``module`` normalises ``tensor`` with one parameter or statistic entry per unit."""
    if isinstance(module, nn.LayerNorm):
        per_unit_dim = unit_dim == tensor.dim() - 1 and module.normalized_shape == (tensor.shape[-1],)
    else:
        per_unit_dim = isinstance(module, NORMALIZATION_TYPES) and unit_dim == 1
    units = (tensor.shape[unit_dim],)
    return per_unit_dim and any(
        isinstance(getattr(module, name, None), Tensor) and getattr(module, name).shape == units
        for name in NORM_UNIT_ENTRIES
    )


def mixes_units(module: nn.Module, tensor: Tensor, unit_dim: int) -> bool:
    """Whether ``module`` normalises ``tensor`` with statistics taken over several units of ``unit_dim``.

    ``nn.LayerNorm`` does when its normalised dims include the unit dim, ``nn.GroupNorm`` when a group holds more
    than one channel (units on dim 1); BatchNorm and InstanceNorm take per-unit statistics and do not.

    Example:
        >>> import torch
        >>> x = torch.zeros(2, 6, 4)
        >>> mixes_units(nn.GroupNorm(3, 6), x, 1), mixes_units(nn.GroupNorm(6, 6), x, 1)
        (True, False)
        >>> mixes_units(nn.LayerNorm(4), x, 2), mixes_units(nn.BatchNorm1d(6), x, 1)
        (True, False)
    """
    if tensor.dim() == 0 or tensor.shape[unit_dim] <= 1:
        return False
    if isinstance(module, nn.LayerNorm):
        return unit_dim % tensor.dim() >= tensor.dim() - len(module.normalized_shape)
    if isinstance(module, nn.GroupNorm):
        return unit_dim == 1 and module.num_channels > module.num_groups
    return False
