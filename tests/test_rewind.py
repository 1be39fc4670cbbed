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
            "schedulers": [config.scheduler.state_dict() for config in trainer.lr_scheduler_configs],
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


def _episodes(*episodes: tuple[int, int]) -> PlantedReadings:
    """A planted loss monitor: per `(start, length)` an alarm at `start` and episode lengths 1..length."""
    readings: dict[int, dict[str, float]] = {}
    for start, length in episodes:
        readings[start] = {SPIKE_KEY: 1.0, EPISODE_KEY: 1.0}
        readings.update({start + i: {EPISODE_KEY: float(i + 1)} for i in range(1, length)})
    return PlantedReadings(readings, [ThresholdRule(SPIKE_KEY, above=0.5, name="spike")])


def test_an_episode_rewinds_when_its_length_reaches_two_and_is_recorded(tmp_path: Path) -> None:
    rewind = Rewind(snapshot_every=3, skip_batches=4, window=10, rewarm=False)
    logger = MemoryLogger()
    trainer = _trainer(tmp_path, [rewind, _episodes((5, 1), (20, 3))], max_steps=25, logger=logger)
    trainer.fit(ScheduledMLP(_digits()))

    # The one-batch spike at step 5 is not rewound; the episode from step 20 is, at its second batch (step 21).
    assert rewind.count == 1
    events = [e for e in read_events(events_file(trainer.log_dir or tmp_path)) if e["type"] == "action"]
    (event,) = events
    # Step 20's alarm ended batch 19; the newest snapshot before it is step 18's (end of batch 17).
    assert event["reason"] == "spike episode" and event["episode_start"] == 20 and event["snapshot_step"] == 18
    assert event["from_step"] == 21 and event["step"] == 18
    assert event["skipped_batch_indices"] == [18, 19, 20, 21, 22]
    assert logger.series("deadunits/rewind/count") == {18: 1.0}
    assert logger.series("deadunits/rewind/skipped_batches") == {18: 5.0}


