"""``deadunits report LOGDIR``: summarise a run's readings (TensorBoard event files) and events (JSON lines).

Readings are the ``<prefix>/...`` scalars the monitors log; events (spikes, deaths after a spike, alarms, stops,
actions) are read from the run's ``deadunits/events*.jsonl`` files (:mod:`lightning_deadunits.events`), never from
the text panels that display them.
"""

import argparse
import json
import math
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lightning_deadunits.cli._report_html import HtmlRun, HtmlSection, render_html
from lightning_deadunits.cli._table import print_table
from lightning_deadunits.events import events_file, read_events
from lightning_deadunits.panels.render import bar_chart, png_bytes, series_chart

__all__ = ["register", "run", "summarise_logdir", "write_html", "write_plots"]

Points = list[tuple[int, float]]
Table = tuple[str, list[str], list[list[str]]]
"""``(title, column names, rows of cells)``: one table, printed in the terminal or written as HTML."""

_HEADLINE_STATS = ("dead", "dead_abs", "dead_rel", "dead_bn", "zero_frac", "dormant")
_RULE_STATS = {"dead_abs": "abs", "dead_rel": "rel", "dead_bn": "BatchNorm"}  # a dead-kernel rule's legend label
_UNIT_STATS = ("dead", "dormant")  # per-layer counts drawn as bars when a source has no rules
_SOURCE_HEADINGS = {"kernels": "Dead kernels per layer", "activations": "Dead units per layer"}
_TEXT_SUFFIX = "/text_summary"  # SummaryWriter.add_text appends it to the tag
_EVENT_PANELS = ("alarms", "loss/spike_events")  # text panels that display events: the events are read instead
_RECORD_KEYS = ("schema", "type", "prefix")  # every event record's envelope, left out of the summary
_SPIKE_COLUMNS = {
    "step": "step",
    "epoch": "epoch",
    "batch": "batch_idx",
    "rank": "rank",
    "loss": "loss",
    "baseline": "baseline",
    "score": "spike_score",
    "signal": "signal",
    "episode": "episode_start",
    "dump": "dump",
}
_ALARM_COLUMNS = {
    "step": "step",
    "level": "level",
    "source": "source",
    "key": "key",
    "value": "value",
    "threshold": "threshold",
    "message": "message",
}


@dataclass
class _Run:
    """One run directory: its scalars and texts under the prefix (tags without it), and its event records."""

    name: str
    path: Path
    scalars: dict[str, Points] = field(default_factory=dict)
    texts: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)

    def sources(self) -> dict[str, dict[str, dict[str, Points]]]:
        """``{source: {"layers": {"<layer>/<stat>": points}, "total": {stat: points}, "series": {name: points}}}``.

        Layer names hold no ``/`` (module names), so ``<source>/<scope>/<layer>/<stat>`` (e.g. the activation
        monitor's ``activations/val/...``) is filed under the source ``<source>/<scope>``.
        """
        grouped: dict[str, dict[str, dict[str, Points]]] = {}
        for tag, points in self.scalars.items():
            source, *middle, stat = tag.split("/")
            if not middle:
                grouped.setdefault(source, {"layers": {}, "total": {}, "series": {}})["series"][stat] = points
                continue
            *scope, layer = middle
            groups = grouped.setdefault("/".join([source, *scope]), {"layers": {}, "total": {}, "series": {}})
            if layer == "total":
                groups["total"][stat] = points
            else:
                groups["layers"][f"{layer}/{stat}"] = points
        return grouped

    def records(self, kind: str) -> list[dict[str, Any]]:
        """The event records of type ``kind``, without their envelope, in step order."""
        found = [
            {key: value for key, value in record.items() if key not in _RECORD_KEYS}
            for record in self.events
            if record.get("type") == kind
        ]
        return sorted(found, key=lambda record: _step_of(record))

    def spikes(self) -> list[dict[str, Any]]:
        """The loss spikes, each with ``"deaths"``: the ``spike_deaths`` records of its step merged, per monitor."""
        deaths: dict[Any, dict[str, dict[str, Any]]] = {}
        for record in self.records("spike_deaths"):
            merged = deaths.setdefault(record.get("step"), {})
            for monitor, found in (record.get("dead_after_spike") or {}).items():
                entry = merged.setdefault(monitor, {"died": {}})
                entry.update({key: value for key, value in found.items() if key != "died"})
                entry["died"].update(found.get("died") or {})
        spikes = [{**spike, "deaths": deaths.get(spike.get("step"), {})} for spike in self.records("spike")]
        return sorted(spikes, key=lambda spike: (_step_of(spike), _step_of(spike, "rank")))


