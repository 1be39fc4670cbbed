"""One callback that switches on the kernel, activation and loss monitors (and optionally LR warmup)."""

import copy
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_deadunits._validation import check_prefix
from lightning_deadunits.actions.alarm_handler import AlarmAction, AlarmHandler
from lightning_deadunits.callbacks.activation_monitor import ActivationMonitor
from lightning_deadunits.callbacks.kernel_norm_monitor import KernelNormMonitor
from lightning_deadunits.callbacks.loss_spike_monitor import LossSpikeMonitor
from lightning_deadunits.callbacks.lr_warmup import LRWarmup
from lightning_deadunits.callbacks.rewind import Rewind
from lightning_deadunits.triggers.rule import Rule

__all__ = ["DeadUnits"]

# Where a part built from `True` departs from its monitor's defaults, to keep the bundle's overhead low.
_BUNDLE_DEFAULTS: dict[str, dict[str, Any]] = {
    "kernels": {"every_n_steps": 100},
    "activations": {"log_every_n_samples": 2},
}


class DeadUnits(Callback):
    """``Trainer(callbacks=[DeadUnits()])``: kernel norms, activations and loss spikes with low-overhead defaults.

    Each part is given as ``True`` (the monitor with its defaults, this bundle's ``alarms``, ``on_alarm`` and
    ``prefix``), ``False`` (off) or a configured instance (used as it is). For a low overhead (on CPU, 1.2% of a
    ResNet-style CNN's training step and 4.7% of a small MobileNet-like CNN's, see ``benchmarks/``) two defaults
    differ from the monitors' own: kernel norms, which move slowly, are checked every 100 steps, and activations
    are sampled every 50 steps (the dead-unit window counts samples) but logged, histograms included, every second
    sample. Images are drawn at every 10th check or log (every 1000 steps; the kernel images also at fit start) and
    at train end: ``benchmarks/`` reports their cost apart. At ``setup`` the parts are inserted
    into ``trainer.callbacks`` right after this callback, so they are ordinary callbacks from then on: each has
    its own hooks, its own checkpoint state (``state_key``), and sees the others (the loss monitor relates
    spikes to the dead units the other two count; ``LRWarmup`` re-warms on the loss monitor's spike alarms).

    Args:
        kernels: a :class:`KernelNormMonitor`, ``True`` or ``False``.
        activations: an :class:`ActivationMonitor`, ``True`` or ``False``.
        loss: a :class:`LossSpikeMonitor`, ``True`` or ``False``.
        lr_warmup: an :class:`LRWarmup`, or ``None`` (default: no LR change).
        rewind: a :class:`Rewind`, ``True`` or ``False`` (default): rewind to an in-memory snapshot and skip the
            batches around loss-spike episodes (give the loss monitor ``skip_update=True`` for one-batch spikes).
        alarms: rules given (each part its own copy) to the parts built from ``True``.
        on_alarm: actions for the parts built from ``True``.
        prefix: first part of every logged key, for the parts built from ``True``.

    Raises:
        TypeError: if a part is neither a bool nor an instance of its class.
        ValueError: on a bad ``prefix`` or ``on_alarm``.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[DeadUnits(activations=ActivationMonitor(every_n_steps=10))])  # doctest: +SKIP
    """

    def __init__(
        self,
        kernels: KernelNormMonitor | bool = True,
        activations: ActivationMonitor | bool = True,
        loss: LossSpikeMonitor | bool = True,
        lr_warmup: LRWarmup | None = None,
        rewind: Rewind | bool = False,
        alarms: Sequence[Rule] = (),
        on_alarm: Sequence[AlarmAction] = ("log",),
        prefix: str = "deadunits",
    ) -> None:
        check_prefix(prefix)
        AlarmHandler(on_alarm)  # validates the actions now rather than when the first part is built
        shared = {"alarms": alarms, "on_alarm": on_alarm, "prefix": prefix}
        self.parts: list[Callback] = [
            part
            for part in (
                _part("kernels", kernels, KernelNormMonitor, shared),
                _part("activations", activations, ActivationMonitor, shared),
                _part("loss", loss, LossSpikeMonitor, shared),
                _part("rewind", rewind, Rewind, shared),
            )
            if part is not None
        ]
        if lr_warmup is not None:
            if not isinstance(lr_warmup, LRWarmup):
                raise TypeError(f"`lr_warmup` must be an LRWarmup or None, got {lr_warmup!r}.")
            self.parts.append(lr_warmup)

    @property
    def kernels(self) -> KernelNormMonitor | None:
        """The kernel-norm monitor, if on."""
        return next((p for p in self.parts if isinstance(p, KernelNormMonitor)), None)

    @property
    def activations(self) -> ActivationMonitor | None:
        """The activation monitor, if on."""
        return next((p for p in self.parts if isinstance(p, ActivationMonitor)), None)

    @property
    def rewind(self) -> Rewind | None:
        """The rewind callback, if on."""
        return next((p for p in self.parts if isinstance(p, Rewind)), None)

    @property
    def loss(self) -> LossSpikeMonitor | None:
        """The loss-spike monitor, if on."""
        return next((p for p in self.parts if isinstance(p, LossSpikeMonitor)), None)

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        # Lightning calls a hook on the callbacks by walking trainer.callbacks in order, so parts inserted right
        # after this one get this very `setup` call, and every later hook, like any other callback.
        callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]
        position = callbacks.index(self) + 1
        for part in self.parts:
            if part not in callbacks:
                callbacks.insert(position, part)
                position += 1


def _part(name: str, value: Any, cls: type[Callback], shared: dict[str, Any]) -> Callback | None:
    if isinstance(value, cls):
        return value
    if value is True:
        alarms = [copy.deepcopy(rule) for rule in shared["alarms"]]
        return cls(**{**_BUNDLE_DEFAULTS.get(name, {}), **shared, "alarms": alarms})
    if value is False:
        return None
    raise TypeError(f"`{name}` must be an instance of {cls.__name__}, True or False, got {value!r}.")
