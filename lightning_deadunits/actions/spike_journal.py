"""A loss monitor's record of its spikes: events built from verdicts, dumps, the events file, the text panel, deaths."""

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only

from lightning_deadunits.actions.spike_dump import SpikeDump
from lightning_deadunits.metrics.spike_deaths import SpikeDeathLedger
from lightning_deadunits.panels.spike_text import deaths_message, spike_events_table
from lightning_deadunits.panels.writer import PanelWriter
from lightning_deadunits.probes.loss import BatchLoss
from lightning_deadunits.triggers.loss_spike import SpikeVerdict

__all__ = ["SpikeJournal", "spike_event"]

log = logging.getLogger("lightning_deadunits")

_MAX_EVENTS = 1000
_NOT_WRITTEN = ("dead_after_spike", "dead_pending")


class _Monitor(Protocol):
    """What the journal needs of its monitor (a ``MonitorCallback``)."""

    prefix: str
    panels: PanelWriter

    @property
    def source(self) -> str: ...

    def key(self, *parts: str) -> str: ...

    def record_event(self, trainer: "pl.Trainer", record: Mapping[str, Any], local: bool = False) -> None: ...


class SpikeJournal:
    """Keeps the spike events of one loss monitor and every record of them.

    Each flagged batch becomes an event (``events``, the last 1000; see ``LossSpikeMonitor``'s docstring for its
    fields); the rank whose loss spiked dumps its batch at an episode's start and at each new peak; every event is
    written to the run's events file (``"spike"``), ended episodes too (``"episode"``), as well as warm-up outliers
    found after the fact (``"spike"`` with ``"late": true``); the deaths after a spike are filled in as monitors
    read after it (``"spike_deaths"``, the dump annotated, a log line); the text panel ``<prefix>/loss/spike_events``
    shows the table of events, replaced at each write.

    Args:
        monitor: the loss monitor it writes for.
        dump: the dump writer.
        deaths: the ledger of other monitors' dead counts.

    Example:
        >>> journal = SpikeJournal(monitor, dump, SpikeDeathLedger())  # doctest: +SKIP
    """

    def __init__(self, monitor: _Monitor, dump: SpikeDump, deaths: SpikeDeathLedger) -> None:
        self.monitor = monitor
        self.dump = dump
        self.deaths = deaths
        self.events: list[dict[str, Any]] = []

    def spike(
        self,
        trainer: "pl.Trainer",
        pl_module: "pl.LightningModule",
        pending: BatchLoss,
        event: dict[str, Any],
        data: tuple[Any, Any],
        recent: Sequence[tuple[int, float]],
    ) -> dict[str, Any]:
        """Keep and write one flagged batch's ``event`` (dumping ``data``: outputs and batch, when due); return it."""
        outputs, batch = data
        if event["local"] and (event["episode_start"] == pending.step or event["episode_peak_step"] == pending.step):
            path = self.dump.write(trainer, pl_module, pending, event, outputs, batch, recent)
            event["dump"] = None if path is None else str(path)
            event["dump_skipped"] = self.dump.dumper.last_skip_reason
        self.events.append(event)
        del self.events[:-_MAX_EVENTS]
        written = {key: value for key, value in event.items() if key not in _NOT_WRITTEN}
        self._write(trainer, {"type": "spike", **written}, local=event["local"])
        self.resolve_deaths(trainer)
        self._show(trainer)
        return event

    def episode(self, trainer: "pl.Trainer", episode: Mapping[str, Any] | None) -> None:
        """Write an ended episode (rank zero: an episode is the same on every rank)."""
        if episode is not None:
            self._write(trainer, {"type": "episode", **{k: v for k, v in episode.items() if k != "signals"}})

    def late(self, trainer: "pl.Trainer", outliers: Sequence[tuple[int, float, float]]) -> None:
        """Write the warm-up outliers ``(step, loss, score)`` found as the warm-up ended."""
        for step, loss, score in outliers:
            _log_late(step, loss, score)
            record = {"type": "spike", "step": step, "loss": loss, "spike_score": score, "late": True}
            self._write(trainer, {**record, "reason": "warm-up outlier", "local": True}, local=True)

    def resolve_deaths(self, trainer: "pl.Trainer") -> None:
        """Fill in the deaths of the events whose monitors have read since the spike."""
        changed = False
        for event in self.events:
            resolved = self.deaths.resolve(event["step"], event["dead_pending"]) if event["dead_pending"] else {}
            if not resolved:
                continue
            changed = True
            event["dead_after_spike"].update(resolved)
            _log_deaths(deaths_message(event))
            record = {"type": "spike_deaths", "step": event["step"], "dead_after_spike": resolved}
            self._write(trainer, record, local=event["local"])
            if event["dump"] is not None:
                self.dump.dumper.annotate(event["dump"], {"dead_after_spike": event["dead_after_spike"]})
        if changed:
            self._show(trainer)

    def _write(self, trainer: "pl.Trainer", record: Mapping[str, Any], local: bool = False) -> None:
        source = {"prefix": self.monitor.prefix, "source": self.monitor.source}
        self.monitor.record_event(trainer, {**source, **record}, local=local)

    def _show(self, trainer: "pl.Trainer") -> None:
        table = spike_events_table(self.events)
        self.monitor.panels.text(trainer, self.monitor.key("spike_events"), table, trainer.global_step, replace=True)


def spike_event(
    trainer: "pl.Trainer",
    pending: BatchLoss,
    verdict: SpikeVerdict,
    deaths_before: Mapping[str, Mapping[str, Any]],
    skipped_update: bool,
) -> dict[str, Any]:
    """The event of one flagged batch, from the detector's verdict (``dump`` filled in when it is written)."""
    episode = verdict.episode or {}
    # Under DDP the gradient is all-reduced, so its norm spikes on every rank: only the loss says whose batch.
    local = verdict.flagged and ("loss" in verdict.signal or trainer.world_size == 1)
    return {
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
        "reason": verdict.reason if local else "spike on another rank",
        "local": local,
        "signal": verdict.signal,
        "grad_norm": verdict.grad_norm,
        "grad_baseline": verdict.grad_baseline,
        "grad_score": verdict.grad_score,
        "layers": verdict.layers,
        "episode_start": episode.get("start_step", pending.step),
        "episode_length": episode.get("length", 1),
        "episode_peak_step": episode.get("peak_step", pending.step),
        "skipped_update": skipped_update,
        "dump": None,
        "dead_after_spike": {},
        "dead_pending": {origin: dict(before) for origin, before in deaths_before.items()},
    }


@rank_zero_only  # type: ignore[untyped-decorator,misc]
def _log_deaths(message: str) -> None:
    log.warning("deadunits: %s", message)


@rank_zero_only  # type: ignore[untyped-decorator,misc]
def _log_late(step: int, loss: float, score: float) -> None:
    log.warning(
        "deadunits: warm-up loss %.4g at step %s was an outlier (robust z %.3g), found as warm-up ended.",
        loss,
        step,
        score,
    )
