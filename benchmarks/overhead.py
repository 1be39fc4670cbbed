"""Overhead of the monitors against a bare Trainer, measured side by side in one process.

Every configuration trains the same model on the same data for the same number of optimizer steps, with the same
TensorBoard logger (Lightning's default), so the only difference from the bare run is what is measured.

**Twins in lockstep (CPU).** A shared machine's speed drifts by tens of percent within seconds (other processes,
frequency, noisy neighbours), which swamps a 3% effect when configurations run one after another. So on CPU each
monitored configuration trains beside a bare twin of its own, at the same time, in two threads of this process that
take turns one optimizer step at a time (which goes first is drawn per pair): step ``i`` of the monitored run runs
right after or before step ``i`` of its twin, and any drift hits both alike. Each step is timed from the moment its
run gets the turn to the end of its last ``on_train_batch_end`` hook, so data loading, forward, backward, optimizer
and every callback hook are in it. Only one thread runs at a time; the TensorBoard writer threads still run in the
background (the monitors hand them one event per check). The whole process runs on one CPU core (a thread left on
a slower virtual core stays slower for a whole run) with glibc's allocator told to keep its memory (otherwise the
page faults of re-mapped tensors differ from run to run by several percent).

**Sequential (CUDA).** On a GPU, turn-taking would need a device sync per step, which would hide the very syncs
the monitors must not make, so the two runs of a pair run one after the other, synchronising only where the timed
window opens and closes.

Each configuration's time per step is compared with its twins': on CPU, the extra time of step ``i`` is the median
over repetitions of the monitored step minus its twin's step, and the ratio adds those up over the timed steps; on
CUDA it is the median over repetitions of the ratio of total times. The range over repetitions of the total-time
ratios is reported beside it, and ``bare, again`` (a bare run against its bare twin) shows the noise floor. The
timed window starts at the end of step ``--warmup`` (so one-off costs such as the fit-start kernel check, the
BatchNorm pairing forward, logger start-up and allocator warm-up are excluded from every configuration alike) and
ends at the end of the last step; ``--steps - --warmup`` should be a multiple of the monitors' 100-step cadence
(``DeadUnits()`` checks kernel norms and logs activations every 100 steps) so that periodic checks are amortised
exactly. The CPU time of the training thread is reported beside the wall time.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` over the timed window. On CPU, each configuration is run
once more, alone, in a fresh subprocess whose peak RSS is reset when the timed window starts
(``/proc/self/clear_refs``) and read at its end, against the bare subprocess (``--no-memory`` skips this).

Usage:
    python benchmarks/overhead.py                 # both models, CPU (or CUDA when available), writes results/
    python benchmarks/overhead.py --scaling       # overhead against model width and sampling interval
    python benchmarks/overhead.py --smoke         # seconds: tiny model, 1 repetition (CI runs this)
"""

import argparse
import contextlib
import ctypes
import functools
import gc
import json
import logging
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_deadunits as du
from lightning_deadunits.probes.activations import DEFAULT_ACTIVATION_TYPES

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # the demo's model and data live there
from digits_demo import MobileNetLike, digits_dataset

RESULTS = Path(__file__).resolve().parent / "results"
CADENCE = 50  # the monitors' default every_n_steps, and the hand-written histogram logger's interval
# The activation monitor measuring every step; it logs (one host transfer, panels) at the default cadence.
ANOMALY = "Trainer(detect_anomaly=True)"
# A second bare run, measured like a monitored one: its ratio shows how finely the benchmark resolves an overhead.
AGAIN = "bare, again (noise floor)"
EVERY_STEP = f"ActivationMonitor(every_n_steps=1, log_every_n_samples={CADENCE})"


class ResidualCNN(nn.Module):
    """A ResNet-style CNN: a stem, then ``stages`` of ``blocks`` residual blocks whose width doubles (and whose
    resolution halves) from one stage to the next, global pooling and a linear head."""

    def __init__(self, width: int = 32, stages: int = 3, blocks: int = 2, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers: list[nn.Module] = []
        channels = width
        for stage in range(stages):
            out = width * 2**stage
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(ResidualBlock(channels, out, stride))
                channels = out
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))  # type: ignore[no-any-return]


