"""What the image panels and histograms of ``DeadUnits()`` cost on a model, apart from the timed window.

At its defaults the bundle draws images far less often than it logs (kernel images every ``images_every_n_checks``
checks, activation band charts every ``images_every_n_logs`` logs), so a 100-step timed window may hold none and
its ratio alone would hide them. This measures them directly: each monitor, with the bundle's settings but checking
(or logging) at every step and drawing at every check, trains the model for a few steps beside a TensorBoard logger;
the time of each check's or log's panels is split into histograms (timed in the panel writer) and images (the rest:
drawing the figures, encoding and writing them; wall time, and the training thread's CPU time beside it in the
JSON). The first rounds are left out (figure creation, font caches).

The amortised share of training time is the cost of one round over the steps between two rounds at the bundle's
defaults, read from ``DeadUnits()`` itself: ``images_ms / (steps_per_round * ms_per_step)`` with the bare run's
time per step (see ``report.image_shares``).
"""

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger

import lightning_deadunits as du
from lightning_deadunits.panels.tensorboard import TensorBoardPanels
from models import BenchModule, build_model


class TimedPanels(TensorBoardPanels):
    """The monitors' panel writer, timing its histograms and counting its images."""

    def __init__(self) -> None:
        self.histogram_seconds = 0.0
        self.histogram_cpu_seconds = 0.0
        self.histograms = 0
        self.images = 0

    def histogram(self, trainer: "pl.Trainer", tag: str, values: torch.Tensor, step: int) -> None:
        began, began_cpu = time.perf_counter(), time.thread_time()
        super().histogram(trainer, tag, values, step)
        self.histogram_seconds += time.perf_counter() - began
        self.histogram_cpu_seconds += time.thread_time() - began_cpu
        self.histograms += 1

    def image(self, trainer: "pl.Trainer", tag: str, image: np.ndarray, step: int) -> None:
        super().image(trainer, tag, image, step)
        self.images += 1


def _timed_rounds(monitor: Any, panels: TimedPanels) -> list[dict[str, float]]:
    """Wrap ``monitor.drawing.write`` (every check's or log's panels) so that each call records a round."""
    rounds: list[dict[str, float]] = []
    write: Callable[..., None] = monitor.drawing.write

    def timed(*args: Any, **kwargs: Any) -> None:
        before = (panels.histogram_seconds, panels.histograms, panels.images, panels.histogram_cpu_seconds)
        began, began_cpu = time.perf_counter(), time.thread_time()
        write(*args, **kwargs)
        total, total_cpu = time.perf_counter() - began, time.thread_time() - began_cpu
        histograms = panels.histogram_seconds - before[0]
        rounds.append(
            {
                "histogram_ms": 1000 * histograms,
                "histograms": panels.histograms - before[1],
                "image_ms": 1000 * (total - histograms),
                "image_cpu_ms": 1000 * (total_cpu - (panels.histogram_cpu_seconds - before[3])),
                "images": panels.images - before[2],
            }
        )

    monitor.drawing.write = timed
    return rounds


def image_cost(model_kind: str, width: int, steps: int = 12, warmup: int = 2) -> dict[str, float]:
    """ms per round of images and of histograms of each monitor with the bundle's settings, and the steps between
    two rounds at the bundle's defaults (one torch thread is the caller's business)."""
    bundle = du.DeadUnits()
    kernels, activations = bundle.kernels, bundle.activations
    assert kernels is not None and activations is not None
    monitors = {
        "kernels": du.KernelNormMonitor(
            every_n_steps=1, images_every_n_checks=1, heatmap_layers=kernels.heatmap_layers
        ),
        "activations": du.ActivationMonitor(
            every_n_steps=1, log_every_n_samples=1, images_every_n_logs=1, band_layers=activations.band_layers
        ),
    }
    result: dict[str, float] = {
        "kernel_steps_per_round": float(kernels.every_n_steps),
        "kernel_steps_per_image_round": float(kernels.every_n_steps * kernels.images_every_n_checks),
        "activation_steps_per_round": float(activations.every_n_steps * (activations.log_every_n_samples or 1)),
        "activation_steps_per_image_round": float(
            activations.every_n_steps * (activations.log_every_n_samples or 1) * activations.images_every_n_logs
        ),
    }
    for name, monitor in monitors.items():
        panels = TimedPanels()
        monitor.panels = panels
        rounds = _timed_rounds(monitor, panels)
        with tempfile.TemporaryDirectory() as log_dir:
            trainer = pl.Trainer(
                max_steps=steps,
                accelerator="cpu",
                callbacks=[monitor],
                logger=TensorBoardLogger(Path(log_dir), name=""),
                enable_progress_bar=False,
                enable_model_summary=False,
                enable_checkpointing=False,
                num_sanity_val_steps=0,
            )
            trainer.fit(BenchModule(*build_model(model_kind, width)))
        measured = rounds[warmup:-1] or rounds  # the train-end round repeats the last step's
        for key in ("image_ms", "image_cpu_ms", "histogram_ms", "images", "histograms"):
            result[f"{name}_{key}"] = statistics.median(entry[key] for entry in measured)
    return result
