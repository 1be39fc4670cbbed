"""Overhead of the monitors against a bare Trainer, measured side by side in one process.

The entry point: the configurations compared, the targets they are held to, the two experiments (the overhead
tables and the scaling sweeps) and the command line. How a configuration is run and timed is in ``harness.py``, the
models and data in ``models.py``, and how runs become rows, ratios, verdicts and written results in ``report.py``.

To compare a new callback, add a ``Config`` to ``configs``; to train a new model, register it in
``models.MODELS``. Neither needs a change to the harness.

Usage:
    python benchmarks/overhead.py                 # the three models, CPU (or CUDA when available), writes results/
    python benchmarks/overhead.py --scaling       # overhead against model width and sampling interval
    python benchmarks/overhead.py --smoke         # seconds: tiny model, 1 repetition (CI runs this)
"""

import argparse
import json
import logging
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

import lightning_deadunits as du
from harness import (
    BARE,
    Config,
    Group,
    one_core,
    progress,
    run_beside_twins,
    run_groups,
    steady_allocator,
    train,
)
from image_cost import image_cost
from lightning_deadunits.functional import activations as functional_activations
from models import MODELS, build_model
from report import (
    Rows,
    Target,
    check_targets,
    machine_description,
    overhead_markdown,
    overhead_rows,
    percent,
    scaling_markdown,
    scaling_rows,
    write_results,
)
from roofline import roofline

RESULTS = Path(__file__).resolve().parent / "results"
CADENCE = 50  # the monitors' default every_n_steps, and the hand-written histogram logger's interval
# A second bare run, measured like a monitored one: its ratio shows how finely the benchmark resolves an overhead.
AGAIN = "bare, again (noise floor)"
ANOMALY = "Trainer(detect_anomaly=True)"
# The activation monitor measuring every step; by default it logs (one host transfer, panels) at the trainer's
# log_every_n_steps (50): sampling is not logging.
EVERY_STEP = "ActivationMonitor(every_n_steps=1)"
# ... and logging every sample too (scalars, histograms, band charts every 10 logs): what it did before issue 19.
EVERY_STEP_LOGGED = "ActivationMonitor(every_n_steps=1, log_every_n_samples=1)"


class ParameterHistograms(pl.Callback):
    """What users write by hand: every parameter's histogram through the TensorBoard logger every N steps."""

    def __init__(self, every_n_steps: int) -> None:
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    for name, parameter in pl_module.named_parameters():
                        logger.experiment.add_histogram(name, parameter.detach(), trainer.global_step)


def _activation_monitor_every_step() -> list[pl.Callback]:
    return [du.ActivationMonitor(every_n_steps=1)]


def configs(histogram_every: int) -> list[Config]:
    """Every configuration of the overhead tables, ``bare`` first."""
    return [
        Config(BARE),
        Config(AGAIN),
        Config("KernelNormMonitor()", lambda: [du.KernelNormMonitor()]),
        Config("ActivationMonitor()", lambda: [du.ActivationMonitor()]),
        Config(EVERY_STEP, _activation_monitor_every_step),
        Config(EVERY_STEP_LOGGED, lambda: [du.ActivationMonitor(every_n_steps=1, log_every_n_samples=1)]),
        Config("LossSpikeMonitor()", lambda: [du.LossSpikeMonitor()]),
        Config("DeadUnits()", lambda: [du.DeadUnits()]),
        Config("Rewind()", lambda: [du.Rewind()]),
        Config(ANOMALY, detect_anomaly=True),
        Config(f"parameter histograms every {histogram_every} steps", lambda: [ParameterHistograms(histogram_every)]),
    ]


def scaling_groups(widths: list[int], intervals: list[int], interval_width: int) -> list[Group]:
    """The scaling sweeps: one group per width (``DeadUnits()`` at defaults, and the activation monitor measuring
    every step), and one group of the activation monitor's sampling intervals at ``interval_width``."""
    groups: list[Group] = [
        (
            "width",
            width,
            [
                (width, Config("DeadUnits()", lambda: [du.DeadUnits()])),
                (width, Config(EVERY_STEP, _activation_monitor_every_step)),
            ],
        )
        for width in widths
    ]
    sampling = [
        (
            interval,
            Config(
                f"ActivationMonitor(every_n_steps={interval})",
                lambda i=interval: [du.ActivationMonitor(every_n_steps=i)],  # type: ignore[misc]
            ),
        )
        for interval in intervals
    ]
    groups.append(("every_n_steps", interval_width, sampling))
    return groups


