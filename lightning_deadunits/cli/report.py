"""``deadunits report LOGDIR``: summarise what the monitors wrote to a run's TensorBoard event files."""

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning_deadunits.cli.scan import print_table

__all__ = ["register", "run", "summarise_logdir", "write_plots"]

Points = list[tuple[int, float]]

_HEADLINE_STATS = ("dead", "dead_abs", "dead_rel", "dead_bn", "zero_frac", "dormant")
_TEXT_SUFFIX = "/text_summary"  # SummaryWriter.add_text appends it to the tag
_ALARMS_TAG = "alarms"
_SPIKES_TAG = "loss/spike_events"
_ROW_KEY_CELLS = 4  # a spike row is identified by its step, epoch, batch and rank
_MAX_LEGEND_LINES = 12


@dataclass
class _Run:
    """One directory of event files: scalars and texts under the prefix, tags without it."""

    name: str
    path: Path
    scalars: dict[str, Points] = field(default_factory=dict)
    texts: dict[str, list[tuple[int, str]]] = field(default_factory=dict)

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

    def spikes(self) -> list[dict[str, Any]]:
        """The rows of the loss-spike table panel, each the latest version of that spike's row."""
        rows: dict[tuple[str, ...], dict[str, Any]] = {}
        for _, text in self.texts.get(_SPIKES_TAG, []):
            lines = [line.strip() for line in text.splitlines() if line.strip().startswith("|")]
            header = _table_cells(lines[0]) if lines else []
            for line in lines[2:]:  # after the header and its |---| line
                cells = _table_cells(line)
                if len(cells) == len(header):
                    rows[tuple(cells[:_ROW_KEY_CELLS])] = {
                        name: _cell_value(cell) for name, cell in zip(header, cells, strict=True)
                    }
        return list(rows.values())


def summarise_logdir(logdir: str | Path, prefix: str = "deadunits") -> dict[str, Any]:
    """Read every event file under ``logdir`` and summarise the ``<prefix>/...`` keys of each run.

    Event files are grouped by the directory that holds them (one run each: ``version_0``, ``version_1``, ...).
    Scalars ``<prefix>/<source>/<layer>/<stat>`` are summarised per layer and stat, ``<prefix>/<source>/total/
    <stat>`` per stat, and ``<prefix>/<source>/<name>`` (e.g. ``deadunits/loss/value``) as source-wide series,
    each as first, last and maximum over time; keys with a scope (``<prefix>/activations/val/<layer>/<stat>``) go
    under the source ``activations/val``. The alarms of the text panel ``<prefix>/alarms`` are listed in step
    order (like TensorBoard, keeping the last text written to a tag at a step), and the loss spikes come from the
    table of ``<prefix>/loss/spike_events`` (step, epoch, batch, rank, loss, baseline, z, dump path, deaths):
    one dict per spike, keyed by the table's column names, numbers parsed. Other text panels are kept as text.

    Args:
        logdir: a log directory (searched recursively) or one event file.
        prefix: the monitors' ``prefix``.

    Returns:
        ``{"logdir", "prefix", "runs": [{"run", "path", "sources": {source: {"layers": {layer: {stat: summary}},
        "total": {stat: summary}, "series": {name: summary}}}, "alarms": [{"step", "text"}], "spikes": [{column: cell}],
        "texts": {tag: [...]}}]}``, where a summary is ``{"first", "first_step", "last", "last_step", "max",
        "max_step", "points", "nonfinite"}`` (non-finite values are ``None``; the maximum is over finite ones).

    Raises:
        ValueError: if ``logdir`` does not exist, holds no event file, or no run has a key under ``prefix``.

    Example:
        >>> summary = summarise_logdir("lightning_logs")  # doctest: +SKIP
        >>> summary["runs"][0]["sources"]["kernels"]["total"]["dead"]["last"]  # doctest: +SKIP
        12.0
    """
    return _summarise(Path(logdir), prefix, _read_runs(Path(logdir), prefix))


