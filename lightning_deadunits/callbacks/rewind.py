"""Rewind-and-skip in memory: after a loss-spike episode, go back to a snapshot and skip the batches around it."""

import logging
from collections.abc import Sequence
from typing import Any, ClassVar

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, Checkpoint
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from lightning_deadunits._strategies import reject_sharded_strategy
from lightning_deadunits.actions.alarm_handler import AlarmAction, AlarmHandler
from lightning_deadunits.actions.rewind import TrainingState, rewind_event
from lightning_deadunits.actions.skip_batches import SkippedBatches
from lightning_deadunits.actions.snapshot_ring import SnapshotRing, tensor_bytes
from lightning_deadunits.actions.stop_training import StopTraining
from lightning_deadunits.callbacks._rewind_settings import RewindSettings
from lightning_deadunits.callbacks.monitor import MonitorCallback
from lightning_deadunits.readings import Reading
from lightning_deadunits.schedules import StepGate, every_n_steps
from lightning_deadunits.triggers.alarm import Alarm
from lightning_deadunits.triggers.rewind_escalation import Episode, RewindEscalation
from lightning_deadunits.triggers.rule import Rule

__all__ = ["Rewind"]

log = logging.getLogger("lightning_deadunits")


class Rewind(MonitorCallback):
    """PaLM's remedy for loss spikes, automatic: restore an in-memory snapshot from before the spike episode and
    skip the batches around it, without a restart.

    **Snapshots.** At train start and every ``snapshot_every`` optimizer steps (at the end of the batch, after every
    other callback's ``on_train_batch_end``) the training state is copied to host memory
    (:class:`~lightning_deadunits.actions.rewind.TrainingState`: parameters and buffers, optimizers, LR schedulers,
    the AMP grad scaler, torch/CUDA/numpy/Python RNG states, the counters behind ``global_step``, and the state of
    every other ``lightning_deadunits`` callback). The ``keep`` latest live in a ring whose buffers are reused
    (pinned, filled without blocking, on CUDA). A snapshot that would take the ring past ``max_bytes`` is not taken
    (one warning); if a single snapshot is larger at train start, training stops there with a ``ValueError``.

    **Escalation** (:class:`~lightning_deadunits.triggers.rewind_escalation.RewindEscalation`, on alarms whose
    ``route`` matches ``on``): a first spike is left to the monitor's update skip (``LossSpikeMonitor(skip_update=
    True)``); an episode (the monitor's ``episode_length`` reaching 2) or a second alarm within ``window`` batches
    rewinds; a rewind asked for after ``max_rewinds`` rewinds within ``window`` batches raises the ``rewind/gave_up``
    alarm instead, which stops training with its reason in the log, the alarm panel and the events.

    **A rewind** restores the newest snapshot taken before the episode's first alarm (``global_step`` goes back to
    the snapshot's), then skips data: the batches trained since the snapshot are undone, and the next batches are
    taken out of the data fetcher unused until ``skip_batches`` batches from the episode start are skipped. The data
    stream moves on (the epoch's batch and epoch counters keep naming data positions), map-style and iterable
    loaders alike (see :class:`~lightning_deadunits.actions.skip_batches.SkippedBatches`); a skip never runs past
    the epoch's end. The skipped positions are saved in checkpoints and skipped again when a resumed run reaches
    them; the ring is rebuilt from the resumed state. With ``rewarm`` the ``rewind/rewound`` alarm is raised after
    the restore: an :class:`~lightning_deadunits.LRWarmup` with ``"rewind/rewound"`` in ``rewarm_on`` re-warms the
    LR from there. Every rank hears the same alarms, so all ranks rewind to the same snapshot and skip the same
    number of batches at the same step, with no communication.

    Logged keys (``<p>`` is ``prefix``), at each rewind:

    ===============================  ================================================
    ``<p>/rewind/count``             rewinds so far
    ``<p>/rewind/skipped_batches``   batches skipped so far (undone and dropped)
    ===============================  ================================================

    Each rewind is an ``"action"`` event (``action="rewind"``: reason, episode start, snapshot step, step before,
    skipped positions, LR after) and a line of the ``<p>/rewind`` text panel.

    Args:
        snapshot_every: optimizer steps between snapshots.
        keep: snapshots kept in the ring.
        skip_batches: batches skipped after a rewind, counted from the episode's first batch.
        on: globs over ``alarm.route`` that count as spikes.
        max_rewinds: rewinds allowed within ``window`` batches before giving up.
        window: batches within which a second spike is a repeat, and rewinds are counted.
        rewarm: raise the ``rewind/rewound`` alarm after each rewind (for ``LRWarmup``).
        max_bytes: host memory the ring may take.
        alarms: rules over the logged keys.
        on_alarm: actions for this callback's alarms (the stop on giving up is always added).
        prefix: first part of every logged key.

    Raises:
        ValueError: on an out-of-range number or a bad prefix; at setup under a sharded strategy or when one
            snapshot exceeds ``max_bytes``.
        TypeError: if ``on`` is not a string or a list of strings.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> callbacks = [LossSpikeMonitor(skip_update=True), Rewind(snapshot_every=100, skip_batches=200)]
        >>> trainer = Trainer(callbacks=callbacks)  # doctest: +SKIP
    """  # noqa: D205

    source: ClassVar[str] = "rewind"

    def __init__(
        self,
        snapshot_every: int = 50,
        keep: int = 3,
        skip_batches: int = 200,
        on: str | Sequence[str] = ("loss/spike",),
        max_rewinds: int = 3,
        window: int = 1000,
        rewarm: bool = True,
        max_bytes: int = 8 * 2**30,
        alarms: Sequence[Rule] = (),
        on_alarm: Sequence[AlarmAction] = ("log",),
        prefix: str = "deadunits",
    ) -> None:
        super().__init__(prefix=prefix, alarms=alarms, on_alarm=on_alarm)
        self.alarm_handler = AlarmHandler([*self.alarm_handler.specs, _StopOnGivingUp()])  # type: ignore[list-item]
        self.settings = RewindSettings(snapshot_every, keep, skip_batches, on, max_rewinds, window, rewarm, max_bytes)
        self.escalation = RewindEscalation(self.settings.on, max_rewinds, window)
        self.skipped = SkippedBatches()
        self.count = 0
        self.skipped_batches = 0
        self.batches = 0
        self.ring = SnapshotRing(keep)
        self._gate = StepGate(every_n_steps(self.settings.snapshot_every))
        self._state = TrainingState([])
        self._tail = _AfterEveryCallback(self)
        self._warned_budget = False

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        reject_sharded_strategy(trainer, type(self).__name__, reason="snapshots whole parameter and optimizer tensors")
        # Inserted after this callback (so it gets this very `setup` walk) but before the checkpoint callbacks, so
        # that it ends every batch after all other callbacks and before a checkpoint is saved.
        callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]
        if self._tail not in callbacks:
            later = [i for i, c in enumerate(callbacks) if isinstance(c, Checkpoint) and i > callbacks.index(self)]
            callbacks.insert(later[0] if later else len(callbacks), self._tail)

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # Not on_fit_start: optimizer, scheduler and callback states are restored from a checkpoint after it.
        others = [c for c in trainer.callbacks if _is_deadunits(c) and c is not self and c is not self._tail]  # type: ignore[attr-defined]
        self._state = TrainingState(others)
        self.ring = SnapshotRing(self.settings.keep, pin=pl_module.device.type == "cuda")
        state = self._state.capture(trainer)
        if tensor_bytes(state) > self.settings.max_bytes:
            raise ValueError(
                f"`max_bytes` of Rewind is {self.settings.max_bytes}, but one snapshot of the model, optimizer and "
                f"callback states takes {tensor_bytes(state)} bytes: raise `max_bytes` or lower `keep`."
            )
        self._take_snapshot(trainer, state)

    @override
    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        self.batches += 1

    def on_deadunits_alarm(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", alarm: Alarm) -> None:
        """Hear a spike alarm (see the escalation above); the decision waits for the batch's end."""
        if alarm.source != self.source and self.escalation.matches(alarm):
            position = trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_idx
            self.escalation.hear_alarm(alarm, self.batches, *position)

    def on_deadunits_reading(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", reading: Reading) -> None:
        """Hear whether a spike episode goes on (its ``episode_length``)."""
        episode_key = f"{reading.prefix}/{reading.source}/episode_length"
        self.escalation.hear_reading(reading.source, reading.scalars, episode_key)

    def after_batch(self, trainer: "pl.Trainer") -> None:
        """End of a batch, after every other callback: rewind, give up or snapshot, then drop skipped batches."""
        decision = self.escalation.decide(self.batches)
        if decision is not None and decision[0] == "give_up":
            self._give_up(trainer, decision[1])
        elif decision is not None:
            self._rewind(trainer, decision[1])
        elif self._gate.due(trainer.global_step):
            self._take_snapshot(trainer, self._state.capture(trainer))
        self.skipped.drop_upcoming(trainer)

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._detach(trainer)
        super().teardown(trainer, pl_module, stage)

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._detach(trainer)
        super().on_exception(trainer, pl_module, exception)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **self.base_state(),
            "escalation": self.escalation.state_dict(),
            "skipped": self.skipped.state_dict(),
            "count": self.count,
            "skipped_batches": self.skipped_batches,
            "batches": self.batches,
            "gate": self._gate.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.load_base_state(state_dict)
        self.escalation.load_state_dict(state_dict.get("escalation", {}))
        self.skipped.load_state_dict(state_dict.get("skipped", {}))
        self.count = int(state_dict.get("count", 0))
        self.skipped_batches = int(state_dict.get("skipped_batches", 0))
        self.batches = int(state_dict.get("batches", 0))
        self._gate.load_state_dict(state_dict.get("gate", {}))

    def _take_snapshot(self, trainer: "pl.Trainer", state: dict[str, Any]) -> None:
        self._gate.mark(trainer.global_step)
        if not self.ring.fits(state, self.settings.max_bytes):
            if not self._warned_budget:
                self._warned_budget = True
                log.warning(
                    "deadunits: Rewind snapshots exceed max_bytes=%d; keeping older ones", self.settings.max_bytes
                )
            return
        self.ring.store(trainer.global_step, state, (trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_idx))

    def _rewind(self, trainer: "pl.Trainer", episode: Episode) -> None:
        found = self.ring.latest_before(episode.step)
        if found is None:
            log.warning("deadunits: no Rewind snapshot before step %d; not rewinding", episode.step)
            return
        snapshot_step, snapshot_position, state = found
        from_step, epoch, batch_idx = trainer.global_step, trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_idx
        self._state.restore(trainer, state)
        more = max(0, episode.batch + self.settings.skip_batches - 1 - self.batches)
        skipped = self.skipped.undo_since(trainer, snapshot_position, epoch, batch_idx, more)
        self.count, self.skipped_batches = self.count + 1, self.skipped_batches + len(skipped)
        step = trainer.global_step
        message, fields = rewind_event(trainer, episode, snapshot_step, from_step, epoch, skipped)
        _log_rewind(message)
        self.record_event(
            trainer, {"type": "action", "prefix": self.prefix, "source": self.source, "step": step, **fields}
        )
        self.panels.text(trainer, f"{self.prefix}/rewind", message, step)
        scalars = {self.key("count"): float(self.count), self.key("skipped_batches"): float(self.skipped_batches)}
        self.publish(trainer, self.reading(step, scalars))
        if self.settings.rewarm:
            self.raise_alarms(trainer, [self._alarm("rewound", self.count, 0, "info", message, step)])

    def _give_up(self, trainer: "pl.Trainer", episode: Episode) -> None:
        window, rewinds = self.escalation.window, self.escalation.max_rewinds
        message = (
            f"{rewinds} rewinds within {window} batches did not end the loss spikes (a {episode.reason} from step "
            f"{episode.step}): stopping training"
        )
        self.raise_alarms(trainer, [self._alarm("gave_up", rewinds + 1, rewinds, "error", message, episode.step)])

    def _alarm(self, stat: str, value: float, threshold: float, level: Any, message: str, step: int) -> Alarm:
        return Alarm(self.source, self.key(stat), value, threshold, level, message, step, "rewind", stat)

    def _detach(self, trainer: "pl.Trainer") -> None:
        callbacks: list[Callback] = trainer.callbacks  # type: ignore[attr-defined]
        if self._tail in callbacks:
            callbacks.remove(self._tail)
        self.ring.clear()


class _AfterEveryCallback(Callback):
    """Runs :meth:`Rewind.after_batch` once every other callback has ended the batch."""

    def __init__(self, rewind: Rewind) -> None:
        self.rewind = rewind

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.rewind.after_batch(trainer)


class _StopOnGivingUp(StopTraining):
    """``"stop"`` for the ``gave_up`` alarm only."""

    @override
    def settle(
        self, trainer: "pl.Trainer | None", pl_module: "pl.LightningModule | None", alarms: Sequence[Alarm]
    ) -> None:
        giving_up = [alarm for alarm in alarms if alarm.stat == "gave_up"]
        if giving_up:
            super().settle(trainer, pl_module, giving_up)


def _is_deadunits(callback: Callback) -> bool:
    return isinstance(callback, MonitorCallback) or type(callback).__module__.startswith("lightning_deadunits.")


@rank_zero_only  # type: ignore[untyped-decorator,misc]
def _log_rewind(message: str) -> None:
    log.warning("deadunits: %s", message)
