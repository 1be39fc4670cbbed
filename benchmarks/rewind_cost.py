"""Cost of ``Rewind``: time per snapshot, its share of training time at the default cadence, and host memory per
snapshot against the model plus optimizer size.

Trains the char-level transformer LM of ``examples/char_lm.py`` (AdamW) with ``Rewind(snapshot_every=1)``, so every
step takes a snapshot, and times each one (capture and copy into the ring, once the ring is full and its buffers are
reused) against a bare step of the same run.

Usage:
    python benchmarks/rewind_cost.py                     # width 256, 4 layers, 60 steps
    python benchmarks/rewind_cost.py --width 64 --layers 2 --steps 20
"""

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from char_lm import CharLMModule, char_windows, stdlib_text

from lightning_deadunits import Rewind
from lightning_deadunits.actions.snapshot_ring import tensor_bytes

DEFAULT_CADENCE = 50


class StepTimer(pl.Callback):
    """Wall time of each batch (start to end), and of each ``Rewind`` snapshot."""

    def __init__(self, rewind: Rewind) -> None:
        self.batch_seconds: list[float] = []
        self.snapshot_seconds: list[float] = []
        take = rewind._take_snapshot

        def timed(trainer: pl.Trainer, state: dict[str, Any]) -> None:
            started = time.perf_counter()
            take(trainer, state)
            self.snapshot_seconds.append(time.perf_counter() - started)

        rewind._take_snapshot = timed  # type: ignore[method-assign]
        self._started = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int) -> None:
        self.batch_seconds.append(time.perf_counter() - self._started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--keep", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    module = CharLMModule(char_windows(stdlib_text(200_000)), width=args.width, layers=args.layers)
    rewind = Rewind(snapshot_every=1, keep=args.keep)
    timer = StepTimer(rewind)
    # The timer ends its batch before Rewind's snapshot (taken after every callback), so batch times are bare steps.
    trainer = pl.Trainer(
        max_steps=args.steps,
        callbacks=[timer, rewind],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    model_bytes = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    optimizer_bytes = tensor_bytes(trainer.optimizers[0].state_dict())
    reused = timer.snapshot_seconds[args.keep + 1 :]  # the first `keep` (and the one at train start) allocate
    step = sorted(timer.batch_seconds[2:])[len(timer.batch_seconds[2:]) // 2]
    per_snapshot = sorted(reused)[len(reused) // 2]
    result = {
        "device": str(module.device),
        "parameters": sum(p.numel() for p in module.parameters()),
        "model_mb": model_bytes / 1e6,
        "optimizer_state_mb": optimizer_bytes / 1e6,
        "snapshot_mb": rewind_bytes(rewind, trainer) / 1e6,
        "snapshot_over_model_plus_optimizer": rewind_bytes(rewind, trainer) / (model_bytes + optimizer_bytes),
        "median_step_ms": step * 1e3,
        "median_snapshot_ms": per_snapshot * 1e3,
        f"share_of_training_at_snapshot_every_{DEFAULT_CADENCE}": per_snapshot / (DEFAULT_CADENCE * step),
    }
    print(json.dumps(result, indent=2))


def rewind_bytes(rewind: Rewind, trainer: pl.Trainer) -> int:
    """Host bytes of one snapshot of the trainer's current state."""
    return tensor_bytes(rewind._state.capture(trainer))


if __name__ == "__main__":
    main()
