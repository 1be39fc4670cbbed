"""Rewind: exact restore, the data skipped after it, escalation, checkpoints and the memory budget."""

import copy
import random
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import TensorDataset

from lightning_deadunits import LossSpikeMonitor, LRWarmup, Rewind
from lightning_deadunits.events import events_file, read_events
from lightning_deadunits.triggers.threshold import ThresholdRule
from tests.helpers.alarm_helpers import SPIKE_KEY, PlantedReadings, spikes_at
from tests.helpers.memory_logger import MemoryLogger
from tests.helpers.spike_models import DigitsMLP, digits_with_dirty_batches

EPISODE_KEY = "deadunits/loss/episode_length"
BATCH = 16


class ScheduledMLP(DigitsMLP):
    """The digits MLP with dropout (so the RNG matters) and a step LR scheduler."""

    def __init__(self, data: TensorDataset, **kwargs: Any) -> None:
        super().__init__(data, per_sample=False, **kwargs)
        self.net.insert(2, torch.nn.Dropout(0.2))

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        images, labels, _ = batch
        return torch.nn.functional.cross_entropy(self.net(images), labels)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adam(self.parameters(), lr=self.lr)
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.StepLR(optimizer, 3, gamma=0.9)}


def _state(trainer: pl.Trainer) -> dict[str, Any]:
    module = trainer.lightning_module
    return copy.deepcopy(
        {
            "parameters": {name: p.detach().clone() for name, p in module.named_parameters()},
            "optimizer": trainer.optimizers[0].state_dict(),
            "scheduler": trainer.lr_scheduler_configs[0].scheduler.state_dict(),
            "torch": torch.get_rng_state(),
            "numpy": np.random.get_state(),
            "python": random.getstate(),
        }
    )


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


class BatchRecorder(pl.Callback):
    """At each batch start: the batch index, global step and sample ids, and the full state the first time a
    global step is seen and every time it is seen again."""

    def __init__(self) -> None:
        self.trained: list[tuple[int, int, int, list[int]]] = []
        self.states: dict[int, list[dict[str, Any]]] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.trained.append((trainer.current_epoch, batch_idx, trainer.global_step, batch[2].tolist()))
        self.states.setdefault(trainer.global_step, []).append(_state(trainer))


def _trainer(tmp_path: Path, callbacks: list[pl.Callback], **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = dict(
        accelerator="cpu",
        max_steps=20,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        default_root_dir=tmp_path,
    )
    return pl.Trainer(callbacks=callbacks, **{**options, **kwargs})


def _digits(batches: int = 40, dirty: tuple[int, ...] = ()) -> TensorDataset:
    data = digits_with_dirty_batches(dirty_batches=dirty)
    return TensorDataset(*(tensor[: batches * BATCH] for tensor in data.tensors))


def test_a_repeated_spike_restores_the_snapshot_bit_for_bit_and_trains_next_on_the_first_batch_after_the_skip(
    tmp_path: Path,
) -> None:
    # Alarms at steps 7 and 8 (batches 6 and 7): a repeat. The newest snapshot before step 7 is step 4's (taken at
    # the end of batch 3); the episode starts at batch 6, so skipping 5 batches drops batches 4 to 10.
    recorder = BatchRecorder()
    rewind = Rewind(snapshot_every=4, keep=2, skip_batches=5, window=10)
    torch.manual_seed(0)
    trainer = _trainer(tmp_path, [recorder, spikes_at(7, 8), rewind], max_steps=10)
    trainer.fit(ScheduledMLP(_digits()))

    batch_indices = [batch_idx for _, batch_idx, _, _ in recorder.trained]
    steps = [step for _, _, step, _ in recorder.trained]
    assert batch_indices == [0, 1, 2, 3, 4, 5, 6, 7, 11, 12, 13, 14, 15, 16]
    assert steps == [0, 1, 2, 3, 4, 5, 6, 7, 4, 5, 6, 7, 8, 9]
    assert recorder.trained[8][3] == list(range(11 * BATCH, 12 * BATCH))  # the samples of data batch 11
    first, after_rewind = recorder.states[4]
    assert _equal(first, after_rewind)
    assert rewind.count == 1 and rewind.skipped.ranges == [(0, 4, 10)]
    assert trainer.global_step == 10


def test_a_first_spike_is_left_to_the_update_skip(tmp_path: Path) -> None:
    rewind = Rewind(snapshot_every=2, skip_batches=5, window=10)
    recorder = BatchRecorder()
    trainer = _trainer(tmp_path, [spikes_at(5), rewind, recorder], max_steps=10)
    trainer.fit(ScheduledMLP(_digits()))
    assert rewind.count == 0
    assert [batch_idx for _, batch_idx, _, _ in recorder.trained] == list(range(10))
