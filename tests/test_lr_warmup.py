import logging
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_deadunits import LossSpikeMonitor
from lightning_deadunits.callbacks.lr_warmup import LRWarmup
from lightning_deadunits.errors import DeadUnitsWarning
from lightning_deadunits.functional.warmup import ramp, rewarm_factor, warmup_factor
from lightning_deadunits.triggers.alarm import Alarm
from lightning_deadunits.triggers.threshold import ThresholdRule
from tests.helpers.alarm_helpers import (
    SPIKE_KEY,
    LRRecorder,
    PlantedReadings,
    SchedulerName,
    TinyRegressor,
    TwoOptimizerRegressor,
    quiet_trainer,
    spikes_at,
)
from tests.helpers.events import load_events, scalar_series
from tests.helpers.spike_models import DigitsMLP, digits_with_dirty_batches

# The documented curves, written out independently of the implementation.
SHAPES = {
    "linear": lambda p: p,
    "quadratic": lambda p: p**2,
    "exponential": lambda p: (1 - math.exp(-2 * p)) / (1 - math.exp(-2)),
}


def _fit(tmp_path: Path, model: Any, callbacks: list[Any], **kwargs: Any) -> LRRecorder:
    recorder = LRRecorder()
    quiet_trainer(tmp_path, [*callbacks, recorder], **kwargs).fit(model)
    return recorder


def _alarm(key: str = SPIKE_KEY, source: str = "loss", step: int = 3) -> Alarm:
    return Alarm(source, key, 1.0, 0.5, "warning", "spike", step, "spike")


@pytest.mark.parametrize("shape", ["linear", "quadratic", "exponential"])
def test_lr_warmup_lr_follows_formula_in_every_group(tmp_path: Path, shape: Any) -> None:
    recorder = _fit(
        tmp_path, TinyRegressor(group_lrs=(0.1, 0.02)), [LRWarmup(warmup_steps=6, shape=shape)], max_steps=9
    )
    lrs = recorder.lrs_by_step()
    assert sorted(lrs) == list(range(9))
    for step, (first, second) in lrs.items():
        factor = SHAPES[shape](step / 6) if step < 6 else 1.0
        assert first == pytest.approx(0.1 * factor, rel=1e-12, abs=1e-15)
        assert second == pytest.approx(0.02 * factor, rel=1e-12, abs=1e-15)
    assert lrs[0] == [0.0, 0.0]
    assert lrs[6] == [0.1, 0.02]


@pytest.mark.parametrize("scheduler", ["step", "exponential", "onecycle", "plateau"])
def test_lr_warmup_leaves_scheduler_untouched(tmp_path: Path, scheduler: SchedulerName) -> None:
    runs = {}
    for warm in (False, True):
        model = TinyRegressor(group_lrs=(0.1, 0.02), scheduler=scheduler, total_steps=12)
        recorder = _fit(tmp_path, model, [LRWarmup(warmup_steps=5)] if warm else [], max_steps=12)
        runs[warm] = (recorder, model.lr_schedulers().state_dict(), model.optimizers().param_groups)  # type: ignore[union-attr]
    (plain, plain_state, plain_groups), (warmed, warmed_state, warmed_groups) = runs[False], runs[True]
    assert warmed.scheduled == plain.scheduled
    assert warmed_state == plain_state
    assert [group["lr"] for group in warmed_groups] == [group["lr"] for group in plain_groups]
    for step, lrs in warmed.lrs_by_step().items():
        baseline = plain.lrs_by_step()[step]
        if step >= 5:
            assert lrs == baseline
        else:
            assert lrs == pytest.approx([lr * step / 5 for lr in baseline], rel=1e-12, abs=1e-15)
    assert len(warmed.lrs_by_step()) == 12


