"""Wiring shared by every monitor: logged-key names, alarm rules and actions, and their state."""

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from lightning_deadunits.actions.alarm_handler import AlarmAction, AlarmHandler
from lightning_deadunits.panels.tensorboard import TensorBoardPanels
from lightning_deadunits.triggers.alarm import Alarm
from lightning_deadunits.triggers.rule import Rule

__all__: list[str] = []

_MAX_ALARM_LOG = 1000


class MonitorCallback(Callback):
    """Base of the monitors: names keys ``<prefix>/<source>/...``, runs alarm rules on published readings,
    hands alarms to the actions and keeps the alarm log in the checkpoint.

    Subclasses set ``source`` and call :meth:`_publish` with readings that are identical on every rank.

    Other callbacks learn of alarms by defining ``on_deadunits_alarm(trainer, pl_module, alarm)``: every alarm
    any monitor raises is passed to each callback of the trainer that has that method (e.g.
    :class:`~lightning_deadunits.LRWarmup` re-warms on loss spikes), before the actions run.

    Monitors that count dead things keep ``dead_counts`` (``{layer: dead count}`` at the latest check) and
    ``dead_counts_step`` (that check's global step), so that a spike can be related to the units it killed, and
    ``dead_masks`` (``{layer: bool tensor over units}`` on the device, same check) for actions that repair them.
    """  # noqa: D205

    source: ClassVar[str] = ""

    def __init__(self, prefix: str, alarms: Sequence[Rule], on_alarm: Sequence[AlarmAction] | AlarmAction) -> None:
        check_prefix(prefix)
        if isinstance(alarms, Rule):
            alarms = [alarms]
        for rule in alarms:
            if not isinstance(rule, Rule):
                raise TypeError(f"`alarms` must be a list of Rule objects (e.g. ThresholdRule), got {rule!r}.")
        self.prefix = prefix
        self.alarms = list(alarms)
        self.alarm_handler = AlarmHandler(on_alarm)  # type: ignore[arg-type]
        self.panels = TensorBoardPanels()
        self.alarm_log: list[Alarm] = []
        self.dead_counts: dict[str, float] = {}
        self.dead_counts_step: int | None = None
        self.dead_masks: dict[str, Tensor] = {}

    def key(self, *parts: str) -> str:
        """The logged key ``<prefix>/<source>/<parts...>``."""
        return "/".join((self.prefix, self.source, *parts))

    @property
    def stop_reason(self) -> str | None:
        """Why an alarm stopped training, or ``None``."""
        return self.alarm_handler.stop_reason

    @property
    def stop_step(self) -> int | None:
        """The global step at which an alarm stopped training, or ``None``."""
        return self.alarm_handler.stop_step

    def _publish(self, trainer: "pl.Trainer", readings: Mapping[str, float], step: int) -> list[Alarm]:
        """Log ``readings`` everywhere, run the alarm rules on them and act on what fires."""
        self.panels.scalars(trainer, readings, step)
        alarms = [alarm for rule in self.alarms for alarm in rule.evaluate(readings, step, self.source)]
        self._raise_alarms(trainer, alarms)
        return alarms

    def _raise_alarms(self, trainer: "pl.Trainer", alarms: Sequence[Alarm]) -> None:
        """Record alarms, pass them to listeners, show them (and a stop) in the alarm panel and run the actions."""
        if not alarms:
            return
        self.alarm_log.extend(alarms)
        del self.alarm_log[:-_MAX_ALARM_LOG]
        listeners = [
            callback for callback in getattr(trainer, "callbacks", []) if hasattr(callback, "on_deadunits_alarm")
        ]
        for alarm in alarms:
            for listener in listeners:
                listener.on_deadunits_alarm(trainer, trainer.lightning_module, alarm)
            self.panels.text(
                trainer,
                f"{self.prefix}/alarms",
                f"**{alarm.level}** [{alarm.rule}] {alarm.message}",
                alarm.step,
            )
        self.alarm_handler.handle(alarms, trainer)
        if "stop" in self.alarm_handler.actions:
            self.panels.text(trainer, f"{self.prefix}/alarms", f"**stop**: {self.stop_reason}", alarms[0].step)

    def _base_state(self) -> dict[str, Any]:
        return {
            "rules": [rule.state_dict() for rule in self.alarms],
            "alarm_log": [alarm.to_dict() for alarm in self.alarm_log],
            "stop_reason": self.alarm_handler.stop_reason,
            "stop_step": self.alarm_handler.stop_step,
        }

    def _load_base_state(self, state_dict: Mapping[str, Any]) -> None:
        for rule, rule_state in zip(self.alarms, state_dict.get("rules", []), strict=False):
            rule.load_state_dict(rule_state)
        self.alarm_log = [Alarm.from_dict(alarm) for alarm in state_dict.get("alarm_log", [])]
        self.alarm_handler.stop_reason = state_dict.get("stop_reason")
        self.alarm_handler.stop_step = state_dict.get("stop_step")


def check_prefix(prefix: Any) -> str:
    """Return ``prefix`` if it can start logged keys; raise ``ValueError`` otherwise.

    Raises:
        ValueError: if ``prefix`` is not a non-empty string without leading or trailing ``/``.
    """
    if not isinstance(prefix, str) or not prefix or prefix.startswith("/") or prefix.endswith("/"):
        raise ValueError(f"`prefix` must be a non-empty string without leading or trailing '/', got {prefix!r}.")
    return prefix


SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")
"""Lightning's strategies that shard parameters, gradients or (tensor parallelism) activations across ranks."""


def reject_sharded_strategy(
    trainer: "pl.Trainer",
    who: str,
    reason: str = "reads whole weight tensors (per-filter norms of a shard are not the filter's)",
    strategies: Sequence[str] = SHARDED_STRATEGIES,
    advice: str | None = None,
) -> None:
    """Raise at setup when the trainer's strategy is (a subclass of) one of ``strategies``, saying why.

    Args:
        trainer: the trainer being set up.
        who: the callback (or option) as the message names it.
        reason: what it does that those strategies break.
        strategies: class names from ``lightning.pytorch.strategies``.
        advice: what to do instead; default: use DDP or drop ``who``.

    Raises:
        ValueError: for those strategies (by default FSDP, DeepSpeed and ModelParallel).
    """
    from lightning.pytorch import strategies as lightning_strategies

    classes = tuple(getattr(lightning_strategies, name) for name in strategies)
    if isinstance(trainer.strategy, classes):
        raise ValueError(
            f"`{who}` {reason} and does not support sharded strategies ({', '.join(strategies)}); got strategy "
            f"{type(trainer.strategy).__name__}. {advice or f'Use DDP, or drop `{who}`.'}"
        )
