"""Watches the training loss for spikes: dumps the offending batch, can skip its update, relates spikes to deaths."""

import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_deadunits._validation import check_bool, check_int
from lightning_deadunits.actions.alarm_handler import AlarmAction
from lightning_deadunits.actions.batch_dump import BatchDumper, rng_states
from lightning_deadunits.callbacks._base import MonitorCallback, reject_sharded_strategy
from lightning_deadunits.errors import DeadUnitsWarning
from lightning_deadunits.triggers.alarm import Alarm
from lightning_deadunits.triggers.loss_spike import SpikeDetector, SpikeVerdict
from lightning_deadunits.triggers.rule import Rule

__all__ = ["LossSpikeMonitor"]

log = logging.getLogger("lightning_deadunits")

_MAX_EVENTS = 1000
_MAX_TABLE_ROWS = 50
# How a dead-unit monitor's `source` is said in a sentence ("37 kernels of layer4.1 died").
_UNIT_WORDS = {"kernels": "kernels", "activations": "units"}


@dataclass
class _Batch:
    """What the monitor knows about the batch in flight, from ``on_train_batch_start`` to its end."""

    step: int
    epoch: int
    batch_idx: int
    rng: dict[str, Any] | None
    dead_before: dict[str, tuple[int, dict[str, float]]]
    loss: Tensor | None = None
    verdict: SpikeVerdict | None = None
    spike: bool = False
    arrived: Any = None  # the CUDA event after which ``loss``, a pinned host copy, may be read


