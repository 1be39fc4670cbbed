"""Watches the training loss for spikes: dumps the offending batch, can skip its update, relates spikes to deaths."""

import logging
import math
import os
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_deadunits.actions.alarm_handler import AlarmAction
from lightning_deadunits.actions.batch_dump import BatchDumper, rng_states
from lightning_deadunits.actions.skip_update import SkipUpdate
from lightning_deadunits.actions.spike_dump import SpikeDump
from lightning_deadunits.actions.spike_journal import SpikeJournal, spike_event
from lightning_deadunits.callbacks._loss_spike_settings import LossSpikeSettings
from lightning_deadunits.callbacks.monitor import MonitorCallback
from lightning_deadunits.metrics.spike_deaths import SpikeDeathLedger
from lightning_deadunits.metrics.spike_readings import spike_scalars
from lightning_deadunits.panels.spike_text import spike_message
from lightning_deadunits.probes.grad_norms import GradNormProbe
from lightning_deadunits.probes.loss import BatchLoss, LossProbe
from lightning_deadunits.readings import Reading
from lightning_deadunits.schedules import StepGate, every_n_steps
from lightning_deadunits.triggers.alarm import Alarm, AlarmLevel
from lightning_deadunits.triggers.loss_spike import SpikeDetector, SpikeVerdict
from lightning_deadunits.triggers.rule import Rule

__all__ = ["LossSpikeMonitor"]

log = logging.getLogger("lightning_deadunits")


