"""Max vs average pooling: the max-pooled last feature of the same backbone ends up with far more exact zeros.

Two CNNs share everything (architecture, initial weights, data, SGD recipe) except the global pooling that turns
the last ReLU feature map into the feature vector: ``AdaptiveMaxPool2d`` or ``AdaptiveAvgPool2d``. Both poolings
output 0 for a channel exactly when its whole map is 0, so any difference in zeros comes from training: the
max-pooled features are larger, training overshoots, and channels whose ReLU never fires again stay dead. As in
the field notes this example reproduces (43% vs 12% zeros over a test set), :class:`ActivationMonitor` runs the
whole validation set through each model (``on_validation=True``) and measures the pooled feature
(``pooling=True``): its zero fraction, its channels that are 0 on every validation image, and its largest value.

It writes TensorBoard logs (``tensorboard --logdir runs/pool_sparsity``), ``report.md`` and ``summary.json``.

Run: ``python examples/pool_sparsity.py`` (about a minute on 2 CPU cores); ``--fast`` (or ``DEADUNITS_FAST=1``)
trains four short epochs, for the tests.
"""

import argparse
import json
import os
from pathlib import Path

import lightning.pytorch as pl
import torch
from digits_demo import DigitsClassifier
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn

from lightning_deadunits.callbacks.activation_monitor import ActivationMonitor

POOLS = {"max": nn.AdaptiveMaxPool2d, "avg": nn.AdaptiveAvgPool2d}
FEATURE = "model.pool"


class PooledCNN(nn.Module):
    """Three 3x3 conv + ReLU layers (two with stride 2), global pooling into the feature vector, a linear head."""

    def __init__(self, pool: str, width: int = 32, features: int = 64) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1, stride=2),
            nn.ReLU(),
            nn.Conv2d(width, features, 3, padding=1, stride=2),
            nn.ReLU(),
        )
        self.pool = POOLS[pool](1)
        self.head = nn.Linear(features, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))  # type: ignore[no-any-return]


def train(pool: str, epochs: int, out: Path) -> dict[str, float]:
    pl.seed_everything(0, verbose=False)  # the same initial weights for both poolings
    monitor = ActivationMonitor(every_n_steps=10, pooling=True, on_validation=True)
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[monitor],
        logger=TensorBoardLogger(out, name=pool, version=""),
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=10,
    )
    model = DigitsClassifier(PooledCNN(pool), optimizer="sgd", lr=0.05, weight_decay=0.0, batch_size=64, image_size=16)
    trainer.fit(model)
    readings = monitor.validation_readings
    return {
        "val_acc": float(trainer.callback_metrics.get("val_acc", torch.tensor(float("nan")))),
        "zero_frac": readings[monitor.key("val", FEATURE, "zero_frac")],
        "dead": readings[monitor.key("val", FEATURE, "dead")],
        "channels": float(model.model.head.in_features),
        "max_abs": readings[monitor.key("val", FEATURE, "max_abs")],
        "backbone_zero_frac": readings[monitor.key("val", "model.features.5", "zero_frac")],
    }


def report(results: dict[str, dict[str, float]]) -> str:
    lines = [
        "| pooling | val acc | zeros in pooled feature | channels 0 on every val image | max feature value "
        "| zeros in last ReLU map |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for pool, r in results.items():
        lines.append(
            f"| {pool} | {r['val_acc']:.3f} | {r['zero_frac']:.1%} | {r['dead']:.0f} / {r['channels']:.0f} "
            f"| {r['max_abs']:.2f} | {r['backbone_zero_frac']:.1%} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("runs/pool_sparsity"))
    parser.add_argument("--fast", action="store_true", default=os.environ.get("DEADUNITS_FAST") == "1")
    args = parser.parse_args()
    epochs = 4 if args.fast else args.epochs
    results = {pool: train(pool, epochs, args.out) for pool in POOLS}
    text = report(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text("# Pooled-feature sparsity: max vs average pooling\n\n" + text)
    (args.out / "summary.json").write_text(json.dumps(results, indent=2))
    print(text)
    print(f"TensorBoard logs, report.md and summary.json in {args.out}; view with: tensorboard --logdir {args.out}")


if __name__ == "__main__":
    main()
