"""The benchmark's rows, ratios and targets, and the results it writes.

Each configuration's time per step is compared with its twins': on CPU, the extra time of step ``i`` is the median
over repetitions of the monitored step minus its twin's step, and the ratio adds those up over the timed steps; on
CUDA it is the median over repetitions of the ratio of total times. The range over repetitions of the total-time
ratios is reported beside it, and ``bare, again`` (a bare run against its bare twin) shows the noise floor. The
CPU time of the training thread is compared in the same way beside the wall time.

Results go to ``<out>/<name>.json`` (every number, the settings and the machine) and ``<out>/<name>.md`` (the
tables).
"""

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness import BARE, Group
from models import activation_values, build_model

Rows = dict[str, dict[str, Any]]
"""One model's rows by configuration name."""


def _ratio(run: dict[str, Any], reference: dict[str, Any], clock: str) -> float:
    """One repetition's ratio of total times."""
    return sum(run[clock]) / sum(reference[clock])


def _overhead(
    runs: list[dict[str, Any]], references: list[dict[str, Any]], clock: str, lockstep: bool
) -> tuple[float, float]:
    """``(ratio to bare, extra seconds per step)``.

    In lockstep, step ``i`` does the same work in every repetition (same data, same check schedule) and ran right
    beside its bare twin's step ``i``, so the extra time is ``sum_i median_r(t[r, i] - bare[r, i])`` over steps
    ``i`` and repetitions ``r``: the median over repetitions keeps what the monitor costs at each step, periodic
    checks included, and drops what another process took from one step of one repetition. Run one after another
    (CUDA), it is the median over repetitions of the difference of the mean step times.
    """
    steps = len(references[0][clock])
    pairs = list(zip(runs, references, strict=True))
    if lockstep:
        extra = sum(statistics.median(run[clock][i] - bare[clock][i] for run, bare in pairs) for i in range(steps))
        base = sum(statistics.median(bare[clock][i] for bare in references) for i in range(steps))
        return 1 + extra / base, extra / steps
    ratio = statistics.median(_ratio(run, bare, clock) for run, bare in pairs)
    return ratio, statistics.median((sum(run[clock]) - sum(bare[clock])) / steps for run, bare in pairs)


def overhead_rows(
    model_kind: str,
    results: dict[str, list[dict[str, Any]]],
    twins: dict[str, list[dict[str, Any]]],
    memory: dict[str, float],
    lockstep: bool,
) -> list[dict[str, Any]]:
    """One row per configuration of one model, the bare one first: every twin against every twin, then each
    monitored configuration's runs against their own twins. ``memory``: peak bytes by name, or empty."""
    every_twin = [run for runs in twins.values() for run in runs]
    rows = [_overhead_row(model_kind, BARE, every_twin, every_twin, memory, lockstep)]
    rows += [_overhead_row(model_kind, name, runs, twins[name], memory, lockstep) for name, runs in results.items()]
    return rows


def _overhead_row(
    model_kind: str,
    name: str,
    runs: list[dict[str, Any]],
    twins: list[dict[str, Any]],
    memory: dict[str, float],
    lockstep: bool,
) -> dict[str, Any]:
    """One configuration's row: its runs against their bare twins."""
    wall = [_ratio(run, twin, "wall") for run, twin in zip(runs, twins, strict=True)]
    row: dict[str, Any] = {
        "model": model_kind,
        "config": name,
        "ms_per_step": 1000 * statistics.median(statistics.fmean(run["wall"]) for run in runs),
        "time_ratio": _overhead(runs, twins, "wall", lockstep)[0],
        "time_ratio_min": min(wall),
        "time_ratio_max": max(wall),
        "cpu_ratio": _overhead(runs, twins, "cpu", lockstep)[0],
        "repeats": len(runs),
    }
    if memory:
        row["peak_memory_mib"] = memory[name] / 2**20
        row["memory_ratio"] = memory[name] / memory[BARE]
    return row


