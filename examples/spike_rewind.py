"""Spike rewind: a burst of corrupted batches wrecks a run; ``Rewind`` recovers it to its clean twin, in memory.

An MLP trains with SGD on scikit-learn's digits (offline). A burst of consecutive batches is corrupted the way dirty
data does it (a few samples per batch with inputs blown up and wrong labels). Three runs, same seed:

- **without Rewind**: the burst's updates throw the weights far off (ReLU units die), and the run ends far worse;
- **with Rewind**: ``LossSpikeMonitor(skip_update=True)`` skips the first spike's update; the second spike (a
  repeat, or an episode going on) makes ``Rewind`` restore its in-memory snapshot from before the burst and skip the
  batches around it; training goes on from there without a restart;
- **clean twin**: the same run on the same data minus the batches ``Rewind`` skipped.

Prints each run's final loss and accuracy on the whole (clean) training set, and writes them to ``summary.json``.
In the fast mode (50 steps, within the first epoch) the rewound run ends bit for bit where the clean twin does; the
full run (400 steps, about 4.4 epochs, the burst coming back in each) rewinds once per epoch and ends within about
6% of the twin's loss (0.108 against 0.102, accuracy 0.970 against 0.976; the twin drops the same positions in
every epoch, the rewound run slightly different ones), while the run without it ends at 2.13 (accuracy 0.19).

Run: ``python examples/spike_rewind.py`` (under a minute on 2 CPU cores); ``--fast`` (or ``DEADUNITS_FAST=1``)
trains for 50 steps, for the tests.
"""

import argparse
import json
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from digits_demo import digits_dataset
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_deadunits import LossSpikeMonitor, Rewind

BATCH = 16
CORRUPTED = (2, 7, 11)  # positions, in each batch of the burst, of the corrupted samples


class DigitsMLP(pl.LightningModule):
    """64 -> 64 -> 10 MLP, SGD at LR 0.1, on an unshuffled loader of 16 images a batch."""

    def __init__(self, data: TensorDataset) -> None:
        super().__init__()
        self.data = data
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, labels = batch
        return F.cross_entropy(self.net(images), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.data, batch_size=BATCH, shuffle=False)


def with_burst(data: TensorDataset, burst: range, scale: float = 50.0) -> TensorDataset:
    """``data`` with the ``CORRUPTED`` samples of each batch of ``burst`` scaled by ``scale`` and mislabelled."""
    images, labels = (tensor.clone() for tensor in data.tensors)
    rows = [batch * BATCH + position for batch in burst for position in CORRUPTED]
    images[rows] *= scale
    labels[rows] = (labels[rows] + 5) % 10
    return TensorDataset(images, labels)


def train(data: TensorDataset, callbacks: list[pl.Callback], steps: int, out: Path) -> nn.Module:
    torch.manual_seed(0)
    module = DigitsMLP(data)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out,
    )
    trainer.fit(module)
    return module.net


def evaluate(net: nn.Module, data: TensorDataset) -> dict[str, float]:
    images, labels = data.tensors
    with torch.no_grad():
        logits = net(images)
    return {
        "loss": F.cross_entropy(logits, labels).item(),
        "accuracy": (logits.argmax(1) == labels).float().mean().item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/spike_rewind"))
    parser.add_argument("--fast", action="store_true", default=os.environ.get("DEADUNITS_FAST") == "1")
    args = parser.parse_args()
    steps, burst = (50, range(25, 30)) if args.fast else (400, range(60, 70))

    clean = digits_dataset(8, "train")
    dirty = with_burst(clean, burst)
    monitor = LossSpikeMonitor(window=10, warmup=5, skip_update=True, dump_dir=args.out / "dumps", max_dumps=0)
    rewind = Rewind(snapshot_every=5, keep=3, skip_batches=len(burst) + 3, window=50)
    results = {
        "without Rewind": evaluate(train(dirty, [], steps, args.out), clean),
        "with Rewind": evaluate(train(dirty, [monitor, rewind], steps, args.out), clean),
    }
    skipped = [(epoch, first, last) for epoch, first, last in rewind.skipped.ranges]
    kept = [row for row in range(len(clean)) if not any(first <= row // BATCH <= last for _, first, last in skipped)]
    # The twin drops the positions of every skipped range in every epoch: exact within the first epoch only.
    twin_data = TensorDataset(*(tensor[kept] for tensor in clean.tensors))
    results["clean twin"] = evaluate(train(twin_data, [], steps, args.out), clean)

    print(f"Burst of corrupted batches {burst.start}-{burst.stop - 1}; {steps} steps.")
    print(f"Rewinds: {rewind.count}; skipped batches (epoch, first, last): {skipped}")
    for name, result in results.items():
        print(f"{name:>15}: final loss {result['loss']:.4f}, accuracy {result['accuracy']:.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"steps": steps, "burst": [burst.start, burst.stop - 1], "rewinds": rewind.count, "skipped": skipped}
    (args.out / "summary.json").write_text(json.dumps({**summary, **results}, indent=2))


if __name__ == "__main__":
    main()
