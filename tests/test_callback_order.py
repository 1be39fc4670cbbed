"""The order of `Trainer(callbacks=[...])` changes nothing: monitors push readings and alarms to listeners."""

import random
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_deadunits import (
    ActivationMonitor,
    DeadUnitRecycler,
    GradNormMonitor,
    KernelNormMonitor,
    LossSpikeMonitor,
    LRWarmup,
)
from tests.helpers.memory_logger import MemoryLogger
from tests.helpers.spike_models import DigitsMLP, digits_with_dirty_batches
from tests.helpers.states import identical

SPIKES = [12, 24]
QUIET: dict[str, Any] = dict(enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)


def _callbacks() -> list[Callback]:
    return [
        KernelNormMonitor(every_n_steps=3, rel_threshold=0.5),
        ActivationMonitor(every_n_steps=2, window=2),
        GradNormMonitor(every_n_steps=1, log_every_n_samples=2, window=2),
        LossSpikeMonitor(window=8, warmup=4, log_every_n_steps=1, skip_update=True),
        DeadUnitRecycler(every_n_steps=2, max_fraction=0.25),
        LRWarmup(warmup_steps=2, rewarm_steps=3, log_every_n_steps=1),
    ]


def _run(tmp_path: Path, order: list[int]) -> tuple[list[Any], dict[str, Any], pl.LightningModule]:
    torch.manual_seed(0)
    callbacks = _callbacks()
    logger = MemoryLogger()
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        callbacks=[callbacks[i] for i in order],
        logger=logger,
        max_steps=30,
        log_every_n_steps=1,
        **QUIET,
    )
    module = DigitsMLP(digits_with_dirty_batches(dirty_batches=SPIKES, scale=50.0), lr=2e-2)
    trainer.fit(module)
    return sorted(logger.records, key=str), _outcome(callbacks, tmp_path), module


def _outcome(callbacks: list[Callback], run_dir: Path) -> dict[str, Any]:
    """What the callbacks did, with the run's own directory (in dump paths) written as ``<run>``."""
    loss, recycler, warmup = callbacks[3:]
    return {
        "spikes": loss.spike_steps,  # type: ignore[attr-defined]
        "skipped": loss.skipped_updates,  # type: ignore[attr-defined]
        "rewarms": warmup.rewarm_starts,  # type: ignore[attr-defined]
        "recycled": recycler.history,  # type: ignore[attr-defined]
        "deaths": [event["dead_after_spike"] for event in loss.events],  # type: ignore[attr-defined]
        "alarms": [
            {**alarm.to_dict(), "message": alarm.message.replace(str(run_dir), "<run>")}
            for alarm in loss.alarm_log  # type: ignore[attr-defined]
        ],
    }


@pytest.mark.parametrize("seed", [1, 2])
def test_shuffled_callbacks_log_and_act_exactly_as_in_order(tmp_path: Path, seed: int) -> None:
    in_order, outcome, module = _run(tmp_path / "in_order", list(range(6)))
    shuffled = list(range(6))
    random.Random(seed).shuffle(shuffled)
    for order in (shuffled, shuffled[::-1]):
        records, other, other_module = _run(tmp_path / "".join(map(str, order)), order)
        assert records == in_order, order
        assert other == outcome, order
        assert identical(other_module.state_dict(), module.state_dict()), order
    # every piece acted: spikes skipped and re-warmed, their deaths resolved, units recycled
    assert outcome["spikes"] == SPIKES and outcome["skipped"] == 2 and outcome["rewarms"] == [s + 1 for s in SPIKES]
    assert all(deaths for deaths in outcome["deaths"])
    assert any(entry.get("recycled", 0) > 0 for entry in outcome["recycled"])