def write_plots(logdir: str | Path, directory: str | Path, prefix: str = "deadunits") -> list[Path]:
    """Write one PNG per run and source: totals, the headline stat per layer and source-wide series over steps.

    Steps of loss spikes (``<prefix>/loss/spike_events``) are marked on every panel, so units that die at a spike
    show as a jump at a dashed line. Files are named ``<run>-<source>.png``.

    Args:
        logdir: a log directory (searched recursively) or one event file.
        directory: where to write the PNGs (created if missing).
        prefix: the monitors' ``prefix``.

    Returns:
        The files written.

    Raises:
        ImportError: if matplotlib is not installed.
        ValueError: as :func:`summarise_logdir`.
    """
    return _plot_runs(_read_runs(Path(logdir), prefix), Path(directory), prefix)


def register(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add the ``report`` command to the ``deadunits`` parser."""
    parser = commands.add_parser(
        "report",
        help="summarise a run's dead kernels, dead units, spikes and alarms",
        description=(
            "Summarise the deadunits keys of every run (directory of event files) under LOGDIR: per layer and in "
            "total, the first, last and largest value of each statistic; source-wide series such as the loss; "
            "the alarms and the loss spikes (with their dump paths) from the text panels."
        ),
    )
    parser.add_argument("logdir", type=Path, help="a TensorBoard log directory (searched recursively) or event file")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--plots", type=Path, metavar="DIR", help="also write PNG figures into DIR (needs matplotlib)")
    parser.add_argument("--prefix", default="deadunits", help="the monitors' key prefix (default deadunits)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Print the summary of ``args.logdir`` (and write plots); return 0, or 2 when there is nothing to read."""
    logdir = Path(args.logdir)
    try:
        runs = _read_runs(logdir, args.prefix)
    except ValueError as error:
        print(f"deadunits report: error: {error}", file=sys.stderr)
        return 2
    summary = _summarise(logdir, args.prefix, runs)
    plots: list[Path] = []
    if args.plots is not None:
        try:
            plots = _plot_runs(runs, Path(args.plots), args.prefix)
        except ImportError as error:
            print(f"deadunits report: error: `--plots` needs matplotlib ({error}).", file=sys.stderr)
            return 2
    if args.json:
        summary["plots"] = [str(path) for path in plots]
        print(json.dumps(summary, indent=2))
        return 0
    for run_summary in summary["runs"]:
        _print_run(run_summary, args.prefix)
    for path in plots:
        print(f"wrote {path}")
    return 0


def _read_runs(logdir: Path, prefix: str) -> list[_Run]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not logdir.exists():
        raise ValueError(f"{logdir}: no such file or directory.")
    files = [logdir] if logdir.is_file() else sorted(logdir.rglob("*tfevents*"))
    if not files:
        raise ValueError(f"{logdir}: no TensorBoard event file (events.out.tfevents.*) under it.")
    sources = [logdir] if logdir.is_file() else sorted({file.parent for file in files})
    runs = []
    for source in sources:
        name = source.name if logdir.is_file() else source.relative_to(logdir).as_posix()
        accumulator = EventAccumulator(str(source), size_guidance={"scalars": 0, "tensors": 0})
        accumulator.Reload()
        run_data = _collect(accumulator, _Run(name, source), prefix)
        if run_data.scalars or run_data.texts:
            runs.append(run_data)
    if not runs:
        raise ValueError(f"{logdir}: the event files hold no `{prefix}/...` key; is `--prefix` the monitors' prefix?")
    return runs


def _collect(accumulator: Any, run_data: _Run, prefix: str) -> _Run:
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
        latest = {event.step: _decode_text(tensor_util.make_ndarray(event.tensor_proto)) for event in events}
        run_data.texts[name] = sorted(latest.items())
    for tag, points in run_data.scalars.items():
        run_data.scalars[tag] = sorted(points, key=lambda point: point[0])
    return run_data


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
        texts = {
            tag: [{"step": step, "text": text} for step, text in entries] for tag, entries in run_data.texts.items()
        }
        spikes = run_data.spikes()
        if spikes:
            texts.pop(_SPIKES_TAG)
        summaries.append(
            {
                "run": run_data.name,
                "path": str(run_data.path),
                "sources": sources,
                "alarms": texts.pop(_ALARMS_TAG, []),
                "spikes": spikes,
                "texts": texts,
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


def _headline(stats: set[str]) -> list[str]:
    """The stats worth a column or a panel: the dead counts and fractions when present, else all of them."""
    return [stat for stat in _HEADLINE_STATS if stat in stats] or sorted(stats)


def _print_run(run_summary: dict[str, Any], prefix: str) -> None:
    print(f"run {run_summary['run']} ({run_summary['path']}); cells: first -> last (max)")
    for source, groups in run_summary["sources"].items():
        rows_by_name = {"total": groups["total"], **groups["layers"]} if groups["total"] else dict(groups["layers"])
        if rows_by_name:
            stats = _headline({stat for row in rows_by_name.values() for stat in row})
            print_table(
                f"{prefix}/{source}",
                ["layer", *stats],
                [[name, *(_cell(row.get(stat)) for stat in stats)] for name, row in rows_by_name.items()],
            )
        if groups["series"]:
            print_table(
                f"{prefix}/{source}: series",
                ["series", "first", "last", "max", "max step", "points", "non-finite"],
                [
                    [
                        name,
                        *(
                            _number(summary[stat])
                            for stat in ("first", "last", "max", "max_step", "points", "nonfinite")
                        ),
                    ]
                    for name, summary in groups["series"].items()
                ],
            )
    print(f"alarms: {len(run_summary['alarms'])}")
    for entry in run_summary["alarms"]:
        text = entry["text"].replace("\n\n", "\n").replace("\n", "\n" + " " * 14)
        print(f"  step {entry['step']:>6}: {text}")
    print(f"loss spikes: {len(run_summary['spikes'])}")
    for row in run_summary["spikes"]:
        cells = [f"{column} {value}" for column, value in row.items() if column != "step"]
        print(f"  step {row.get('step', '?'):>6}: {', '.join(cells)}")
    print()


def _cell(summary: dict[str, Any] | None) -> str:
    if summary is None:
        return ""
    return f"{_number(summary['first'])} -> {_number(summary['last'])} ({_number(summary['max'])})"


def _number(value: float | int | None) -> str:
    return "nan" if value is None else f"{value:.4g}"


def _plot_runs(runs: list[_Run], directory: Path, prefix: str) -> list[Path]:
    from matplotlib.figure import Figure

    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for run_data in runs:
        spike_steps = sorted({row["step"] for row in run_data.spikes() if isinstance(row.get("step"), int)})
        for source, groups in run_data.sources().items():
            panels = _plot_panels(groups)
            figure = Figure(figsize=(5.5 * len(panels), 3.8), layout="constrained")
            axes = figure.subplots(1, len(panels), squeeze=False)[0]
            for ax, (title, lines) in zip(axes, panels, strict=True):
                for label, points in lines.items():
                    ax.plot([step for step, _ in points], [value for _, value in points], ".-", label=label)
                for index, step in enumerate(spike_steps):
                    ax.axvline(
                        step, color="tab:red", linestyle="--", linewidth=0.8, label=None if index else "loss spike"
                    )
                ax.set_title(f"{prefix}/{source}: {title}")
                ax.set_xlabel("step")
                if len(lines) <= _MAX_LEGEND_LINES:
                    ax.legend(fontsize="small")
            path = directory / f"{_slug(run_data.name)}-{_slug(source)}.png"
            figure.savefig(path, dpi=100)
            written.append(path)
    return written


def _plot_panels(groups: dict[str, dict[str, Points]]) -> list[tuple[str, dict[str, Points]]]:
    panels: list[tuple[str, dict[str, Points]]] = []
    if groups["total"]:
        panels.append(("totals", {stat: groups["total"][stat] for stat in _headline(set(groups["total"]))}))
    if groups["layers"]:
        stat = _headline({layer_stat.rpartition("/")[2] for layer_stat in groups["layers"]})[0]
        lines = {
            layer_stat.rpartition("/")[0]: points
            for layer_stat, points in groups["layers"].items()
            if layer_stat.endswith(f"/{stat}")
        }
        panels.append((f"{stat} per layer", lines))
    panels.extend((name, {name: points}) for name, points in groups["series"].items())
    return panels


def _table_cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def _cell_value(cell: str) -> int | float | str:
    """The number in a table cell (finite ones only, so the JSON stays standard), else the cell's text."""
    for parse in (int, float):
        try:
            number = parse(cell)
        except ValueError:
            continue
        return number if math.isfinite(number) else cell
    return cell


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "run"
