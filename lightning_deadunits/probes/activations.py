"""What the activation monitor measures: forward hooks on activation (or pre-activation) modules, per call site.

Hooks exist only between :meth:`ActivationProbe.start` and :meth:`ActivationProbe.stop`. Each hook reduces the
module's output to per-channel sums on the output's device (no host sync) and keeps no reference to it.
"""

import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_deadunits.errors import DeadUnitsWarning
from lightning_deadunits.functional.activations import channel_stats
from lightning_deadunits.metrics.activation_stats import ActivationStats, CallSite
from lightning_deadunits.probes.selection import ModuleSelector

__all__ = [
    "DEFAULT_ACTIVATION_TYPES",
    "DEFAULT_EPS",
    "POOLING_TYPES",
    "PRE_ACTIVATION_TYPES",
    "ActivationProbe",
    "ChannelDim",
    "Watch",
]

Watch = Literal["activations", "pre_activations"]
ChannelDim = Literal["auto", 1, -1]

DEFAULT_ACTIVATION_TYPES: tuple[type, ...] = (
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
)
POOLING_TYPES: tuple[type, ...] = (
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._LPPoolNd,
)
PRE_ACTIVATION_TYPES: tuple[type, ...] = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)

_TOLERANCE = 1e-6
DEFAULT_EPS: dict[type, float | None] = {
    nn.ReLU: 0.0,
    nn.ReLU6: 0.0,
    **dict.fromkeys(POOLING_TYPES, 0.0),
    **dict.fromkeys((nn.Sigmoid, nn.Tanh, nn.Hardsigmoid, nn.Hardtanh), None),
}
"""Near-zero tolerance by module type (the first class of a module's MRO found here wins).

Exact zero (``0.0``) for ReLU and ReLU6 and for pooling (pooled ReLU features are exactly 0 where dead). ``None``
(no zero counting) for the bounded activations, whose units die by saturating, not by reaching 0. Any other type
(LeakyReLU, PReLU, ELU, GELU, SiLU, Hardswish and user types) gets ``1e-6``: their "dead" outputs are tiny but
not zero (a PReLU whose slope collapsed outputs ~1e-7; GELU(-6) is -6e-9).
"""

_CHANNELS_LAST_PRODUCERS = (nn.Linear, nn.LayerNorm, nn.Embedding)
# Outputs known to be >= 0 (exact types: a subclass may change forward), so |x| need not be computed.
_NONNEGATIVE_TYPES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid)
_NONNEGATIVE_FNS = (torch.relu, F.relu, torch.sigmoid)


