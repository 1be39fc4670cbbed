import base64
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
from lightning_deadunits.cli._table import print_table
from lightning_deadunits.cli.report import summarise_logdir, write_html, write_plots
from lightning_deadunits.events import EventLog, events_file
from tests.helpers.spike_models import DigitsMLP, digits_with_dirty_batches
from tests.helpers.tb_helpers import PLANTED_DEAD, fit_planted

DUMP = "/tmp/spike dumps|run 1/step 10 | rank 0.pt"  # pipes and spaces: a Markdown table would have split it
SPIKE = {
    "type": "spike",
    "prefix": "deadunits",
    "source": "loss",
    "step": 10,
    "epoch": 0,
    "batch_idx": 10,
    "rank": 0,
    "loss": 9.5,
    "baseline": 1.1,
    "spread": 0.2,
    "ratio": 8.6,
    "spike_score": 12.3,
    "threshold": 6.0,
    "reason": "score",
    "local": True,
    "skipped_update": False,
    "dump": DUMP,
}
DEATHS_KERNELS = {"kernels": {"unit": "filters", "before_step": 0, "after_step": 20, "died": {"conv": 3}}}
DEATHS_UNITS = {"activations": {"unit": "channels", "before_step": 0, "after_step": 20, "died": {"fc": 2}}}
ALARM = {
    "type": "alarm",
    "prefix": "deadunits",
    "source": "kernels",
    "key": "deadunits/kernels/conv/dead",
    "value": 3.0,
    "threshold": 2.0,
    "level": "warning",
    "message": "deadunits/kernels/conv/dead = 3 rose above 2",
    "step": 10,
    "rule": "dead_kernels",
}
ACTION = {"type": "action", "prefix": "deadunits", "source": "loss", "step": 10, "action": "rewarm", "steps": 50}
STOP = {"type": "stop", "prefix": "deadunits", "source": "kernels", "step": 30, "reason": "dead_kernels alarm"}


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


def _write_events(directory: Path, records: list[dict[str, Any]], rank: int = 0) -> None:
    log = EventLog(events_file(directory, rank))
    for record in records:
        log.write(record)


@pytest.fixture
def logdir(tmp_path: Path) -> Path:
    """Two runs with monitor keys (`version_0` with events, `version_1`) and one without (`other`)."""
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
            # Displays of the events: never parsed (a wrong row here must not reach the report).
            "deadunits/alarms": [(10, "**warning** shown, not read")],
            "deadunits/loss/spike_events": [(10, "| step | dump |\n| ---: | --- |\n| 99 | /wrong.pt |")],
            "deadunits/notes": [(0, "hello")],
        },
    )
    nan_spike = {**SPIKE, "step": 20, "batch_idx": 20, "loss": math.nan, "spike_score": math.inf, "dump": None}
    _write_events(
        tmp_path / "version_0",
        [
            SPIKE,
            ALARM,
            ACTION,
            {
                "type": "spike_deaths",
                "prefix": "deadunits",
                "source": "kernels",
                "step": 10,
                "dead_after_spike": DEATHS_KERNELS,
            },
            {
                "type": "spike_deaths",
                "prefix": "deadunits",
                "source": "activations",
                "step": 10,
                "dead_after_spike": DEATHS_UNITS,
            },
            nan_spike,
            STOP,
            {**ALARM, "prefix": "other"},  # another monitor set's prefix: left out
        ],
    )
    # Rank 1 saw its own spike at step 10 and wrote its dump.
    _write_events(tmp_path / "version_0", [{**SPIKE, "rank": 1, "dump": "/tmp/rank1.pt"}], rank=1)
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