class ResidualBlock(nn.Module):
    def __init__(self, channels: int, out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out, out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or channels != out:
            self.shortcut = nn.Sequential(nn.Conv2d(channels, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(y + self.shortcut(x))  # type: ignore[no-any-return]


class BenchModule(pl.LightningModule):
    def __init__(self, model: nn.Module, data: TensorDataset, batch_size: int) -> None:
        super().__init__()
        self.model = model
        self.data = data
        self.batch_size = batch_size

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        images, labels = batch
        per_sample = F.cross_entropy(self.model(images), labels, reduction="none")
        return {"loss": per_sample.mean(), "per_sample_loss": per_sample.detach()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader[Any]:
        # Its own generator: every run sees the same batches in the same order, whatever runs beside it.
        order = torch.Generator().manual_seed(0)
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True, drop_last=True, generator=order)


class Lockstep:
    """Lets ``runs`` training threads take turns, one optimizer step each, in the order of their numbers."""

    def __init__(self, runs: int) -> None:
        # Everyone waits until all runs have set up (so no setup runs beside a timed step), then collects garbage
        # once so that no run starts with another's.
        self.ready = threading.Barrier(runs, action=gc.collect)
        self.runs = runs
        self.turn = 0
        self.finished: set[int] = set()
        self.condition = threading.Condition()

    def start(self, run: int) -> None:
        self.ready.wait()
        self.wait(run)

    def wait(self, run: int) -> None:
        with self.condition:
            self.condition.wait_for(lambda: self.turn == run)

    def hand_on(self, run: int) -> None:
        with self.condition:
            self._pass(run)

    def finish(self, run: int) -> None:
        """``run`` is over (or failed): never wait for it again."""
        with self.condition:
            self.finished.add(run)
            if self.turn == run:
                self._pass(run)
        if self.ready.n_waiting:  # a run that failed before the barrier would leave the others waiting forever
            self.ready.abort()

    def _pass(self, run: int) -> None:
        following = [(run + offset) % self.runs for offset in range(1, self.runs + 1)]
        self.turn = next((other for other in following if other not in self.finished), run)
        self.condition.notify_all()


class WindowTimer(pl.Callback):
    """Wall and training-thread CPU seconds of every step after step ``warmup``; resets the peak-memory counters
    when the window opens. Put last, so that every other callback's hooks are in the step.

    With a ``lockstep``, the run hands the turn on after each step and a step is timed from the moment it gets the
    turn back. Without, CUDA is synchronised only where the window opens and closes: a sync per step would hide
    the very syncs the monitors must not make, so per-step times then add up right but mean little one by one.
    """

    def __init__(self, warmup: int, lockstep: Lockstep | None = None, run: int = 0) -> None:
        self.warmup = warmup
        self.lockstep = lockstep
        self.run = run
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.resumed = (0.0, 0.0)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.lockstep is not None:
            self.lockstep.start(self.run)
        self.resumed = _clocks()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step in (self.warmup, trainer.max_steps):
            _sync()
        now = _clocks()
        if trainer.global_step == self.warmup:
            reset_peak_memory()
        elif trainer.global_step > self.warmup:
            self.wall.append(now[0] - self.resumed[0])
            self.cpu.append(now[1] - self.resumed[1])
        if self.lockstep is not None:
            self.lockstep.hand_on(self.run)
            self.lockstep.wait(self.run)
            now = _clocks()
        self.resumed = now

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.lockstep is not None:
            self.lockstep.finish(self.run)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.on_train_end(trainer, pl_module)


def _clocks() -> tuple[float, float]:
    return time.perf_counter(), time.thread_time()


class AnomalyDetection(pl.Callback):
    """``Trainer(detect_anomaly=True)`` for lockstep runs: the trainer flag sets process-wide state for the whole
    fit, which would leak into the runs stepping beside it, so this turns it on for this run's steps only."""

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        torch.autograd.set_detect_anomaly(True)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        torch.autograd.set_detect_anomaly(False)


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


@dataclass
class Config:
    name: str
    callbacks: Callable[[], list[pl.Callback]] = list
    detect_anomaly: bool = False

    def build_callbacks(self, lockstep: bool) -> list[pl.Callback]:
        return [*self.callbacks(), *([AnomalyDetection()] if self.detect_anomaly and lockstep else [])]

    def trainer_options(self, lockstep: bool) -> dict[str, Any]:
        return {"detect_anomaly": self.detect_anomaly and not lockstep}


def configs(histogram_every: int) -> list[Config]:
    return [
        Config("bare"),
        Config(AGAIN),
        Config("KernelNormMonitor()", lambda: [du.KernelNormMonitor()]),
        Config("ActivationMonitor()", lambda: [du.ActivationMonitor()]),
        Config(
            EVERY_STEP,
            lambda: [du.ActivationMonitor(every_n_steps=1, log_every_n_samples=CADENCE)],
        ),
        Config("ActivationMonitor(every_n_steps=1)", lambda: [du.ActivationMonitor(every_n_steps=1)]),
        Config("LossSpikeMonitor()", lambda: [du.LossSpikeMonitor()]),
        Config("DeadUnits()", lambda: [du.DeadUnits()]),
        Config(ANOMALY, detect_anomaly=True),
        Config(f"parameter histograms every {histogram_every} steps", lambda: [ParameterHistograms(histogram_every)]),
    ]


Job = tuple[Config, str, int]
"""A configuration, the model it trains and the model's width."""


@functools.cache
def _digits(size: int) -> TensorDataset:
    return digits_dataset(size, "all")


@functools.cache
def _images(channels: int, size: int, count: int = 2048) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(count, channels, size, size, generator=generator)
    return TensorDataset(images, torch.randint(0, 10, (count,), generator=generator))


def build_model(kind: str, width: int) -> tuple[nn.Module, TensorDataset, int]:
    """``(model, data, batch size)``: the demo's MobileNet-like CNN on 16x16 digits, the ResNet-style CNN on random
    3x16x16 images, or a tiny MobileNet for smoke runs."""
    if kind == "mobilenet":
        return MobileNetLike(), _digits(16), 32
    if kind == "resnet":
        return ResidualCNN(width=width), _images(3, 16), 32
    if kind == "tiny":
        return MobileNetLike(widths=(8, 8, 16)), _digits(8), 32
    raise ValueError(f"unknown model {kind!r}")


def train(
    config: Config,
    built: tuple[nn.Module, TensorDataset, int],
    args: argparse.Namespace,
    log_dir: Path,
    lockstep: Lockstep | None = None,
    run: int = 0,
) -> dict[str, Any]:
    """Train one configuration; return its per-step wall and CPU seconds over the timed window, and peak memory."""
    model, data, batch_size = built
    timer = WindowTimer(args.warmup, lockstep, run)
    trainer = pl.Trainer(
        max_steps=args.steps,
        accelerator=args.device,
        devices=1,
        callbacks=[*config.build_callbacks(lockstep is not None), timer],
        logger=TensorBoardLogger(log_dir, name=_slug(config.name)),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        **config.trainer_options(lockstep is not None),
    )
    trainer.fit(BenchModule(model, data, batch_size))
    assert timer.wall, "the run ended before the timed window"
    return {"wall": timer.wall, "cpu": timer.cpu, "peak_memory": read_peak_memory(args.device)}


def run_lockstep(jobs: list[Job], args: argparse.Namespace, log_dir: Path) -> list[dict[str, Any]]:
    """Train ``(config, model, width)`` jobs at the same time, one thread each, taking turns step by step in the
    order given; return their results in that order."""
    lockstep = Lockstep(len(jobs))
    results: list[dict[str, Any] | BaseException | None] = [None] * len(jobs)

    def work(run: int, config: Config, built: tuple[nn.Module, TensorDataset, int]) -> None:
        try:
            results[run] = train(config, built, args, log_dir / str(run), lockstep, run)
        except BaseException as error:
            results[run] = error
            lockstep.finish(run)

    # Built here, one after another, so that every run starts from the same initial weights.
    threads = [
        threading.Thread(target=work, args=(run, config, seeded_model(model_kind, width)))
        for run, (config, model_kind, width) in enumerate(jobs)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        if not isinstance(result, dict):
            raise RuntimeError(f"a lockstep run failed: {result!r}") from (
                result if isinstance(result, BaseException) else None
            )
    return results  # type: ignore[return-value]


def run_repetition(
    jobs: list[tuple[Config, str, int]], args: argparse.Namespace, log_dir: Path
) -> list[dict[str, Any]]:
    """One repetition of ``jobs``: in lockstep on CPU, one after another on CUDA."""
    if args.device == "cpu":
        return run_lockstep(jobs, args, log_dir)
    results = []
    for config, model_kind, width in jobs:
        results.append(train(config, seeded_model(model_kind, width), args, log_dir))
    return results


def seeded_model(model_kind: str, width: int) -> tuple[nn.Module, TensorDataset, int]:
    torch.manual_seed(0)
    return build_model(model_kind, width)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        torch.cuda.synchronize()


def reset_peak_memory() -> None:
    """Reset the CUDA peak-allocation counter, or the process's peak RSS (Linux), so peaks cover the window only."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        torch.cuda.reset_peak_memory_stats()
    # Not Linux: the peak then covers the whole process, which only dilutes the ratios.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def read_peak_memory(device: str) -> float:
    """Bytes: CUDA peak allocation, or peak RSS since the last reset."""
    if device == "cuda":
        return float(torch.cuda.max_memory_allocated())
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def peak_rss_subprocess(config_index: int, model_kind: str, args: argparse.Namespace) -> float:
    """Peak RSS (bytes) over the timed window of a fresh process that runs one configuration."""
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
        "--out",
        str(args.out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"memory subprocess failed: {result.stderr[-2000:]}")
    return float(json.loads(result.stdout.strip().splitlines()[-1])["peak_memory"])


def _selected(name: str, only: list[str] | None) -> bool:
    return not only or any(part in name for part in only)


def benchmark(model_kind: str, args: argparse.Namespace, log_dir: Path) -> list[dict[str, Any]]:
    """Every configuration on one model, each beside a bare twin of its own; one row per configuration."""
    all_configs = [c for c in configs(args.histogram_every) if c.name == "bare" or _selected(c.name, args.only)]
    bare, monitored = all_configs[0], all_configs[1:]
    results: dict[str, list[dict[str, Any]]] = {c.name: [] for c in monitored}
    twins: dict[str, list[dict[str, Any]]] = {c.name: [] for c in monitored}
    order_rng = random.Random(0)
    for repetition in range(args.repeats):
        order_rng.shuffle(monitored)
        for config in monitored:
            pair = [bare, config]
            order_rng.shuffle(pair)
            jobs = [(member, model_kind, args.width) for member in pair]
            outcome = dict(zip((member is config for member in pair), run_repetition(jobs, args, log_dir), strict=True))
            results[config.name].append(outcome[True])
            twins[config.name].append(outcome[False])
        _progress(f"[{model_kind}] repetition {repetition + 1}/{args.repeats} done")
    memory: dict[str, float] = {}
    if args.device == "cuda":
        memory = {name: statistics.median(r["peak_memory"] for r in runs) for name, runs in results.items()}
        memory[bare.name] = statistics.median(r["peak_memory"] for runs in twins.values() for r in runs)
    elif args.memory:
        indices = {c.name: i for i, c in enumerate(configs(args.histogram_every))}
        memory = {c.name: peak_rss_subprocess(indices[c.name], model_kind, args) for c in all_configs}
        _progress(f"[{model_kind}] memory runs done")
    every_twin = [run for runs in twins.values() for run in runs]
    rows = [_row(model_kind, bare.name, every_twin, every_twin, memory, args)]
    rows += [_row(model_kind, c.name, results[c.name], twins[c.name], memory, args) for c in all_configs[1:]]
    return rows


def _row(
    model_kind: str,
    name: str,
    runs: list[dict[str, Any]],
    twins: list[dict[str, Any]],
    memory: dict[str, float],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One configuration's row: its runs against their bare twins."""
    lockstep = args.device == "cpu"
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
        row["memory_ratio"] = memory[name] / memory["bare"]
    return row


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


@dataclass
class Target:
    description: str
    check: Callable[[dict[str, dict[str, Any]]], tuple[str, bool]]
    needs: tuple[str, ...]
    devices: tuple[str, ...] = ("cpu", "cuda")


def _percent(ratio: float) -> str:
    return f"{100 * (ratio - 1):+.1f}%"


def _time_at_most(config: str, limit: float) -> Callable[[dict[str, dict[str, Any]]], tuple[str, bool]]:
    def check(rows: dict[str, dict[str, Any]]) -> tuple[str, bool]:
        row = rows[config]
        spread = f"range {_percent(row['time_ratio_min'])} to {_percent(row['time_ratio_max'])}, "
        spread += f"CPU time {_percent(row['cpu_ratio'])}"
        if AGAIN in rows:
            spread += f"; noise floor {_percent(rows[AGAIN]['time_ratio'])}"
        return f"{_percent(row['time_ratio'])} ({spread})", row["time_ratio"] - 1 <= limit

    return check


def _cheaper_than_anomaly(rows: dict[str, dict[str, Any]]) -> tuple[str, bool]:
    anomaly = rows[ANOMALY]["time_ratio"] - 1
    loss = rows["LossSpikeMonitor()"]["time_ratio"] - 1
    both = f"detect_anomaly {100 * anomaly:+.1f}%, LossSpikeMonitor {100 * loss:+.1f}%"
    if loss <= 0:
        return f"{both} (below the noise)", anomaly > 0
    return f"{anomaly / loss:.0f}x ({both})", anomaly / loss >= 20


def _memory_growth(rows: dict[str, dict[str, Any]]) -> tuple[str, bool]:
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
]


def check_targets(rows: list[dict[str, Any]], device: str) -> list[dict[str, Any]]:
    """One entry per (model, target): what was measured and whether the target is met."""
    verdicts = []
    for model in dict.fromkeys(row["model"] for row in rows):
        by_config = {row["config"]: row for row in rows if row["model"] == model}
        for target in TARGETS:
            if device in target.devices and all(name in by_config for name in target.needs):
                measured, met = target.check(by_config)
                verdicts.append({"model": model, "target": target.description, "measured": measured, "met": met})
    return verdicts


def scaling(args: argparse.Namespace, log_dir: Path) -> list[dict[str, Any]]:
    """Extra time per step against what is measured, on the ResNet-style CNN: against its width (``DeadUnits()``
    at defaults, and the activation monitor measuring every step), and against the activation monitor's sampling
    interval. Each width, and the interval sweep, is one group run in lockstep with its own bare run; groups are
    shuffled per repetition."""
    groups: list[tuple[str, int, list[tuple[int, Config]]]] = [
        (
            "width",
            width,
            [
                (width, Config("DeadUnits()", lambda: [du.DeadUnits()])),
                (
                    width,
                    Config(EVERY_STEP, lambda: [du.ActivationMonitor(every_n_steps=1, log_every_n_samples=CADENCE)]),
                ),
            ],
        )
        for width in args.widths
    ]
    intervals = [
        (
            interval,
            Config(
                f"ActivationMonitor(every_n_steps={interval})",
                lambda i=interval: [du.ActivationMonitor(every_n_steps=i)],  # type: ignore[misc]
            ),
        )
        for interval in args.intervals
    ]
    groups.append(("every_n_steps", args.width, intervals))
    runs: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    order_rng = random.Random(0)
    for repetition in range(args.repeats):
        order_rng.shuffle(groups)
        for sweep, width, points in groups:
            jobs = [(Config("bare"), "resnet", width), *((config, "resnet", width) for _, config in points)]
            order_rng.shuffle(jobs)
            for (config, _, _), result in zip(jobs, run_repetition(jobs, args, log_dir), strict=True):
                runs.setdefault((sweep, width, config.name), []).append(result)
        _progress(f"[scaling] repetition {repetition + 1}/{args.repeats} done")
    rows = []
    for sweep, width, points in sorted(groups, key=lambda group: (group[0] != "width", group[1])):
        model, _, _ = build_model("resnet", width)
        reference = runs[(sweep, width, "bare")]
        for value, config in points:
            monitored = runs[(sweep, width, config.name)]
            ratio, extra = _overhead(monitored, reference, "wall", args.device == "cpu")
            extra_cpu = _overhead(monitored, reference, "cpu", args.device == "cpu")[1]
            ratios = [_ratio(m, b, "wall") for m, b in zip(monitored, reference, strict=True)]
            rows.append(
                {
                    "sweep": sweep,
                    "value": value,
                    "config": config.name,
                    "width": width,
                    "parameters": sum(p.numel() for p in model.parameters()),
                    "activation_values": activation_values(model, 32),
                    "bare_ms_per_step": 1000 * statistics.median(statistics.fmean(b["wall"]) for b in reference),
                    "extra_ms_per_step": 1000 * extra,
                    "extra_cpu_ms_per_step": 1000 * extra_cpu,
                    "time_ratio": ratio,
                    "time_ratio_min": min(ratios),
                    "time_ratio_max": max(ratios),
                }
            )
    return rows


def activation_values(model: nn.Module, batch_size: int) -> int:
    """Values the activation monitor reads in one sampled step (outputs of the watched activation modules)."""
    total = 0

    def count(module: nn.Module, inputs: Any, output: Tensor) -> None:
        nonlocal total
        total += output.numel()

    handles = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, DEFAULT_ACTIVATION_TYPES)]
    with torch.no_grad():
        model(torch.zeros(batch_size, 3, 16, 16))
    for handle in handles:
        handle.remove()
    return total


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
    if verdicts:
        lines += ["", "| model | target | measured | met |", "| --- | --- | --- | --- |"]
        for verdict in verdicts:
            met = "yes" if verdict["met"] else "**no**"
            lines.append(f"| {verdict['model']} | {verdict['target']} | {verdict['measured']} | {met} |")
    return "\n".join(lines) + "\n"


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


def one_core() -> None:
    """Run every thread of this process (and its children) on one CPU core.

    A run whose thread sits on a slower core (a busy hyperthread sibling, a noisy neighbour of a virtual CPU)
    stays slower for its whole length; on one core, runs that take turns see the same core. Only one training
    thread runs at a time anyway.
    """
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})