def summarise_logdir(logdir: str | Path, prefix: str = "deadunits") -> dict[str, Any]:
    """Read every run under ``logdir`` and summarise its ``<prefix>/...`` readings and its events.

    A run is a directory holding TensorBoard event files and/or ``deadunits/events*.jsonl`` event logs (one run
    each: ``version_0``, ``version_1``, ...). Scalars ``<prefix>/<source>/<layer>/<stat>`` are summarised per layer
    and stat, ``<prefix>/<source>/total/<stat>`` per stat, and ``<prefix>/<source>/<name>`` (e.g.
    ``deadunits/loss/value``) as source-wide series, each as first, last and maximum over time; keys with a scope
    (``<prefix>/activations/val/<layer>/<stat>``) go under the source ``activations/val``. Spikes, alarms, stops
    and actions are the records of the run's event logs whose ``prefix`` is ``prefix``, in step order; each spike
    gets ``"deaths"``, the ``spike_deaths`` records of its step merged per monitor (``{monitor: {"unit",
    "before_step", "after_step", "died": {layer: count}}}``). Non-finite numbers in records become the strings
    ``"nan"``, ``"inf"`` and ``"-inf"``, so the JSON stays standard. Text panels other than the displays of events
    (``<prefix>/alarms``, ``<prefix>/loss/spike_events``) are kept as text.

    Args:
        logdir: a log directory (searched recursively) or one TensorBoard event file.
        prefix: the monitors' ``prefix``.

    Returns:
        ``{"logdir", "prefix", "runs": [{"run", "path", "sources": {source: {"layers": {layer: {stat: summary}},
        "total": {stat: summary}, "series": {name: summary}}}, "spikes": [spike record + "deaths"], "alarms":
        [alarm record], "stops": [...], "actions": [...], "texts": {tag: [{"step", "text"}]}}]}``, where a summary is
        ``{"first", "first_step", "last", "last_step", "max", "max_step", "points", "nonfinite"}`` (non-finite values
        are ``None``; the maximum is over finite ones).

    Raises:
        ValueError: if ``logdir`` does not exist, holds no event file, or no run has a key or event under ``prefix``.

    Example:
        >>> summary = summarise_logdir("lightning_logs")  # doctest: +SKIP
        >>> summary["runs"][0]["sources"]["kernels"]["total"]["dead"]["last"]  # doctest: +SKIP
        12.0
    """
    return _summarise(Path(logdir), prefix, _read_runs(Path(logdir), prefix))


def write_plots(logdir: str | Path, directory: str | Path, prefix: str = "deadunits") -> list[Path]:
    """Write the figures of every run as PNG files named ``<run>-<source>-<figure>.png``.

    Per source: the headline totals over steps (``totals``), the headline stat of each layer over steps
    (``<stat>-per-layer``), the last check's dead counts per layer (``dead-at-last-check``; by rule for kernels, the
    TensorBoard panel's figure) and each source-wide series (e.g. ``value`` for the loss); loss spikes are marked on
    every figure over steps.

    Args:
        logdir: a log directory (searched recursively) or one event file.
        directory: where to write the PNGs (created if missing).
        prefix: the monitors' ``prefix``.

    Returns:
        The files written.

    Raises:
        ValueError: as :func:`summarise_logdir`.
    """
    return _write_plots(_pngs(_read_runs(Path(logdir), prefix), prefix), Path(directory))


def write_html(logdir: str | Path, path: str | Path, prefix: str = "deadunits") -> Path:
    """Write one self-contained HTML report of every run: figures embedded as PNG, no external reference.

    Per run: its readings (dead kernels and units per layer over time, per-layer tables), loss spikes with their
    dumps and the deaths after them, alarms, and actions taken (stops included).

    Args:
        logdir: a log directory (searched recursively) or one event file.
        path: the HTML file to write (its directory is created if missing).
        prefix: the monitors' ``prefix``.

    Returns:
        ``path``.

    Raises:
        ValueError: as :func:`summarise_logdir`.
    """
    runs = _read_runs(Path(logdir), prefix)
    return _write_html(Path(logdir), _summarise(Path(logdir), prefix, runs), _pngs(runs, prefix), Path(path))


