"""What the activation monitor measures: activation (or pre-activation) modules and functions, per call site.

Hooks (and the function mode) exist only between :meth:`ActivationProbe.start` and :meth:`ActivationProbe.stop`.
Each call reduces its output to per-channel sums on the output's device (no host sync) and keeps no reference to it.
"""

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_deadunits.errors import DeadUnitsWarning
from lightning_deadunits.functional.activations import channel_stats
from lightning_deadunits.metrics.activation_stats import ActivationStats, CallSite
from lightning_deadunits.probes.module_kinds import (
    BATCHNORM_TYPES,
    CHANNELS_LAST_TYPES,
    DEFAULT_ACTIVATION_TYPES,
    FUNCTIONAL_ACTIVATIONS,
    POOLING_TYPES,
    PRE_ACTIVATION_TYPES,
)
from lightning_deadunits.probes.selection import ModuleSelector
from lightning_deadunits.probes.tracing import ForwardTracer

# the type tables live in module_kinds; they stay importable from here, where the monitor imports them
__all__ = [
    "DEFAULT_ACTIVATION_TYPES",
    "DEFAULT_EPS",
    "POOLING_TYPES",
    "PRE_ACTIVATION_TYPES",
    "ActivationProbe",
    "ChannelDim",
    "Watch",
    "find_token_mask",
]

Watch = Literal["activations", "pre_activations"]
ChannelDim = Literal["auto", 1, -1]

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

# Outputs known to be >= 0 (exact types: a subclass may change forward), so |x| need not be computed.
_NONNEGATIVE_TYPES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Hardsigmoid)
_NONNEGATIVE_FNS = (torch.relu, F.relu, torch.sigmoid)


