"""A run stopped at a checkpoint and resumed logs, alarms, spikes, dumps and re-warms exactly as an uninterrupted one,
and several instances of a callback keep their own state in one checkpoint."""

import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_deadunits import (
    ActivationMonitor,
    DeadUnits,
    KernelNormMonitor,
    LossSpikeMonitor,
    LRWarmup,
    ThresholdRule,
)
from tests.helpers.alarm_helpers import LRRecorder
from tests.helpers.memory_logger import MemoryLogger
from tests.helpers.spike_models import DigitsMLP, digits_with_dirty_batches
from tests.helpers.states import identical

BATCHES_PER_EPOCH = 30
QUIET: dict[str, Any] = dict(enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)


def _bundle() -> DeadUnits:
    """Every callback, with state that must cross the checkpoint at step 30: a rule's patience streak, an
    activation log period (samples 24..30), the loss window, the warmup and a re-warmup begun at step 26."""
    return DeadUnits(
        kernels=KernelNormMonitor(
            every_n_steps=3, alarms=[ThresholdRule("deadunits/kernels/total/filters", above=0, patience=4)]
        ),
        activations=ActivationMonitor(
            every_n_steps=2,
            log_every_n_samples=4,
            window=5,
            alarms=[ThresholdRule("deadunits/activations/total/channels", above=0, patience=3)],
        ),
        loss=LossSpikeMonitor(window=30, warmup=20, skip_update=True, log_every_n_steps=5),
        lr_warmup=LRWarmup(warmup_steps=40, rewarm_floor=0.2, rewarm_steps=10, log_every_n_steps=1),
    )


class MarkCheckpoints(pl.Callback):
    """Notes how many records the logger held at each checkpoint."""

    def __init__(self, logger: MemoryLogger) -> None:
        self.logger = logger
        self.marks: list[int] = []

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        self.marks.append(len(self.logger.records))


def _run(directory: Path, ckpt_path: Path | None = None) -> dict[str, Any]:
    torch.manual_seed(0)  # the same initial weights; the resumed run loads its own from the checkpoint
    bundle, logger, recorder = _bundle(), MemoryLogger(), LRRecorder()
    marks = MarkCheckpoints(logger)
    checkpoints = ModelCheckpoint(dirpath=directory / "ckpt", save_top_k=-1, every_n_epochs=1)
    trainer = pl.Trainer(
        max_epochs=2,
        limit_train_batches=BATCHES_PER_EPOCH,
        callbacks=[bundle, recorder, marks, checkpoints],
        logger=logger,
        default_root_dir=directory,
        **QUIET,
    )
    # dirty batches 5 (in the loss warm-up the first time) and 25 of each epoch: spikes at steps 25, 35 and 55
    trainer.fit(DigitsMLP(digits_with_dirty_batches(dirty_batches=[5, 25], scale=100.0)), ckpt_path=ckpt_path)
    kernels, activations, loss, warmup = bundle.parts
    assert isinstance(loss, LossSpikeMonitor) and isinstance(warmup, LRWarmup)
    return {
        "records": [record for record in logger.records if record[1].startswith("deadunits/")],
        "marks": marks.marks,
        "alarms": [
            [{**alarm.to_dict(), "message": re.sub(r"\S*/dumps/", "", alarm.message)} for alarm in part.alarm_log]  # type: ignore[attr-defined]
            for part in (kernels, activations, loss)
        ],
        "histories": [kernels.history, activations.history],  # type: ignore[attr-defined]
        "events": [{**event, "dump": Path(event["dump"]).name} for event in loss.events],
        "spike_steps": loss.spike_steps,
        "dumps": sorted(path.name for path in (directory / "deadunits" / "dumps").iterdir()),
        "dump_count": loss.dumper.count,
        "rewarm_starts": warmup.rewarm_starts,
        "lrs": recorder.lrs_by_step(),
    }