def register(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add the ``report`` command to the ``deadunits`` parser."""
    parser = commands.add_parser(
        "report",
        help="summarise a run's dead kernels, dead units, spikes, alarms and actions",
        description=(
            "Summarise every run (directory of event files) under LOGDIR: per layer and in total, the first, last "
            "and largest value of each deadunits statistic; source-wide series such as the loss; and, from the "
            "run's deadunits/events*.jsonl, the loss spikes (with their dumps and the deaths after them), alarms, "
            "stops and actions."
        ),
    )
    parser.add_argument("logdir", type=Path, help="a TensorBoard log directory (searched recursively) or event file")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables (full layer names)")
    parser.add_argument("--plots", type=Path, metavar="DIR", help="also write the figures as PNG files into DIR")
    parser.add_argument("--html", type=Path, metavar="FILE", help="also write a self-contained HTML report to FILE")
    parser.add_argument("--prefix", default="deadunits", help="the monitors' key prefix (default deadunits)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Print the summary of ``args.logdir`` (and write plots and HTML); return 0, or 2 when there is nothing to read."""
    logdir = Path(args.logdir)
    try:
        runs = _read_runs(logdir, args.prefix)
    except ValueError as error:
        print(f"deadunits report: error: {error}", file=sys.stderr)
        return 2
    summary = _summarise(logdir, args.prefix, runs)
    pngs = {} if args.plots is None and args.html is None else _pngs(runs, args.prefix)
    written = [] if args.plots is None else _write_plots(pngs, Path(args.plots))
    if args.html is not None:
        written.append(_write_html(logdir, summary, pngs, Path(args.html)))
    if args.json:
        summary["written"] = [str(path) for path in written]
        print(json.dumps(summary, indent=2))
        return 0
    for run_summary in summary["runs"]:
        print(f"run {run_summary['run']} ({run_summary['path']}); cells: first -> last (max)")
        for title, columns, rows in _tables(run_summary, args.prefix):
            if rows:
                print_table(title, columns, rows)
            else:
                print(title)
        print()
    for path in written:
        print(f"wrote {path}")
    return 0


def _read_runs(logdir: Path, prefix: str) -> list[_Run]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not logdir.exists():
        raise ValueError(f"{logdir}: no such file or directory.")
    events_directory = events_file(".").parent.name
    if logdir.is_file():
        directories = [logdir.parent]
    else:
        tensorboard_files = logdir.rglob("*tfevents*")
        event_logs = logdir.rglob(f"{events_directory}/events*.jsonl")
        directories = sorted({file.parent for file in tensorboard_files} | {log.parent.parent for log in event_logs})
    if not directories:
        raise ValueError(
            f"{logdir}: no TensorBoard event file (events.out.tfevents.*) and no deadunits event log "
            f"({events_directory}/events*.jsonl) under it."
        )
    runs = []
    for directory in directories:
        name = logdir.name if logdir.is_file() else directory.relative_to(logdir).as_posix()
        run_data = _Run(name, logdir if logdir.is_file() else directory)
        if logdir.is_file() or any(directory.glob("*tfevents*")):
            accumulator = EventAccumulator(str(run_data.path), size_guidance={"scalars": 0, "tensors": 0})
            accumulator.Reload()
            _collect(accumulator, run_data, prefix)
        for log in sorted(Path(directory, events_directory).glob("events*.jsonl")):
            run_data.events += [record for record in read_events(log) if record.get("prefix") == prefix]
        if run_data.scalars or run_data.texts or run_data.events:
            runs.append(run_data)
    if not runs:
        raise ValueError(
            f"{logdir}: the event files hold no `{prefix}/...` key and no event of that prefix; is `--prefix` the "
            "monitors' prefix?"
        )
    return runs


def _collect(accumulator: Any, run_data: _Run, prefix: str) -> None:
    from tensorboard.util import tensor_util

    start = f"{prefix}/"
    tags = accumulator.Tags()
    for tag in tags.get("scalars", []):
        if tag.startswith(start):
            run_data.scalars[tag[len(start) :]] = [
                (event.step, float(event.value)) for event in accumulator.Scalars(tag)
            ]
    for tag in tags.get("tensors", []):
        plugin = accumulator.SummaryMetadata(tag).plugin_data.plugin_name
        if not tag.startswith(start) or plugin not in ("scalars", "text"):
            continue
        events = accumulator.Tensors(tag)
        if plugin == "scalars":  # written by TF2-style writers instead of SummaryWriter.add_scalar
            points = [(event.step, float(tensor_util.make_ndarray(event.tensor_proto).item())) for event in events]
            run_data.scalars[tag[len(start) :]] = points
            continue
        name = tag[len(start) :].removesuffix(_TEXT_SUFFIX)
        if name not in _EVENT_PANELS:
            latest = {event.step: _decode_text(tensor_util.make_ndarray(event.tensor_proto)) for event in events}
            run_data.texts[name] = sorted(latest.items())
    for tag, points in run_data.scalars.items():
        run_data.scalars[tag] = sorted(points, key=lambda point: point[0])


def _decode_text(array: Any) -> str:
    return "\n".join(item.decode("utf-8", "replace") if isinstance(item, bytes) else str(item) for item in array.flat)


def _summarise(logdir: Path, prefix: str, runs: list[_Run]) -> dict[str, Any]:
    summaries = []
    for run_data in runs:
        sources = {
            source: {
                "layers": _layer_summaries(groups["layers"]),
                "total": {stat: _series_summary(points) for stat, points in groups["total"].items()},
                "series": {name: _series_summary(points) for name, points in groups["series"].items()},
            }
            for source, groups in run_data.sources().items()
        }
        summaries.append(
            {
                "run": run_data.name,
                "path": str(run_data.path),
                "sources": sources,
                "spikes": _jsonable(run_data.spikes()),
                "alarms": _jsonable(run_data.records("alarm")),
                "stops": _jsonable(run_data.records("stop")),
                "actions": _jsonable(run_data.records("action")),
                "texts": {
                    tag: [{"step": step, "text": text} for step, text in entries]
                    for tag, entries in run_data.texts.items()
                },
            }
        )
    return {"logdir": str(logdir), "prefix": prefix, "runs": summaries}


def _layer_summaries(layer_points: dict[str, Points]) -> dict[str, dict[str, dict[str, Any]]]:
    layers: dict[str, dict[str, dict[str, Any]]] = {}
    for layer_stat, points in layer_points.items():
        layer, _, stat = layer_stat.rpartition("/")
        layers.setdefault(layer, {})[stat] = _series_summary(points)
    return layers


def _series_summary(points: Points) -> dict[str, Any]:
    finite = [point for point in points if math.isfinite(point[1])]
    peak = max(finite, key=lambda point: point[1]) if finite else None
    return {
        "first": _finite_or_none(points[0][1]),
        "first_step": points[0][0],
        "last": _finite_or_none(points[-1][1]),
        "last_step": points[-1][0],
        "max": peak[1] if peak else None,
        "max_step": peak[0] if peak else None,
        "points": len(points),
        "nonfinite": len(points) - len(finite),
    }


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _jsonable(value: Any) -> Any:
    """``value`` with non-finite floats as ``"nan"``, ``"inf"`` or ``"-inf"`` (standard JSON has none)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_jsonable(item) for item in value]
    return value


def _step_of(record: Mapping[str, Any], key: str = "step") -> int:
    value = record.get(key)
    return value if isinstance(value, int) else -1


def _headline(stats: set[str]) -> list[str]:
    """The stats worth a column or a figure: the dead counts and fractions when present, else all of them."""
    return [stat for stat in _HEADLINE_STATS if stat in stats] or sorted(stats)


def _tables(run_summary: Mapping[str, Any], prefix: str) -> Iterator[Table]:
    """Every table of one run: per source (layers, series), then spikes, alarms and actions taken."""
    for source, groups in run_summary["sources"].items():
        yield from _source_tables(f"{prefix}/{source}", groups)
    yield _spike_table(run_summary["spikes"])
    yield _alarm_table(run_summary["alarms"])
    yield _action_table(run_summary["actions"], run_summary["stops"])


def _source_tables(title: str, groups: Mapping[str, Any]) -> Iterator[Table]:
    rows_by_name = {"total": groups["total"], **groups["layers"]} if groups["total"] else dict(groups["layers"])
    if rows_by_name:
        stats = _headline({stat for row in rows_by_name.values() for stat in row})
        rows = [[name, *(_cell(row.get(stat)) for stat in stats)] for name, row in rows_by_name.items()]
        yield title, ["layer", *stats], rows
    if groups["series"]:
        fields = ("first", "last", "max", "max_step", "points", "nonfinite")
        rows = [[name, *(_reading(summary[key]) for key in fields)] for name, summary in groups["series"].items()]
        yield f"{title}: series", ["series", "first", "last", "max", "max step", "points", "non-finite"], rows


def _spike_table(spikes: Sequence[Mapping[str, Any]]) -> Table:
    rows = [[*(_number(spike.get(key)) for key in _SPIKE_COLUMNS.values()), _deaths(spike)] for spike in spikes]
    return f"loss spikes: {len(spikes)}", [*_SPIKE_COLUMNS, "died after it"], rows


def _alarm_table(alarms: Sequence[Mapping[str, Any]]) -> Table:
    rows = [[_number(alarm.get(key)) for key in _ALARM_COLUMNS.values()] for alarm in alarms]
    return f"alarms: {len(alarms)}", list(_ALARM_COLUMNS), rows


def _action_table(actions: Sequence[Mapping[str, Any]], stops: Sequence[Mapping[str, Any]]) -> Table:
    taken = [*actions, *({**stop, "action": "stop"} for stop in stops)]
    rows = [
        [
            _number(record.get("step")),
            str(record.get("source", "")),
            str(record.get("action", "")),
            ", ".join(
                f"{key} {_number(value)}" for key, value in record.items() if key not in ("step", "source", "action")
            ),
        ]
        for record in sorted(taken, key=lambda record: _step_of(record))
    ]
    return f"actions taken: {len(rows)}", ["step", "source", "action", "details"], rows


def _deaths(spike: Mapping[str, Any]) -> str:
    """``"kernels: conv 3, head 1 (steps 10 -> 20)"``, one clause per monitor; ``"-"`` before any check."""
    clauses = []
    for monitor, found in (spike.get("deaths") or {}).items():
        died = ", ".join(f"{layer} {_number(count)}" for layer, count in (found.get("died") or {}).items())
        steps = f" (steps {found['before_step']} -> {found['after_step']})" if "before_step" in found else ""
        clauses.append(f"{monitor}: {died or 'none'}{steps}")
    return "; ".join(clauses) or "-"


def _cell(summary: Mapping[str, Any] | None) -> str:
    if summary is None:
        return ""
    return f"{_reading(summary['first'])} -> {_reading(summary['last'])} ({_reading(summary['max'])})"


def _reading(value: float | None) -> str:
    """A summarised reading: ``None`` stands for a non-finite value."""
    return "nan" if value is None else _number(value)


def _number(value: Any) -> str:
    """A record's field: numbers to 4 significant digits, ``"-"`` for a missing one, anything else as text."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:.4g}"


def _figures(run_data: _Run, prefix: str) -> Iterator[tuple[str, str, np.ndarray]]:
    """``(source, figure name, image)`` of every figure of a run (see :func:`write_plots`)."""
    spike_steps = [spike["step"] for spike in run_data.spikes() if isinstance(spike.get("step"), int)]
    for source, groups in run_data.sources().items():
        title = f"{prefix}/{source}"
        if groups["total"]:
            totals = {stat: groups["total"][stat] for stat in _headline(set(groups["total"]))}
            yield (
                source,
                "totals",
                _over_steps(totals, f"{title}: totals over training", "count or fraction", spike_steps),
            )
        layer_stats: dict[str, dict[str, Points]] = {}
        for layer_stat, points in sorted(groups["layers"].items(), key=lambda item: _natural_order(item[0])):
            layer, _, stat = layer_stat.rpartition("/")
            layer_stats.setdefault(stat, {})[layer] = points
        if layer_stats:
            stat = _headline(set(layer_stats))[0]
            label = f"{title}: {stat} per layer over training"
            yield source, f"{stat}-per-layer", _over_steps(layer_stats[stat], label, _unit(stat), spike_steps)
            last_check = _last_check_chart(title, layer_stats)
            if last_check is not None:
                yield source, "dead-at-last-check", last_check
        for name, points in groups["series"].items():
            yield source, name, _over_steps({name: points}, f"{title}/{name}", name, spike_steps)


def _over_steps(series: Mapping[str, Points], title: str, value_label: str, marks: Sequence[int]) -> np.ndarray:
    last_step = max((points[-1][0] for points in series.values() if points), default=0)
    return series_chart(series, title=title, value_label=value_label, step=last_step, marks=marks)


def _last_check_chart(title: str, layer_stats: Mapping[str, Mapping[str, Points]]) -> np.ndarray | None:
    """The dead counts per layer at the last check, by rule when the source has rules (the kernels panel's figure)."""
    rules = [stat for stat in _RULE_STATS if stat in layer_stats]
    counted = rules or [stat for stat in _UNIT_STATS if stat in layer_stats]
    if not counted:
        return None
    layers = list(layer_stats[counted[0]])
    step = max(points[-1][0] for points in layer_stats[counted[0]].values())

    def last(stat: str) -> list[float]:
        return [_last_value(layer_stats.get(stat, {}).get(layer)) for layer in layers]

    values = {_RULE_STATS.get(stat, stat): last(stat) for stat in counted}
    total = ("any rule", last("dead")) if rules and "dead" in layer_stats else None
    value_label = "dead filters (count)" if rules else "channels (count)"
    return bar_chart(
        layers,
        values,
        total=total,
        title=f"{title}: dead per layer",
        value_label=value_label,
        step=step,
        order="names in natural order",
    )


def _last_value(points: Points | None) -> float:
    return points[-1][1] if points else 0.0


def _unit(stat: str) -> str:
    return f"{stat} (fraction)" if stat.endswith("frac") else f"{stat} (count)"


def _pngs(runs: list[_Run], prefix: str) -> dict[str, list[tuple[str, str, bytes]]]:
    """``{run name: [(source, figure name, PNG)]}``: every figure drawn once, for ``--plots`` and ``--html`` alike."""
    return {
        run_data.name: [(source, name, png_bytes(image)) for source, name, image in _figures(run_data, prefix)]
        for run_data in runs
    }


def _write_plots(pngs: Mapping[str, list[tuple[str, str, bytes]]], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for run_name, figures in pngs.items():
        for source, name, png in figures:
            path = directory / f"{_slug(run_name)}-{_slug(source)}-{_slug(name)}.png"
            path.write_bytes(png)
            written.append(path)
    return written


def _write_html(
    logdir: Path, summary: Mapping[str, Any], pngs: Mapping[str, list[tuple[str, str, bytes]]], path: Path
) -> Path:
    pages = [
        HtmlRun(
            run_summary["run"],
            run_summary["path"],
            ", ".join(f"{len(run_summary[key])} {key}" for key in ("spikes", "alarms", "stops", "actions")),
            _html_sections(run_summary, pngs[run_summary["run"]], summary["prefix"]),
        )
        for run_summary in summary["runs"]
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(f"deadunits report: {logdir}", pages), encoding="utf-8")
    return path


def _html_sections(
    run_summary: Mapping[str, Any], pngs: list[tuple[str, str, bytes]], prefix: str
) -> list[HtmlSection]:
    """One section per source (dead kernels, dead units, others), then spikes, alarms and actions taken."""
    figures: dict[str, list[tuple[str, bytes]]] = {}
    for source, name, png in pngs:
        figures.setdefault(source, []).append((f"{prefix}/{source}: {name}", png))
    sections = [
        HtmlSection(
            f"{_SOURCE_HEADINGS.get(source.split('/')[0], 'Readings')} ({prefix}/{source})",
            figures.get(source, []),
            list(_source_tables(f"{prefix}/{source}", groups)),
        )
        for source, groups in run_summary["sources"].items()
    ]
    sections.append(HtmlSection("Loss spikes and the deaths after them", [], [_spike_table(run_summary["spikes"])]))
    sections.append(HtmlSection("Alarms", [], [_alarm_table(run_summary["alarms"])]))
    sections.append(HtmlSection("Actions taken", [], [_action_table(run_summary["actions"], run_summary["stops"])]))
    return sections


def _natural_order(name: str) -> list[Any]:
    """Sort key putting ``features.3`` before ``features.10``: the report knows layers by name only, not model order."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "run"
