import copy
import logging
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins import MixedPrecision

from lightning_deadunits import Alarm, DeadUnitsWarning, KernelNormMonitor
from lightning_deadunits.callbacks.loss_spike_monitor import LossSpikeMonitor
from lightning_deadunits.cli.dump import summarize
from lightning_deadunits.dumps import load_dump
from tests.helpers.events import load_events, scalar_series
from tests.helpers.spike_models import DIRTY_SAMPLES, DigitsMLP, ManualDigitsMLP, digits_with_dirty_batches
from tests.helpers.states import identical

BATCH = 16
PLANTED = 40  # the dirty batch of most tests: step 40 of the first epoch


def _trainer(tmp_path: Path, callbacks: list[Any], **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = dict(
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def _monitor(**kwargs: Any) -> LossSpikeMonitor:
    return LossSpikeMonitor(window=30, warmup=20, **kwargs)


class AlarmListener(pl.Callback):
    def __init__(self) -> None:
        self.alarms: list[Alarm] = []

    def on_deadunits_alarm(self, trainer: pl.Trainer, pl_module: pl.LightningModule, alarm: Alarm) -> None:
        self.alarms.append(alarm)


def test_planted_spike_is_flagged_at_its_step_and_its_batch_dumped_exactly(tmp_path: Path) -> None:
    data = digits_with_dirty_batches(dirty_batches=[PLANTED])
    called: list[Alarm] = []
    monitor = _monitor(on_alarm=[called.append, "stop"])
    listener = AlarmListener()
    logger = TensorBoardLogger(tmp_path, name="", version="")
    trainer = _trainer(tmp_path, [monitor, listener], max_steps=100, logger=logger)
    trainer.fit(DigitsMLP(data))

    assert monitor.spike_steps == [PLANTED] and trainer.global_step == PLANTED + 1  # "stop" ended the run
    (event,) = monitor.events
    path = tmp_path / "deadunits" / "dumps" / f"deadunits-step{PLANTED:08d}-rank0-batch{PLANTED:05d}.pt"
    assert event["dump"] == str(path) and event["local"] and event["reason"] == "ratio and z-score"
    (images, labels, ids), metadata = load_dump(path)
    rows = slice(PLANTED * BATCH, (PLANTED + 1) * BATCH)
    expected = [tensor[rows] for tensor in data.tensors]
    assert images.equal(expected[0]) and labels.equal(expected[1]) and ids.equal(expected[2])
    assert metadata["global_step"] == PLANTED and metadata["epoch"] == 0 and metadata["batch_idx"] == PLANTED
    assert metadata["rank"] == 0 and metadata["world_size"] == 1 and not metadata["skipped_update"]
    assert metadata["loss"] == pytest.approx(float(metadata["per_sample_loss"].mean()), rel=1e-6)
    assert metadata["loss"] > 2 * metadata["baseline"] and metadata["spike_score"] > 6
    assert metadata["baseline"] < metadata["threshold"] < metadata["loss"]
    assert metadata["recent_steps"].tolist() == list(range(PLANTED - 29, PLANTED + 1))
    assert metadata["recent_losses"][-1].item() == metadata["loss"]
    assert metadata["rng_states"]["torch"].dtype == torch.uint8
    ranking = summarize(images, metadata, top=len(DIRTY_SAMPLES))["ranking"]
    assert {row["index"] for row in ranking} == set(DIRTY_SAMPLES)
    assert {row["sample_id"] for row in ranking} == {PLANTED * BATCH + p for p in DIRTY_SAMPLES}
    # the spike did not enter the baseline
    assert event["loss"] not in monitor.detector.window and (PLANTED, event["loss"]) in monitor.detector.recent

    (alarm,) = called
    assert listener.alarms == [alarm] and monitor.alarm_log == [alarm]
    assert (alarm.source, alarm.key, alarm.step, alarm.level) == ("loss", "deadunits/loss/spike", PLANTED, "warning")
    assert alarm.value == event["loss"] and alarm.threshold == event["threshold"]
    assert f"loss spike at step {PLANTED} (epoch 0, batch {PLANTED}, rank 0)" in alarm.message
    assert str(path) in alarm.message

    events = load_events(tmp_path)
    assert scalar_series(events, "deadunits/loss/spikes") == {0: 0.0, PLANTED: 1.0}
    assert scalar_series(events, "deadunits/loss/value")[PLANTED] == pytest.approx(event["loss"])
    assert scalar_series(events, "deadunits/loss/baseline") == {PLANTED: pytest.approx(event["baseline"])}
    assert scalar_series(events, "deadunits/loss/spike_score") == {PLANTED: pytest.approx(event["spike_score"])}
    (entry,) = events.Tensors("deadunits/loss/spike_events/text_summary")
    assert str(path) in entry.tensor_proto.string_val[0].decode()

    restored = _monitor()
    restored.load_state_dict(monitor.state_dict())
    assert restored.state_dict() == monitor.state_dict()
    assert restored.spike_steps == [PLANTED] and restored.detector.baseline() == monitor.detector.baseline()


def test_clean_run_of_hundreds_of_steps_raises_no_spike(tmp_path: Path) -> None:
    monitor = LossSpikeMonitor()  # the defaults
    trainer = _trainer(tmp_path, [monitor], max_epochs=4)
    trainer.fit(DigitsMLP(digits_with_dirty_batches()))
    assert trainer.global_step == 360
    assert monitor.spike_count == 0 and monitor.events == [] and not (tmp_path / "deadunits").exists()
    assert len(monitor.detector.window) == 100


def test_nan_loss_is_a_spike_and_skipping_keeps_the_weights_finite(tmp_path: Path) -> None:
    monitor = _monitor(skip_update=True)
    model = DigitsMLP(digits_with_dirty_batches(nan_batches=[5, 30]), per_sample=False)
    _trainer(tmp_path, [monitor], max_steps=35).fit(model)
    assert monitor.spike_steps == [5, 30]  # also during warm-up
    assert [event["reason"] for event in monitor.events] == ["non-finite", "non-finite"]
    assert monitor.events[0]["baseline"] is not None and math.isnan(monitor.events[0]["loss"])
    assert [alarm.level for alarm in monitor.alarm_log] == ["error", "error"]
    assert "non-finite loss nan at step 5" in monitor.alarm_log[0].message
    assert all(torch.isfinite(p).all() for p in model.parameters()) and monitor.skipped_updates == 2
    batch, metadata = load_dump(monitor.events[1]["dump"])
    assert math.isnan(batch[0][0, 0, 0, 0]) and metadata["per_sample_loss"] is None


class StepSnapshots(pl.Callback):
    """Weights and optimizer state before the first and after the last micro-batch of every step."""

    def __init__(self) -> None:
        self.before: dict[int, Any] = {}
        self.after: dict[int, Any] = {}
        self._step = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        self._step = trainer.global_step
        self.before.setdefault(self._step, self._state(trainer, pl_module))

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        self.after[self._step] = self._state(trainer, pl_module)

    @staticmethod
    def _state(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        return copy.deepcopy((pl_module.state_dict(), trainer.optimizers[0].state_dict()["state"]))


def _fp16_with_scaler() -> dict[str, Any]:
    # Lightning turns "16-mixed" into bf16 on CPU; a CPU GradScaler exercises the fp16 scaler path.
    return {"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}


@pytest.mark.parametrize(
    ("precision", "optimizer", "accumulate", "dirty", "step"),
    [
        ("32-true", "adam", 1, PLANTED, PLANTED),
        ("bf16-mixed", "adam", 1, PLANTED, PLANTED),
        ("fp16-scaler", "adam", 1, PLANTED, PLANTED),
        ("fp16-scaler", "fused_adam", 1, PLANTED, PLANTED),
        ("32-true", "adam", 2, PLANTED, PLANTED // 2),  # spike in the first micro-batch of the step
        ("32-true", "adam", 2, PLANTED + 1, PLANTED // 2),  # ... in the last one, decided before the step
    ],
)
def test_skip_update_leaves_weights_and_optimizer_state_bitidentical(
    tmp_path: Path, precision: str, optimizer: str, accumulate: int, dirty: int, step: int
) -> None:
    monitor = _monitor(skip_update=True)
    snapshots = StepSnapshots()
    options = _fp16_with_scaler() if precision == "fp16-scaler" else {"precision": precision}
    trainer = _trainer(
        tmp_path, [monitor, snapshots], max_steps=step + 2, accumulate_grad_batches=accumulate, **options
    )
    trainer.fit(DigitsMLP(digits_with_dirty_batches(dirty_batches=[dirty]), optimizer=optimizer))

    # a dirty first micro-batch: its loss, then the step's accumulated gradient norm, are one episode's spikes
    assert set(monitor.spike_steps) == {step} and monitor.events[0]["batch_idx"] == dirty
    assert monitor.spike_count == 1 and monitor.skipped_updates == 1 and monitor.events[0]["skipped_update"]
    assert identical(snapshots.before[step], snapshots.after[step])
    assert identical(snapshots.after[step], snapshots.before[step + 1])
    # ordinary steps do move weights and optimizer state, so the comparison above can fail
    assert not identical(snapshots.before[step - 1][0], snapshots.after[step - 1][0])
    assert not identical(snapshots.before[step + 1][1], snapshots.after[step + 1][1])
    metadata = load_dump(monitor.events[0]["dump"]).metadata
    assert metadata["loss"] == pytest.approx(float(metadata["per_sample_loss"].mean()), rel=1e-6)
    assert metadata["accumulate_grad_batches"] == accumulate


def test_manual_optimization_loss_returned_by_training_step_is_watched(tmp_path: Path) -> None:
    monitor = _monitor()
    model = ManualDigitsMLP(digits_with_dirty_batches(dirty_batches=[PLANTED]))
    _trainer(tmp_path, [monitor], max_steps=PLANTED + 1).fit(model)
    assert monitor.spike_steps == [PLANTED]
    assert monitor.events[0]["loss"] == pytest.approx(25.0, rel=0.5)


def test_manual_optimization_without_a_returned_loss_warns_once(tmp_path: Path) -> None:
    monitor = _monitor()
    model = ManualDigitsMLP(digits_with_dirty_batches(), return_loss=False)
    with pytest.warns(DeadUnitsWarning, match=r"could not read a loss at step 0 \(batch 0\).*manual optimization"):
        _trainer(tmp_path, [monitor], max_steps=5).fit(model)
    assert monitor.detector.recent == type(monitor.detector.recent)() and monitor.probe.warned_missing


def test_skip_update_with_manual_optimization_is_rejected_at_setup(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, [_monitor(skip_update=True)], max_steps=1)
    with pytest.raises(ValueError, match=r"`skip_update=True` needs automatic optimization"):
        trainer.fit(ManualDigitsMLP(digits_with_dirty_batches()))


def test_unwritable_dump_directory_warns_and_training_finishes(tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("not a directory")
    monitor = _monitor(dump_dir=tmp_path / "a_file" / "dumps")
    trainer = _trainer(tmp_path, [monitor], max_steps=PLANTED + 3)
    with pytest.warns(DeadUnitsWarning, match="Could not write spike dump"):
        trainer.fit(DigitsMLP(digits_with_dirty_batches(dirty_batches=[PLANTED])))
    assert trainer.global_step == PLANTED + 3
    assert monitor.spike_steps[0] == PLANTED and monitor.events[0]["dump"] is None
    assert monitor.dumper.count == 0


def _resumable_run(tmp_path: Path, epochs: int, ckpt_path: Path | None = None) -> tuple[LossSpikeMonitor, pl.Trainer]:
    torch.manual_seed(0)  # the same initial weights in both runs (the resumed one loads them from the checkpoint)
    monitor = _monitor(skip_update=True)
    trainer = _trainer(tmp_path, [monitor], max_epochs=epochs, limit_train_batches=60)
    # dirty batches 5 (in warm-up: not flagged) and 40 of every epoch: steps 40, 65, 100
    trainer.fit(DigitsMLP(digits_with_dirty_batches(dirty_batches=[5, 40])), ckpt_path=ckpt_path)
    return monitor, trainer


def test_resumed_run_flags_the_same_steps_as_an_uninterrupted_one(tmp_path: Path) -> None:
    uninterrupted, _ = _resumable_run(tmp_path / "straight", epochs=2)
    _, first_half = _resumable_run(tmp_path / "resumed", epochs=1)
    first_half.save_checkpoint(tmp_path / "half.ckpt")
    resumed, _ = _resumable_run(tmp_path / "resumed", epochs=2, ckpt_path=tmp_path / "half.ckpt")
    # step 65 comes 5 steps after the resume: a detector starting afresh would still be warming up
    assert uninterrupted.spike_steps == [40, 65, 100] == resumed.spike_steps
    assert [e["loss"] for e in resumed.events] == [e["loss"] for e in uninterrupted.events]
    assert resumed.dumper.count == uninterrupted.dumper.count == 3


class KillRows(pl.Callback):
    """Right after the update of step `at`, zero the first `rows` weight rows of `net.1` and give them a very
    negative bias: their ReLUs never fire again, so without momentum their weights stay exactly 0.
    """

    def __init__(self, at: int, rows: int) -> None:
        self.at, self.rows = at, rows

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int) -> None:
        if trainer.global_step == self.at + 1:
            with torch.no_grad():
                pl_module.net[1].weight[: self.rows] = 0
                pl_module.net[1].bias[: self.rows] = -1e3


def test_spike_event_records_the_kernels_that_died_after_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    spike = 42
    kernels = KernelNormMonitor(every_n_steps=5, log_histograms=False, log_images=False)
    monitor = _monitor()
    callbacks = [monitor, KillRows(at=spike, rows=3), kernels]
    with caplog.at_level(logging.WARNING, logger="lightning_deadunits"):
        _trainer(tmp_path, callbacks, max_steps=48).fit(
            DigitsMLP(digits_with_dirty_batches(dirty_batches=[spike]), optimizer="sgd", lr=0.1)
        )
    assert monitor.spike_steps[0] == spike
    deaths = {"unit": "kernels", "before_step": 40, "after_step": 45, "died": {"net.1": 3.0}}
    assert monitor.events[0]["dead_after_spike"] == {"deadunits/kernels": deaths}
    assert monitor.events[0]["dead_pending"] == {}
    assert (
        f"spike at step {spike}: 3 kernels of net.1 died (deadunits/kernels checks at steps 40 and 45)" in caplog.text
    )
    assert load_dump(monitor.events[0]["dump"]).metadata["dead_after_spike"] == {"deadunits/kernels": deaths}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"skip_update": "yes"}, TypeError, "`skip_update` must be a bool, got 'yes'"),
        ({"dump_dir": 3}, TypeError, "`dump_dir` must be a path or None, got 3"),
        ({"max_dumps": -1}, ValueError, "`max_dumps` must be an int >= 0, got -1"),
        ({"max_bytes": -1}, ValueError, "`max_bytes` must be an int >= 0, got -1"),
        ({"log_every_n_steps": 0}, ValueError, "`log_every_n_steps` must be an int >= 1, got 0"),
        ({"window": 1}, ValueError, "`window` must be an int >= 2, got 1"),
        ({"ratio": 0.5}, ValueError, r"`ratio` must be a finite number in \(1.0, inf\], got 0.5"),
        ({"on_alarm": ["email"]}, ValueError, "`on_alarm` must be one of"),
        ({"prefix": "/x"}, ValueError, "`prefix` must be a non-empty string"),
    ],
)
def test_monitor_rejects_bad_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        LossSpikeMonitor(**kwargs)


def test_spike_events_panel_shows_one_table_per_step_with_pipes_escaped(tmp_path: Path) -> None:
    monitor = _monitor(dump_dir=tmp_path / "a|b c")
    kernels = KernelNormMonitor(every_n_steps=1, log_histograms=False, log_images=False)
    logger = TensorBoardLogger(tmp_path, name="", version="")
    _trainer(tmp_path, [monitor, kernels], max_steps=PLANTED + 2, logger=logger).fit(
        DigitsMLP(digits_with_dirty_batches(dirty_batches=[PLANTED]))
    )
    texts = [
        entry.tensor_proto.string_val[0].decode()
        for entry in load_events(tmp_path).Tensors("deadunits/loss/spike_events/text_summary")
    ]
    assert texts and all(text.count("| step |") == 1 for text in texts)
    assert all("a\\|b c" in text for text in texts)