def _record(event: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """An event as the report gives it: without its envelope (schema, type, prefix)."""
    return {key: value for key, value in {**event, **changes}.items() if key not in ("type", "prefix")}


def test_report_json_summarises_readings_and_reads_events_not_panels(
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
    assert run["sources"]["activations/val"] == {
        "layers": {"fc": {"dead": _summary(2, 20, 2, 20, 2, 20, 1)}},
        "total": {"dead": _summary(2, 20, 2, 20, 2, 20, 1)},
        "series": {},
    }
    deaths = {**DEATHS_KERNELS, **DEATHS_UNITS}
    assert run["spikes"] == [
        _record(SPIKE, deaths=deaths),
        _record(SPIKE, rank=1, dump="/tmp/rank1.pt", deaths=deaths),
        _record(SPIKE, step=20, batch_idx=20, loss="nan", spike_score="inf", dump=None, deaths={}),
    ]
    for spike in run["spikes"]:
        assert {"step", "epoch", "batch_idx", "rank", "loss", "baseline", "spike_score", "dump", "deaths"} <= set(spike)
    assert run["alarms"] == [_record(ALARM)]
    assert run["actions"] == [_record(ACTION)]
    assert run["stops"] == [_record(STOP)]
    assert run["texts"] == {"notes": [{"step": 0, "text": "hello"}]}
    assert report["runs"][1]["sources"] == {
        "kernels": {"layers": {}, "total": {"dead": _summary(1, 0, 1, 0, 1, 0, 1)}, "series": {}}
    }
    assert report["runs"][1]["spikes"] == [] and report["runs"][1]["alarms"] == []
    assert report["written"] == []


def test_report_json_returns_a_dump_path_with_pipes_and_spaces_exactly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _write_events(tmp_path / "version_0", [SPIKE])  # an event log alone makes a run
    assert main(["report", str(tmp_path), "--json"]) == 0
    (spike,) = json.loads(capsys.readouterr().out)["runs"][0]["spikes"]
    assert spike["dump"] == DUMP
    assert (spike["step"], spike["batch_idx"], spike["rank"], spike["deaths"]) == (10, 10, 0, {})


def test_report_merges_later_death_records_into_the_same_monitor(tmp_path: Path) -> None:
    later = {"kernels": {"unit": "filters", "before_step": 0, "after_step": 30, "died": {"head": 1}}}
    _write_events(
        tmp_path / "run",
        [
            SPIKE,
            {
                "type": "spike_deaths",
                "prefix": "deadunits",
                "source": "kernels",
                "step": 10,
                "dead_after_spike": DEATHS_KERNELS,
            },
            {"type": "spike_deaths", "prefix": "deadunits", "source": "kernels", "step": 10, "dead_after_spike": later},
            {"type": "spike_deaths", "prefix": "deadunits", "source": "kernels", "step": 99, "dead_after_spike": later},
        ],
    )
    (spike,) = summarise_logdir(tmp_path)["runs"][0]["spikes"]
    assert spike["deaths"] == {
        "kernels": {"unit": "filters", "before_step": 0, "after_step": 30, "died": {"conv": 3, "head": 1}}
    }


def test_report_tables_show_growth_spikes_alarms_and_actions(logdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(logdir)]) == 0
    out = capsys.readouterr().out
    assert f"run version_0 ({logdir / 'version_0'})" in out
    assert "0 -> 4 (5)" in out  # conv and total dead: first -> last (max)
    assert "0.125 -> 0.5 (0.5)" in out
    assert "deadunits/loss: series" in out
    assert re.search(r"│ value +│ +1 │ +0.5 │ +1 │ +0 │ +3 │ +1 │", out)  # first, last, max, its step, points, nan
    assert "loss spikes: 3" in out and DUMP in out
    assert "kernels: conv 3 (steps 0 -> 20); activations: fc 2 (steps 0 -> 20)" in out
    assert "alarms: 1" in out and "deadunits/kernels/conv/dead = 3 rose above 2" in out
    assert "actions taken: 2" in out and "rewarm" in out and "reason dead_kernels alarm" in out
    assert "shown, not read" not in out and "/wrong.pt" not in out
    assert "run other" not in out


def test_report_plots_write_the_panels_figures_per_run_and_source(
    logdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plots = tmp_path / "plots"
    assert main(["report", str(logdir), "--plots", str(plots)]) == 0
    names = [  # in drawing order: per run and source, totals, per layer over steps, last check, series
        "version_0-kernels-totals.png",
        "version_0-kernels-dead-per-layer.png",
        "version_0-kernels-dead-at-last-check.png",  # by rule, as the TensorBoard bar chart
        "version_0-activations-dead-per-layer.png",
        "version_0-activations-dead-at-last-check.png",
        "version_0-activations_val-totals.png",
        "version_0-activations_val-dead-per-layer.png",
        "version_0-activations_val-dead-at-last-check.png",
        "version_0-loss-value.png",
        "version_0-loss-spikes.png",
        "version_1-kernels-totals.png",
    ]
    assert sorted(path.name for path in plots.iterdir()) == sorted(names)
    for name in names:
        assert (plots / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert f"wrote {plots / 'version_0-loss-value.png'}" in capsys.readouterr().out
    assert write_plots(logdir, tmp_path / "again") == [tmp_path / "again" / name for name in names]


def test_report_html_is_one_self_contained_file_with_every_section(
    logdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    page = tmp_path / "out" / "report.html"
    assert main(["report", str(logdir), "--html", str(page)]) == 0
    assert capsys.readouterr().out.rstrip().endswith(f"wrote {page}")
    assert sorted(path.name for path in page.parent.iterdir()) == ["report.html"]
    text = page.read_text(encoding="utf-8")
    assert "http" not in text and "<script" not in text and "<link" not in text
    sources = re.findall(r'src="([^"]*)"', text)
    assert sources and all(source.startswith("data:image/png;base64,") for source in sources)
    for heading in (
        "run version_0",
        "Dead kernels per layer (deadunits/kernels)",
        "Dead units per layer (deadunits/activations)",
        "Readings (deadunits/loss)",
        "Loss spikes and the deaths after them",
        "Alarms",
        "Actions taken",
        "run version_1",
    ):
        assert f">{heading}<" in text, heading
    assert "/tmp/spike dumps|run 1/step 10 | rank 0.pt" in text  # the dump path, escaped as needed
    assert "kernels: conv 3 (steps 0 -&gt; 20)" in text
    assert "deadunits/kernels/conv/dead = 3 rose above 2" in text and "rewarm" in text
    assert "3 spikes, 1 alarms, 1 stops, 1 actions" in text
    assert write_html(logdir, tmp_path / "again.html").read_text(encoding="utf-8") == text


def test_report_plots_and_html_together_embed_the_written_figures(
    logdir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    page, plots = tmp_path / "report.html", tmp_path / "plots"
    assert main(["report", str(logdir), "--json", "--plots", str(plots), "--html", str(page)]) == 0
    written = json.loads(capsys.readouterr().out)["written"]
    assert written[-1] == str(page) and len(written) == 12
    text = page.read_text(encoding="utf-8")
    for png in written[:-1]:
        assert base64.b64encode(Path(png).read_bytes()).decode("ascii") in text  # the same figures, drawn once


def test_report_reads_a_single_event_file_and_a_custom_prefix(tmp_path: Path) -> None:
    _write_run(tmp_path / "run", {"mon/kernels/total/dead": [(0, 2), (5, 3)]}, {})
    _write_events(tmp_path / "run", [{**ALARM, "prefix": "mon"}, ALARM])
    (event_file,) = (tmp_path / "run").glob("*tfevents*")
    report = summarise_logdir(event_file, prefix="mon")
    assert report["runs"][0]["sources"]["kernels"]["total"]["dead"]["last"] == 3
    assert report["runs"][0]["alarms"] == [_record(ALARM)]


@pytest.mark.parametrize(
    ("setup", "argv", "message"),
    [
        ("missing", [], "no such file or directory"),
        ("empty", [], r"no TensorBoard event file \(events.out.tfevents.\*\) and no deadunits event log"),
        ("other", [], r"hold no `deadunits/...` key and no event of that prefix; is `--prefix` the monitors' prefix\?"),
        ("deadunits", ["--prefix", "mon"], r"hold no `mon/...` key"),
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


LONG = "backbone.stages.3.blocks.11.attention.qkv_projection"  # 51 characters


@pytest.mark.parametrize("rich", [True, False])
def test_tables_never_break_a_name_in_a_narrow_terminal(
    rich: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if not rich:
        monkeypatch.setitem(sys.modules, "rich.console", None)
    columns = ["layer", *(f"stat{index}" for index in range(8))]
    rows = [[LONG, *("0 -> 12 (12)" for _ in range(8))], ["conv", *("1" for _ in range(8))]]
    print_table("dead per layer", columns, rows, width=60)
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert all(len(line) <= 60 for line in lines), lines
    cells = [line for line in lines if "backbone" in line]
    assert cells and all("backbone.sta…" in line and "…_projection" in line for line in cells)  # both ends kept
    assert "(columns part 1 of" in out and "stat7" in out  # folded, no column lost
    assert "`--json` has them in full" in out


def test_tables_keep_full_names_when_they_fit(capsys: pytest.CaptureFixture[str]) -> None:
    print_table("t", ["layer", "dead"], [[LONG, "3"]], width=200)
    out = capsys.readouterr().out
    assert LONG in out and "…" not in out and "part" not in out


def test_report_on_a_real_run_counts_planted_filters(tmp_path: Path) -> None:
    rule = ThresholdRule("deadunits/kernels/*/dead_abs", above=1)
    monitor = KernelNormMonitor(every_n_steps=2, alarms=[rule])
    fit_planted(tmp_path, TensorBoardLogger(tmp_path, name="fit"), [monitor], max_steps=4)

    (run,) = summarise_logdir(tmp_path)["runs"]
    assert run["run"] == "fit/version_0"
    kernels = run["sources"]["kernels"]
    assert kernels["layers"]["model.conv"]["dead_abs"] == _summary(PLANTED_DEAD, 0, PLANTED_DEAD, 4, PLANTED_DEAD, 0, 3)
    assert kernels["layers"]["model.head"]["dead"]["max"] == 0
    assert kernels["total"]["filters"]["last"] == 4 + 2


def test_report_on_a_real_run_lists_alarms_and_the_spike_with_its_dump_and_deaths(tmp_path: Path) -> None:
    planted = 40
    spikes = LossSpikeMonitor(window=30, warmup=20, dump_dir=tmp_path / "dumps")
    rule = ThresholdRule("deadunits/kernels/*/dead", above=-1)
    kernels = KernelNormMonitor(every_n_steps=10, log_histograms=False, log_images=False, alarms=[rule])
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
    dump = tmp_path / "dumps" / f"deadunits-step{planted:08d}-rank0-batch{planted:05d}.pt"
    assert (spike["step"], spike["batch_idx"], spike["rank"], spike["dump"]) == (planted, planted, 0, str(dump))
    assert dump.is_file() and "deadunits/kernels" in spike["deaths"]
    assert run["alarms"] and all(alarm["rule"] for alarm in run["alarms"])
    assert run["sources"]["kernels"]["total"]["dead"]["points"] == 6  # checks at steps 0, 10, ..., 50
