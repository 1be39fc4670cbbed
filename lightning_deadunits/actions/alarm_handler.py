"""Runs a monitor's actions on its alarms: the built-in ones by name, user actions and plain functions."""

from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl

from lightning_deadunits._validation import check_choice
from lightning_deadunits.actions.action import Action
from lightning_deadunits.actions.call_function import CallFunction
from lightning_deadunits.actions.log_alarm import LogAlarm
from lightning_deadunits.actions.raise_alarm import RaiseAlarm
from lightning_deadunits.actions.stop_training import StopTraining
from lightning_deadunits.actions.warn_alarm import WarnAlarm
from lightning_deadunits.triggers.alarm import Alarm

__all__ = ["BUILTIN_ACTIONS", "AlarmAction", "AlarmHandler"]

AlarmAction = Literal["log", "warn", "stop", "raise"] | Callable[[Alarm], Any]
"""How an action is given: a built-in name, an :class:`~lightning_deadunits.actions.action.Action`, or a function
of the alarm."""

BUILTIN_ACTIONS: dict[str, type[Action]] = {
    action.name: action for action in (LogAlarm, WarnAlarm, StopTraining, RaiseAlarm)
}
"""The actions that can be named in ``on_alarm``."""


class AlarmHandler:
    """Runs the configured actions on each alarm.

    Every rank calls :meth:`handle` with the same alarms at the same step (the monitors reduce their readings
    across ranks first and rules are deterministic), so actions that change training act on all ranks together,
    with no collective call that a rank could miss; actions with ``all_ranks = False`` (``"log"``, ``"warn"``) run
    on rank zero only. Each action sees each alarm in the order given, then each action settles the alarms raised
    together; ``"raise"`` settles last, so the others still happen.

    ``"stop"`` (:class:`~lightning_deadunits.actions.stop_training.StopTraining`) sets ``trainer.should_stop``;
    the reason and step are kept in :attr:`stop_reason` and :attr:`stop_step`. ``"raise"`` raises
    :class:`~lightning_deadunits.errors.DeadUnitsError`.

    Args:
        actions: any of ``"log"`` (Python logging, logger ``lightning_deadunits``), ``"warn"``
            (:class:`~lightning_deadunits.errors.DeadUnitsWarning`), ``"stop"``, ``"raise"``,
            :class:`~lightning_deadunits.actions.action.Action` instances (called with the trainer, the module and
            the alarm) and functions (called with the :class:`~lightning_deadunits.Alarm`, on every rank).

    Raises:
        ValueError: if a string action is not one of the built-in ones.

    Example:
        >>> handler = AlarmHandler(["log", print])
    """

    def __init__(self, actions: Sequence[AlarmAction] | AlarmAction = ("log",)) -> None:
        if isinstance(actions, str) or callable(actions):
            actions = [actions]
        self.specs: list[AlarmAction] = list(actions)
        self.actions: list[Action] = [_resolve(spec) for spec in self.specs]
        self._stop = next((action for action in self.actions if isinstance(action, StopTraining)), None)
        self.stop_reason: str | None = None
        self.stop_step: int | None = None

    def handle(
        self,
        alarms: Sequence[Alarm],
        trainer: "pl.Trainer | None" = None,
        pl_module: "pl.LightningModule | None" = None,
    ) -> None:
        """Run every action on every alarm, then let each settle them (``"raise"`` last).

        Raises:
            DeadUnitsError: if ``"raise"`` is configured and there is at least one alarm.
        """
        if not alarms:
            return
        here = [action for action in self.actions if action.all_ranks or _rank(trainer) == 0]
        for alarm in alarms:
            for action in here:
                action(trainer, pl_module, alarm)
        for action in sorted(here, key=lambda action: isinstance(action, RaiseAlarm)):
            action.settle(trainer, pl_module, alarms)
            if action is self._stop:
                self.stop_reason, self.stop_step = self._stop.reason, self._stop.step


def _resolve(spec: Any) -> Action:
    if isinstance(spec, Action):
        return spec
    if callable(spec):
        return CallFunction(spec)
    return BUILTIN_ACTIONS[check_choice("on_alarm", spec, tuple(BUILTIN_ACTIONS))]()


def _rank(trainer: "pl.Trainer | None") -> int:
    return 0 if trainer is None else trainer.global_rank