def _time_at_most(config: str, limit: float) -> Callable[[Rows], tuple[str, bool]]:
    def check(rows: Rows) -> tuple[str, bool]:
        row = rows[config]
        spread = f"range {percent(row['time_ratio_min'])} to {percent(row['time_ratio_max'])}, "
        spread += f"CPU time {percent(row['cpu_ratio'])}"
        if AGAIN in rows:
            spread += f"; noise floor {percent(rows[AGAIN]['time_ratio'])}"
        return f"{percent(row['time_ratio'])} ({spread})", row["time_ratio"] - 1 <= limit

    return check


def _cheaper_than_anomaly(rows: Rows) -> tuple[str, bool]:
    anomaly = rows[ANOMALY]["time_ratio"] - 1
    loss = rows["LossSpikeMonitor()"]["time_ratio"] - 1
    both = f"detect_anomaly {100 * anomaly:+.1f}%, LossSpikeMonitor {100 * loss:+.1f}%"
    if loss <= 0:
        return f"{both} (below the noise)", anomaly > 0
    return f"{anomaly / loss:.0f}x ({both})", anomaly / loss >= 20


def _statistics_roofline(rows: Rows) -> tuple[str, bool]:
    pass_costs = rows[BARE].get("roofline")
    if not pass_costs:
        return "not measured", True
    best = min(pass_costs.get("fused_over_sum", math.inf), pass_costs["eager_over_sum"])
    measured = ", ".join(
        f"{name} {pass_costs[f'{name}_over_sum']:.1f}x"
        for name in ("fused", "eager")
        if f"{name}_over_sum" in pass_costs
    )
    return measured + f" one `x.sum()` ({pass_costs['sum_ms']:.2f} ms per sampled step)", best <= 2


def _memory_growth(rows: Rows) -> tuple[str, bool]:
    monitors = [name for name in rows if "Monitor" in name or "DeadUnits" in name]
    if not monitors or any("memory_ratio" not in rows[name] for name in monitors):
        return "not measured", True
    worst = max(monitors, key=lambda name: rows[name]["memory_ratio"])
    growth = rows[worst]["memory_ratio"] - 1
    return f"largest {100 * growth:+.1f}% ({worst})", growth <= 0.02


TARGETS = [
    Target(
        "`DeadUnits()` wall-time overhead <= 3% (CPU)", _time_at_most("DeadUnits()", 0.03), ("DeadUnits()",), ("cpu",)
    ),
    Target(
        "`DeadUnits()` wall-time overhead <= 2% (GPU)", _time_at_most("DeadUnits()", 0.02), ("DeadUnits()",), ("cuda",)
    ),
    Target("activation monitor at every step <= 10% (CPU)", _time_at_most(EVERY_STEP, 0.10), (EVERY_STEP,), ("cpu",)),
    Target(
        "NaN/spike protection >= 20x cheaper than `detect_anomaly=True`",
        _cheaper_than_anomaly,
        (ANOMALY, "LossSpikeMonitor()"),
    ),
    Target("peak memory of every monitor <= 2% above bare", _memory_growth, ()),
    Target("statistics pass <= 2x one plain read of the same activations", _statistics_roofline, ()),
]
"""The targets of issues 8 and 19, checked per model."""


def _selected(name: str, only: list[str] | None) -> bool:
    return not only or any(part in name for part in only)


def benchmark(model_kind: str, args: argparse.Namespace, log_dir: Path) -> list[dict[str, Any]]:
    """Every configuration on one model, each beside a bare twin of its own; one row per configuration."""
    every_config = configs(args.histogram_every)
    chosen = [c for c in every_config if c.name == BARE or _selected(c.name, args.only)]
    bare, monitored = chosen[0], chosen[1:]
    # First, and in this process: it also compiles the fused statistics kernel, so every configuration runs in the
    # steady state of a long run (the kernel compiled once COMPILE_AFTER_CALLS tensors were measured).
    pass_costs = roofline(build_model(model_kind, args.width), args.device, args.roofline_repeats, 5, not args.smoke)
    progress(f"[{model_kind}] statistics pass: {pass_costs}")
    image_costs = image_cost(model_kind, args.width, steps=4 if args.smoke else 12, warmup=1 if args.smoke else 2)
    progress(f"[{model_kind}] images and histograms: {image_costs}")
    if args.eager_statistics:
        functional_activations.COMPILE_AFTER_CALLS = None
    results, twins = run_beside_twins(model_kind, bare, monitored, args, log_dir)
    memory: dict[str, float] = {}
    if args.device == "cuda":
        memory = {name: statistics.median(r["peak_memory"] for r in runs) for name, runs in results.items()}
        memory[BARE] = statistics.median(r["peak_memory"] for runs in twins.values() for r in runs)
    elif args.memory:
        indices = {c.name: i for i, c in enumerate(every_config)}
        memory = {c.name: peak_rss_subprocess(indices[c.name], model_kind, args) for c in chosen}
        progress(f"[{model_kind}] memory runs done")
    rows = overhead_rows(model_kind, results, twins, memory, args.device == "cpu")
    rows[0]["roofline"] = pass_costs
    rows[0]["images"] = image_costs
    return rows


