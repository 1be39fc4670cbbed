import csv
import io
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from PIL import Image

from lightning_deadunits import KernelNormMonitor, ThresholdRule
from lightning_deadunits.panels import TensorBoardPanels
from lightning_deadunits.triggers import Alarm
from tests.helpers.events import load_events, scalar_series
from tests.helpers.memory_logger import MemoryLogger
from tests.helpers.tb_helpers import PLANTED_DEAD, fit_planted

TOTAL_DEAD = "deadunits/kernels/total/dead"
CONV_DEAD_ABS = "deadunits/kernels/model.conv/dead_abs"
CHECKED_STEPS = [0, 2, 4]


def _loggers(kind: str, tmp_path: Path) -> list[Logger]:
    tensorboard = TensorBoardLogger(tmp_path / "tb", name="", version="")
    csv_logger = CSVLogger(tmp_path / "csv", name="", version="")
    return {
        "tensorboard": [tensorboard],
        "csv": [csv_logger],
        "tensorboard+csv": [tensorboard, csv_logger],
        "other": [MemoryLogger()],
    }[kind]


def _csv_series(path: Path, key: str) -> dict[int, float]:
    with path.open() as file:
        return {int(row["step"]): float(row[key]) for row in csv.DictReader(file) if row.get(key)}


def _monitor(alarms: list[Alarm]) -> KernelNormMonitor:
    rule = ThresholdRule(TOTAL_DEAD, above=1)
    return KernelNormMonitor(every_n_steps=2, alarms=[rule], on_alarm=[alarms.append])


@pytest.mark.parametrize("kind", ["tensorboard", "csv", "tensorboard+csv", "other"])
def test_scalars_reach_every_logger_and_panels_only_tensorboard(tmp_path: Path, kind: str) -> None:
    loggers = _loggers(kind, tmp_path)
    alarms: list[Alarm] = []
    fit_planted(tmp_path, loggers, [_monitor(alarms)], max_steps=4)

    expected = dict.fromkeys(CHECKED_STEPS, float(PLANTED_DEAD))
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            events = load_events(tmp_path / "tb")
            assert scalar_series(events, TOTAL_DEAD) == expected
            assert scalar_series(events, CONV_DEAD_ABS) == expected
            tags = events.Tags()
            assert "deadunits/kernels/dead_per_layer" in tags["images"]
            assert "deadunits/kernels/model.conv/l1" in tags["histograms"]
            assert {"custom_scalars__config__", "deadunits/alarms/text_summary"} <= set(tags["tensors"])
        elif isinstance(logger, CSVLogger):
            metrics = tmp_path / "csv" / "metrics.csv"
            assert _csv_series(metrics, TOTAL_DEAD) == expected
            assert _csv_series(metrics, CONV_DEAD_ABS) == expected
        else:
            assert isinstance(logger, MemoryLogger)
            logged = logger.metrics[TOTAL_DEAD]
            assert logged == expected
    if "tensorboard" not in kind:
        assert not list(tmp_path.rglob("*tfevents*"))
    assert [alarm.step for alarm in alarms] == CHECKED_STEPS


def test_without_logger_alarms_still_reach_callable_actions(tmp_path: Path) -> None:
    alarms: list[Alarm] = []
    monitor = _monitor(alarms)
    fit_planted(tmp_path, False, [monitor], max_steps=4)

    assert [(alarm.step, alarm.key, alarm.value) for alarm in alarms] == [
        (step, TOTAL_DEAD, float(PLANTED_DEAD)) for step in CHECKED_STEPS
    ]
    assert monitor.dead_counts == {"model.conv": PLANTED_DEAD, "model.head": 0}
    assert [entry["dead"] for entry in monitor.history] == [float(PLANTED_DEAD)] * len(CHECKED_STEPS)
    assert not list(tmp_path.rglob("*tfevents*")) and not list(tmp_path.rglob("metrics.csv"))


def test_tensorboard_text_joins_entries_of_one_step_unless_replaced(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="", version="")
    trainer = SimpleNamespace(global_rank=0, loggers=[logger])
    first, second = TensorBoardPanels(), TensorBoardPanels()  # two monitors share the alarm tag
    first.text(trainer, "deadunits/alarms", "a", 3)  # type: ignore[arg-type]
    second.text(trainer, "deadunits/alarms", "b", 3)  # type: ignore[arg-type]
    first.text(trainer, "deadunits/alarms", "c", 4)  # type: ignore[arg-type]
    first.text(trainer, "deadunits/table", "| old |", 4)  # type: ignore[arg-type]
    first.text(trainer, "deadunits/table", "| new |", 4, replace=True)  # type: ignore[arg-type]
    logger.experiment.flush()

    events = load_events(tmp_path)

    def texts(tag: str) -> list[tuple[int, str]]:
        return [(e.step, e.tensor_proto.string_val[0].decode()) for e in events.Tensors(f"{tag}/text_summary")]

    assert texts("deadunits/alarms") == [(3, "a"), (3, "a\n\nb"), (4, "c")]  # TensorBoard shows the last per step
    assert texts("deadunits/table") == [(4, "| old |"), (4, "| new |")]


def test_tensorboard_histograms_and_images_hold_what_was_given(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="", version="")
    trainer = SimpleNamespace(global_rank=0, loggers=[logger])
    panels = TensorBoardPanels()
    values = torch.tensor([0.0, 0.5, 0.5, 1.0, float("nan"), float("inf")])
    panels.histogram(trainer, "h", values, 7)  # type: ignore[arg-type]
    image = np.zeros((2, 3, 3), dtype=np.uint8)
    image[1, 2] = (255, 128, 0)
    panels.image(trainer, "i", image, 7)  # type: ignore[arg-type]
    logger.experiment.flush()

    events = load_events(tmp_path)
    (histogram,) = events.Histograms("h")
    value = histogram.histogram_value
    assert (histogram.step, value.min, value.max, value.num, value.sum) == (7, 0.0, 1.0, 4, 2.0)  # finite ones
    assert sum(value.bucket) == 4 and value.bucket_limit[0] == 0.0 and value.bucket_limit[-1] == 1.0
    (written,) = events.Images("i")
    decoded = np.asarray(Image.open(io.BytesIO(written.encoded_image_string)).convert("RGB"))
    assert (written.step, written.width, written.height) == (7, 3, 2) and np.array_equal(decoded, image)
