"""Recycling dead units: train the demo's Adam model with and without `DeadUnitRecycler`, and compare.

Adam with coupled L2 weight decay is the zero-kernel recipe: filters that stop getting gradient are pulled to
zero by the decay. `KernelNormMonitor` checks both runs every 40 steps; in the second, `DeadUnitRecycler`
re-initialises up to a quarter of each layer's dead filters after each check (fresh incoming weights, zeroed
outgoing weights, reset Adam moments). Both runs start from the same weights and see the same batches. The
script prints, for both, the dead kernels of the final weights (a check after training) and the validation
accuracy, and writes TensorBoard logs (``tensorboard --logdir runs/recycle_dead_units``) and ``summary.json``.

Run: ``python examples/recycle_dead_units.py`` (a few minutes on 2 CPU cores); ``--fast`` (or
``DEADUNITS_FAST=1``) trains two epochs on 16-pixel digits with a check every 20 steps, for the tests (the
shortest run in which kernels die and recycling leaves fewer dead).
"""

import argparse
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from digits_demo import DigitsClassifier
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_deadunits import KernelNormMonitor
from lightning_deadunits.callbacks.dead_unit_recycler import DeadUnitRecycler


def train(recycle: bool, epochs: int, out: Path, fast: bool) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    # not a divisor of the 45 batches per epoch, so that no recycling comes right before a validation
    check_every = 20 if fast else 40
    monitor = KernelNormMonitor(every_n_steps=check_every, log_histograms=False)
    recycler = DeadUnitRecycler(every_n_steps=check_every, max_fraction=0.25, sources=["kernels"])
    trainer = pl.Trainer(
        max_epochs=epochs,
        limit_val_batches=1 if fast else 1.0,
        callbacks=[monitor, recycler] if recycle else [monitor],
        logger=TensorBoardLogger(out, name="with_recycler" if recycle else "without_recycler", version=""),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    model = DigitsClassifier(image_size=16 if fast else 32)
    trainer.fit(model)
    final = monitor.check(trainer, trainer.global_step)
    return {
        "dead_kernels": final["deadunits/kernels/total/dead"],
        "filters": final["deadunits/kernels/total/filters"],
        "val_acc": trainer.validate(model, verbose=False)[0]["val_acc"],
        "recycled": float(recycler.recycled_total),
        "recycle_events": [entry for entry in recycler.history if entry.get("recycled")],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path("runs/recycle_dead_units"))
    parser.add_argument("--fast", action="store_true", default=os.environ.get("DEADUNITS_FAST") == "1")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", module="lightning")
    epochs = 2 if args.fast else args.epochs
    results: dict[str, Any] = {
        "without recycler": train(False, epochs, args.out, args.fast),
        "with recycler": train(True, epochs, args.out, args.fast),
    }
    print(f"{'run':<18} {'dead kernels':>14} {'val acc':>8} {'recycled':>9}")
    for name, result in results.items():
        dead = f"{result['dead_kernels']:.0f}/{result['filters']:.0f}"
        print(f"{name:<18} {dead:>14} {result['val_acc']:>8.3f} {result['recycled']:>9.0f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
