"""Rewind under 2-rank DDP: a spike on one rank rewinds both ranks to the same snapshot and skips the same batches."""

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest

from lightning_deadunits import LossSpikeMonitor, Rewind
from tests.helpers.ddp import DDP_OPTIONS, RecordOnEachRank, read_ranks
from tests.helpers.spike_models import DigitsMLP, digits_with_dirty_batches


class TrainedBatches(pl.Callback):
    def __init__(self) -> None:
        self.trained: list[tuple[int, int]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.trained.append((batch_idx, trainer.global_step))


def _record(trainer: pl.Trainer) -> dict[str, Any]:
    callbacks = trainer.callbacks  # type: ignore[attr-defined]
    rewind = next(cb for cb in callbacks if isinstance(cb, Rewind))
    batches = next(cb for cb in callbacks if isinstance(cb, TrainedBatches))
    return {
        "count": rewind.count,
        "ranges": rewind.skipped.ranges,
        "trained": batches.trained,
        "weights": [p.detach().flatten().tolist() for p in trainer.lightning_module.parameters()],
    }


@pytest.mark.slow
def test_a_spike_on_one_rank_rewinds_both_ranks_identically(tmp_path: Path) -> None:
    data = digits_with_dirty_batches(dirty_batches=[20, 22], rank=1, world_size=2)
    callbacks = [
        LossSpikeMonitor(window=10, warmup=5, skip_update=True, dump_dir=tmp_path / "dumps", max_dumps=0),
        Rewind(snapshot_every=5, skip_batches=6, window=20),
        TrainedBatches(),
        RecordOnEachRank(tmp_path / "ranks", _record),
    ]
    trainer = pl.Trainer(max_steps=24, callbacks=callbacks, logger=False, default_root_dir=tmp_path, **DDP_OPTIONS)
    trainer.fit(DigitsMLP(data, per_sample=False))

    rank0, rank1 = read_ranks(tmp_path / "ranks")
    assert rank0["count"] == rank1["count"] == 1
    assert rank0["ranges"] == rank1["ranges"] == [[0, 15, 25]]
    assert rank0["trained"] == rank1["trained"]
    indices = [batch_idx for batch_idx, _ in rank0["trained"]]
    steps = [step for _, step in rank0["trained"]]
    # The monitor dates a spike by the step its batch trained from (20): the newest snapshot strictly before it is
    # step 15's. Rewound at the end of batch 22 (the repeat), batches 23-25 are dropped.
    assert indices[20:25] == [20, 21, 22, 26, 27]
    assert steps[20:25] == [20, 21, 22, 15, 16]
    assert rank0["weights"] == rank1["weights"]