class LossSpikeMonitor(MonitorCallback):
    r"""Detects loss spikes on every training batch, dumps the offending batch and can skip its update.

    **Detection.** Each batch's loss (under gradient accumulation each micro-batch's, scaled back to what
    ``training_step`` returned) goes to a :class:`~lightning_deadunits.triggers.SpikeDetector`: after ``warmup``
    accepted losses, a loss is flagged when it exceeds both ``ratio`` times the median of the last ``window``
    accepted losses and ``z_score`` robust standard deviations above it (the larger of 1.4826 x MAD and the
    median's distance to the 95th percentile over 1.645, so the hard batches of a skewed run are not spikes);
    NaN and Inf are always spikes. Flagged losses never enter the baseline. ``patience`` flagged losses in a
    row make a spike. A loss belongs to ``trainer.global_step`` as its batch starts (the optimizer steps done
    before it), so the spike of the 1801st batch of a run without accumulation is at step 1800. The loss is read
    from ``on_before_backward`` in automatic optimization, and from what ``training_step`` returns (a tensor or
    ``{"loss": ...}``) in manual optimization; when there is none, one warning says so. A batch whose
    ``training_step`` returns ``None`` in automatic optimization (Lightning's way to skip it) is not watched.

    **Cost.** One scalar device-to-host copy per batch (the loss). On CUDA it does not wait for the device: the
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

    **Dumps.** The rank whose loss spiked writes ``<dump_dir>/step{step:08d}-rank{rank}-batch{batch_idx:05d}.pt``
    (default ``dump_dir``: ``<trainer.log_dir>/deadunits/dumps``): the batch on CPU, the loss, the baseline,
    the scores, step, epoch, batch index, rank, the RNG states before the step, the per-sample losses and
    sample ids if given, and the last window of losses. Written atomically, at most ``max_dumps`` files and
    ``max_bytes`` bytes per rank, readable with ``torch.load(weights_only=True)`` or
    :func:`~lightning_deadunits.load_dump`. A failed write warns and training goes on.

    **Skipping the update** (``skip_update=True``, automatic optimization only): the optimizer step of a
    spiking batch (under accumulation, of the whole accumulation window) runs with every gradient set to
    ``None``, so torch optimizers (all but LBFGS) leave the weights and their state (moments, step counts)
    bit-identical. Under fp16 AMP the ``GradScaler`` still sees this step's gradients: an overflow backs its
    scale off as usual. ``trainer.global_step`` still advances, so Lightning still steps the learning-rate
    schedulers of both intervals (``"step"``: once per global step, skipped or not; ``"epoch"``: unchanged) and
    ``ReduceLROnPlateau`` sees only its monitored metric; gradient clipping sees no gradients.

    **Spikes and dead units.** With a :class:`~lightning_deadunits.KernelNormMonitor` (or any monitor that
    exposes ``dead_counts``) in the trainer, each spike event records, per layer, how many kernels or units died
    between that monitor's last check before the spike and its first check after it: in ``events``, in the
    TensorBoard text panel, in the log ("spike at step 1800: 37 kernels of layer4.1 died") and in the dump.

    **Alarms.** Every spike raises an :class:`~lightning_deadunits.Alarm` with source ``"loss"`` and key
    ``<p>/loss/spike`` (value: the loss; threshold: the limit it crossed; level ``"error"`` for a non-finite
    loss), handed to ``on_alarm`` and to every callback with ``on_deadunits_alarm``.

    Logged keys (``<p>`` is ``prefix``; every ``log_every_n_steps`` steps and at each spike):

    ==========================  ========================================================================
    ``<p>/loss/value``          the loss (mean over ranks)
    ``<p>/loss/baseline``       the median of the accepted losses (after the first loss)
    ``<p>/loss/spike_score``    the robust z-score of the loss against the baseline
    ``<p>/loss/spikes``         spike events so far
    ==========================  ========================================================================

    With TensorBoard, the text panel ``<p>/loss/spike_events`` lists the events with their dump paths.

    ``events`` holds one dict per spike: ``step``, ``epoch``, ``batch_idx``, ``rank``, ``loss``, ``baseline``,
    ``spread``, ``ratio``, ``spike_score``, ``threshold``, ``reason``, ``local`` (this rank's loss spiked),
    ``skipped_update``, ``dump`` (path or ``None``), ``dead_after_spike`` (``{"<prefix>/<source>": {"unit",
    "before_step", "after_step", "died": {layer: count}}}``) and ``dead_pending`` (checks still awaited).

    Args:
        window: accepted losses in the baseline (>= 2).
        warmup: accepted losses before any decision (1 ... ``window``).
        ratio: a spike exceeds this multiple of the baseline (> 1).
        z_score: ... and this many robust standard deviations above it (> 0).
        patience: consecutive flagged losses that make a spike (>= 1).
        rebaseline_after: flagged losses in a row after which they become the baseline (``None``: never).
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
    # Devices whose loss is read one batch late, so that reading it never waits for the device.
    _deferred_devices: ClassVar[tuple[str, ...]] = ("cuda",)

    def __init__(
        self,
        window: int = 100,
        warmup: int = 50,
        ratio: float = 2.0,
        z_score: float = 8.0,
        patience: int = 1,
        rebaseline_after: int | None = 100,
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
        self.detector = SpikeDetector(window, warmup, ratio, z_score, patience, rebaseline_after)
        self.skip_update = check_bool("skip_update", skip_update)
        if dump_dir is not None and not isinstance(dump_dir, (str, os.PathLike)):
            raise TypeError(f"`dump_dir` must be a path or None, got {dump_dir!r}.")
        self.dump_dir = None if dump_dir is None else Path(dump_dir)
        self.dumper = BatchDumper(self.dump_dir or Path("deadunits", "dumps"), max_dumps, max_bytes)
        self.log_every_n_steps = (
            None if log_every_n_steps is None else check_int("log_every_n_steps", log_every_n_steps, 1)
        )
        self.events: list[dict[str, Any]] = []
        self.spike_count = 0
        self.skipped_updates = 0
        self._log_every = self.log_every_n_steps or 50
        self._warned_no_loss = False
        self._peers: dict[str, MonitorCallback] = {}
        self._peer_steps: dict[str, int | None] = {}
        self._batch: _Batch | None = None
        self._skip_pending = False
        self._last_logged_step: int | None = None
        self._deferred: tuple[_Batch, Any, Any] | None = None

    @property
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
    def spike_steps(self) -> list[int]:
        """The global step of every spike event, in order."""
        return [event["step"] for event in self.events]

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        if self.skip_update:
            reject_sharded_strategy(
                trainer,
                "LossSpikeMonitor(skip_update=True)",
                reason="skips a step by clearing the `param.grad` the optimizer reads, which sharded strategies "
                "keep in their own buffers or shards",
                advice="Use DDP, or `skip_update=False` (spikes are still detected, dumped and alarmed).",
            )
        if self.skip_update and not pl_module.automatic_optimization:
            raise ValueError(
                "`skip_update=True` needs automatic optimization: with manual optimization the loss is known only "
                "after `training_step` has stepped the optimizer. Use `skip_update=False`, or skip in your own "
                "`training_step` from the alarm (`on_alarm=[callable]`)."
            )
        if self.dump_dir is None:
            self.dumper.directory = Path(trainer.log_dir or trainer.default_root_dir, "deadunits", "dumps")
        self._log_every = self.log_every_n_steps or int(getattr(trainer, "log_every_n_steps", self._log_every))

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._peers = {
            f"{callback.prefix}/{callback.source}": callback
            for callback in trainer.callbacks  # type: ignore[attr-defined]
            if isinstance(callback, MonitorCallback) and callback is not self
        }

    @override
    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        dumping = self.dumper.count < self.dumper.max_dumps
        self._batch = _Batch(
            step=trainer.global_step,
            epoch=trainer.current_epoch,
            batch_idx=batch_idx,
            rng=rng_states() if dumping else None,
            dead_before={
                key: (monitor.dead_counts_step, monitor.dead_counts)
                for key, monitor in self._peers.items()
                if monitor.dead_counts_step is not None
            },
        )

    @override
    def on_before_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss: Tensor) -> None:
        if self._batch is None or not pl_module.automatic_optimization:
            return
        # Lightning hands over the loss divided by `accumulate_grad_batches` and, under fp16 AMP, multiplied by
        # the GradScaler's scale (a power of two, so dividing it out is exact); undo both, on the device.
        value = loss.detach().float()
        scale = getattr(getattr(trainer.precision_plugin, "scaler", None), "_scale", None)
        if isinstance(scale, Tensor):
            value = value / scale.to(value.device)
        self._batch.loss = value * trainer.accumulate_grad_batches

    @override
    def on_before_optimizer_step(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: Optimizer
    ) -> None:
        if not self.skip_update:
            return
        if self._batch is not None:
            self._decide(trainer, self._batch)
        if self._skip_pending:
            self._skip_pending = False
            self._drop_gradients(trainer, optimizer)

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        pending, self._batch = self._batch, None
        if pending is None:
            return
        if pending.loss is None and not pl_module.automatic_optimization:
            pending.loss = _loss_from(outputs)
        if self._deferred is not None:  # the previous loss has had a whole batch to reach the host
            self._finish_batch(trainer, pl_module, *self._deferred)
            self._deferred = None
        if not self.skip_update and pending.loss is not None and pending.loss.device.type in self._deferred_devices:
            pending.loss, pending.arrived = _start_host_copy(pending.loss)
            dumping = self.dumper.count < self.dumper.max_dumps
            self._deferred = (pending, outputs, batch if dumping else None)
            return
        self._finish_batch(trainer, pl_module, pending, outputs, batch)

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._deferred is not None:
            self._finish_batch(trainer, pl_module, *self._deferred)
            self._deferred = None

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._deferred = None

    def _finish_batch(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", pending: _Batch, outputs: Any, batch: Any
    ) -> None:
        """Judge a batch's loss, record and dump a spike, log on logging steps and raise the alarm."""
        self._decide(trainer, pending)
        if pending.verdict is None:
            self._warn_no_loss(pl_module, outputs, pending)
            return
        alarm = self._record_spike(trainer, pl_module, pending, outputs, batch) if pending.spike else None
        self._resolve_deaths(trainer)
        if pending.spike or (pending.step % self._log_every == 0 and pending.step != self._last_logged_step):
            self._last_logged_step = pending.step
            self._publish(trainer, self._readings(trainer, pl_module, pending.verdict), pending.step)
        if alarm is not None:
            self._raise_alarms(trainer, [alarm])

    @override
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # Monitors check once more at train end, possibly after this callback's own on_train_end.
        self._resolve_deaths(trainer)
        self.panels.flush(trainer)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **self._base_state(),
            "detector": self.detector.state_dict(),
            "dumper": self.dumper.state_dict(),
            "events": [dict(event) for event in self.events],
            "spike_count": self.spike_count,
            "skipped_updates": self.skipped_updates,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._load_base_state(state_dict)
        self.detector.load_state_dict(state_dict.get("detector", {}))
        self.dumper.load_state_dict(state_dict.get("dumper", {}))
        self.events = [dict(event) for event in state_dict.get("events", [])]
        self.spike_count = int(state_dict.get("spike_count", 0))
        self.skipped_updates = int(state_dict.get("skipped_updates", 0))

    def _decide(self, trainer: "pl.Trainer", pending: _Batch) -> None:
        """Judge the batch's loss once: the one host transfer, then the decision shared by all ranks."""
        if pending.verdict is not None or pending.loss is None:
            return
        if pending.arrived is not None:
            pending.arrived.synchronize()  # waits for that copy only; not a device sync
        pending.verdict = self.detector.update(float(pending.loss), pending.step)
        pending.spike = bool(trainer.strategy.reduce_boolean_decision(pending.verdict.spike, all=False))
        if pending.spike and self.skip_update:
            self._skip_pending = True
        if pending.verdict.rebaselined:
            _log_rebaseline(pending.step, self.detector.rebaseline_after)

    def _drop_gradients(self, trainer: "pl.Trainer", optimizer: Optimizer) -> None:
        """Make the coming optimizer step a no-op: torch optimizers skip parameters whose gradient is ``None``."""
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and _optimizer_handles_unscaling(optimizer):
            # Lightning leaves unscaling to such (fused) optimizers; without gradients the scaler would record no
            # inf check and fail in update(), so let it check this step's gradients now.
            scaler.unscale_(optimizer)
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                parameter.grad = None
        self.skipped_updates += 1

    def _record_spike(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", pending: _Batch, outputs: Any, batch: Any
    ) -> Alarm:
        """Count the spike, dump this rank's batch if its loss spiked, keep the event; return its alarm."""
        verdict = pending.verdict
        assert verdict is not None
        self.spike_count += 1
        event: dict[str, Any] = {
            "step": pending.step,
            "epoch": pending.epoch,
            "batch_idx": pending.batch_idx,
            "rank": trainer.global_rank,
            "loss": verdict.loss,
            "baseline": verdict.baseline,
            "spread": verdict.spread,
            "ratio": verdict.ratio,
            "spike_score": verdict.score,
            "threshold": verdict.limit,
            "reason": verdict.reason if verdict.spike else "spike on another rank",
            "local": verdict.spike,
            "skipped_update": self.skip_update,
            "dump": None,
            "dead_after_spike": {},
            "dead_pending": {
                key: {"step": step, "counts": dict(counts)} for key, (step, counts) in pending.dead_before.items()
            },
        }
        if verdict.spike:
            path = self._dump(trainer, pl_module, pending, event, outputs, batch)
            event["dump"] = None if path is None else str(path)
        self.events.append(event)
        del self.events[:-_MAX_EVENTS]
        self._peer_steps = {}  # the next poll must look at this event even if no monitor checked since the last
        self._write_events_panel(trainer)
        return Alarm(
            source=self.source,
            key=self.key("spike"),
            value=verdict.loss,
            threshold=math.nan if verdict.limit is None else verdict.limit,
            level="error" if verdict.reason == "non-finite" else "warning",
            message=_spike_message(event),
            step=pending.step,
            rule=type(self).__name__,
        )

    def _dump(
        self,
        trainer: "pl.Trainer",
        pl_module: "pl.LightningModule",
        pending: _Batch,
        event: Mapping[str, Any],
        outputs: Any,
        batch: Any,
    ) -> Path | None:
        extras = outputs if isinstance(outputs, Mapping) else {}
        recent = list(self.detector.recent)
        record = {
            "batch": batch,
            "per_sample_loss": extras.get("per_sample_loss"),
            "sample_ids": extras.get("sample_ids"),
            "recent_steps": torch.tensor([step for step, _ in recent], dtype=torch.long),
            "recent_losses": torch.tensor([loss for _, loss in recent], dtype=torch.float64),
            "rng_states": pending.rng,
        }
        metadata = {
            **{key: value for key, value in event.items() if key not in ("dump", "dead_after_spike", "dead_pending")},
            "global_step": pending.step,
            "world_size": trainer.world_size,
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "module": type(pl_module).__qualname__,
            "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        name = f"step{pending.step:08d}-rank{trainer.global_rank}-batch{pending.batch_idx:05d}"
        return self.dumper.write(name, record, metadata)

    def _resolve_deaths(self, trainer: "pl.Trainer") -> None:
        """Fill in the deaths of spike events whose monitors have checked since the spike (Python floats only)."""
        steps = {key: monitor.dead_counts_step for key, monitor in self._peers.items()}
        if steps == self._peer_steps:
            return
        self._peer_steps = steps
        changed = False
        for event in self.events:
            resolved = {}
            for key, before in list(event["dead_pending"].items()):
                monitor = self._peers.get(key)
                after_step = None if monitor is None else monitor.dead_counts_step
                if monitor is None or after_step is None or after_step <= event["step"]:
                    continue
                del event["dead_pending"][key]
                counts = before["counts"]
                resolved[key] = {
                    "unit": _UNIT_WORDS.get(monitor.source, monitor.source),
                    "before_step": before["step"],
                    "after_step": after_step,
                    "died": {
                        layer: count - counts.get(layer, 0.0)
                        for layer, count in monitor.dead_counts.items()
                        if count > counts.get(layer, 0.0)
                    },
                }
            if not resolved:
                continue
            changed = True
            event["dead_after_spike"].update(resolved)
            _log_deaths(_deaths_message(event))
            if event["dump"] is not None:
                self.dumper.annotate(event["dump"], {"dead_after_spike": event["dead_after_spike"]})
        if changed:
            self._write_events_panel(trainer)

    def _readings(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", verdict: SpikeVerdict
    ) -> dict[str, float]:
        values = [verdict.loss, *(math.nan if v is None else v for v in (verdict.baseline, verdict.score))]
        if trainer.world_size > 1:
            reduced = trainer.strategy.reduce(
                torch.tensor(values, dtype=torch.float64, device=pl_module.device), reduce_op="mean"
            )
            values = reduced.cpu().tolist()
        loss, baseline, score = values
        readings = {self.key("value"): loss, self.key("spikes"): float(self.spike_count)}
        if verdict.baseline is not None:
            readings[self.key("baseline")] = baseline
            readings[self.key("spike_score")] = score
        return readings

    def _warn_no_loss(self, pl_module: "pl.LightningModule", outputs: Any, pending: _Batch) -> None:
        # In automatic optimization a batch without a loss is one `training_step` skipped by returning None.
        if self._warned_no_loss or pl_module.automatic_optimization:
            return
        self._warned_no_loss = True
        warnings.warn(
            f"`LossSpikeMonitor` could not read a loss at step {pending.step} (batch {pending.batch_idx}): "
            f"`{type(pl_module).__name__}.training_step` (manual optimization) gave {type(outputs).__name__}. "
            'Return the loss (a tensor or {"loss": ..., "per_sample_loss": ...}) for the monitor to watch it; '
            "batches without a loss are not watched (this warning is not repeated).",
            DeadUnitsWarning,
            stacklevel=2,
        )

    def _write_events_panel(self, trainer: "pl.Trainer") -> None:
        rows = [
            "| step | epoch | batch | rank | loss | baseline | z | dump | died |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
        ]
        for event in self.events[-_MAX_TABLE_ROWS:]:
            rows.append(
                f"| {event['step']} | {event['epoch']} | {event['batch_idx']} | {event['rank']} "
                f"| {_number(event['loss'])} | {_number(event['baseline'])} | {_number(event['spike_score'])} "
                f"| {event['dump'] or '-'} | {_deaths_summary(event) or '-'}"
                f"{' (awaiting a check)' if event['dead_pending'] else ''} |"
            )
        self.panels.text(trainer, self.key("spike_events"), "\n".join(rows), trainer.global_step)


def _start_host_copy(value: Tensor) -> tuple[Tensor, Any]:
    """Start copying a CUDA scalar into pinned host memory without waiting; return the copy and the event marking
    its arrival. Values on other devices are returned as they are (reading them later costs the same as now).
    """  # noqa: D205
    if value.device.type != "cuda":
        return value, None
    host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
    host.copy_(value, non_blocking=True)
    arrived = torch.cuda.Event()  # type: ignore[no-untyped-call]
    arrived.record(torch.cuda.current_stream(value.device))
    return host, arrived


def _loss_from(outputs: Any) -> Tensor | None:
    """The scalar loss a manual-optimization ``training_step`` returned (a tensor or ``{"loss": ...}``), if any."""
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
    return loss.detach().float() if isinstance(loss, Tensor) and loss.numel() == 1 else None


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _spike_message(event: Mapping[str, Any]) -> str:
    where = f"step {event['step']} (epoch {event['epoch']}, batch {event['batch_idx']}, rank {event['rank']})"
    if not event["local"]:
        text = f"loss spike on another rank at step {event['step']}; this rank's loss {_number(event['loss'])}"
    elif event["reason"] == "non-finite":
        text = f"non-finite loss {event['loss']} at {where}"
    else:
        text = (
            f"loss spike at {where}: loss {_number(event['loss'])} is {event['ratio']:.3g}x the baseline "
            f"{_number(event['baseline'])} (robust z {event['spike_score']:.3g})"
        )
    if event["skipped_update"]:
        text += "; its update is skipped"
    if event["dump"] is not None:
        text += f"; batch dumped to {event['dump']}"
    return text


def _deaths_summary(event: Mapping[str, Any]) -> str:
    """``"37 kernels of layer4.1, 2 kernels of layer3"`` (most first), ``"no kernels"``, or ``""`` if unknown."""
    parts = []
    for deaths in event["dead_after_spike"].values():
        died = sorted(deaths["died"].items(), key=lambda item: -item[1])
        parts += [f"{count:.0f} {deaths['unit']} of {layer}" for layer, count in died] or [f"no {deaths['unit']}"]
    return ", ".join(parts)


def _deaths_message(event: Mapping[str, Any]) -> str:
    checks = "; ".join(
        f"{key} checks at steps {deaths['before_step']} and {deaths['after_step']}"
        for key, deaths in event["dead_after_spike"].items()
    )
    return f"spike at step {event['step']}: {_deaths_summary(event)} died ({checks})"


@rank_zero_only  # type: ignore[untyped-decorator,misc]
def _log_deaths(message: str) -> None:
    log.warning("deadunits: %s", message)


@rank_zero_only  # type: ignore[untyped-decorator,misc]
def _log_rebaseline(step: int, run: int | None) -> None:
    log.warning("deadunits: %s flagged losses in a row up to step %s: taking them as the new loss baseline.", run, step)
