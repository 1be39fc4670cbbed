"""Spike dump: inject a dirty batch into training, catch the loss spike, and find the dirty samples in its dump.

A small CNN trains on scikit-learn's digits (offline, through the demo's ``DigitsClassifier``, whose
``training_step`` returns per-sample losses). At one step a callback corrupts a few
samples of the batch the way dirty data does (inputs blown up, labels wrong). ``LossSpikeMonitor`` flags the
loss spike at exactly that step, skips its update, and dumps the batch with the per-sample losses;
``KernelNormMonitor`` runs alongside, so the spike event says how
many kernels died after it. The script then reads the dump back with ``load_dump`` and prints it the way
``deadunits dump show PATH`` does: the corrupted samples come first in the ranking.

Run: ``python examples/spike_dump.py`` (under a minute on 2 CPU cores); ``--fast`` (or ``DEADUNITS_FAST=1``)
trains a tinier model for 40 steps, for the tests.
"""

import argparse
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from digits_demo import DigitsClassifier
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_deadunits import KernelNormMonitor
from lightning_deadunits.callbacks.loss_spike_monitor import LossSpikeMonitor
from lightning_deadunits.cli.dump import show
from lightning_deadunits.dumps import load_dump

CORRUPTED = (3, 17, 29)  # positions, in the dirty batch, of the samples the injector corrupts


class DirtyBatchInjector(pl.Callback):
    """At global step ``step``, scales the inputs of the ``CORRUPTED`` samples by ``scale`` and shifts their labels."""

    def __init__(self, step: int, scale: float = 20.0) -> None:
        self.step = step
        self.scale = scale

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        if trainer.global_step == self.step:
            images, labels = batch
            rows = list(CORRUPTED)
            images[rows] *= self.scale
            labels[rows] = (labels[rows] + 5) % 10


def small_cnn(image_size: int, width: int) -> nn.Module:
    """One 3x3 convolution and a linear head: learns the digits within a few dozen steps."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(width * image_size**2, 10)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/spike_dump"))
    parser.add_argument("--fast", action="store_true", default=os.environ.get("DEADUNITS_FAST") == "1")
    args = parser.parse_args()

    pl.seed_everything(0, verbose=False)
    image_size, width = (8, 8) if args.fast else (16, 16)
    model = DigitsClassifier(small_cnn(image_size, width), image_size=image_size, lr=1e-2)
    dirty_step, window, warmup, steps = (36, 30, 20, 40) if args.fast else (120, 60, 40, 135)
    spikes = LossSpikeMonitor(window=window, warmup=warmup, skip_update=True)
    kernels = KernelNormMonitor(every_n_steps=5, log_images=False)
    trainer = pl.Trainer(
        max_steps=steps,
        limit_val_batches=0,
        callbacks=[DirtyBatchInjector(dirty_step), spikes, kernels],
        logger=TensorBoardLogger(args.out, name="", version=""),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=5,
    )
    trainer.fit(model)

    print(f"\nDirty batch injected at step {dirty_step}; spikes flagged at steps {spikes.spike_steps}.")
    event = next((event for event in spikes.events if event["step"] == dirty_step), None)
    if event is None or event["dump"] is None:
        raise SystemExit(f"no dump for step {dirty_step}: the spike was not caught")
    print(f"Update of step {dirty_step} skipped: {event['skipped_update']}; dump: {event['dump']}\n")
    show(argparse.Namespace(path=Path(event["dump"]), json=False, top=len(CORRUPTED) + 2))

    _, metadata = load_dump(event["dump"])
    ranked = torch.argsort(metadata["per_sample_loss"], descending=True)[: len(CORRUPTED)].tolist()
    verdict = "yes" if sorted(ranked) == sorted(CORRUPTED) else "no"
    print(f"\nCorrupted samples {list(CORRUPTED)}; top {len(CORRUPTED)} by per-sample loss: {ranked}.")
    print(f"Corrupted samples ranked first: {verdict}")
    print(f"TensorBoard logs in {args.out}; view with: tensorboard --logdir {args.out}")


if __name__ == "__main__":
    main()
