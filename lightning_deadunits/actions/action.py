"""The protocol every action follows: it gets the trainer, the module and the alarm, and says where it runs."""

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

import lightning.pytorch as pl

from lightning_deadunits.triggers.alarm import Alarm

__all__ = ["Action"]


class Action(ABC):
    """What to do with an alarm. Subclass it (one file per action) and pass an instance in ``on_alarm=[...]``.

    Every rank raises the same alarms at the same step, so an action that changes training (stop, skip, rewind,
    re-warm) must run on every rank (``all_ranks = True``) and must not call collectives of its own; an action that
    only speaks (log, warn, write a file) sets ``all_ranks = False`` and runs on rank zero.

    :meth:`__call__` runs once per alarm, in the order the actions were given; :meth:`settle` runs once after every
    alarm raised together has been through every action (e.g. to stop once for several alarms, or to raise last).
    ``trainer`` and ``pl_module`` are ``None`` when an :class:`~lightning_deadunits.AlarmHandler` is used outside
    a trainer.

    Example:
        >>> class Notify(Action):
        ...     all_ranks = False
        ...     def __call__(self, trainer, pl_module, alarm):
        ...         print(f"step {alarm.step}: {alarm.message}")
    """

    name: ClassVar[str] = ""
    all_ranks: ClassVar[bool] = True

    @abstractmethod
    def __call__(self, trainer: "pl.Trainer | None", pl_module: "pl.LightningModule | None", alarm: Alarm) -> None:
        """Act on one alarm."""

    def settle(  # noqa: B027  (optional: most actions act per alarm only)
        self, trainer: "pl.Trainer | None", pl_module: "pl.LightningModule | None", alarms: Sequence[Alarm]
    ) -> None:
        """Act once on all the alarms raised together (after :meth:`__call__` has seen each); nothing by default."""