class ActivationProbe:
    """Finds the watched modules and, while started, measures every call of each of them.

    **Call sites.** A module called several times per forward of its parent (torchvision's ResNet blocks call one
    ``relu`` two or three times) is measured per call: the call index counts calls since the parent's forward
    began. :meth:`site_name` is ``"<module>"`` for a module called once per parent forward and ``"<module>#<k>"``
    (``k`` from 0) for each call of a module called more often; a module called from outside its parent's forward
    counts calls since :meth:`start`. In-place activations are measured from the hook's output, which is the value
    after the in-place operation.

    **Channels** are dim 1 of the output, or its last dim for ``(N, *, F)`` outputs of linear layers: with
    ``channel_dim="auto"`` a call site whose input, in the first measured forward, is the output of an
    ``nn.Linear``, ``nn.LayerNorm`` or ``nn.Embedding`` (or of a watched module resolved to the last dim) uses
    the last dim, every other site dim 1. ``1`` or ``-1`` fixes the dim for every site.

    **Pre-activation mode** (``watch="pre_activations"``) watches convolution, linear and BatchNorm outputs, for
    models that call ``F.relu`` inside ``forward``: it measures ``pre_activation_fn(output)`` (``torch.relu`` by
    default), so the numbers equal those of an ``nn.ReLU`` module placed after the layer. A convolution or linear
    layer whose output goes straight into a watched BatchNorm (seen in the first measured forward) is dropped,
    since the activation sees the BatchNorm's output.

    Args:
        layer_types: module classes to watch (subclasses count).
        include: module-name globs to watch (empty: all).
        exclude: module-name globs to skip.
        eps: near-zero tolerance: one number for every module, or ``{type: eps or None}`` searched along each
            module's MRO before :data:`DEFAULT_EPS` (``None`` turns zero counting off), or ``None`` for the defaults.
        watch: ``"activations"`` or ``"pre_activations"``.
        pre_activation_fn: applied to pre-activation outputs before measuring them.
        channel_dim: ``"auto"``, ``1`` or ``-1``.

    Example:
        >>> probe = ActivationProbe(DEFAULT_ACTIVATION_TYPES)
        >>> probe.attach(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2), nn.Tanh()))
        >>> probe.eps
        {'1': 0.0, '3': None}
    """

    def __init__(
        self,
        layer_types: Sequence[type],
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        eps: float | Mapping[type, float | None] | None = None,
        watch: Watch = "activations",
        pre_activation_fn: Callable[[Tensor], Tensor] | None = None,
        channel_dim: ChannelDim = "auto",
    ) -> None:
        self._selector = ModuleSelector(layer_types, include, exclude)
        self._eps_setting = eps
        self.watch = watch
        self.pre_activation_fn = pre_activation_fn
        self.channel_dim = channel_dim
        self.modules: dict[str, nn.Module] = {}
        self.eps: dict[str, float | None] = {}
        self.calls_per_forward: dict[str, int] = {}
        self.channel_dims: dict[CallSite, int] = {}
        self.skipped: set[str] = set()
        self._parents: dict[str, nn.Module] = {}
        self._producers: list[nn.Module] = []
        self._handles: list[RemovableHandle] = []
        self._target: ActivationStats | None = None
        self._calls: dict[str, int] = {}
        self._outputs: dict[int, tuple[weakref.ref[Tensor], str | None, bool]] = {}
        self._tracked = False
        self._failed: set[str] = set()

    def attach(self, model: nn.Module) -> None:
        """Find the watched modules of ``model``, their tolerances, their parents and the linear-like producers."""
        self.modules = {name: module for name, module in self._selector.select(model) if name not in self.skipped}
        self.eps = {name: self._eps_for(module) for name, module in self.modules.items()}
        self._parents = {name: model.get_submodule(name.rpartition(".")[0]) for name in self.modules}
        watched = {id(module) for module in self.modules.values()}
        self._producers = [
            module
            for module in model.modules()
            if isinstance(module, _CHANNELS_LAST_PRODUCERS) and id(module) not in watched
        ]
        self._tracked = False

    def _eps_for(self, module: nn.Module) -> float | None:
        if isinstance(self._eps_setting, float | int):
            return float(self._eps_setting)
        for table in (self._eps_setting or {}, DEFAULT_EPS):
            for cls in type(module).__mro__:
                if cls in table:
                    return table[cls]
        if self.watch == "pre_activations" and isinstance(module, PRE_ACTIVATION_TYPES):
            return 0.0
        return _TOLERANCE

    @property
    def hooks_attached(self) -> int:
        """How many hooks this probe currently holds on the model."""
        return len(self._handles)

    def start(self, target: ActivationStats) -> None:
        """Attach the hooks; until :meth:`stop`, every call of a watched module adds its statistics to ``target``."""
        if self._handles:
            self.stop()
        self._target = target
        self._calls = dict.fromkeys(self.modules, 0)
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._measure(name)))
        by_parent: dict[int, tuple[nn.Module, list[str]]] = {}
        for name, parent in self._parents.items():
            by_parent.setdefault(id(parent), (parent, []))[1].append(name)
        for parent, children in by_parent.values():
            self._handles.append(parent.register_forward_pre_hook(self._restart_calls(children)))
        if not self._tracked:
            for module in self._producers:
                self._handles.append(module.register_forward_hook(self._remember_channels_last))

    def stop(self) -> None:
        """Remove every hook and forget every tensor seen. Safe to call at any time."""
        if any(self._calls.values()):
            self._tracked = True
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._outputs.clear()
        self._target = None
        for name in self.skipped.intersection(self.modules):
            del self.modules[name], self._parents[name], self.eps[name]

    def site_name(self, site: CallSite) -> str:
        """``"<module>"`` for a module called once per parent forward, ``"<module>#<k>"`` otherwise."""
        name, call = site
        return name if self.calls_per_forward.get(name, 1) <= 1 else f"{name}#{call}"

    def _restart_calls(self, children: list[str]) -> Any:
        def hook(module: nn.Module, inputs: Any) -> None:
            for name in children:
                self._calls[name] = 0

        return hook

    def _remember_channels_last(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, Tensor):
            self._outputs[id(output)] = (weakref.ref(output), None, True)

    def _producer(self, inputs: Any) -> tuple[str | None, bool] | None:
        """``(watched module name or None, channels last?)`` of the module whose output is ``inputs[0]``, if known."""
        if not inputs or not isinstance(inputs[0], Tensor):
            return None
        found = self._outputs.get(id(inputs[0]))
        return (found[1], found[2]) if found is not None and found[0]() is inputs[0] else None

    def _measure(self, name: str) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            call = self._calls.get(name, 0)
            self._calls[name] = call + 1
            self.calls_per_forward[name] = max(self.calls_per_forward.get(name, 1), call + 1)
            if isinstance(output, tuple) and output and isinstance(output[0], Tensor):
                output = output[0]  # pooling with return_indices=True
            if name in self._failed or self._target is None or not isinstance(output, Tensor):
                return
            try:
                self._record(name, call, module, inputs, output)
            except Exception as error:  # never crash training for a measurement
                self._failed.add(name)
                warnings.warn(
                    f"`ActivationMonitor` cannot measure {name!r} ({type(module).__name__}, output shape "
                    f"{tuple(output.shape)}): {error}; it stops watching that module.",
                    DeadUnitsWarning,
                    stacklevel=2,
                )

        return hook

    def _record(self, name: str, call: int, module: nn.Module, inputs: Any, output: Tensor) -> None:
        assert self._target is not None
        site = (name, call)
        if self.channel_dim != "auto":
            self.channel_dims.setdefault(site, self.channel_dim)
        if not self._tracked:
            self._track(site, module, inputs, output)
        if name in self.skipped or not output.is_floating_point() or output.numel() == 0:
            return
        values, nonnegative = output, type(module) in _NONNEGATIVE_TYPES
        if self.pre_activation_fn is not None and isinstance(module, PRE_ACTIVATION_TYPES):
            values = self.pre_activation_fn(output.detach())
            nonnegative = self.pre_activation_fn in _NONNEGATIVE_FNS
        dim = self.channel_dims.setdefault(site, 1)
        self._target.update(site, channel_stats(values, dim, self.eps[name], nonnegative))

    def _track(self, site: CallSite, module: nn.Module, inputs: Any, output: Tensor) -> None:
        """First measured forward: resolve the site's channel dim and, in pre-activation mode, BatchNorm pairing."""
        producer, producer_channels_last = self._producer(inputs) or (None, False)
        if self.channel_dim == "auto" and site not in self.channel_dims:
            last = isinstance(module, _CHANNELS_LAST_PRODUCERS) or producer_channels_last
            self.channel_dims[site] = -1 if last else 1
        if (
            self.watch == "pre_activations"
            and isinstance(module, nn.modules.batchnorm._BatchNorm)
            and producer in self.modules
            and not isinstance(self.modules[producer], nn.modules.batchnorm._BatchNorm)
        ):
            self.skipped.add(producer)
            assert self._target is not None
            for dropped in [seen for seen in self.channel_dims if seen[0] == producer]:
                self._target.drop(dropped)
        self._outputs[id(output)] = (weakref.ref(output), site[0], self.channel_dims.get(site) == -1)

    def state_dict(self) -> dict[str, Any]:
        """Call counts, channel dims and dropped layers found so far."""
        return {
            "calls_per_forward": dict(self.calls_per_forward),
            "channel_dims": [[name, call, dim] for (name, call), dim in self.channel_dims.items()],
            "skipped": sorted(self.skipped),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output, so a resumed run names and splits call sites as before."""
        self.calls_per_forward = dict(state_dict.get("calls_per_forward", {}))
        self.channel_dims = {(name, int(call)): int(dim) for name, call, dim in state_dict.get("channel_dims", [])}
        self.skipped = set(state_dict.get("skipped", []))