def test_every_callback_resumed_from_a_checkpoint_repeats_the_uninterrupted_run(tmp_path: Path) -> None:
    straight = _run(tmp_path / "straight")
    resumed = _run(tmp_path / "resumed", ckpt_path=tmp_path / "straight" / "ckpt" / "epoch=0-step=30.ckpt")

    first_checkpoint = straight["marks"][0]
    assert resumed["records"] == straight["records"][first_checkpoint:]
    for key in ("alarms", "histories", "events", "spike_steps", "dump_count", "rewarm_starts"):
        assert resumed[key] == straight[key], key
    steps = {name: int(re.findall(r"step(\d{8})", name)[0]) for name in straight["dumps"]}
    assert resumed["dumps"] == [name for name in straight["dumps"] if steps[name] >= BATCHES_PER_EPOCH]
    assert resumed["lrs"] == {step: lrs for step, lrs in straight["lrs"].items() if step >= BATCHES_PER_EPOCH}
    # the comparison covers state carried across step 30, not just what happens afterwards
    assert straight["spike_steps"] == [25, 35, 55] and straight["rewarm_starts"] == [26, 36, 56]
    logged_after = {(step, key) for step, key, _ in resumed["records"]}
    assert (30, "deadunits/activations/total/zero_frac") in logged_after  # the period of samples 24..30
    alarm_steps = [[alarm["step"] for alarm in part] for part in straight["alarms"]]
    assert any(step > BATCHES_PER_EPOCH for steps in alarm_steps[:2] for step in steps)


def _two_bundles() -> list[DeadUnits]:
    return [
        DeadUnits(
            kernels=KernelNormMonitor(every_n_steps=1, prefix="fast"),
            activations=ActivationMonitor(every_n_steps=1, log_every_n_samples=1, prefix="fast"),
            loss=LossSpikeMonitor(window=4, warmup=2, prefix="fast"),
            lr_warmup=LRWarmup(warmup_steps=4),
        ),
        # the defaults of every setting but the prefix (and the warmup): two logs of one run side by side
        DeadUnits(prefix="slow", lr_warmup=LRWarmup(warmup_steps=0, rewarm_on=())),
    ]


def test_two_instances_of_each_callback_keep_their_own_state_in_one_checkpoint(tmp_path: Path) -> None:
    def fit(bundles: list[DeadUnits], max_steps: int, ckpt_path: Path | None = None) -> pl.Trainer:
        trainer = pl.Trainer(
            max_steps=max_steps,
            callbacks=list(bundles),
            logger=False,
            enable_checkpointing=False,
            default_root_dir=tmp_path,
            **QUIET,
        )
        trainer.fit(DigitsMLP(digits_with_dirty_batches()), ckpt_path=ckpt_path)
        return trainer

    bundles = _two_bundles()
    fit(bundles, max_steps=4).save_checkpoint(tmp_path / "both.ckpt")
    states = torch.load(tmp_path / "both.ckpt", weights_only=True)["callbacks"]
    parts = [part for bundle in bundles for part in bundle.parts]
    assert len({part.state_key for part in parts}) == len(parts) == 8
    for part in parts:
        assert identical(states[part.state_key], part.state_dict()), part.state_key

    resumed = _two_bundles()
    fit(resumed, max_steps=6, ckpt_path=tmp_path / "both.ckpt")
    fast, slow = (bundle.kernels for bundle in resumed)
    assert fast is not None and slow is not None
    assert [entry["step"] for entry in fast.history] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert [entry["step"] for entry in slow.history] == [0.0, 4.0, 6.0]  # every 50 steps, and at train end
    fast_loss, slow_loss = (bundle.loss for bundle in resumed)
    assert fast_loss is not None and slow_loss is not None
    assert [step for step, _ in fast_loss.detector.recent] == [2, 3, 4, 5]
    assert [step for step, _ in slow_loss.detector.recent] == list(range(6))


@pytest.mark.parametrize("monitor", [KernelNormMonitor, ActivationMonitor, LossSpikeMonitor])
def test_monitors_that_differ_only_in_prefix_keep_apart_in_a_checkpoint(monitor: type[pl.Callback]) -> None:
    assert monitor(prefix="train").state_key != monitor(prefix="probe").state_key  # type: ignore[call-arg]
