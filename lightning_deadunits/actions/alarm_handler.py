"""What to do with alarms: log, warn, call the user, stop the run, or raise."""

import logging
import warnings
from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only

from lightning_deadunits._validation import check_choice
from lightning_deadunits.errors import DeadUnitsError, DeadUnitsWarning
from lightning_deadunits.triggers.alarm import Alarm

__all__ = ["AlarmAction", "AlarmHandler"]

log = logging.getLogger("lightning_deadunits")

AlarmAction = Literal["log", "warn", "stop", "raise"] | Callable[[Alarm], Any]

_BUILTIN: tuple[AlarmAction, ...] = ("log", "warn", "stop", "raise")
_LOG_LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class AlarmHandler:
    """Runs the configured actions on each alarm.

    Every rank calls :meth:`handle` with the same alarms at the same step (the monitors reduce their
    readings across ranks first), so ``"stop"`` and ``"raise"`` act on all ranks together. ``"log"`` and
    ``"warn"`` speak on rank zero only; a user callable runs on every rank (check ``trainer.global_rank``
    in it to write files once).

    Args:
        actions: any of ``"log"`` (Python logging, logger ``lightning_deadunits``), ``"warn"``
            (:class:`~lightning_deadunits.errors.DeadUnitsWarning`), ``"stop"`` (``trainer.should_stop``),
            ``"raise"`` (:class:`~lightning_deadunits.errors.DeadUnitsError`) and callables taking the
            :class:`~lightning_deadunits.triggers.Alarm`.

    Raises:
        ValueError: if a string action is not one of the built-in ones.

    Example:
        >>> handler = AlarmHandler(["log", print])
    """

    def __init__(self, actions: Sequence[AlarmAction] = ("log",)) -> None:
        if isinstance(actions, str) or callable(actions):
            actions = [actions]
        self.actions: list[AlarmAction] = [
            action if callable(action) else check_choice("on_alarm", action, _BUILTIN) for action in actions
        ]
        self.stop_reason: str | None = None

    def handle(self, alarms: Sequence[Alarm], trainer: "pl.Trainer | None" = None) -> None:
        """Run every action on every alarm, in order; ``"raise"`` goes last so the others still happen.

        Raises:
            DeadUnitsError: if ``"raise"`` is configured and there is at least one alarm.
        """
        if not alarms:
            return
        for alarm in alarms:
            for action in self.actions:
                if callable(action):
                    action(alarm)
                elif action == "log":
                    _log_alarm(alarm)
                elif action == "warn":
                    _warn_alarm(alarm)
                elif action == "stop":
                    self._stop(alarm, trainer)
        if "raise" in self.actions:
            raise DeadUnitsError("; ".join(f"[{alarm.rule}] {alarm.message}" for alarm in alarms))

    def _stop(self, alarm: Alarm, trainer: "pl.Trainer | None") -> None:
        if self.stop_reason is None:
            self.stop_reason = f"[{alarm.rule}] {alarm.message}"
            _log_stop(self.stop_reason)
        if trainer is not None:
            trainer.should_stop = True


@rank_zero_only  # type: ignore[untyped-decorator,misc]
def _log_alarm(alarm: Alarm) -> None:
    log.log(_LOG_LEVELS[alarm.level], "deadunits alarm [%s]: %s", alarm.rule, alarm.message)


@rank_zero_only  # type: ignore[untyped-decorator,misc]
def _warn_alarm(alarm: Alarm) -> None:
    warnings.warn(f"deadunits alarm [{alarm.rule}]: {alarm.message}", DeadUnitsWarning, stacklevel=2)


@rank_zero_only  # type: ignore[untyped-decorator,misc]
def _log_stop(reason: str) -> None:
    log.warning("deadunits: stopping training: %s", reason)
