"""Transformer LM: FFN neurons dying at a high learning rate against a stable twin, and a corrupted batch caught.

A small character-level transformer (``char_lm.CharLM``: ``nn.TransformerEncoderLayer`` blocks, ReLU applied as a
function inside the layer) learns the standard library's sources, offline, twice with ``DeadUnits()``:

- **high LR** (AdamW at ``--high-lr``): feed-forward ReLU neurons die; ``ActivationMonitor`` sees them through
  the layers' functional ``F.relu`` calls (sites ``model.encoder.layers.<i>:relu#0``, channels = FFN width);
- **stable** (AdamW at 3e-3): none die. At one step a callback corrupts 20 of the batch's 32 windows (random
  characters in, NUL characters to predict); ``LossSpikeMonitor`` (``ratio=1.5, z_score=4``: a short run's
  baseline is noisy) flags the spike at that step, skips its update and dumps the batch, and the script reads the
  dump back: the corrupted sequences rank first by per-sample loss, printed as text.

TensorBoard panels (activations per FFN site, kernels per attention head, embeddings apart, loss and spikes) land
in ``<out>/high_lr`` and ``<out>/stable``; ``<out>/summary.json`` holds the numbers.

Run: ``python examples/transformer_lm.py`` (about 2 minutes on 2 CPU cores); ``--fast`` (or ``DEADUNITS_FAST=1``)
trains a tinier model for fewer steps, for the tests.
"""

import argparse
import json
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from char_lm import VOCAB, CharLMModule, char_windows, stdlib_text
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_deadunits import ActivationMonitor, DeadUnits, KernelNormMonitor
from lightning_deadunits.callbacks.loss_spike_monitor import LossSpikeMonitor
from lightning_deadunits.dumps import load_dump

CORRUPTED = tuple(i for i in range(32) if i % 8 not in (0, 3, 6))  # the dirty batch's corrupted windows (20 of 32)
STABLE_LR = 3e-3


class CorruptedBatchInjector(pl.Callback):
    """At global step ``step``, replaces the ``CORRUPTED`` windows' inputs with random characters and their
    targets with NUL, which source text never holds (a binary file read as text)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, i: int) -> None:
        if trainer.global_step == self.step:
            codes, targets, _ = batch
            generator = torch.Generator().manual_seed(self.step)
            rows = list(CORRUPTED)
            codes[rows] = torch.randint(VOCAB // 2, VOCAB, codes[rows].shape, generator=generator)
            targets[rows] = 0


def _text(codes: torch.Tensor, width: int = 48) -> str:
    return repr("".join(chr(int(code)) for code in codes[:width]))


def _train(
    name: str, lr: float, args: argparse.Namespace, sizes: dict[str, int], callbacks: list[pl.Callback]
) -> tuple[DeadUnits, ActivationMonitor]:
    pl.seed_everything(0, verbose=False)
    data = char_windows(stdlib_text(sizes["chars"]), seq_len=sizes["seq_len"])
    module = CharLMModule(data, lr=lr, width=sizes["width"], ffn=sizes["ffn"], layers=2, heads=4)
    activations = ActivationMonitor(every_n_steps=5, window=4, log_images=not args.fast)
    bundle = DeadUnits(
        kernels=KernelNormMonitor(every_n_steps=10, log_images=not args.fast),
        activations=activations,
        loss=LossSpikeMonitor(window=sizes["window"], warmup=sizes["warmup"], ratio=1.5, z_score=4.0, skip_update=True),
    )
    trainer = pl.Trainer(
        max_steps=sizes["steps"],
        callbacks=[*callbacks, bundle],
        logger=TensorBoardLogger(args.out, name=name, version=""),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        log_every_n_steps=5,
    )
    trainer.fit(module)
    return bundle, activations


def _ffn_dead(activations: ActivationMonitor) -> dict[str, float]:
    return {
        key.split("/")[2]: value
        for key, value in activations.readings.items()
        if key.endswith("/dead") and ":relu#" in key and "/val/" not in key
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/transformer_lm"))
    parser.add_argument("--high-lr", type=float, default=1e-1)
    parser.add_argument("--fast", action="store_true", default=os.environ.get("DEADUNITS_FAST") == "1")
    args = parser.parse_args()
    if args.fast:
        sizes = dict(chars=60_000, seq_len=32, width=32, ffn=128, steps=60, window=20, warmup=15, dirty=55)
    else:
        sizes = dict(chars=200_000, seq_len=64, width=64, ffn=256, steps=150, window=60, warmup=40, dirty=120)

    _, high = _train("high_lr", args.high_lr, args, sizes, [])
    stable_bundle, stable = _train("stable", STABLE_LR, args, sizes, [CorruptedBatchInjector(sizes["dirty"])])
    high_dead, stable_dead = _ffn_dead(high), _ffn_dead(stable)
    print(f"\nFFN neurons dead at the end (of {sizes['ffn']} per layer):")
    for site in sorted(high_dead):
        print(f"  {site}: high LR {high_dead[site]:.0f}, stable {stable_dead.get(site, 0.0):.0f}")

    spikes = stable_bundle.loss
    assert spikes is not None
    print(f"\nCorrupted batch injected at step {sizes['dirty']}; spikes flagged at steps {spikes.spike_steps}.")
    event = next((event for event in spikes.events if event["step"] == sizes["dirty"]), None)
    ranked: list[int] = []
    if event is not None and event["dump"] is not None:
        batch, metadata = load_dump(event["dump"])
        codes = batch[0]
        ranked = torch.argsort(metadata["per_sample_loss"], descending=True)[: len(CORRUPTED)].tolist()
        print(f"Update skipped: {event['skipped_update']}; dump: {event['dump']}")
        clean = [i for i in range(len(codes)) if i not in CORRUPTED]
        print(f"Windows by per-sample loss (highest first; {len(ranked) - 4} more corrupted, then clean ones):")
        for index in ranked[:4] + clean[:2]:
            loss = float(metadata["per_sample_loss"][index])
            print(f"  #{index:<3} loss {loss:6.3f}  {_text(codes[index])}")
    verdict = "yes" if sorted(ranked) == sorted(CORRUPTED) else "no"
    print(f"Corrupted windows ranked first: {verdict}")
    summary = {
        "ffn": sizes["ffn"],
        "high_lr": {"lr": args.high_lr, "ffn_dead": high_dead},
        "stable": {"lr": STABLE_LR, "ffn_dead": stable_dead},
        "dirty_step": sizes["dirty"],
        "spike_steps": spikes.spike_steps,
        "dump": None if event is None else event["dump"],
        "corrupted_ranked_first": verdict == "yes",
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"TensorBoard logs in {args.out}; view with: tensorboard --logdir {args.out}")


if __name__ == "__main__":
    main()