def steady_allocator() -> None:
    """Make glibc's malloc keep and reuse freed memory, in one arena, before any run starts.

    By default each thread gets its own arena, and large blocks are mapped and unmapped (or a heap's top trimmed)
    as they come and go, so the page faults of re-mapping a tensor's memory differ from thread to thread and from
    run to run by several percent of a step. Every configuration runs under the same settings. Nothing happens
    where glibc is not the C library.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    mallopt(m_arena_max, 1)
    mallopt(m_mmap_threshold, 32 * 2**20)  # glibc's largest
    mallopt(m_trim_threshold, 2**30)


def _progress(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


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
    parser.add_argument("--models", nargs="+", default=["mobilenet", "resnet"], choices=["mobilenet", "resnet", "tiny"])
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
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default="mobilenet", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.steps, args.warmup, args.repeats, args.memory = ["tiny"], 4, 2, 1, False
        args.widths, args.intervals, args.width = [4], [2], 4
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    _quiet()
    one_core()
    steady_allocator()
    torch.set_num_threads(args.threads)
    log_dir = args.out / "tmp"
    if args.child is not None:
        config = configs(args.histogram_every)[args.child]
        result = train(config, seeded_model(args.model, args.width), args, log_dir / "child")
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
            verdicts = check_targets(rows, args.device)
            name, text = f"overhead-{args.device}", overhead_markdown(rows, verdicts, machine)
    finally:
        if not args.keep_logs:
            shutil.rmtree(log_dir, ignore_errors=True)
    if args.smoke:
        name += "-smoke"
    args.out.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) for k, v in vars(args).items() if k not in ("child", "model")}
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine,
        "settings": settings,
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
        "targets": verdicts,
    }
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
