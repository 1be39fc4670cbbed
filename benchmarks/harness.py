"""How a configuration is trained and timed beside a bare run.

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

The timed window starts at the end of step ``--warmup`` (so one-off costs such as the fit-start kernel check, the
BatchNorm pairing forward, logger start-up and allocator warm-up are excluded from every configuration alike) and
ends at the end of the last step; ``--steps - --warmup`` should be a multiple of the monitors' 100-step cadence
(``DeadUnits()`` checks kernel norms and logs activations every 100 steps) so that periodic checks are amortised
exactly. The CPU time of the training thread is recorded beside the wall time.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` over the timed window. On CPU, the entry point runs each
configuration once more, alone, in a fresh process whose peak RSS is reset when the timed window starts
(``/proc/self/clear_refs``) and read at its end.

A run's result is a dict: ``wall`` and ``cpu`` (seconds of each timed step) and ``peak_memory`` (bytes).
"""

import argparse
import contextlib
import ctypes
import gc
import itertools
import math
import os
import random
import resource
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from models import BenchModule, Built, build_model

BARE = "bare"
"""The reference configuration's name: nothing measured."""


@dataclass
class Config:
    """A configuration under test: its name in the tables, the callbacks it adds, and whether it turns on
    PyTorch's anomaly detection."""

    name: str
    callbacks: Callable[[], list[pl.Callback]] = list
    detect_anomaly: bool = False

    def build_callbacks(self, lockstep: bool) -> list[pl.Callback]:
        return [*self.callbacks(), *([AnomalyDetection()] if self.detect_anomaly and lockstep else [])]

    def trainer_options(self, lockstep: bool) -> dict[str, Any]:
        return {"detect_anomaly": self.detect_anomaly and not lockstep}


class AnomalyDetection(pl.Callback):
    """``Trainer(detect_anomaly=True)`` for lockstep runs: the trainer flag sets process-wide state for the whole
    fit, which would leak into the runs stepping beside it, so this turns it on for this run's steps only."""

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        torch.autograd.set_detect_anomaly(True)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        torch.autograd.set_detect_anomaly(False)


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
    when the window opens and reads them when it closes (so the one-off work of ``on_train_end``, such as the final
    figures, is outside both). Put last, so that every other callback's hooks are in the step.

    With a ``lockstep``, the run hands the turn on after each step and a step is timed from the moment it gets the
    turn back. Without (CUDA), a CUDA event is recorded at the end of each step and the wall time of a step is the
    time between two events on the device's timeline, read once the run ends: a sync per step would hide the very
    syncs the monitors must not make.
    """

    def __init__(self, warmup: int, lockstep: Lockstep | None = None, run: int = 0) -> None:
        self.warmup = warmup
        self.lockstep = lockstep
        self.run = run
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.resumed = (0.0, 0.0)
        self.events: list[torch.cuda.Event] = []
        self.peak_memory = math.nan

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.lockstep is not None:
            self.lockstep.start(self.run)
        self.resumed = _clocks()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step in (self.warmup, trainer.max_steps):
            _sync()
        now = _clocks()
        if self.lockstep is None and _cuda_running() and trainer.global_step >= self.warmup:
            self.events.append(torch.cuda.Event(enable_timing=True))  # type: ignore[no-untyped-call]
            self.events[-1].record()
        if trainer.global_step == self.warmup:
            reset_peak_memory()
        elif trainer.global_step == trainer.max_steps:
            self.peak_memory = read_peak_memory("cuda" if _cuda_running() else "cpu")
        if trainer.global_step > self.warmup:
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
        if len(self.events) == len(self.wall) + 1:  # the device's own step times replace the host's
            self.events[-1].synchronize()
            self.wall = [start.elapsed_time(end) / 1000 for start, end in itertools.pairwise(self.events)]

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.on_train_end(trainer, pl_module)


def _clocks() -> tuple[float, float]:
    return time.perf_counter(), time.thread_time()


def _cuda_running() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()  # type: ignore[no-untyped-call]


def _sync() -> None:
    if _cuda_running():
        torch.cuda.synchronize()


def reset_peak_memory() -> None:
    """Reset the CUDA peak-allocation counter, or the process's peak RSS (Linux), so peaks cover the window only."""
    if _cuda_running():
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


