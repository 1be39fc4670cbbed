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
    readings across ranks first and rules are deterministic), so ``"stop"`` and ``"raise"`` act on all ranks
    together, with no collective call that a rank could miss. ``"log"`` and ``"warn"`` speak on rank zero
    only; a user callable runs on every rank (check ``trainer.global_rank`` in it to write files once).

    ``"stop"`` sets ``trainer.should_stop``: Lightning then ends ``Trainer.fit`` after the current batch (running
    validation first if any is configured, as for early stopping), so ``trainer.global_step`` ends at the alarm's
    step. If ``min_steps`` or ``min_epochs`` is not reached yet, Lightning keeps training until it is; the log
    says so. The reason (the alarms' messages) and step are kept in :attr:`stop_reason` and :attr:`stop_step`
    and logged (logger ``lightning_deadunits``, rank zero). ``"raise"`` raises after every other action has run.

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
        self.stop_step: int | None = None

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
        if "stop" in self.actions:
            self._stop(alarms, trainer)
        if "raise" in self.actions:
            raise DeadUnitsError(_describe(alarms))

    def _stop(self, alarms: Sequence[Alarm], trainer: "pl.Trainer | None") -> None:
        self.stop_reason = _describe(alarms)
        self.stop_step = alarms[0].step
        deferred = ""
        if trainer is not None:
            trainer.should_stop = True
            deferred = _deferral(trainer)
        _log_stop(self.stop_step, self.stop_reason, deferred)


def _describe(alarms: Sequence[Alarm]) -> str:
    return "; ".join(f"[{alarm.rule}] {alarm.message}" for alarm in alarms)


def _deferral(trainer: "pl.Trainer") -> str:
    """Why Lightning will train on despite ``should_stop`` (its ``min_steps``/``min_epochs``), or ``""``."""
    fit_loop = trainer.fit_loop
    unmet = []
    if fit_loop.min_steps and trainer.global_step < fit_loop.min_steps:
        unmet.append(f"min_steps={fit_loop.min_steps}")
    if fit_loop.min_epochs and trainer.current_epoch < fit_loop.min_epochs:
        unmet.append(f"min_epochs={fit_loop.min_epochs}")
    return f" (deferred by Lightning until {' and '.join(unmet)} are reached)" if unmet else ""


@rank_zero_only  # type: ignore[untyped-decorator,misc]
def _log_alarm(alarm: Alarm) -> None:
    log.log(_LOG_LEVELS[alarm.level], "deadunits alarm [%s]: %s", alarm.rule, alarm.message)


@rank_zero_only  # type: ignore[untyped-decorator,misc]
def _warn_alarm(alarm: Alarm) -> None:
    warnings.warn(f"deadunits alarm [{alarm.rule}]: {alarm.message}", DeadUnitsWarning, stacklevel=2)


@rank_zero_only  # type: ignore[untyped-decorator,misc]
def _log_stop(step: int, reason: str, deferred: str) -> None:
    log.warning("deadunits: stopping training at step %d%s: %s", step, deferred, reason)
