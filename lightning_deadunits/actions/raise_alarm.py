"""Action ``"raise"``: raise :class:`~lightning_deadunits.errors.DeadUnitsError` on every rank, after every other
action has run.
"""  # noqa: D205

from collections.abc import Sequence

import lightning.pytorch as pl

from lightning_deadunits.actions.action import Action
from lightning_deadunits.actions.stop_training import describe_alarms
from lightning_deadunits.errors import DeadUnitsError
from lightning_deadunits.triggers.alarm import Alarm

__all__ = ["RaiseAlarm"]


class RaiseAlarm(Action):
    """Raises once for all the alarms raised together; the handler settles it last.

    Example:
        >>> action = RaiseAlarm()
    """

    name = "raise"

    def __call__(self, trainer: "pl.Trainer | None", pl_module: "pl.LightningModule | None", alarm: Alarm) -> None:
        """Nothing per alarm: it raises in :meth:`settle`."""

    def settle(
        self, trainer: "pl.Trainer | None", pl_module: "pl.LightningModule | None", alarms: Sequence[Alarm]
    ) -> None:
        """Raise with every alarm's message.

        Raises:
            DeadUnitsError: always.
        """
        raise DeadUnitsError(describe_alarms(alarms))