Job = tuple[Config, str, int]
"""A configuration, the model it trains and the model's width."""


def train(
    config: Config,
    built: Built,
    args: argparse.Namespace,
    log_dir: Path,
    lockstep: Lockstep | None = None,
    run: int = 0,
) -> dict[str, Any]:
    """Train one configuration; return its per-step wall and CPU seconds over the timed window, and peak memory."""
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
    trainer.fit(BenchModule(*built))
    assert timer.wall, "the run ended before the timed window"
    return {"wall": timer.wall, "cpu": timer.cpu, "peak_memory": timer.peak_memory}


def run_lockstep(jobs: list[Job], args: argparse.Namespace, log_dir: Path) -> list[dict[str, Any]]:
    """Train ``(config, model, width)`` jobs at the same time, one thread each, taking turns step by step in the
    order given; return their results in that order."""
    lockstep = Lockstep(len(jobs))
    results: list[dict[str, Any] | BaseException | None] = [None] * len(jobs)

    def work(run: int, config: Config, built: Built) -> None:
        try:
            results[run] = train(config, built, args, log_dir / str(run), lockstep, run)
        except BaseException as error:
            results[run] = error
            lockstep.finish(run)

    # Built here, one after another, so that every run starts from the same initial weights.
    threads = [
        threading.Thread(target=work, args=(run, config, build_model(model_kind, width)))
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


def run_repetition(jobs: list[Job], args: argparse.Namespace, log_dir: Path) -> list[dict[str, Any]]:
    """One repetition of ``jobs``: in lockstep on CPU, one after another on CUDA."""
    if args.device == "cpu":
        return run_lockstep(jobs, args, log_dir)
    results = []
    for config, model_kind, width in jobs:
        results.append(train(config, build_model(model_kind, width), args, log_dir))
    return results


def run_beside_twins(
    model_kind: str, bare: Config, monitored: list[Config], args: argparse.Namespace, log_dir: Path
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, list[dict[str, Any]]]]:
    """``--repeats`` repetitions of every ``monitored`` configuration, each run beside a bare twin of its own;
    return, by configuration name, the monitored runs' results and their twins' results, repetition by repetition.
    The order of the configurations, and which of a pair goes first, are drawn per repetition."""
    results: dict[str, list[dict[str, Any]]] = {c.name: [] for c in monitored}
    twins: dict[str, list[dict[str, Any]]] = {c.name: [] for c in monitored}
    order = list(monitored)
    order_rng = random.Random(0)
    for repetition in range(args.repeats):
        order_rng.shuffle(order)
        for config in order:
            pair = [bare, config]
            order_rng.shuffle(pair)
            jobs = [(member, model_kind, args.width) for member in pair]
            outcome = dict(zip((member is config for member in pair), run_repetition(jobs, args, log_dir), strict=True))
            results[config.name].append(outcome[True])
            twins[config.name].append(outcome[False])
        progress(f"[{model_kind}] repetition {repetition + 1}/{args.repeats} done")
    return results, twins


Group = tuple[str, int, list[tuple[int, Config]]]
"""A sweep's name, the model's width, and the points run together: each a swept value and its configuration."""


def run_groups(
    model_kind: str, groups: list[Group], args: argparse.Namespace, log_dir: Path
) -> dict[tuple[str, int, str], list[dict[str, Any]]]:
    """``--repeats`` repetitions of every group, its configurations and a bare run of its own in lockstep; return
    the results by ``(sweep, width, configuration name)``, repetition by repetition. The order of the groups, and
    of the runs in a group, are drawn per repetition."""
    runs: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    order = list(groups)
    order_rng = random.Random(0)
    for repetition in range(args.repeats):
        order_rng.shuffle(order)
        for sweep, width, points in order:
            jobs = [(Config(BARE), model_kind, width), *((config, model_kind, width) for _, config in points)]
            order_rng.shuffle(jobs)
            for (config, _, _), result in zip(jobs, run_repetition(jobs, args, log_dir), strict=True):
                runs.setdefault((sweep, width, config.name), []).append(result)
        progress(f"[scaling] repetition {repetition + 1}/{args.repeats} done")
    return runs


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


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


def progress(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)
