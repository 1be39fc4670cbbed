"""Action ``"warn"``: each alarm as a :class:`~lightning_deadunits.errors.DeadUnitsWarning`."""

import warnings

import lightning.pytorch as pl

from lightning_deadunits.actions.action import Action
from lightning_deadunits.errors import DeadUnitsWarning
from lightning_deadunits.triggers.alarm import Alarm

__all__ = ["WarnAlarm"]


class WarnAlarm(Action):
    """Warns ``deadunits alarm [<rule>]: <message>`` on rank zero.

    Example:
        >>> action = WarnAlarm()
    """

    name = "warn"
    all_ranks = False

    def __call__(self, trainer: "pl.Trainer | None", pl_module: "pl.LightningModule | None", alarm: Alarm) -> None:
        """Warn about the alarm."""
        warnings.warn(f"deadunits alarm [{alarm.rule}]: {alarm.message}", DeadUnitsWarning, stacklevel=2)
