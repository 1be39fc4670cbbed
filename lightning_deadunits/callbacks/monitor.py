"""The base every monitor extends: named keys, pushed readings, alarm rules and actions, events, and their state."""

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from typing_extensions import override

from lightning_deadunits._state import note_missing_keys
from lightning_deadunits._validation import check_prefix
from lightning_deadunits.actions.alarm_handler import AlarmAction, AlarmHandler
from lightning_deadunits.events import EventLog, events_file
from lightning_deadunits.panels.layout import LayoutSpec, build_layout
from lightning_deadunits.panels.tensorboard import TensorBoardPanels
from lightning_deadunits.panels.writer import PanelWriter
from lightning_deadunits.probes.selection import replaced_modules
from lightning_deadunits.readings import Reading, announce_alarm, announce_reading
from lightning_deadunits.triggers.alarm import Alarm
from lightning_deadunits.triggers.rule import Rule

__all__ = ["MonitorCallback"]

log = logging.getLogger("lightning_deadunits")

_MAX_ALARM_LOG = 1000


class MonitorCallback(Callback):
    """The extension point for monitors: subclass it, set ``source``, measure in a probe and call :meth:`publish`.

    **Contract.**

    - Keys are ``<prefix>/<source>/<parts...>`` (:meth:`key`).
    - :meth:`publish` takes a :class:`~lightning_deadunits.readings.Reading` that is identical on every rank
      (reduce across ranks first), logs its scalars through :attr:`panels`, keeps its dead counts and masks in
      :attr:`dead_counts`, :attr:`dead_counts_step` and :attr:`dead_masks` (the latest reading, for users), hands it
      to every :class:`~lightning_deadunits.readings.ReadingListener` among the trainer's callbacks, then runs the
      alarm rules on its scalars.
    - :meth:`raise_alarms` records each alarm (in :attr:`alarm_log`, the checkpoint, the ``<prefix>/alarms`` text
      panel and the run's events file), hands it to every :class:`~lightning_deadunits.readings.AlarmListener`, then
      runs the ``on_alarm`` actions. Alarms carry ``(source, stat)`` so listeners route on them whatever the prefix.
    - :meth:`record_event` appends structured events (see :mod:`lightning_deadunits.events`) to the events file
      of the run's log directory, found in ``on_fit_start`` (override it calling ``super()``).
    - :meth:`release` undoes side effects (hooks on the model); it runs at teardown and on exceptions.
    - ``state_dict`` includes :meth:`base_state` (rules, alarm log, stop reason); ``load_state_dict`` calls
      :meth:`load_base_state`, which tolerates missing keys.
    - A monitor may validate its constructor arguments into a frozen dataclass held as ``settings`` (the
      arguments and what follows from them); ``monitor.<argument>`` then reads ``monitor.settings.<argument>``.
    - ``state_key`` names the class and the settings listed in :attr:`state_key_fields` (none: the class alone).
      It is a :func:`functools.cached_property`: Lightning reads it around every hook of every callback (to name
      the hook in its profiler), and rebuilding the string each time cost ~4 us a read. It is computed once, so
      the settings it names are fixed after ``__init__`` (none is assigned again).

    Args:
        prefix: first part of every logged key.
        alarms: :class:`~lightning_deadunits.triggers.Rule` objects over the logged keys.
        on_alarm: actions for fired alarms (names, :class:`~lightning_deadunits.actions.action.Action` instances or
            functions of the alarm).

    Raises:
        ValueError: on a malformed prefix or an unknown action.
        TypeError: if an alarm is not a rule.

    Example:
        >>> class Constant(MonitorCallback):
        ...     source = "constant"
        ...     def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        ...         step = trainer.global_step
        ...         self.publish(trainer, Reading(self.prefix, self.source, step, {self.key("one"): 1.0}))
    """

    source: ClassVar[str] = ""
    unit: ClassVar[str] = "units"
    state_key_fields: ClassVar[tuple[str, ...]] = ()
    """The attributes (settings, ``prefix``) that tell two instances apart in a checkpoint, in ``state_key`` order."""

    def __init__(self, prefix: str, alarms: Sequence[Rule], on_alarm: Sequence[AlarmAction] | AlarmAction) -> None:
        check_prefix(prefix)
        if isinstance(alarms, Rule):
            alarms = [alarms]
        for rule in alarms:
            if not isinstance(rule, Rule):
                raise TypeError(f"`alarms` must be a list of Rule objects (e.g. ThresholdRule), got {rule!r}.")
        self.prefix = prefix
        self.alarms = list(alarms)
        self.alarm_handler = AlarmHandler(on_alarm)
        self.panels: PanelWriter = TensorBoardPanels()
        self.event_log = EventLog()
        self.alarm_log: list[Alarm] = []
        self.dead_counts: dict[str, float] = {}
        self.dead_counts_step: int | None = None
        self.dead_masks: dict[str, Tensor] = {}
        self._layouts: dict[tuple[str, ...], Any] = {}

    if not TYPE_CHECKING:  # at run time only: the package itself reads `settings.<argument>`, with its type

        def __getattr__(self, name: str) -> Any:
            """A constructor argument, validated: ``monitor.<argument>`` is ``monitor.settings.<argument>``."""
            settings = self.__dict__.get("settings")  # not `self.settings`: absent while unpickling, it would recurse
            if name in getattr(settings, "__dataclass_fields__", ()):  # a subclass's own `settings` may be anything
                return getattr(settings, name)
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @cached_property
    @override
    def state_key(self) -> str:
        if not self.state_key_fields:
            return super().state_key
        return self._generate_state_key(**{name: getattr(self, name) for name in self.state_key_fields})

    def key(self, *parts: str) -> str:
        """The logged key ``<prefix>/<source>/<parts...>``."""
        return "/".join((self.prefix, self.source, *parts))

    def reading(self, step: int, scalars: Mapping[str, float], **dead: Any) -> Reading:
        """A :class:`~lightning_deadunits.readings.Reading` of this monitor (``dead``: its dead counts and masks)."""
        return Reading(self.prefix, self.source, step, scalars, unit=self.unit, **dead)

    @property
    def stop_reason(self) -> str | None:
        """Why an alarm stopped training, or ``None``."""
        return self.alarm_handler.stop_reason

    @property
    def stop_step(self) -> int | None:
        """The global step at which an alarm stopped training, or ``None``."""
        return self.alarm_handler.stop_step

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self.release()

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self.release()

    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._layouts = {}
        # Every rank reads `log_dir` here: under DDP reading it broadcasts, so it must not happen on one rank only.
        self.event_log.path = events_file(trainer.log_dir or trainer.default_root_dir, trainer.global_rank)

    @override
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.panels.flush(trainer)

    def release(self) -> None:
        """Remove whatever the monitor attached to the model; safe to call at any time. Nothing by default."""

    def reattach(
        self, pl_module: "pl.LightningModule", watched: Mapping[str, nn.Module], attach: Callable[[nn.Module], None]
    ) -> None:
        """Find the watched modules again when some were replaced in the model since (e.g. by surgery between epochs).

        Args:
            pl_module: the model being trained.
            watched: the probe's ``{name: module}``.
            attach: the probe's ``attach``.
        """
        replaced = replaced_modules(pl_module, watched)
        if replaced:
            log.info("deadunits: `%s` watches the new %s, which replaced the old ones", type(self).__name__, replaced)
            attach(pl_module)

    def publish(self, trainer: "pl.Trainer", reading: Reading) -> list[Alarm]:
        """Log ``reading``, hand it to the listeners, run the alarm rules on it and act on what fires."""
        self.panels.scalars(trainer, reading.scalars, reading.step)
        if reading.dead_counts or reading.dead_masks:
            self.dead_counts = dict(reading.dead_counts)
            self.dead_counts_step = reading.step
            self.dead_masks = dict(reading.dead_masks)
        announce_reading(trainer, reading)
        alarms = [
            replace(alarm, stat=self._stat(alarm.key))
            for rule in self.alarms
            for alarm in rule.evaluate(reading.scalars, reading.step, self.source)
        ]
        self.raise_alarms(trainer, alarms)
        return alarms

    def raise_alarms(self, trainer: "pl.Trainer", alarms: Sequence[Alarm]) -> None:
        """Record alarms, hand them to listeners, show them (and a stop) in the alarm panel and run the actions."""
        if not alarms:
            return
        self.alarm_log.extend(alarms)
        del self.alarm_log[:-_MAX_ALARM_LOG]
        stop_before = self.stop_reason, self.stop_step
        for alarm in alarms:
            self.record_event(trainer, {"type": "alarm", "prefix": self.prefix, **alarm.to_dict()})
            announce_alarm(trainer, alarm)
            self.panels.text(
                trainer, f"{self.prefix}/alarms", f"**{alarm.level}** [{alarm.rule}] {alarm.message}", alarm.step
            )
        self.alarm_handler.handle(alarms, trainer, trainer.lightning_module)
        if self.stop_reason is not None and (self.stop_reason, self.stop_step) != stop_before:
            step = alarms[0].step
            self.record_event(
                trainer,
                {
                    "type": "stop",
                    "prefix": self.prefix,
                    "source": self.source,
                    "step": step,
                    "reason": self.stop_reason,
                },
            )
            self.panels.text(trainer, f"{self.prefix}/alarms", f"**stop**: {self.stop_reason}", step)

    def show_layout(
        self,
        trainer: "pl.Trainer",
        spec: LayoutSpec,
        groups: Mapping[str, Sequence[str]],
        scope: tuple[str, ...] = (),
    ) -> None:
        """Register the custom-scalars layout of ``spec`` for ``groups`` of layers, again only when they change."""
        shown = sorted((group, tuple(layers)) for group, layers in groups.items())
        if self._layouts.get(scope) == shown or not self.panels.active(trainer):
            return
        self._layouts[scope] = shown
        base = "/".join((self.prefix, self.source, *scope))
        title = f"{self.prefix}/{self.source}" + (f" ({', '.join(scope)})" if scope else "")
        self.panels.layout(trainer, build_layout(base, title, spec, groups))

    def record_event(self, trainer: "pl.Trainer", record: Mapping[str, Any], local: bool = False) -> None:
        """Append a structured event: rank zero writes shared ones, each rank its ``local`` ones (e.g. its dumps)."""
        if trainer.global_rank == 0 or local:
            self.event_log.write(record)

    def base_state(self) -> dict[str, Any]:
        """The state every monitor saves: rule states, the alarm log and the stop."""
        return {
            "rules": [rule.state_dict() for rule in self.alarms],
            "alarm_log": [alarm.to_dict() for alarm in self.alarm_log],
            "stop_reason": self.alarm_handler.stop_reason,
            "stop_step": self.alarm_handler.stop_step,
        }

    def load_base_state(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`base_state`'s output; missing keys (of the whole state) keep their defaults, with a note."""
        note_missing_keys(self, state_dict)
        for rule, rule_state in zip(self.alarms, state_dict.get("rules", []), strict=False):
            rule.load_state_dict(rule_state)
        self.alarm_log = [Alarm.from_dict(alarm) for alarm in state_dict.get("alarm_log", [])]
        self.alarm_handler.stop_reason = state_dict.get("stop_reason")
        self.alarm_handler.stop_step = state_dict.get("stop_step")

    def _stat(self, key: str) -> str:
        base = f"{self.prefix}/{self.source}/"
        return key[len(base) :] if key.startswith(base) else key
