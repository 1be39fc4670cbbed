"""Two-process CPU DDP runs whose per-rank results come back through files (ddp_spawn shares no objects)."""

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl


class RecordOnEachRank(pl.Callback):
    """At train end, writes ``record(trainer)`` of every rank to ``<directory>/rank<r>.json``."""

    def __init__(self, directory: Path, record: Callable[[pl.Trainer], Any]) -> None:
        self.directory = directory
        self.record = record

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.record(trainer)))


def read_ranks(directory: Path, world_size: int = 2) -> list[Any]:
    return [json.loads((directory / f"rank{rank}.json").read_text()) for rank in range(world_size)]


DDP_OPTIONS: dict[str, Any] = dict(
    accelerator="cpu",
    devices=2,
    strategy="ddp_spawn",
    enable_progress_bar=False,
    enable_model_summary=False,
    enable_checkpointing=False,
)
