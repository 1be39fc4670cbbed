import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.tensorboard import SummaryWriter

from lightning_deadunits import KernelNormMonitor, ThresholdRule
from lightning_deadunits.callbacks.loss_spike_monitor import LossSpikeMonitor
from lightning_deadunits.cli import main
from lightning_deadunits.cli.report import summarise_logdir, write_plots
from tests.helpers.spike_models import DigitsMLP, digits_with_dirty_batches
from tests.helpers.tb_helpers import PLANTED_DEAD, fit_planted

SPIKE_HEADER = (
    "| step | epoch | batch | rank | loss | baseline | z | dump | died |\n"
    "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |"
)
SPIKE_PENDING = "| 10 | 0 | 10 | 0 | 9.5 | 1.1 | 12.3 | /tmp/dumps/step10.pt | - (awaiting a check) |"
SPIKE_CHECKED = "| 10 | 0 | 10 | 0 | 9.5 | 1.1 | 12.3 | /tmp/dumps/step10.pt | 3 kernels of conv |"
SPIKE_NAN = "| 20 | 0 | 20 | 0 | nan | 1.0 | inf | - | no kernels |"


def _write_run(
    directory: Path, scalars: dict[str, list[tuple[int, float]]], texts: dict[str, list[tuple[int, str]]]
) -> None:
    writer = SummaryWriter(str(directory))
    for tag, points in scalars.items():
        for step, value in points:
            writer.add_scalar(tag, value, step)
    for tag, entries in texts.items():
        for step, text in entries:
            writer.add_text(tag, text, step)
    writer.close()


@pytest.fixture
def logdir(tmp_path: Path) -> Path:
    """Two runs with monitor keys (`version_0`, `version_1`) and one without (`other`)."""
    _write_run(
        tmp_path / "version_0",
        {
            "deadunits/kernels/conv/dead": [(0, 0), (10, 3), (20, 5), (30, 4)],
            "deadunits/kernels/conv/dead_abs": [(0, 0), (10, 1), (20, 1), (30, 1)],
            "deadunits/kernels/total/dead": [(0, 0), (10, 3), (20, 5), (30, 4)],
            "deadunits/activations/fc/dead": [(10, 0), (20, 7)],
            "deadunits/activations/fc/zero_frac": [(10, 0.125), (20, 0.5)],
            "deadunits/activations/val/fc/dead": [(20, 2)],
            "deadunits/activations/val/total/dead": [(20, 2)],
            "deadunits/loss/value": [(0, 1.0), (10, math.nan), (20, 0.5)],
            "deadunits/loss/spikes": [(0, 0), (10, 1), (20, 1)],
            "train_loss": [(0, 1.0)],
        },
        {
            # The panels rewrite a tag's text at a step with every alarm so far; the last write holds them all.
            "deadunits/alarms": [(10, "**warning** first"), (10, "**warning** first\n\n**error** second")],
            # The spike table is rewritten at each spike and once the deaths after it are known.
            "deadunits/loss/spike_events": [
                (10, f"{SPIKE_HEADER}\n{SPIKE_PENDING}"),
                (20, f"{SPIKE_HEADER}\n{SPIKE_CHECKED}\n{SPIKE_NAN}"),
            ],
            "deadunits/notes": [(0, "hello")],
        },
    )
    _write_run(tmp_path / "version_1", {"deadunits/kernels/total/dead": [(0, 1)]}, {})
    _write_run(tmp_path / "other", {"train_loss": [(0, 1.0)]}, {})
    return tmp_path


def _summary(
    first: float | None,
    first_step: int,
    last: float | None,
    last_step: int,
    peak: float,
    peak_step: int,
    points: int,
    nonfinite: int = 0,
) -> dict[str, Any]:
    return {
        "first": first,
        "first_step": first_step,
        "last": last,
        "last_step": last_step,
        "max": peak,
        "max_step": peak_step,
        "points": points,
        "nonfinite": nonfinite,
    }


