"""Dump the batch of a loss spike: the record (batch, per-sample losses, recent losses, RNG) and its metadata."""

from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_deadunits.actions.batch_dump import BatchDumper
from lightning_deadunits.probes.loss import BatchLoss

__all__ = ["SpikeDump"]

_NOT_METADATA = ("dump", "dump_skipped", "dead_after_spike", "dead_pending")


class SpikeDump:
    """Writes ``<dumper.directory>/<tag>-step{step:08d}-rank{rank}-batch{batch_idx:05d}.pt`` for the spiking rank.

    Args:
        dumper: the writer (caps, atomic files, safe format).

    Example:
        >>> dump = SpikeDump(BatchDumper("dumps", max_dumps=3))
    """

    def __init__(self, dumper: BatchDumper) -> None:
        self.dumper = dumper

    @property
    def open(self) -> bool:
        """Whether another dump may still be written (so the batch and RNG states are worth keeping)."""
        return self.dumper.count < self.dumper.max_dumps

    def write(
        self,
        trainer: "pl.Trainer",
        pl_module: "pl.LightningModule",
        pending: BatchLoss,
        event: Mapping[str, Any],
        outputs: Any,
        batch: Any,
        recent: Sequence[tuple[int, float]],
    ) -> Path | None:
        """Dump ``batch`` with ``event``'s fields as metadata; the path, or ``None`` if nothing was written."""
        extras = outputs if isinstance(outputs, Mapping) else {}
        record = {
            "batch": batch,
            "per_sample_loss": extras.get("per_sample_loss"),
            "sample_ids": extras.get("sample_ids"),
            "recent_steps": torch.tensor([step for step, _ in recent], dtype=torch.long),
            "recent_losses": torch.tensor([loss for _, loss in recent], dtype=torch.float64),
            "rng_states": pending.rng,
        }
        metadata = {
            **{key: value for key, value in event.items() if key not in _NOT_METADATA},
            "global_step": pending.step,
            "world_size": trainer.world_size,
            "accumulate_grad_batches": trainer.accumulate_grad_batches,
            "module": type(pl_module).__qualname__,
            "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        name = f"step{pending.step:08d}-rank{trainer.global_rank}-batch{pending.batch_idx:05d}"
        return self.dumper.write(name, record, metadata)
