from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_deadunits.callbacks.loss_spike_monitor import LossSpikeMonitor
from lightning_deadunits.dumps import load_dump
from tests.helpers.ddp import DDP_OPTIONS, RecordOnEachRank, read_ranks
from tests.helpers.spike_models import digits_with_dirty_batches, rows_seen
from tests.helpers.states import identical
from tests.test_loss_spike_monitor import StepSnapshots
from tests.test_spike_episodes import GradientBlowUp

PLANTED = 30
GRADIENT_SPIKE = 36
BATCH = 16


def _record(trainer: pl.Trainer) -> dict[str, Any]:
    callbacks = trainer.callbacks  # type: ignore[attr-defined]
    monitor = next(cb for cb in callbacks if isinstance(cb, LossSpikeMonitor))
    snapshots = next(cb for cb in callbacks if isinstance(cb, StepSnapshots))
    return {
        "spike_steps": monitor.spike_steps,
        "events": [{key: event[key] for key in ("local", "dump", "reason", "rank")} for event in monitor.events],
        "signals": [event["signal"] for event in monitor.events],
        "alarms": [alarm.step for alarm in monitor.alarm_log],
        "skipped": monitor.skipped_updates,
        "unchanged": identical(snapshots.before[PLANTED], snapshots.after[PLANTED]),
        "moved_before": not identical(snapshots.before[PLANTED - 1], snapshots.after[PLANTED - 1]),
        "weights": float(sum(p.double().sum() for p in trainer.lightning_module.parameters())),
    }


@pytest.mark.slow
def test_a_spike_on_one_rank_is_acted_on_by_all_ranks_and_dumped_by_that_rank(tmp_path: Path) -> None:
    # a loss spike on rank 1 at step 30, then a gradient-only spike on rank 0 at step 36 (one process group for both)
    monitor = LossSpikeMonitor(window=30, warmup=20, skip_update=True)
    data = digits_with_dirty_batches(dirty_batches=[PLANTED], rank=1, world_size=2)
    trainer = pl.Trainer(
        max_steps=GRADIENT_SPIKE + 2,
        callbacks=[monitor, StepSnapshots(), RecordOnEachRank(tmp_path / "ranks", _record)],
        logger=False,
        default_root_dir=tmp_path,
        **DDP_OPTIONS,
    )
    trainer.fit(GradientBlowUp(data, step=GRADIENT_SPIKE, rank=0))

    rank0, rank1 = read_ranks(tmp_path / "ranks")
    dump = tmp_path / "deadunits" / "dumps" / f"deadunits-step{PLANTED:08d}-rank1-batch{PLANTED:05d}.pt"
    assert rank0["spike_steps"] == rank1["spike_steps"] == [PLANTED, GRADIENT_SPIKE]
    assert rank0["alarms"] == rank1["alarms"] == [PLANTED, GRADIENT_SPIKE]
    other = {"local": False, "dump": None, "reason": "spike on another rank"}
    assert rank1["events"] == [
        {"local": True, "dump": str(dump), "reason": "ratio and z-score", "rank": 1},
        {**other, "rank": 1},
    ]
    assert rank0["events"] == [{**other, "rank": 0}, {**other, "rank": 0}]
    # the gradient says when, not whose batch it was: no rank dumps a gradient-only spike under DDP
    # (the dirty batch's gradient reaches rank 0 through the all-reduce; the blow-up after it stays on rank 0)
    assert rank0["signals"] == ["grad_norm", "grad_norm"] and rank1["signals"] == ["grad_norm+loss", ""]
    assert rank0["skipped"] == rank1["skipped"] == 2
    assert rank0["unchanged"] and rank1["unchanged"] and rank0["moved_before"] and rank1["moved_before"]
    assert rank0["weights"] == rank1["weights"]
    assert list(dump.parent.iterdir()) == [dump]
    (_, _, ids), metadata = load_dump(dump)
    assert ids.tolist() == rows_seen(len(data), rank=1, world_size=2)[PLANTED * BATCH : (PLANTED + 1) * BATCH]
    assert metadata["rank"] == 1 and metadata["world_size"] == 2
    assert torch.isfinite(metadata["per_sample_loss"]).all()
