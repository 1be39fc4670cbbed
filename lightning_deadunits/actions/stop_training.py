"""Action ``"stop"``: end ``Trainer.fit`` on every rank at the alarm's step, with the reason kept and logged."""

import logging
from collections.abc import Sequence

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only

from lightning_deadunits.actions.action import Action
from lightning_deadunits.triggers.alarm import Alarm

__all__ = ["StopTraining", "describe_alarms"]

log = logging.getLogger("lightning_deadunits")


def describe_alarms(alarms: Sequence[Alarm]) -> str:
    """``"[rule] message; [rule] message"``: the reason given for stopping or raising."""
    return "; ".join(f"[{alarm.rule}] {alarm.message}" for alarm in alarms)


class StopTraining(Action):
    """Sets ``trainer.should_stop``: Lightning ends ``fit`` after the current batch (validating first if configured,
    as for early stopping), so ``trainer.global_step`` ends at the alarm's step. If ``min_steps`` or ``min_epochs``
    is not reached yet, Lightning trains on until it is; the log says so. The reason and the step are kept in
    :attr:`reason` and :attr:`step`.

    Example:
        >>> stop = StopTraining()
    """  # noqa: D205

    name = "stop"

    def __init__(self) -> None:
        self.reason: str | None = None
        self.step: int | None = None

    def __call__(self, trainer: "pl.Trainer | None", pl_module: "pl.LightningModule | None", alarm: Alarm) -> None:
        """Nothing per alarm: the run stops once, in :meth:`settle`."""

    def settle(
        self, trainer: "pl.Trainer | None", pl_module: "pl.LightningModule | None", alarms: Sequence[Alarm]
    ) -> None:
        """Stop for all the alarms raised together."""
        self.reason = describe_alarms(alarms)
        self.step = alarms[0].step
        deferred = ""
        if trainer is not None:
            trainer.should_stop = True
            deferred = _deferral(trainer)
        _log_stop(self.step, self.reason, deferred)


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
def _log_stop(step: int, reason: str, deferred: str) -> None:
    log.warning("deadunits: stopping training at step %d%s: %s", step, deferred, reason)
