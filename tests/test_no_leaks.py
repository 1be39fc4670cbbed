"""Nothing stays behind: no hook after fit, an exception, validate or test; no memory growth over thousands of steps."""

import gc
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_deadunits import DeadUnits, ThresholdRule, readings
from lightning_deadunits.callbacks.activation_monitor import ActivationMonitor
from lightning_deadunits.callbacks.kernel_norm_monitor import KernelNormMonitor
from lightning_deadunits.callbacks.loss_spike_monitor import LossSpikeMonitor
from lightning_deadunits.callbacks.lr_warmup import LRWarmup
from lightning_deadunits.triggers.loss_spike import SpikeDetector
from tests.helpers.activation_models import hook_count
from tests.helpers.memory_logger import MemoryLogger
from tests.helpers.odd_models import (
    OddTask,
    SmallConvNet,
    TinyMLP,
    every_step_bundle,
    held_by,
    image_data,
    structured,
)

QUIET: dict[str, Any] = dict(enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


def _task(**options: Any) -> OddTask:
    return OddTask(SmallConvNet(inplace=True), [structured("tensor_tuple", *pair) for pair in image_data(5)], **options)


def _assert_nothing_attached(task: OddTask, bundle: DeadUnits) -> None:
    assert hook_count(task) == 0
    assert bundle.kernels is not None and bundle.kernels.probe.hooks_attached == 0
    assert bundle.activations is not None and bundle.activations.probe.hooks_attached == 0
    for optimizer in task.trainer.optimizers:
        assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks


def test_no_hook_remains_after_fit_with_validation(tmp_path: Path) -> None:
    task = _task()
    bundle = every_step_bundle(on_validation=True)
    trainer = pl.Trainer(max_epochs=2, callbacks=[bundle], logger=False, default_root_dir=tmp_path, **QUIET)
    trainer.fit(task)
    assert bundle.activations is not None and bundle.activations.validation_readings  # validation was measured
    _assert_nothing_attached(task, bundle)


@pytest.mark.parametrize("fail_at_step", [0, 3])  # 0: while the BatchNorm pairing hooks are attached too
def test_no_hook_remains_after_an_exception_inside_a_sampled_step(tmp_path: Path, fail_at_step: int) -> None:
    task = _task(fail_at_step=fail_at_step)
    bundle = every_step_bundle()
    trainer = pl.Trainer(max_epochs=1, callbacks=[bundle], logger=False, default_root_dir=tmp_path, **QUIET)
    with pytest.raises(RuntimeError, match=f"planted failure at step {fail_at_step}"):
        trainer.fit(task)
    _assert_nothing_attached(task, bundle)
    assert [group["lr"] for group in trainer.optimizers[0].param_groups] == [task.lr]  # warmup factor undone


def test_no_hook_remains_after_validate_and_test(tmp_path: Path) -> None:
    task = _task()
    bundle = every_step_bundle(on_validation=True)
    trainer = pl.Trainer(max_steps=2, callbacks=[bundle], logger=False, default_root_dir=tmp_path, **QUIET)
    trainer.fit(task)
    for run in (trainer.validate, trainer.test):
        run(task)
        _assert_nothing_attached(task, bundle)


class HeldCounts(pl.Callback):
    """At the end of the batches that reach `steps`, counts what the callbacks hold and every live tensor."""

    def __init__(self, watched: list[pl.Callback], steps: set[int]) -> None:
        self.watched = watched
        self.steps = steps
        self.counts: dict[int, dict[str, int]] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int) -> None:
        if trainer.global_step in self.steps:
            gc.collect()
            live = sum(isinstance(obj, torch.Tensor) for obj in gc.get_objects())
            self.counts[trainer.global_step] = {**held_by(self.watched), "live_tensors": live}


@pytest.mark.slow
def test_memory_held_by_the_callbacks_stays_flat_over_two_thousand_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The histories are capped at 1000 entries; a cap of 100 shows the bound within this run's 2000 steps.
    monkeypatch.setattr(readings, "HISTORY_LENGTH", 100)
    quiet_rule = ThresholdRule("deadunits/*", above=1e12)  # keeps a streak per key, never fires
    bundle = DeadUnits(
        kernels=KernelNormMonitor(every_n_steps=2, alarms=[quiet_rule]),
        activations=ActivationMonitor(every_n_steps=1, log_every_n_samples=2, window=3, band_history=20),
        loss=LossSpikeMonitor(window=50, warmup=10, log_every_n_steps=1),
        lr_warmup=LRWarmup(warmup_steps=100, rewarm_steps=10, log_every_n_steps=1),
    )
    counts = HeldCounts(bundle.parts, {1000, 2000})
    task = OddTask(TinyMLP(), [structured("tensor_tuple", *image_data(1)[0])] * 2000, lr=0.01)
    trainer = pl.Trainer(
        max_epochs=1, callbacks=[bundle, counts], logger=MemoryLogger(keep=False), default_root_dir=tmp_path, **QUIET
    )
    trainer.fit(task)
    assert trainer.global_step == 2000
    halfway, end = counts.counts[1000], counts.counts[2000]
    assert end["objects"] > 0 and end["tensors"] > 0
    assert {key: end[key] for key in ("tensors", "elements", "objects")} == {
        key: halfway[key] for key in ("tensors", "elements", "objects")
    }
    assert end["live_tensors"] <= halfway["live_tensors"] + 5


def test_spike_detector_without_rebaselining_keeps_no_growing_run_of_flagged_losses() -> None:
    detector = SpikeDetector(window=10, warmup=5, rebaseline_after=None)
    for step in range(10):
        detector.update(1.0 + 0.01 * (step % 3), step)
    verdicts = [detector.update(100.0, step) for step in range(10, 3010)]  # a lasting new level, never accepted
    assert all(verdict.flagged for verdict in verdicts)
    assert detector.state_dict()["flagged_run"] == [] and len(detector.recent) == len(detector.window) == 10
