"""The contract between callbacks: monitors *push* each reading and alarm to whoever listens.

A monitor never polls another, and no callback reads another's fields: after each measurement a monitor hands a
:class:`Reading` to every callback of the trainer that implements :class:`ReadingListener`, and each alarm to every
callback that implements :class:`AlarmListener`, at the moment it is made. A listener that must see the readings of
every monitor of a step before acting (the recycler merges masks from several monitors) collects them and acts in
its next ``on_train_batch_start``, which runs after every callback's ``on_train_batch_end``: so the order of
``Trainer(callbacks=[...])`` never changes a result.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import lightning.pytorch as pl
from torch import Tensor

from lightning_deadunits.triggers.alarm import Alarm

__all__ = [
    "HISTORY_LENGTH",
    "AlarmListener",
    "Reading",
    "ReadingListener",
    "announce_alarm",
    "announce_reading",
    "keep_totals",
]

HISTORY_LENGTH = 1000
"""How many entries a monitor's ``history`` keeps (the latest)."""


@dataclass(frozen=True)
class Reading:
    """One measurement of one monitor, identical on every rank.

    Args:
        prefix: the monitor's key prefix (``"deadunits"``).
        source: what was measured (``"kernels"``, ``"activations"``, ``"loss"``, ``"grads"``...).
        step: the global step the reading belongs to.
        scalars: the logged values, by full key (``<prefix>/<source>/<layer>/<stat>``).
        dead_counts: dead units per layer or call site (monitors that count dead things).
        dead_masks: per layer or call site, a bool tensor over its units, on the device.
        unit: how the dead things are said in a sentence (``"kernels"``, ``"units"``).

    Example:
        >>> Reading("deadunits", "kernels", 100, {"deadunits/kernels/total/dead": 3.0}, {"conv1": 3.0}).step
        100
    """

    prefix: str
    source: str
    step: int
    scalars: Mapping[str, float]
    dead_counts: Mapping[str, float] = field(default_factory=dict)
    dead_masks: Mapping[str, Tensor] = field(default_factory=dict)
    unit: str = "units"

    @property
    def origin(self) -> str:
        """``"<prefix>/<source>"``: which monitor the reading comes from."""
        return f"{self.prefix}/{self.source}"


@runtime_checkable
class ReadingListener(Protocol):
    """A callback that hears every reading any monitor of its trainer makes."""

    def on_deadunits_reading(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", reading: Reading) -> None:
        """Called on every rank, right after the monitor has logged ``reading``."""


@runtime_checkable
class AlarmListener(Protocol):
    """A callback that hears every alarm any monitor of its trainer raises, before the monitor's actions run."""

    def on_deadunits_alarm(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", alarm: Alarm) -> None:
        """Called on every rank with the same alarm at the same step."""


def announce_reading(trainer: "pl.Trainer", reading: Reading) -> None:
    """Hand ``reading`` to every :class:`ReadingListener` among the trainer's callbacks."""
    for callback in getattr(trainer, "callbacks", []):
        if isinstance(callback, ReadingListener):
            callback.on_deadunits_reading(trainer, trainer.lightning_module, reading)


def announce_alarm(trainer: "pl.Trainer", alarm: Alarm) -> None:
    """Hand ``alarm`` to every :class:`AlarmListener` among the trainer's callbacks."""
    for callback in getattr(trainer, "callbacks", []):
        if isinstance(callback, AlarmListener):
            callback.on_deadunits_alarm(trainer, trainer.lightning_module, alarm)


def keep_totals(history: list[dict[str, float]], step: int, totals: Mapping[str, float]) -> None:
    """Append ``{"step": step, **totals}`` to a monitor's ``history``, which keeps the latest :data:`HISTORY_LENGTH`.

    Example:
        >>> history = []
        >>> keep_totals(history, 100, {"dead": 3.0})
        >>> history
        [{'step': 100.0, 'dead': 3.0}]
    """
    history.append({"step": float(step), **totals})
    del history[:-HISTORY_LENGTH]