def test_lr_warmup_spike_rewarms_from_the_alarm_step(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    warmup = LRWarmup(warmup_steps=2, rewarm_floor=0.25, rewarm_steps=4)
    with caplog.at_level(logging.INFO, logger="lightning_deadunits"):
        recorder = _fit(tmp_path, TinyRegressor(), [spikes_at(6), warmup], max_steps=12)
    lrs = {step: lrs[0] for step, lrs in recorder.lrs_by_step().items()}
    assert warmup.rewarm_starts == [6]
    assert [lrs[step] for step in range(2, 6)] == [0.1] * 4
    assert [lrs[step] for step in range(6, 12)] == pytest.approx([0.025, 0.04375, 0.0625, 0.08125, 0.1, 0.1])
    assert "re-warming the learning rate from factor 0.25 at step 6 back to 1 at step 10" in caplog.text


def test_lr_warmup_ignores_alarms_it_does_not_watch(tmp_path: Path) -> None:
    kernels = PlantedReadings({4: {"deadunits/kernels/total/dead": 9.0}}, [ThresholdRule("deadunits/*", above=1)])
    warmup = LRWarmup(warmup_steps=0, rewarm_steps=4)
    recorder = _fit(tmp_path, TinyRegressor(), [kernels, warmup], max_steps=8)
    assert kernels.alarm_log and warmup.rewarm_starts == []
    assert all(lrs == [0.1] for lrs in recorder.lrs_by_step().values())


def test_lr_warmup_rewarm_on_matches_key_or_source() -> None:
    assert LRWarmup(rewarm_on="loss").triggers_rewarm(_alarm(key="deadunits/loss/nonfinite"))
    assert LRWarmup(rewarm_on="deadunits/kernels/*").triggers_rewarm(_alarm(key="deadunits/kernels/conv/dead"))
    assert not LRWarmup().triggers_rewarm(_alarm(key="deadunits/loss/other"))
    assert not LRWarmup(rewarm_on=[]).triggers_rewarm(_alarm())
    assert not LRWarmup(rewarm_steps=0).triggers_rewarm(_alarm())


def test_lr_warmup_spike_during_warmup_never_raises_lr(tmp_path: Path) -> None:
    warmup = LRWarmup(warmup_steps=8, rewarm_floor=0.5, rewarm_steps=4)
    recorder = _fit(tmp_path, TinyRegressor(), [spikes_at(2), warmup], max_steps=10)
    for step, (lr,) in recorder.lrs_by_step().items():
        rewarm = 0.5 + 0.5 * (step - 2) / 4 if 2 <= step < 6 else 1.0
        assert lr == pytest.approx(0.1 * min(step / 8 if step < 8 else 1.0, rewarm), abs=1e-15)
    assert recorder.lrs_by_step()[2] == [pytest.approx(0.025)]  # warmup's 0.25 < floor 0.5: the lower one wins


def test_lr_warmup_alarm_inside_the_step_rewarms_that_step(tmp_path: Path) -> None:
    warmup = LRWarmup(warmup_steps=0, rewarm_floor=0.5, rewarm_steps=2)
    recorder = _fit(tmp_path, TinyRegressor(), [spikes_at(3, inside_step=True), warmup], max_steps=6)
    assert [lrs[0] for lrs in recorder.lrs_by_step().values()] == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.075, 0.1])


def test_lr_warmup_counts_optimizer_steps_under_accumulation(tmp_path: Path) -> None:
    recorder = _fit(tmp_path, TinyRegressor(), [LRWarmup(warmup_steps=4)], max_steps=6, accumulate_grad_batches=2)
    lrs = recorder.lrs_by_step()
    assert sorted(lrs) == list(range(6))
    assert [lrs[step][0] for step in range(6)] == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1, 0.1])


def test_lr_warmup_scales_every_optimizer(tmp_path: Path) -> None:
    # Manual optimization: each optimizer step advances `trainer.global_step`, as it does for `max_steps`.
    recorder = _fit(tmp_path, TwoOptimizerRegressor(), [LRWarmup(warmup_steps=4)], max_steps=8)
    expected = {0: 0.1, 1: 0.02}
    assert [(step, index) for step, index, _ in recorder.effective] == [(s, s % 2) for s in range(8)]
    for step, index, (lr,) in recorder.effective:
        assert lr == pytest.approx(expected[index] * min(step / 4, 1.0), abs=1e-15)


