import json
import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_deadunits.actions.alarm_handler import AlarmHandler
from lightning_deadunits.callbacks.lr_warmup import LRWarmup
from lightning_deadunits.errors import DeadUnitsError, DeadUnitsWarning
from lightning_deadunits.triggers.alarm import Alarm
from lightning_deadunits.triggers.threshold import ThresholdRule
from tests.helpers.alarm_helpers import (
    SPIKE_KEY,
    LRRecorder,
    PlantedReadings,
    TinyRegressor,
    quiet_trainer,
    spikes_at,
)
from tests.helpers.ddp import DDP_OPTIONS, read_ranks
from tests.helpers.events import load_events

MESSAGE = f"{SPIKE_KEY} = 1 rose above 0.5 at step 5"


def _alarm(step: int = 5, level: Any = "warning", message: str = "12 dead") -> Alarm:
    return Alarm("kernels", "deadunits/kernels/total/dead", 12.0, 10.0, level, message, step, "dead")


def _spike_monitor(on_alarm: list[Any], step: int = 5) -> PlantedReadings:
    return PlantedReadings({step: {SPIKE_KEY: 1.0}}, [ThresholdRule(SPIKE_KEY, above=0.5, name="spike")], on_alarm)


class AlarmListener(pl.Callback):
    def __init__(self) -> None:
        self.heard: list[Alarm] = []

    def on_deadunits_alarm(self, trainer: pl.Trainer, pl_module: pl.LightningModule, alarm: Alarm) -> None:
        self.heard.append(alarm)


def test_alarm_handler_logs_at_the_alarm_level(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="lightning_deadunits"):
        AlarmHandler(["log"]).handle([_alarm(level="error"), _alarm(level="info", message="fyi")])
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.ERROR, "deadunits alarm [dead]: 12 dead"),
        (logging.INFO, "deadunits alarm [dead]: fyi"),
    ]


def test_alarm_handler_warns() -> None:
    with pytest.warns(DeadUnitsWarning, match=r"deadunits alarm \[dead\]: 12 dead"):
        AlarmHandler("warn").handle([_alarm()])


def test_alarm_handler_calls_user_callables_in_order() -> None:
    seen: list[tuple[str, int]] = []
    handler = AlarmHandler([lambda alarm: seen.append(("a", alarm.step)), lambda alarm: seen.append(("b", alarm.step))])
    handler.handle([_alarm(1), _alarm(2)])
    handler.handle([])
    assert seen == [("a", 1), ("b", 1), ("a", 2), ("b", 2)]


def test_alarm_handler_raise_runs_the_other_actions_first() -> None:
    seen: list[Alarm] = []
    handler = AlarmHandler(["raise", seen.append, "stop"])
    with pytest.raises(DeadUnitsError, match=r"^\[dead\] 12 dead; \[dead\] second$"):
        handler.handle([_alarm(), _alarm(message="second")])
    assert len(seen) == 2 and handler.stop_reason == "[dead] 12 dead; [dead] second"


def test_alarm_handler_stop_without_trainer_records_reason_and_step(caplog: pytest.LogCaptureFixture) -> None:
    handler = AlarmHandler(["stop"])
    with caplog.at_level(logging.WARNING, logger="lightning_deadunits"):
        handler.handle([_alarm(step=9)])
    assert (handler.stop_step, handler.stop_reason) == (9, "[dead] 12 dead")
    assert "deadunits: stopping training at step 9: [dead] 12 dead" in caplog.text


def test_alarm_handler_rejects_unknown_action() -> None:
    with pytest.raises(ValueError, match=r"`on_alarm` must be one of 'log', 'warn', 'stop', 'raise', got 'email'"):
        AlarmHandler(["log", "email"])  # type: ignore[list-item]