def scaling_rows(
    model_kind: str, groups: list[Group], runs: dict[tuple[str, int, str], list[dict[str, Any]]], lockstep: bool
) -> list[dict[str, Any]]:
    """One row per point of every group (widths first, in increasing order): the extra time per step of its
    configuration over the group's bare run, beside the model's size."""
    rows = []
    for sweep, width, points in sorted(groups, key=lambda group: (group[0] != "width", group[1])):
        built = build_model(model_kind, width)
        reference = runs[(sweep, width, BARE)]
        for value, config in points:
            monitored = runs[(sweep, width, config.name)]
            ratio, extra = _overhead(monitored, reference, "wall", lockstep)
            extra_cpu = _overhead(monitored, reference, "cpu", lockstep)[1]
            ratios = [_ratio(m, b, "wall") for m, b in zip(monitored, reference, strict=True)]
            rows.append(
                {
                    "sweep": sweep,
                    "value": value,
                    "config": config.name,
                    "width": width,
                    "parameters": sum(p.numel() for p in built.model.parameters()),
                    "activation_values": activation_values(built),
                    "bare_ms_per_step": 1000 * statistics.median(statistics.fmean(b["wall"]) for b in reference),
                    "extra_ms_per_step": 1000 * extra,
                    "extra_cpu_ms_per_step": 1000 * extra_cpu,
                    "time_ratio": ratio,
                    "time_ratio_min": min(ratios),
                    "time_ratio_max": max(ratios),
                }
            )
    return rows


@dataclass
class Target:
    """A target the tables end with: ``check`` turns one model's rows into what was measured and whether the
    target is met. It is checked where every configuration in ``needs`` ran, on the ``devices`` it is set for."""

    description: str
    check: Callable[[Rows], tuple[str, bool]]
    needs: tuple[str, ...]
    devices: tuple[str, ...] = ("cpu", "cuda")


def percent(ratio: float) -> str:
    """A ratio as a signed percentage of overhead: ``1.03`` is ``+3.0%``."""
    return f"{100 * (ratio - 1):+.1f}%"


def check_targets(rows: list[dict[str, Any]], device: str, targets: list[Target]) -> list[dict[str, Any]]:
    """One entry per (model, target): what was measured and whether the target is met."""
    verdicts = []
    for model in dict.fromkeys(row["model"] for row in rows):
        by_config = {row["config"]: row for row in rows if row["model"] == model}
        for target in targets:
            if device in target.devices and all(name in by_config for name in target.needs):
                measured, met = target.check(by_config)
                verdicts.append({"model": model, "target": target.description, "measured": measured, "met": met})
    return verdicts