def test_lr_warmup_resume_mid_warmup_repeats_the_lr_sequence(tmp_path: Path) -> None:
    def run(ckpt_path: str | None, callbacks: list[Any]) -> dict[int, list[float]]:
        recorder = LRRecorder()
        trainer = quiet_trainer(tmp_path, [*callbacks, recorder], max_steps=10, enable_checkpointing=True)
        trainer.fit(TinyRegressor(scheduler="step"), ckpt_path=ckpt_path)
        return recorder.lrs_by_step()

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    settings = dict(warmup_steps=6, shape="quadratic", rewarm_floor=0.5, rewarm_steps=4)
    uninterrupted = run(None, [spikes_at(3), LRWarmup(**settings), checkpoint])  # type: ignore[arg-type]
    resumed_warmup = LRWarmup(**settings)  # type: ignore[arg-type]
    resumed = run(str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"), [resumed_warmup])
    assert resumed_warmup.rewarm_starts == [3]
    assert sorted(resumed) == list(range(4, 10))
    assert resumed == {step: uninterrupted[step] for step in range(4, 10)}
    assert uninterrupted[4] != uninterrupted[6]  # the resumed steps cover both the warmup and the re-warmup


def test_lr_warmup_restores_lr_and_removes_hooks_on_exception(tmp_path: Path) -> None:
    model = TinyRegressor(scheduler="step", fail_at_step=4)
    warmup = LRWarmup(warmup_steps=8)
    with pytest.raises(RuntimeError, match="planted failure at step 4"):
        _fit(tmp_path, model, [warmup], max_steps=10)
    optimizer = model.trainer.optimizers[0]
    assert optimizer.param_groups[0]["lr"] == model.lr_schedulers().get_last_lr()[0] == 0.05  # type: ignore[union-attr]
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks


def test_lr_warmup_removes_hooks_at_teardown(tmp_path: Path) -> None:
    model = TinyRegressor()
    _fit(tmp_path, model, [LRWarmup(warmup_steps=2)], max_steps=3)
    optimizer = model.trainer.optimizers[0]
    assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
    assert optimizer.param_groups[0]["lr"] == 0.1


def test_lr_warmup_logs_factor_and_effective_lr(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="", version="")
    warmup = LRWarmup(warmup_steps=4, log_every_n_steps=2)
    _fit(tmp_path, TinyRegressor(group_lrs=(0.1, 0.02)), [warmup], max_steps=7, logger=logger)
    events = load_events(tmp_path)
    assert scalar_series(events, "deadunits/lr/factor") == pytest.approx({0: 0.0, 2: 0.5, 4: 1.0, 6: 1.0})
    assert scalar_series(events, "deadunits/lr/effective/SGD/pg1") == pytest.approx({0: 0.0, 2: 0.01, 4: 0.02, 6: 0.02})


def test_lr_warmup_tells_optimizers_of_one_class_apart() -> None:
    from lightning_deadunits.callbacks.lr_warmup import _unique_names

    params = [torch.nn.Parameter(torch.zeros(1))]
    sgd, adam = torch.optim.SGD(params, lr=0.1), torch.optim.Adam(params)
    assert _unique_names([sgd, adam, torch.optim.SGD(params, lr=0.1)]) == ["SGD-0", "Adam", "SGD-2"]


def test_lr_warmup_warns_on_optimizer_without_lr(tmp_path: Path) -> None:
    class NoLR(torch.optim.Optimizer):
        def __init__(self, params: Any) -> None:
            super().__init__(params, {})

        def step(self, closure: Any = None) -> Any:
            return closure() if closure is not None else None

    class Model(TinyRegressor):
        def configure_optimizers(self) -> Any:
            return NoLR(self.parameters())

    with pytest.warns(DeadUnitsWarning, match="cannot scale NoLR: a param group has no 'lr' entry"):
        quiet_trainer(tmp_path, [LRWarmup(warmup_steps=2)], max_steps=2).fit(Model())


def test_lr_warmup_state_dict_round_trip() -> None:
    warmup = LRWarmup(warmup_steps=10, rewarm_floor=0.5, rewarm_steps=4)
    warmup.rewarm_starts = [3, 20]
    restored = LRWarmup(warmup_steps=10, rewarm_floor=0.5, rewarm_steps=4)
    restored.load_state_dict(warmup.state_dict())
    assert restored.rewarm_starts == [3, 20]
    assert [restored.factor(step) for step in range(30)] == [warmup.factor(step) for step in range(30)]
    assert restored.factor(4) == pytest.approx(min(0.4, 0.625))  # the re-warm of step 3, not the later one
    assert restored.factor(21) == 0.625
    empty = LRWarmup()
    empty.load_state_dict({})
    assert empty.rewarm_start is None


def test_lr_warmup_state_key_tells_settings_apart() -> None:
    assert LRWarmup(warmup_steps=10).state_key != LRWarmup(warmup_steps=20).state_key


def test_warmup_functions_match_the_documented_formulas() -> None:
    for shape, curve in SHAPES.items():
        assert [warmup_factor(step, 8, shape) for step in range(10)] == pytest.approx(  # type: ignore[arg-type]
            [curve(step / 8) for step in range(8)] + [1.0, 1.0]
        )
        assert ramp(-1.0, shape) == 0.0 and ramp(2.0, shape) == 1.0  # type: ignore[arg-type]
    assert warmup_factor(0, 0) == 1.0
    assert [rewarm_factor(step, 4, 0.2, 2) for step in (3, 4, 5, 6)] == pytest.approx([1.0, 0.2, 0.6, 1.0])
    assert rewarm_factor(5, None, 0.2, 2) == 1.0
    assert rewarm_factor(5, 5, 0.2, 0) == 1.0
    with pytest.raises(ValueError, match="`shape` must be one of 'linear', 'quadratic', 'exponential', got 'cubic'"):
        ramp(0.5, "cubic")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"warmup_steps": -1}, ValueError, r"`warmup_steps` must be an int >= 0, got -1"),
        ({"shape": "cubic"}, ValueError, r"`shape` must be one of 'linear', 'quadratic', 'exponential', got 'cubic'"),
        ({"rewarm_on": [1]}, TypeError, r"`rewarm_on` must be a string or a list of strings, got \[1\]"),
        ({"rewarm_floor": 1.5}, ValueError, r"`rewarm_floor` must be a finite number in \[0.0, 1.0\], got 1.5"),
        ({"rewarm_steps": 2.5}, ValueError, r"`rewarm_steps` must be an int >= 0, got 2.5"),
        ({"log_every_n_steps": 0}, ValueError, r"`log_every_n_steps` must be an int >= 1, got 0"),
        ({"prefix": "/x"}, ValueError, r"`prefix` must be a non-empty string without leading or trailing '/'"),
    ],
)
def test_lr_warmup_rejects_bad_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        LRWarmup(**kwargs)


def test_lr_warmup_rewarms_on_the_spike_of_a_loss_monitor_with_a_custom_prefix(tmp_path: Path) -> None:
    monitor = LossSpikeMonitor(window=30, warmup=20, prefix="x")
    warmup = LRWarmup(warmup_steps=0, rewarm_steps=5)  # default rewarm_on: the route "loss/spike"
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        max_steps=45,
        callbacks=[monitor, warmup],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(DigitsMLP(digits_with_dirty_batches(dirty_batches=[40])))
    assert monitor.spike_steps == [40] and monitor.alarm_log[0].key == "x/loss/spike"
    assert warmup.rewarm_starts == [41]  # the alarm comes at the end of the spiking batch, after its step