def test_report_json_summarises_layers_totals_series_alarms_and_spikes(
    logdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(logdir), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [run["run"] for run in report["runs"]] == ["version_0", "version_1"]
    run = report["runs"][0]
    assert run["sources"]["kernels"] == {
        "layers": {
            "conv": {
                "dead": _summary(0, 0, 4, 30, 5, 20, 4),
                "dead_abs": _summary(0, 0, 1, 30, 1, 10, 4),
            }
        },
        "total": {"dead": _summary(0, 0, 4, 30, 5, 20, 4)},
        "series": {},
    }
    assert run["sources"]["activations"]["layers"]["fc"] == {
        "dead": _summary(0, 10, 7, 20, 7, 20, 2),
        "zero_frac": _summary(0.125, 10, 0.5, 20, 0.5, 20, 2),
    }
    assert run["sources"]["loss"]["series"] == {
        "value": _summary(1.0, 0, 0.5, 20, 1.0, 0, 3, nonfinite=1),
        "spikes": _summary(0, 0, 1, 20, 1, 10, 3),
    }
    assert run["alarms"] == [{"step": 10, "text": "**warning** first\n\n**error** second"}]
    assert run["spikes"] == [
        {
            "step": 10,
            "epoch": 0,
            "batch": 10,
            "rank": 0,
            "loss": 9.5,
            "baseline": 1.1,
            "z": 12.3,
            "dump": "/tmp/dumps/step10.pt",
            "died": "3 kernels of conv",
        },
        {
            "step": 20,
            "epoch": 0,
            "batch": 20,
            "rank": 0,
            "loss": "nan",
            "baseline": 1.0,
            "z": "inf",
            "dump": "-",
            "died": "no kernels",
        },
    ]
    assert run["texts"] == {"notes": [{"step": 0, "text": "hello"}]}
    assert run["sources"]["activations/val"] == {
        "layers": {"fc": {"dead": _summary(2, 20, 2, 20, 2, 20, 1)}},
        "total": {"dead": _summary(2, 20, 2, 20, 2, 20, 1)},
        "series": {},
    }
    assert report["runs"][1]["sources"] == {
        "kernels": {"layers": {}, "total": {"dead": _summary(1, 0, 1, 0, 1, 0, 1)}, "series": {}}
    }
    assert report["plots"] == []


def test_report_tables_show_growth_alarms_and_dump_paths(logdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(logdir)]) == 0
    out = capsys.readouterr().out
    assert f"run version_0 ({logdir / 'version_0'})" in out
    assert "0 -> 4 (5)" in out  # conv and total dead: first -> last (max)
    assert "0.125 -> 0.5 (0.5)" in out
    assert "deadunits/loss: series" in out
    assert re.search(r"│ value +│ +1 │ +0.5 │ +1 │ +0 │ +3 │ +1 │", out)  # first, last, max, its step, points, nan
    assert "alarms: 1\n  step     10: **warning** first\n" in out
    assert "**error** second" in out
    assert (
        "loss spikes: 2\n"
        "  step     10: epoch 0, batch 10, rank 0, loss 9.5, baseline 1.1, z 12.3, dump /tmp/dumps/step10.pt, "
        "died 3 kernels of conv\n"
    ) in out
    assert "run other" not in out