def test_too_many_rewinds_stop_training_with_the_reason_in_the_log_and_the_alarm_panel(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger

    from tests.helpers.events import load_events

    rewind = Rewind(snapshot_every=2, skip_batches=2, max_rewinds=1, window=100, rewarm=False)
    trainer = _trainer(
        tmp_path, [rewind, _episodes((5, 2), (12, 2))], max_steps=30, logger=TensorBoardLogger(tmp_path, name="tb")
    )
    with caplog.at_level("WARNING", logger="lightning_deadunits"):
        trainer.fit(ScheduledMLP(_digits()))

    assert rewind.count == 1
    assert rewind.stop_reason is not None and "1 rewinds within 100 batches" in rewind.stop_reason
    assert trainer.global_step == 13  # stopped at the end of the batch where the second episode went on
    assert "stopping training" in caplog.text and "[rewind] 1 rewinds within 100 batches" in caplog.text
    texts = load_events(tmp_path / "tb" / "version_0").Tensors("deadunits/alarms/text_summary")
    assert any("**stop**: [rewind] 1 rewinds" in t.tensor_proto.string_val[0].decode() for t in texts)


def test_a_repeated_spike_of_the_real_loss_monitor_rewinds_past_both_dirty_batches(tmp_path: Path) -> None:
    monitor = LossSpikeMonitor(window=10, warmup=5, skip_update=True)
    rewind = Rewind(snapshot_every=5, skip_batches=10, window=20)
    recorder = BatchRecorder()
    trainer = _trainer(tmp_path, [monitor, rewind, recorder], max_steps=40)
    trainer.fit(DigitsMLP(_digits(60, dirty=(20, 24)), per_sample=False))

    assert rewind.count == 1
    trained = [batch_idx for _, batch_idx, _, _ in recorder.trained]
    assert 20 in trained and 24 in trained  # both trained once (the first skipped by the monitor), then undone
    (span,) = rewind.skipped.ranges
    assert span[1] <= 20 and span[2] >= 29  # the skip runs 10 batches from the first spike
    assert trained[trained.index(24) + 1] == span[2] + 1


def test_rewarm_restarts_the_lr_warmup_from_the_restored_step(tmp_path: Path) -> None:
    warmup = LRWarmup(warmup_steps=0, rewarm_on=("rewind/rewound",), rewarm_steps=5)
    rewind = Rewind(snapshot_every=4, skip_batches=3, window=10)
    trainer = _trainer(tmp_path, [warmup, spikes_at(9, 10), rewind], max_steps=14)
    trainer.fit(ScheduledMLP(_digits()))
    assert rewind.count == 1
    assert warmup.rewarm_starts == [8]  # the restored step (the snapshot of step 8)


def test_a_snapshot_larger_than_max_bytes_fails_at_train_start(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="`max_bytes` of Rewind is 1000, but one snapshot"):
        _trainer(tmp_path, [Rewind(max_bytes=1000)]).fit(ScheduledMLP(_digits()))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"snapshot_every": 0}, "snapshot_every"),
        ({"keep": 0}, "keep"),
        ({"max_rewinds": -1}, "max_rewinds"),
        ({"window": 0}, "window"),
        ({"on": 3}, "on"),
        ({"rewarm": "yes"}, "rewarm"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        Rewind(**kwargs)


def test_skipped_batches_are_not_trained_after_a_resume_and_the_ring_is_rebuilt(tmp_path: Path) -> None:
    # The skip list survives the checkpoint: a resumed run that replays the epoch skips the same positions.
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=6, save_top_k=-1)
    rewind = Rewind(snapshot_every=2, skip_batches=4, window=10)
    trainer = _trainer(tmp_path, [spikes_at(5, 6), rewind, checkpoint], max_steps=8, enable_checkpointing=True)
    trainer.fit(ScheduledMLP(_digits()))
    assert rewind.skipped.ranges == [(0, 4, 7)]

    resumed, recorder = Rewind(snapshot_every=2, skip_batches=4, window=10), BatchRecorder()
    trainer = _trainer(tmp_path, [resumed, recorder], max_steps=40, max_epochs=2)
    trainer.fit(ScheduledMLP(_digits()), ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=6.ckpt"))
    assert resumed.skipped.ranges == [(0, 4, 7)] and resumed.count == 1
    assert not any(epoch == 0 and 4 <= batch_idx <= 7 for epoch, batch_idx, _, _ in recorder.trained)
    assert resumed.ring.steps == [] and trainer.global_step == 40  # cleared at teardown, rebuilt while training


def _final_loss(data: TensorDataset, callbacks: list[pl.Callback], tmp_path: Path) -> tuple[float, torch.Tensor]:
    """Train the digits MLP (SGD, LR 0.1) for 50 steps; its loss on the clean digits, and its weights."""
    torch.manual_seed(0)
    module = DigitsMLP(data, per_sample=False, optimizer="sgd", lr=0.1)
    _trainer(tmp_path, callbacks, max_steps=50, max_epochs=3).fit(module)
    images, labels, _ = digits_with_dirty_batches().tensors
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(module.net(images), labels).item()
    return loss, torch.cat([p.detach().flatten() for p in module.parameters()])


def test_a_run_rewound_past_a_burst_of_dirty_batches_ends_as_its_clean_twin_and_one_without_rewind_does_not(
    tmp_path: Path,
) -> None:
    burst = digits_with_dirty_batches(dirty_batches=range(25, 30), scale=50.0)
    monitor = LossSpikeMonitor(window=10, warmup=5, skip_update=True, dump_dir=tmp_path / "dumps", max_dumps=0)
    rewind = Rewind(snapshot_every=5, skip_batches=8, window=50)
    rewound, rewound_weights = _final_loss(burst, [monitor, rewind], tmp_path)
    plain, _ = _final_loss(burst, [], tmp_path)

    # The clean twin: the same seed and data, minus the batches the rewind skipped.
    (epoch, first, last), *others = rewind.skipped.ranges
    assert not others and epoch == 0 and first <= 25 and last >= 29 and rewind.count == 1
    kept = [row for row in range(len(burst)) if not first <= row // BATCH <= last]
    twin, twin_weights = _final_loss(
        TensorDataset(*(t[kept] for t in digits_with_dirty_batches().tensors)), [], tmp_path
    )

    assert abs(rewound - twin) <= 0.02 * twin
    assert torch.equal(rewound_weights, twin_weights)  # in fact bit for bit: the rewind restored everything
    assert plain > 2 * twin


def test_dead_units_adds_a_rewind_when_asked(tmp_path: Path) -> None:
    from lightning_deadunits import DeadUnits

    bundle = DeadUnits(kernels=False, activations=False, loss=LossSpikeMonitor(skip_update=True), rewind=True)
    assert isinstance(bundle.rewind, Rewind) and DeadUnits().rewind is None
    trainer = _trainer(tmp_path, [bundle], max_steps=3)
    trainer.fit(ScheduledMLP(_digits()))
    assert bundle.rewind.ring.steps == []  # it ran (and released its ring at teardown)
    with pytest.raises(TypeError, match="`rewind` must be an instance of Rewind"):
        DeadUnits(rewind=3)  # type: ignore[arg-type]


def test_the_ring_reuses_its_buffers_and_never_hands_them_out() -> None:
    from lightning_deadunits.actions.snapshot_ring import SnapshotRing

    ring = SnapshotRing(keep=2)
    weights = torch.arange(6.0)
    for step in range(5):
        weights += 1
        ring.store(step, {"w": weights, "meta": [step, "x"]}, position=(0, step))
        if step == 1:
            buffers = [buffer.data_ptr() for slot in ring._slots for buffer in slot.buffers]
    assert [buffer.data_ptr() for slot in ring._slots for buffer in slot.buffers] == buffers
    assert ring.steps == [3, 4] and ring.nbytes == 2 * 6 * 4
    found = ring.latest_before(4)
    assert found is not None
    step, position, state = found
    assert (step, position, state["meta"]) == (3, (0, 3), [3, "x"])
    assert torch.equal(state["w"], torch.arange(6.0) + 4)
    state["w"].zero_()  # a restored state is a copy: the ring keeps its snapshot
    assert torch.equal(ring.latest_before(4)[2]["w"], torch.arange(6.0) + 4)  # type: ignore[index]
    assert ring.latest_before(3) is None