def scaling(args: argparse.Namespace, log_dir: Path) -> list[dict[str, Any]]:
    """Extra time per step against what is measured, on the ResNet-style CNN: against its width, and against the
    activation monitor's sampling interval. Each width, and the interval sweep, is one group run in lockstep with
    its own bare run; groups are shuffled per repetition."""
    groups = scaling_groups(args.widths, args.intervals, args.width)
    runs = run_groups("resnet", groups, args, log_dir)
    return scaling_rows("resnet", groups, runs, args.device == "cpu")


def peak_rss_subprocess(config_index: int, model_kind: str, args: argparse.Namespace) -> float:
    """Peak RSS (bytes) over the timed window of a fresh process that runs one configuration (``--child``)."""
    command = [
        sys.executable,
        __file__,
        "--child",
        str(config_index),
        "--model",
        model_kind,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--width",
        str(args.width),
        "--device",
        args.device,
        "--threads",
        str(args.threads),
        "--histogram-every",
        str(args.histogram_every),
        *(["--eager-statistics"] if args.eager_statistics else []),
        "--out",
        str(args.out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"memory subprocess failed: {result.stderr[-2000:]}")
    return float(json.loads(result.stdout.strip().splitlines()[-1])["peak_memory"])


def _quiet() -> None:
    """Lightning's per-fit banners would drown the progress lines."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*detect_anomaly.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilenet", "resnet", "charlm"], choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=110, help="optimizer steps per run (default 110)")
    parser.add_argument("--warmup", type=int, default=10, help="steps before the timed window (default 10)")
    parser.add_argument("--repeats", type=int, default=4, help="interleaved repetitions (default 4)")
    parser.add_argument("--width", type=int, default=32, help="base width of the ResNet-style CNN (default 32)")
    parser.add_argument("--histogram-every", type=int, default=CADENCE)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a shared machine more threads than free cores make every "
        "timing meaningless)",
    )
    parser.add_argument("--smoke", action="store_true", default=os.environ.get("DEADUNITS_FAST") == "1")
    parser.add_argument("--scaling", action="store_true", help="overhead against model width and sampling interval")
    parser.add_argument("--widths", type=int, nargs="+", default=[8, 16, 32, 48])
    parser.add_argument("--intervals", type=int, nargs="+", default=[1, 2, 5, 10, 50])
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the CPU peak-RSS subprocesses")
    parser.add_argument("--only", nargs="+", help="run only the configurations whose name contains one of these")
    parser.add_argument("--keep-logs", action="store_true", help="keep the TensorBoard logs under <out>/tmp")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--roofline-repeats", type=int, default=15, help="interleaved timings of each statistics pass")
    parser.add_argument(
        "--eager-statistics", action="store_true", help="train without the fused statistics kernel (to compare)"
    )
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default="mobilenet", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.steps, args.warmup, args.repeats, args.memory = ["tiny"], 4, 2, 1, False
        args.widths, args.intervals, args.width, args.roofline_repeats = [4], [2], 4, 2
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    _quiet()
    one_core()
    steady_allocator()
    torch.set_num_threads(args.threads)
    log_dir = args.out / "tmp"
    if args.child is not None:
        if args.eager_statistics:
            functional_activations.COMPILE_AFTER_CALLS = None
        config = configs(args.histogram_every)[args.child]
        result = train(config, build_model(args.model, args.width), args, log_dir / "child")
        print(json.dumps({"peak_memory": result["peak_memory"]}))
        return
    machine = machine_description(args.device, args.threads)
    started = time.perf_counter()
    try:
        if args.scaling:
            rows, verdicts = scaling(args, log_dir), []
            name, text = f"scaling-{args.device}", scaling_markdown(rows, machine)
        else:
            rows = [row for model in args.models for row in benchmark(model, args, log_dir)]
            verdicts = check_targets(rows, args.device, TARGETS)
            name, text = f"overhead-{args.device}", overhead_markdown(rows, verdicts, machine)
    finally:
        if not args.keep_logs:
            shutil.rmtree(log_dir, ignore_errors=True)
    if args.smoke:
        name += "-smoke"
    settings = {k: str(v) for k, v in vars(args).items() if k not in ("child", "model")}
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine,
        "settings": settings,
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
        "targets": verdicts,
    }
    write_results(args.out, name, report, text)
    print(text)


if __name__ == "__main__":
    main()
