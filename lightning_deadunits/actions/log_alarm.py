"""Action ``"log"``: each alarm to Python logging (logger ``lightning_deadunits``) at the alarm's level."""

import logging

import lightning.pytorch as pl

from lightning_deadunits.actions.action import Action
from lightning_deadunits.triggers.alarm import Alarm

__all__ = ["LogAlarm"]

log = logging.getLogger("lightning_deadunits")

_LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class LogAlarm(Action):
    """Logs ``deadunits alarm [<rule>]: <message>`` on rank zero.

    Example:
        >>> LogAlarm()(None, None, Alarm("loss", "deadunits/loss/spike", 9.0, 2.0, "warning", "spike", 3, "spike"))
    """

    name = "log"
    all_ranks = False

    def __call__(self, trainer: "pl.Trainer | None", pl_module: "pl.LightningModule | None", alarm: Alarm) -> None:
        """Log the alarm."""
        log.log(_LEVELS[alarm.level], "deadunits alarm [%s]: %s", alarm.rule, alarm.message)
