"""A plain function as an action: ``on_alarm=[my_function]`` calls ``my_function(alarm)`` on every rank."""

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl

from lightning_deadunits.actions.action import Action
from lightning_deadunits.triggers.alarm import Alarm

__all__ = ["CallFunction"]


class CallFunction(Action):
    """Calls ``function(alarm)`` on every rank (check ``trainer.global_rank`` to write files once; for the trainer,
    subclass :class:`~lightning_deadunits.actions.action.Action` instead).

    Args:
        function: called with each :class:`~lightning_deadunits.Alarm`.

    Example:
        >>> action = CallFunction(print)
    """  # noqa: D205

    def __init__(self, function: Callable[[Alarm], Any]) -> None:
        self.function = function

    def __call__(self, trainer: "pl.Trainer | None", pl_module: "pl.LightningModule | None", alarm: Alarm) -> None:
        """Call the function."""
        self.function(alarm)