def overhead_markdown(rows: list[dict[str, Any]], verdicts: list[dict[str, Any]], machine: str) -> str:
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {machine}.",
        "",
        "Wall-time ratio: monitored over bare time per step; 1.030 means 3% slower. Each monitored run trains beside "
        "a bare twin (on CPU in lockstep, taking turns step by step on one core) and the ratio adds up each step's "
        "median extra time over the repetitions; in brackets, the range of the repetitions' own ratios; "
        "`bare, again` is a bare run against its bare twin: the noise floor. ms/step: median over repetitions.",
        "",
        "| model | configuration | ms/step | wall-time ratio (min-max) | CPU-time ratio | peak memory ratio |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        memory = f"{row['memory_ratio']:.3f}" if "memory_ratio" in row else "n/a"
        lines.append(
            f"| {row['model']} | {row['config']} | {row['ms_per_step']:.1f} | {row['time_ratio']:.3f} "
            f"({row['time_ratio_min']:.3f}-{row['time_ratio_max']:.3f}) | {row['cpu_ratio']:.3f} | {memory} |"
        )
    passes = [row for row in rows if row.get("roofline")]
    if passes:
        lines += [
            "",
            "Statistics pass (roofline): `channel_stats` over the activations the monitor reads in one sampled step "
            "(one batch through the watched activation modules), eager passes and fused compiled pass, against one "
            "`x.sum()` over the same tensors (the floor: one read); ms per sampled step, median of interleaved "
            "repetitions on one thread (CUDA events on a GPU).",
            "",
            "| model | activation values | `x.sum()` ms | eager ms (x sum) | fused ms (x sum) |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for row in passes:
            cost = row["roofline"]
            fused = f"{cost['fused_ms']:.2f} ({cost['fused_over_sum']:.1f}x)" if "fused_ms" in cost else "n/a"
            lines.append(
                f"| {row['model']} | {int(cost['values']):,} | {cost['sum_ms']:.2f} "
                f"| {cost['eager_ms']:.2f} ({cost['eager_over_sum']:.1f}x) | {fused} |"
            )
    lines += image_markdown(rows)
    if verdicts:
        lines += ["", "| model | target | measured | met |", "| --- | --- | --- | --- |"]
        for verdict in verdicts:
            met = "yes" if verdict["met"] else "**no**"
            lines.append(f"| {verdict['model']} | {verdict['target']} | {verdict['measured']} | {met} |")
    return "\n".join(lines) + "\n"


def image_shares(cost: dict[str, float], ms_per_step: float) -> dict[str, float]:
    """The images' and the histograms' shares of training time at the bundle's default cadence, from one model's
    ``image_cost`` and its bare time per step."""
    shares = {"images": 0.0, "histograms": 0.0}
    for monitor in ("kernel", "activation"):
        source = "kernels" if monitor == "kernel" else "activations"
        shares["images"] += cost[f"{source}_image_ms"] / (cost[f"{monitor}_steps_per_image_round"] * ms_per_step)
        shares["histograms"] += cost[f"{source}_histogram_ms"] / (cost[f"{monitor}_steps_per_round"] * ms_per_step)
    return shares


def image_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The table of what ``DeadUnits()``'s images and histograms cost, for the models whose bare row holds one."""
    measured = [row for row in rows if row.get("images")]
    if not measured:
        return []
    lines = [
        "",
        "Images and histograms of `DeadUnits()` (`image_cost.py`): each monitor with the bundle's settings, drawing at "
        "every step for a few steps, median ms per round (a check's or a log's panels: figures drawn, encoded and "
        "written; histograms timed apart). At the defaults a round of images comes every N steps, so the timed window "
        "above may hold none; the share is the round's cost over N steps of the bare run (ms/step above).",
        "",
        "| model | kernel images: ms (count), every N steps | band charts: ms (count), every N steps "
        "| histograms: ms (count) per check + log, every N steps | share of training time: images | histograms |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in measured:
        cost = row["images"]
        shares = image_shares(cost, row["ms_per_step"])
        lines.append(
            f"| {row['model']} | {cost['kernels_image_ms']:.0f} ({cost['kernels_images']:.0f}), "
            f"{cost['kernel_steps_per_image_round']:.0f} "
            f"| {cost['activations_image_ms']:.0f} ({cost['activations_images']:.0f}), "
            f"{cost['activation_steps_per_image_round']:.0f} "
            f"| {cost['kernels_histogram_ms']:.1f} ({cost['kernels_histograms']:.0f}) + "
            f"{cost['activations_histogram_ms']:.1f} ({cost['activations_histograms']:.0f}), "
            f"{cost['kernel_steps_per_round']:.0f} / {cost['activation_steps_per_round']:.0f} "
            f"| {100 * shares['images']:.2f}% | {100 * shares['histograms']:.2f}% |"
        )
    return lines


def scaling_markdown(rows: list[dict[str, Any]], machine: str) -> str:
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {machine}, ResNet-style CNN, batch 32 of 3x16x16 images.",
        "",
        "Extra ms/step: the monitored run's time per step minus the bare run's, same width, same repetition (median).",
        "",
        "| sweep | value | configuration | parameters | activation values per step | bare ms/step | extra ms/step "
        "| extra CPU ms/step | wall-time ratio (min-max) |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['sweep']} | {row['value']} | {row['config']} | {row['parameters']:,} "
            f"| {row['activation_values']:,} | {row['bare_ms_per_step']:.1f} | {row['extra_ms_per_step']:+.2f} "
            f"| {row['extra_cpu_ms_per_step']:+.2f} | {row['time_ratio']:.3f} "
            f"({row['time_ratio_min']:.3f}-{row['time_ratio_max']:.3f}) |"
        )
    return "\n".join(lines) + "\n"


def machine_description(device: str, threads: int) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    cpu = _cpu_model() or platform.processor() or platform.machine()
    return f"{cpu} ({os.cpu_count()} cores, {threads} torch thread(s)), torch {torch.__version__}"


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def write_results(out: Path, name: str, report: dict[str, Any], markdown: str) -> None:
    """``report`` as ``<out>/<name>.json`` and ``markdown`` as ``<out>/<name>.md``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown)