class ActivationProbe:
    """Finds the watched modules and, while started, measures every call of each of them.

    **Call sites.** A module called several times per forward of its parent (torchvision's ResNet blocks call one
    ``relu`` two or three times) is measured per call: the call index counts calls since the parent's forward
    began. :meth:`site_name` is ``"<module>"`` for a module called once per parent forward and ``"<module>#<k>"``
    (``k`` from 0) for each call of a module called more often; a module called from outside its parent's forward
    counts calls since :meth:`start` (:class:`~lightning_deadunits.probes.tracing.ForwardTracer` counts and names).
    In-place activations are measured from the hook's output, which is the value after the in-place operation.

    **Functional calls** (``functional=True``, activation mode): calls of the activation functions of
    :data:`~lightning_deadunits.probes.module_kinds.FUNCTIONAL_ACTIVATIONS` (``F.relu``, ``F.gelu``, ``F.silu``,
    ``torch.sigmoid``, ``x.relu()``...) inside the model's forwards are call sites too, named
    ``"<enclosing module>:<function>#<k>"`` (e.g. ``"enc.layers.0:relu#0"``; ``k`` counts that function's calls
    in one forward of the enclosing module; the root module's calls are ``":relu#0"``), measured like the module
    that applies the function (its tolerance, its sign). ``include``/``exclude`` globs match these names. Calls
    made by an activation module itself (``nn.GELU`` calls ``F.gelu``) count once, as the module (or not at all,
    when its type is not watched). A function is watched when its module type is (``layer_types=(nn.ReLU,)``
    watches ``F.relu`` and ``nn.ReLU`` only).

    **Channels** are dim 1 of the output, or its last dim for ``(N, *, F)`` outputs of linear layers: with
    ``channel_dim="auto"`` a call site whose input, in the first measured forward, was computed from the output of
    an ``nn.Linear``, ``nn.LayerNorm`` or ``nn.Embedding`` (directly, or through shape-keeping functions such as
    ``fc(x) * 0.5`` or dropout, or through a watched site resolved to the last dim) uses the last dim, every other
    site dim 1; statistics then sum over every position whatever the sequence length. ``1`` or ``-1`` fixes the
    dim for every site.

    **Padding.** While :attr:`token_mask` is set (a boolean tensor, ``True`` for real tokens, shaped like a site's
    output without its channel dim: ``(N, T)`` for ``(N, T, F)``), channels-last sites whose output has that shape
    count only the real positions (selecting them costs one host sync per site and sampled forward); other sites
    are measured whole. :meth:`stop` clears it.

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
        functional: also watch activation functions (activation mode only).

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
        functional: bool = True,
    ) -> None:
        self._selector = ModuleSelector(layer_types, include, exclude)
        self._eps_setting = eps
        self.watch = watch
        self.pre_activation_fn = pre_activation_fn
        self.channel_dim = channel_dim
        self.functional = functional and watch == "activations"
        self.modules: dict[str, nn.Module] = {}
        self.eps: dict[str, float | None] = {}
        self.channel_dims: dict[CallSite, int] = {}
        self.skipped: set[str] = set()
        self._channels_last_producers: list[str] = []
        self._tracer: ForwardTracer[CallSite] = ForwardTracer(self._measure)
        self._target: ActivationStats | None = None
        self._tracked = False
        self._tracked_forwards = 0
        self._measured_functions: set[str] = set()
        self._failed: set[str] = set()
        self.token_mask: Tensor | None = None

    def attach(self, model: nn.Module) -> None:
        """Find the watched modules of ``model``, their tolerances, their parents and the linear-like producers."""
        self.modules = {name: module for name, module in self._selector.select(model) if name not in self.skipped}
        self.eps = {name: self._eps_for(type(module)) for name, module in self.modules.items()}
        watched = {id(module) for module in self.modules.values()}
        producers = {
            name: module
            for name, module in ModuleSelector(CHANNELS_LAST_TYPES).select(model)
            if id(module) not in watched
        }
        self._channels_last_producers = list(producers)
        self._tracer.attach(
            model,
            {**producers, **self.modules},
            functions=self._functions() if self.functional else None,
            skip=(*DEFAULT_ACTIVATION_TYPES, *self._selector.types),
        )
        self._tracked = False

    def _functions(self) -> dict[str, type[nn.Module]]:
        """The activation functions whose module type is watched (``layer_types`` choose functions too)."""
        return {name: kind for name, kind in FUNCTIONAL_ACTIVATIONS.items() if issubclass(kind, self._selector.types)}

    @property
    def watching(self) -> bool:
        """Whether anything may be measured: a watched module, or activation functions to intercept."""
        return bool(self.modules) or self.functional

    @property
    def found_nothing(self) -> bool:
        """Whether a measured forward ran and met no watched module and no activation function."""
        return self._tracked_forwards > 0 and not self.modules and not self._measured_functions

    @property
    def calls_per_forward(self) -> dict[str, int]:
        """The most calls per parent forward seen of each watched module (what :meth:`site_name` goes by)."""
        counted = self._tracer.calls_per_forward.items()
        return {name: calls for name, calls in counted if name not in self._channels_last_producers}

    def _eps_for(self, kind: type) -> float | None:
        if isinstance(self._eps_setting, float | int):
            return float(self._eps_setting)
        for table in (self._eps_setting or {}, DEFAULT_EPS):
            for cls in kind.__mro__:
                if cls in table:
                    return table[cls]
        if self.watch == "pre_activations" and issubclass(kind, PRE_ACTIVATION_TYPES):
            return 0.0
        return _TOLERANCE

    @property
    def hooks_attached(self) -> int:
        """How many hooks this probe currently holds on the model."""
        return self._tracer.hooks_attached

    def start(self, target: ActivationStats, validation: bool = False) -> None:
        """Attach the hooks; until :meth:`stop`, every call of a watched module adds its statistics to ``target``.

        Training forwards after the first measured one intercept activation functions only if that one called
        some (the interception costs several microseconds per torch call of the forward); a validation pass
        (``validation=True``) always does, since eval-mode paths may call functions that training does not.
        """
        self.stop()
        self._target = target
        # the linear-like producers matter only to the first measured forward, which resolves the channel dims
        traced = self.modules if self._tracked else [*self._channels_last_producers, *self.modules]
        functions = validation or not self._tracked or bool(self._measured_functions)
        self._tracer.start(traced, propagate=not self._tracked and self.channel_dim == "auto", functions=functions)

    def stop(self) -> None:
        """Remove every hook and forget every tensor seen. Safe to call at any time."""
        if self._tracer.forwards_traced:
            self._tracked_forwards += 1
        if any(self._tracer.calls.get(name) for name in self.modules) or self._measured_functions:
            self._tracked = True
        self._tracer.stop()
        self._target = None
        self.token_mask = None
        for name in self.skipped.intersection(self.modules):
            del self.modules[name], self.eps[name]

    def site_name(self, site: CallSite) -> str:
        """``"<module>"`` for a module called once per parent forward, ``"<module>#<k>"`` otherwise."""
        return self._tracer.site_name(site)

    def _measure(self, site: CallSite, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> CallSite | None:
        """Add one call's statistics to the target; in the first measured forward, mark its output with its site."""
        name = site[0]
        kind = self._tracer.function_sites.get(name)
        if kind is None and name not in self.modules:
            return site  # a linear-like producer: its output is channels last
        if kind is not None and not self._selector.keeps(name):
            return None
        if name in self._failed or self._target is None or not isinstance(output, Tensor):
            return None
        if kind is not None:
            self._measured_functions.add(name)
            if name not in self.eps:
                self.eps[name] = self._eps_for(kind)
        kind = kind or type(module)
        try:
            self._record(site, kind, inputs, output)
        except Exception as error:  # never crash training for a measurement
            self._failed.add(name)
            warnings.warn(
                f"`ActivationMonitor` cannot measure {name!r} ({kind.__name__}, output shape "
                f"{tuple(output.shape)}): {error}; it stops watching that call site.",
                DeadUnitsWarning,
                stacklevel=3,
            )
            return None
        return None if self._tracked else site

    def _record(self, site: CallSite, kind: type, inputs: tuple[Any, ...], output: Tensor) -> None:
        assert self._target is not None
        name = site[0]
        if self.channel_dim != "auto":
            self.channel_dims.setdefault(site, self.channel_dim)
        if not self._tracked:
            self._track(site, kind, inputs)
        if name in self.skipped or not output.is_floating_point() or output.numel() == 0:
            return
        values, nonnegative = output, kind in _NONNEGATIVE_TYPES
        if self.pre_activation_fn is not None and issubclass(kind, PRE_ACTIVATION_TYPES):
            values = self.pre_activation_fn(output.detach())
            nonnegative = self.pre_activation_fn in _NONNEGATIVE_FNS
        dim = self.channel_dims.setdefault(site, 1)
        mask = self.token_mask
        if mask is not None and dim == -1 and values.shape[:-1] == mask.shape:
            values = values[mask.to(values.device)]
            if values.numel() == 0:
                return
        self._target.update(site, channel_stats(values, dim, self.eps[name], nonnegative))

    def _track(self, site: CallSite, kind: type, inputs: tuple[Any, ...]) -> None:
        """First measured forward: resolve the site's channel dim and, in pre-activation mode, BatchNorm pairing."""
        producer_site = self._tracer.mark_of(inputs)
        producer = None if producer_site is None else producer_site[0]
        if self.channel_dim == "auto" and site not in self.channel_dims:
            producer_channels_last = producer_site is not None and (
                producer in self._channels_last_producers or self.channel_dims.get(producer_site) == -1
            )
            last = issubclass(kind, CHANNELS_LAST_TYPES) or producer_channels_last
            self.channel_dims[site] = -1 if last else 1
        if (
            self.watch == "pre_activations"
            and issubclass(kind, BATCHNORM_TYPES)
            and producer in self.modules
            and not isinstance(self.modules[producer], BATCHNORM_TYPES)
        ):
            self.skipped.add(producer)
            assert self._target is not None
            for dropped in [seen for seen in self.channel_dims if seen[0] == producer]:
                self._target.drop(dropped)

    def state_dict(self) -> dict[str, Any]:
        """Call counts, channel dims and dropped layers found so far."""
        return {
            "calls_per_forward": dict(self.calls_per_forward),
            "channel_dims": [[name, call, dim] for (name, call), dim in self.channel_dims.items()],
            "skipped": sorted(self.skipped),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output, so a resumed run names and splits call sites as before."""
        self._tracer.calls_per_forward = dict(state_dict.get("calls_per_forward", {}))
        self.channel_dims = {(name, int(call)): int(dim) for name, call, dim in state_dict.get("channel_dims", [])}
        self.skipped = set(state_dict.get("skipped", []))


def find_token_mask(module: nn.Module, batch: Any) -> Tensor | None:
    """The padding mask of ``batch`` (``True`` for real tokens), or ``None``.

    ``module.deadunits_token_mask(batch)`` when the module defines it (a method returning a boolean tensor or
    ``None``), else ``batch["token_mask"]`` when the batch is a mapping holding one.

    Example:
        >>> find_token_mask(nn.Linear(2, 2), {"tokens": torch.zeros(1, 3), "token_mask": torch.tensor([[1, 1, 0]])})
        tensor([[ True,  True, False]])
    """
    hook = getattr(module, "deadunits_token_mask", None)
    found = hook(batch) if callable(hook) else batch.get("token_mask") if isinstance(batch, Mapping) else None
    return found.bool() if isinstance(found, Tensor) else None
