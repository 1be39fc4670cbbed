"""Zero kernels: train a small MobileNet-like CNN with Adam and with SGD, and count the collapsed filters.

Adam with coupled L2 weight decay drives many filters (mostly depthwise, mostly deep) to a tiny fraction of
their layer's typical norm; SGD with momentum on the same model and data leaves none. The run shows which run is
training (``[1/2] adam``) with a progress bar (rich's in a terminal, Lightning's tqdm bar otherwise), then
writes TensorBoard logs (``tensorboard --logdir runs/zero_kernels``; ``DeadUnits`` also logs activations and the
loss), ``report.md`` with the per-layer table and ``report.html`` (``deadunits report --html``: every figure and
event, one file).

Run: ``python examples/zero_kernels.py`` (about three minutes on 2 CPU cores); ``--fast`` (or
``DEADUNITS_FAST=1``) runs a few batches only, for the tests.
"""

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from digits_demo import DigitsClassifier
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_deadunits import DeadUnits, KernelNormMonitor
from lightning_deadunits.cli.report import write_html

RECIPES = {"adam": 5e-3, "sgd": 0.05}


def progress_bar() -> ProgressBar:
    """rich's progress bar in a terminal when rich is installed (the ``examples`` extra), else Lightning's tqdm bar.

    rich draws nothing until the end when its output is not a terminal; tqdm's bar still shows progress in a pipe.
    """
    try:
        import rich  # noqa: F401
    except ImportError:
        return TQDMProgressBar()
    return RichProgressBar() if sys.stdout.isatty() else TQDMProgressBar()


def train(optimizer: str, epochs: int, out: Path, fast: bool) -> tuple[KernelNormMonitor, float]:
    pl.seed_everything(0, verbose=False)
    monitor = KernelNormMonitor(every_n_steps=45)  # one check per epoch of 45 batches
    trainer = pl.Trainer(
        max_epochs=epochs,
        limit_train_batches=5 if fast else 1.0,
        limit_val_batches=1 if fast else 1.0,
        callbacks=[DeadUnits(kernels=monitor), progress_bar()],
        logger=TensorBoardLogger(out, name=optimizer, version=""),
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=10,
    )
    trainer.fit(DigitsClassifier(optimizer=optimizer, lr=RECIPES[optimizer]))
    return monitor, float(trainer.callback_metrics.get("val_acc", torch.tensor(float("nan"))))


def report(results: dict[str, tuple[KernelNormMonitor, float]]) -> str:
    adam, sgd = results["adam"][0], results["sgd"][0]
    lines = [
        "| layer | kind | filters | dead (Adam) | dead (SGD) |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for name, kind in adam.probe.kinds.items():
        filters = adam.probe.layers[name].weight.shape[0] if kind != "transpose" else "?"
        lines.append(
            f"| {name} | {kind} | {filters} | {adam.dead_counts.get(name, 0):.0f} "
            f"| {sgd.dead_counts.get(name, 0):.0f} |"
        )
    lines.append(
        f"| **total** | | | **{sum(adam.dead_counts.values()):.0f}** | **{sum(sgd.dead_counts.values()):.0f}** |"
    )
    lines += ["", "Validation accuracy: " + ", ".join(f"{opt} {acc:.3f}" for opt, (_, acc) in results.items())]
    lines += ["", "Dead filters (any rule) at each check:", "", "| step | Adam | SGD |", "| ---: | ---: | ---: |"]
    for a, s in zip(adam.history, sgd.history, strict=False):
        lines.append(f"| {a['step']:.0f} | {a['dead']:.0f} | {s['dead']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--out", type=Path, default=Path("runs/zero_kernels"))
    parser.add_argument("--fast", action="store_true", default=os.environ.get("DEADUNITS_FAST") == "1")
    args = parser.parse_args()
    epochs = 1 if args.fast else args.epochs
    results = {}
    for number, optimizer in enumerate(RECIPES, start=1):
        print(f"[{number}/{len(RECIPES)}] training with {optimizer} for {epochs} epochs", flush=True)
        results[optimizer] = train(optimizer, epochs, args.out, args.fast)
        dead = sum(results[optimizer][0].dead_counts.values())
        print(f"[{number}/{len(RECIPES)}] {optimizer} done: {dead:.0f} dead filters", flush=True)
    text = report(results)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text("# Zero kernels: Adam vs SGD\n\n" + text)
    html = write_html(args.out, args.out / "report.html")
    print(text)
    print(f"TensorBoard logs: {args.out}/adam and {args.out}/sgd")
    print(f"Reports: {args.out / 'report.md'} (the tables above) and {html} (figures, spikes, alarms; one file)")
    print(f"Open the logs with:   tensorboard --logdir {args.out}")
    print(f"Open the report with: python -m webbrowser {html.resolve()}")


if __name__ == "__main__":
    main()