def test_report_plots_write_one_png_per_run_and_source(
    logdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plots = tmp_path / "plots"
    assert main(["report", str(logdir), "--plots", str(plots)]) == 0
    names = [
        "version_0-kernels.png",
        "version_0-activations.png",
        "version_0-activations_val.png",
        "version_0-loss.png",
        "version_1-kernels.png",
    ]
    assert sorted(path.name for path in plots.iterdir()) == sorted(names)
    for name in names:
        assert (plots / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert f"wrote {plots / 'version_0-loss.png'}" in capsys.readouterr().out


def test_report_plots_without_matplotlib_exit_2(
    logdir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert main(["report", str(logdir), "--plots", str(tmp_path / "plots")]) == 2
    assert capsys.readouterr().err.startswith("deadunits report: error: `--plots` needs matplotlib")
    with pytest.raises(ImportError):
        write_plots(logdir, tmp_path / "plots")


def test_report_reads_a_single_event_file_and_a_custom_prefix(tmp_path: Path) -> None:
    _write_run(tmp_path / "run", {"mon/kernels/total/dead": [(0, 2), (5, 3)]}, {"mon/alarms": [(5, "grew")]})
    (event_file,) = (tmp_path / "run").iterdir()
    report = summarise_logdir(event_file, prefix="mon")
    assert report["runs"][0]["sources"]["kernels"]["total"]["dead"]["last"] == 3
    assert report["runs"][0]["alarms"] == [{"step": 5, "text": "grew"}]


@pytest.mark.parametrize(
    ("setup", "argv", "message"),
    [
        ("missing", [], "no such file or directory"),
        ("empty", [], r"no TensorBoard event file \(events.out.tfevents.\*\) under it"),
        ("other", [], r"the event files hold no `deadunits/...` key; is `--prefix` the monitors' prefix\?"),
        ("deadunits", ["--prefix", "mon"], r"the event files hold no `mon/...` key"),
    ],
)
def test_report_without_monitor_data_exits_2_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], setup: str, argv: list[str], message: str
) -> None:
    target = tmp_path / "logs"
    if setup != "missing":
        target.mkdir()
    if setup in ("other", "deadunits"):
        _write_run(target / "version_0", {f"{'train' if setup == 'other' else 'deadunits'}/loss": [(0, 1.0)]}, {})
    assert main(["report", str(target), *argv]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"deadunits report: error: {target}: ") and captured.out == ""
    with pytest.raises(ValueError, match=message):
        summarise_logdir(target, *argv[1:])


def test_report_on_a_real_run_counts_planted_filters_and_lists_alarms(tmp_path: Path) -> None:
    rule = ThresholdRule("deadunits/kernels/*/dead_abs", above=1)
    monitor = KernelNormMonitor(every_n_steps=2, alarms=[rule])
    fit_planted(tmp_path, TensorBoardLogger(tmp_path, name="fit"), [monitor], max_steps=4)

    (run,) = summarise_logdir(tmp_path)["runs"]
    assert run["run"] == "fit/version_0"
    kernels = run["sources"]["kernels"]
    assert kernels["layers"]["model.conv"]["dead_abs"] == _summary(PLANTED_DEAD, 0, PLANTED_DEAD, 4, PLANTED_DEAD, 0, 3)
    assert kernels["layers"]["model.head"]["dead"]["max"] == 0
    assert kernels["total"]["filters"]["last"] == 4 + 2
    assert [alarm["step"] for alarm in run["alarms"]] == [0, 2, 4]
    for alarm in run["alarms"]:
        assert "deadunits/kernels/model.conv/dead_abs = 2 rose above 1" in alarm["text"]
        assert "deadunits/kernels/total/dead_abs = 2 rose above 1" in alarm["text"]


def test_report_on_a_real_run_lists_the_spike_with_its_dump_and_deaths(tmp_path: Path) -> None:
    planted = 40
    spikes = LossSpikeMonitor(window=30, warmup=20, dump_dir=tmp_path / "dumps")
    kernels = KernelNormMonitor(every_n_steps=10, log_histograms=False, log_images=False)
    trainer = pl.Trainer(
        max_steps=50,
        logger=TensorBoardLogger(tmp_path, name="spiky"),
        callbacks=[spikes, kernels],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(DigitsMLP(digits_with_dirty_batches(dirty_batches=[planted])))

    (run,) = summarise_logdir(tmp_path)["runs"]
    (spike,) = run["spikes"]
    dump = tmp_path / "dumps" / f"step{planted:08d}-rank0-batch{planted:05d}.pt"
    assert (spike["step"], spike["batch"], spike["rank"], spike["dump"]) == (planted, planted, 0, str(dump))
    assert dump.is_file() and "kernels" in spike["died"]
    assert run["sources"]["loss"]["series"]["spikes"]["last"] == 1
    assert run["sources"]["kernels"]["total"]["dead"]["points"] == 6  # checks at steps 0, 10, ..., 50