def test_alarm_stop_ends_fit_at_the_alarm_step(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    monitor = _spike_monitor(["stop"])
    trainer = quiet_trainer(tmp_path, [monitor], max_steps=30, logger=TensorBoardLogger(tmp_path, name="", version=""))
    with caplog.at_level(logging.WARNING, logger="lightning_deadunits"):
        trainer.fit(TinyRegressor())
    assert trainer.global_step == 5 == monitor.stop_step
    assert monitor.stop_reason == f"[spike] {MESSAGE}"
    assert f"deadunits: stopping training at step 5: [spike] {MESSAGE}" in caplog.text
    latest = load_events(tmp_path).Tensors("deadunits/alarms/text_summary")[-1]  # TensorBoard shows the last per step
    text = latest.tensor_proto.string_val[0].decode()
    assert latest.step == 5 and f"**warning** [spike] {MESSAGE}" in text and f"**stop**: [spike] {MESSAGE}" in text


def test_alarm_stop_waits_for_min_steps_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    monitor = _spike_monitor(["stop"])
    trainer = quiet_trainer(tmp_path, [monitor], max_steps=30, min_steps=20)
    with caplog.at_level(logging.WARNING, logger="lightning_deadunits"):
        trainer.fit(TinyRegressor())
    # Lightning sets min_epochs=1 with min_steps; an epoch is 16 steps, so it stops at step 20.
    assert trainer.global_step == 20 and monitor.stop_step == 5
    assert "at step 5 (deferred by Lightning until min_steps=20 and min_epochs=1 are reached)" in caplog.text


def test_alarm_stop_state_round_trip() -> None:
    monitor = _spike_monitor(["stop"])
    monitor.alarm_handler.handle([_alarm(step=7)])
    restored = _spike_monitor(["stop"])
    restored.load_base_state(json.loads(json.dumps(monitor.base_state())))
    assert (restored.stop_step, restored.stop_reason) == (7, "[dead] 12 dead")


def test_alarm_raise_raises_from_fit_after_listeners_heard_it(tmp_path: Path) -> None:
    listener = AlarmListener()
    trainer = quiet_trainer(tmp_path, [_spike_monitor(["raise"]), listener], max_steps=30)
    with pytest.raises(DeadUnitsError, match=rf"^\[spike\] {MESSAGE}$"):
        trainer.fit(TinyRegressor())
    assert trainer.global_step == 5
    assert [(alarm.source, alarm.key, alarm.step) for alarm in listener.heard] == [("loss", SPIKE_KEY, 5)]


def test_alarm_user_callable_runs_inside_fit(tmp_path: Path) -> None:
    seen: list[Alarm] = []
    quiet_trainer(tmp_path, [_spike_monitor([seen.append], step=3)], max_steps=6).fit(TinyRegressor())
    assert [(alarm.step, alarm.value, alarm.threshold, alarm.level) for alarm in seen] == [(3, 1.0, 0.5, "warning")]


class RecordOnAlarm:
    """A user action writing, on each rank, the alarm's step and the effective LRs so far to `rank<r>.json`.

    Under ddp_spawn the workers' exceptions reach only the main process, so the record is written by the action
    that runs just before "raise" on every rank.
    """

    def __init__(self, directory: Path, recorder: LRRecorder) -> None:
        self.directory = directory
        self.recorder = recorder

    def __call__(self, alarm: Alarm) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        record = {"step": alarm.step, "lrs": [lrs[0] for _, _, lrs in self.recorder.effective]}
        (self.directory / f"rank{torch.distributed.get_rank()}.json").write_text(json.dumps(record))


@pytest.mark.slow
def test_alarm_rewarm_and_raise_happen_on_every_rank(tmp_path: Path) -> None:
    recorder = LRRecorder()
    raising = PlantedReadings(
        {5: {"deadunits/loss/nonfinite": 1.0}},
        [ThresholdRule("*/nonfinite", above=0.5, name="nan")],
        [RecordOnAlarm(tmp_path / "ranks", recorder), "raise"],
    )
    warmup = LRWarmup(warmup_steps=0, rewarm_floor=0.5, rewarm_steps=2)
    trainer = pl.Trainer(
        callbacks=[spikes_at(2), raising, warmup, recorder],
        max_steps=10,
        logger=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        **DDP_OPTIONS,
    )
    with pytest.raises(
        Exception, match=r"DeadUnitsError: \[nan\] deadunits/loss/nonfinite = 1 rose above 0.5 at step 5"
    ):
        trainer.fit(TinyRegressor())
    rank0, rank1 = read_ranks(tmp_path / "ranks")
    assert rank0 == rank1
    assert rank0["step"] == 5
    assert rank0["lrs"] == pytest.approx([0.1, 0.1, 0.05, 0.075, 0.1])