class LossSpikeMonitor(MonitorCallback):
    r"""Detects loss spikes on every training batch, dumps the offending batch and can skip its update.

    **Detection.** Each batch's loss (under gradient accumulation each micro-batch's, scaled back to what
    ``training_step`` returned) and, with ``grad_signal``, the global gradient norm of each optimizer step (read in
    ``on_before_optimizer_step``: after AMP unscaling and accumulation, and under DDP after the all-reduce, before
    clipping) go to a :class:`~lightning_deadunits.triggers.SpikeDetector`. Each signal keeps a window of its last
    ``window`` accepted values, their median ``m``, robust spread ``s = 1.4826 x MAD`` and a reference ``r``: the median
    of its first 10 accepted values (its level while training was young). A value ``x`` is flagged when
    ``x > ratio * m`` and ``(x - m) / s > z_score`` and ``x - m > min_excess * |r|`` (``grad_min_excess`` for the
    gradient norm, whose hard batches are far more heavy-tailed): far above the recent values, and large for this signal
    (the scale floor: late in a converged run the median nears 0 and an ordinary hard batch is 20x it and many spreads
    above it, yet a few percent of the young loss). During warm-up ``m`` follows the window's falling trend (a young
    loss falls faster than a median follows); a run that starts trained (fine-tuning, resuming without the monitor's
    state; its first 10 values span more than 4x) has no young level, and its values are also judged in log space (see
    :class:`~lightning_deadunits.triggers.SpikeDetector`). The MAD ignores up to half of the window, so spikes in
    warm-up cannot widen it; judging starts after 10 accepted values (a provisional baseline), and when warm-up ends the
    window is screened by its own baseline: earlier outliers are logged and written to the events file as ``"spike"``
    records with ``"late": true``. NaN and Inf losses are always spikes; a non-finite gradient norm is ignored (fp16
    overflows are the ``GradScaler``'s). Flagged values never enter a window. A batch is flagged when its loss *or* its
    gradient norm is (``signal`` says which); ``patience`` flagged batches in a row make a spike. A loss belongs to
    ``trainer.global_step`` as its batch starts (the optimizer steps done before it), so the spike of the 1801st batch
    of a run without accumulation is at step 1800. The loss is read from ``on_before_backward`` in automatic
    optimization, and from what ``training_step`` returns (a tensor or ``{"loss": ...}``) in manual optimization; when
    there is none, one warning says so. A batch whose ``training_step`` returns ``None`` in automatic optimization
    (Lightning's way to skip it) is not watched.

    **Episodes.** Spikes no more than ``episode_gap`` steps apart are one episode (a corrupted batch and the
    aftershocks of the weights it damaged): one alarm and one count in ``<p>/loss/spikes`` per episode, at its
    start; a ``"spike"`` event per spiking batch (with ``episode_start``, ``episode_length`` so far and
    ``episode_peak_step``), dumps of the first batch and of each new peak, and with ``skip_update`` every spiking
    batch's update is skipped. When an episode ends (more than ``episode_gap`` steps after its last spike, or at
    train end) an ``"episode"`` record is written: ``start_step``, ``peak_step``, ``end_step``, ``length``,
    ``peak_loss``, ``peak_score``, ``signal`` and ``layers``.

    **Gradient attribution.** At a spike, each watched layer's gradient norm (convolutions and ``nn.Linear``) is
    compared with the median of its own last ``window`` norms; the event, the dump, the alarm message and the text
    panel name the layers furthest above theirs ("layer4.1.conv2 gradient 40x its baseline"). Under DDP the gradient
    is all-reduced, so a gradient-only spike is acted on by every rank but dumped by none (only the loss tells whose
    batch it was).

    **Cost.** One small device-to-host copy per batch (the loss, and with ``grad_signal`` the global and per-layer
    gradient norms, computed on the device at each optimizer step). On CUDA it does not wait for the device: the
    copy goes to pinned memory as the batch ends and the loss is judged at the end of the *next* batch (or at
    train end), so a spike's event, dump and alarm come one batch later (still with the spike's own step); with
    ``skip_update=True`` the decision is needed before the optimizer step, so the loss is read at once, which
    waits for the forward pass. Under DDP also one all-reduce of a bool per batch (``reduce_boolean_decision``:
    every rank acts on a spike seen by any rank) and, on logging steps, one all-reduce of three numbers (the
    logged values are means over ranks). While dumps are enabled, the CPU, numpy and Python RNG states are copied
    on the host at each batch start.

    **Per-sample losses protocol.** ``training_step`` may return
    ``{"loss": loss, "per_sample_loss": tensor[N], "sample_ids": tensor[N] or list}``; both are stored in the
    dump, and ``deadunits dump show`` ranks the samples by their loss.

    **Dumps.** The rank whose loss spiked writes
    ``<dump_dir>/<prefix>-step{step:08d}-rank{rank}-batch{batch_idx:05d}.pt`` (``-1``, ``-2``... appended rather than
    replacing a file of that name: monitors sharing a directory, a rerun)
    (default ``dump_dir``: ``<trainer.log_dir>/deadunits/dumps``): the batch on CPU, the loss, the baseline,
    the scores, step, epoch, batch index, rank, the RNG states before the step, the per-sample losses and
    sample ids if given, and the last window of losses. Written atomically, at most ``max_dumps`` files and
    ``max_bytes`` bytes per rank, readable with ``torch.load(weights_only=True)`` or
    :func:`~lightning_deadunits.load_dump`. A failed write warns and training goes on.

    **Skipping the update** (``skip_update=True``, automatic optimization only): the optimizer step of a spiking
    batch (under accumulation, of the whole accumulation window) runs with every gradient set to ``None``
    (:class:`~lightning_deadunits.actions.SkipUpdate`: dropped as ``optimizer.step`` begins, after every callback
    and gradient clipping have seen them), so torch optimizers (all but LBFGS) leave the weights and their state
    (moments, step counts) bit-identical. Under fp16 AMP the ``GradScaler`` still checks this step's gradients: an
    overflow backs its scale off as usual. ``trainer.global_step`` still advances, so Lightning still steps the
    learning-rate schedulers of both intervals (``"step"``: once per global step, skipped or not; ``"epoch"``:
    unchanged) and ``ReduceLROnPlateau`` sees only its monitored metric.

    **Spikes and dead units.** With a :class:`~lightning_deadunits.KernelNormMonitor` (or any monitor that pushes
    dead counts in its readings) in the trainer, each spike event records, per layer, how many kernels or units died
    between that monitor's last check before the spike and its first check after it: in ``events``, in the
    TensorBoard text panel, in the events file, in the log ("spike at step 1800: 37 kernels of layer4.1 died") and
    in the dump. The monitors' order in ``callbacks=[...]`` does not matter.

    **Alarms.** Every episode raises, at its first spike, an :class:`~lightning_deadunits.Alarm` with source
    ``"loss"`` and key
    ``<p>/loss/spike`` (value: the loss; threshold: the limit it crossed; level ``"error"`` for a non-finite
    loss), handed to ``on_alarm`` and to every callback with ``on_deadunits_alarm``.

    Logged keys (``<p>`` is ``prefix``; every ``log_every_n_steps`` steps and at each spike):

    ==========================  ========================================================================
    ``<p>/loss/value``          the loss (mean over ranks)
    ``<p>/loss/baseline``       the median of the accepted losses (in warm-up, their trend)
    ``<p>/loss/spike_score``    the robust z-score of the loss against the baseline
    ``<p>/loss/spikes``         spike episodes so far
    ``<p>/loss/episode_length`` at a spike: spiking batches of its episode so far (1 at its start)
    ==========================  ========================================================================

    The reading published at every spiking batch (to every ``on_deadunits_reading`` listener) carries these keys.

    With TensorBoard, the text panel ``<p>/loss/spike_events`` lists the events with their dump paths. Every event
    is also written as data to the run's events file (``<log_dir>/deadunits/events.jsonl``, see
    :mod:`lightning_deadunits.events`), which ``deadunits report`` reads.

    ``events`` holds one dict per spiking batch: ``step``, ``epoch``, ``batch_idx``, ``rank``, ``loss``, ``baseline``,
    ``spread``, ``ratio``, ``spike_score``, ``threshold``, ``reason``, ``local`` (this rank's loss spiked),
    ``skipped_update``, ``signal``, ``grad_norm``, ``grad_baseline``, ``grad_score``, ``layers`` (``[{"layer",
    "norm", "baseline", "ratio"}]``, most first), ``episode_start``, ``episode_length``, ``episode_peak_step``,
    ``dump`` (path or ``None``), ``dump_skipped`` (why no dump was written, or ``None``),
    ``dead_after_spike`` (``{"<prefix>/<source>": {"unit", "before_step", "after_step", "died": {layer: count}}}``)
    and ``dead_pending`` (checks still awaited).

    Args:
        window: accepted values in each baseline (>= 2).
        warmup: accepted values that fix the young level and end warm-up (1 ... ``window``).
        ratio: a spike exceeds this multiple of the baseline (> 1).
        z_score: ... and this many robust standard deviations above it (> 0).
        patience: consecutive flagged losses that make a spike (>= 1).
        rebaseline_after: flagged losses in a row after which they become the baseline (``None``: never).
        min_excess: ... and exceeds the median by this fraction of the signal's young level (>= 0; the scale floor).
        episode_gap: the most steps between two spikes of one episode (>= 0).
        grad_signal: also judge the global gradient norm, and attribute spikes to layers.
        grad_min_excess: the gradient norm's scale floor, as a multiple of its young level (>= 0; see
            :class:`~lightning_deadunits.triggers.SpikeDetector`).
        skip_update: skip the optimizer step of spiking batches (automatic optimization only).
        dump_dir: where dumps go (default ``<trainer.log_dir>/deadunits/dumps``).
        max_dumps: the most dump files per rank (0: no dumps).
        max_bytes: the most bytes of dumps per rank.
        log_every_n_steps: log the scalars every this many steps (default: the trainer's ``log_every_n_steps``).
        alarms: extra :class:`~lightning_deadunits.triggers.Rule` objects over the logged keys.
        on_alarm: actions for alarms (``"log"``, ``"warn"``, ``"stop"``, ``"raise"`` or callables).
        prefix: first part of every logged key.

    Raises:
        ValueError: on an out-of-range number, an unknown action, or (at setup) ``skip_update`` with manual
            optimization or a sharded strategy (FSDP, DeepSpeed, ModelParallel).
        TypeError: on a wrongly typed argument.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[LossSpikeMonitor(skip_update=True)])  # doctest: +SKIP
    """

    source = "loss"

    def __init__(
        self,
        window: int = 100,
        warmup: int = 50,
        ratio: float = 1.5,
        z_score: float = 6.0,
        patience: int = 1,
        rebaseline_after: int | None = 100,
        min_excess: float = 0.25,
        episode_gap: int = 5,
        grad_signal: bool = True,
        grad_min_excess: float = 4.0,
        skip_update: bool = False,
        dump_dir: str | os.PathLike[str] | None = None,
        max_dumps: int = 20,
        max_bytes: int = 2**30,
        log_every_n_steps: int | None = None,
        alarms: Sequence[Rule] = (),
        on_alarm: Sequence[AlarmAction] = ("log",),
        prefix: str = "deadunits",
    ) -> None:
        super().__init__(prefix=prefix, alarms=alarms, on_alarm=on_alarm)
        self.detector = SpikeDetector(
            window,
            warmup,
            ratio,
            z_score,
            patience,
            rebaseline_after,
            min_excess,
            episode_gap=episode_gap,
            grad_min_excess=grad_min_excess,
        )
        self.settings = LossSpikeSettings(grad_signal, skip_update, dump_dir, max_dumps, max_bytes, log_every_n_steps)
        self.grad_probe = GradNormProbe() if grad_signal else None
        self.dumper = BatchDumper(Path(self.settings.dump_dir or "deadunits/dumps"), max_dumps, max_bytes, tag=prefix)
        self.probe = LossProbe()
        self.dump = SpikeDump(self.dumper)
        self.skip = SkipUpdate()
        self.deaths = SpikeDeathLedger()
        self.journal = SpikeJournal(self, self.dump, self.deaths)
        self.spike_count = 0
        self.logs = StepGate(every_n_steps(self.settings.log_every_n_steps or 50))
        self._batch: BatchLoss | None = None
        self._deaths_before: dict[str, dict[str, Any]] = {}
        self._skip_pending = False
        self._deferred: tuple[BatchLoss, dict[str, dict[str, Any]], Any, Any] | None = None
        self._judged: tuple[BatchLoss, SpikeVerdict, bool] | None = None

    @cached_property
    @override
    def state_key(self) -> str:
        detector = self.detector
        return self._generate_state_key(
            window=detector.window_size,
            warmup=detector.warmup,
            ratio=detector.ratio,
            z_score=detector.z_score,
            patience=detector.patience,
            prefix=self.prefix,
        )

    @property
    def skip_update(self) -> bool:
        """Whether the updates of spiking batches are skipped (read by the hooks of every batch)."""
        return self.settings.skip_update

    @property
    def events(self) -> list[dict[str, Any]]:
        """One dict per flagged batch (the last 1000), fields as in the table above."""
        return self.journal.events

    @property
    def spike_steps(self) -> list[int]:
        """The global step of every spike event, in order."""
        return [event["step"] for event in self.events]

    @property
    def skipped_updates(self) -> int:
        """Optimizer steps skipped so far."""
        return self.skip.count

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        self.settings.check_trainer(trainer, pl_module)
        if self.settings.dump_dir is None:
            self.dumper.directory = Path(trainer.log_dir or trainer.default_root_dir, "deadunits", "dumps")
        self.logs.schedule = every_n_steps(
            self.settings.log_every_n_steps or int(getattr(trainer, "log_every_n_steps", 50))
        )

    def on_deadunits_reading(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", reading: Reading) -> None:
        """Keep the dead counts of other monitors, and resolve the deaths of spikes they have checked after."""
        if reading.origin != f"{self.prefix}/{self.source}":
            self.deaths.hear(reading)
            self.journal.resolve_deaths(trainer)

    @override
    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        rng = rng_states() if self.dump.open else None
        self._batch = BatchLoss(trainer.global_step, trainer.current_epoch, batch_idx, rng)
        self._deaths_before = self.deaths.snapshot()

    @override
    def on_before_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss: Tensor) -> None:
        if self._batch is not None and pl_module.automatic_optimization:
            self.probe.from_backward(trainer, self._batch, loss)

    @override
    def on_before_optimizer_step(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: Optimizer
    ) -> None:
        if self.grad_probe is not None and self._batch is not None:
            norms = self.grad_probe.step_norms()
            if norms is not None:
                self._batch.grads, self._batch.grad_layers = norms
        if not self.skip_update:
            return
        if self._batch is not None:
            self._decide(trainer, self._batch)
        if self._skip_pending:
            self._skip_pending = False
            assert self._judged is not None
            loss, step = self._judged[1].loss, trainer.global_step
            self.skip(
                trainer, pl_module, self._alarm(loss, math.nan, f"loss {loss:.4g} at step {step}: update skipped", step)
            )

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.grad_probe is not None:
            self.grad_probe.attach(pl_module)
        if self.skip_update:
            self.skip.attach(trainer.optimizers)

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.skip.disarm()
        pending, self._batch = self._batch, None
        if pending is None:
            return
        if not pl_module.automatic_optimization:
            self.probe.from_outputs(pending, outputs)
        self._finish_deferred(trainer, pl_module)
        if not self.skip_update and self.probe.start_host_copy(pending):
            self._deferred = (pending, self._deaths_before, outputs, batch if self.dump.open else None)
            return
        self._finish_batch(trainer, pl_module, pending, self._deaths_before, outputs, batch)

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._finish_deferred(trainer, pl_module)
        self.journal.episode(trainer, self.detector.finish())

    @override
    def release(self) -> None:
        self._deferred = None
        self.skip.detach()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **self.base_state(),
            "detector": self.detector.state_dict(),
            "dumper": self.dumper.state_dict(),
            "events": [dict(event) for event in self.events],
            "spike_count": self.spike_count,
            "skipped_updates": self.skip.count,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.load_base_state(state_dict)
        self.detector.load_state_dict(state_dict.get("detector", {}))
        self.dumper.load_state_dict(state_dict.get("dumper", {}))
        self.journal.events = [dict(event) for event in state_dict.get("events", [])]
        self.spike_count = int(state_dict.get("spike_count", 0))
        self.skip.count = int(state_dict.get("skipped_updates", 0))

    def _decide(self, trainer: "pl.Trainer", pending: BatchLoss) -> tuple[SpikeVerdict, bool] | None:
        """Judge the batch's loss once: the one host read, then the decision shared by all ranks."""
        if self._judged is not None and self._judged[0] is pending:
            return self._judged[1:]
        if pending.loss is None:
            return None
        grad_norm, layer_norms = pending.grad_values()
        verdict = self.detector.update(
            pending.value(),
            pending.step,
            grad_norm,
            layer_norms,
            agree=lambda spike: bool(trainer.strategy.reduce_boolean_decision(spike, all=False)),
        )
        spike = verdict.spike
        self._judged = (pending, verdict, spike)
        self._skip_pending |= spike and self.skip_update
        if verdict.rebaselined:
            _log_rebaseline(pending.step, self.detector.rebaseline_after)
        return verdict, spike

    def _finish_deferred(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Finish the batch whose loss was left to arrive on the host (CUDA), if any."""
        deferred, self._deferred = self._deferred, None
        if deferred is not None:
            self._finish_batch(trainer, pl_module, *deferred)

    def _finish_batch(
        self,
        trainer: "pl.Trainer",
        pl_module: "pl.LightningModule",
        pending: BatchLoss,
        deaths_before: dict[str, dict[str, Any]],
        outputs: Any,
        batch: Any,
    ) -> None:
        """Judge a batch's loss, record (and dump) a spike, log on logging steps, raise an episode's alarm."""
        judged = self._decide(trainer, pending)
        if judged is None:
            self.probe.warn_if_missing(pl_module, outputs, pending)
            return
        verdict, spike = judged
        self.journal.episode(trainer, verdict.ended_episode)
        self.journal.late(trainer, verdict.late)
        event = None
        if spike:
            self.spike_count = self.detector.episodes.count
            event = spike_event(trainer, pending, verdict, deaths_before, self.skip_update)
            recent = list(self.detector.recent)
            self.journal.spike(trainer, pl_module, pending, event, (outputs, batch), recent)
        if self.logs.due(pending.step) or spike:
            self.logs.mark(pending.step)
            scalars = spike_scalars(trainer, pl_module.device, verdict, self.spike_count, self.key)
            self.publish(trainer, self.reading(pending.step, scalars))
        if event is not None and verdict.episode_start:
            level: AlarmLevel = "error" if verdict.reason == "non-finite" else "warning"
            limit = math.nan if verdict.limit is None else verdict.limit
            self.raise_alarms(trainer, [self._alarm(verdict.loss, limit, spike_message(event), pending.step, level)])

    def _alarm(self, loss: float, limit: float, message: str, step: int, level: AlarmLevel = "warning") -> Alarm:
        return Alarm(self.source, self.key("spike"), loss, limit, level, message, step, type(self).__name__, "spike")


@rank_zero_only  # type: ignore[untyped-decorator,misc]
def _log_rebaseline(step: int, run: int | None) -> None:
    log.warning("deadunits: %s flagged losses in a row up to step %s: taking them as the new loss baseline.", run, step)
