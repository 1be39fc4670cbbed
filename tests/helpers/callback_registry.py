"""Every public callback with the arguments that make it act in a few steps, and the task it watches.

The generic tests (``tests/test_callback_contract.py``: construct, fit twice, state round trip, resume, no leaked
hooks, 2-rank DDP) run for each entry: a new public callback gets them by adding one line here.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from torch.utils.data import TensorDataset

from lightning_deadunits import (
    ActivationMonitor,
    BlockLesion,
    DeadUnitRecycler,
    DeadUnits,
    GradNormMonitor,
    KernelNormMonitor,
    LossSpikeMonitor,
    LRWarmup,
    Rewind,
)
from tests.helpers.residual_models import LesionClassifier
from tests.helpers.spike_models import DigitsMLP, digits_with_dirty_batches


def digits_task() -> pl.LightningModule:
    """An MLP on the first 64 digits (4 batches an epoch) with a corrupted batch at index 2 (a loss spike)."""
    data = digits_with_dirty_batches(dirty_batches=[2])
    return DigitsMLP(TensorDataset(*(tensor[:64] for tensor in data.tensors)), lr=1e-2)


@dataclass(frozen=True)
class Entry:
    """A public callback as the generic tests build it."""

    name: str
    build: Callable[[], Callback]
    task: Callable[[], pl.LightningModule] = digits_task


REGISTRY: list[Entry] = [
    Entry("KernelNormMonitor", lambda: KernelNormMonitor(every_n_steps=2)),
    Entry("ActivationMonitor", lambda: ActivationMonitor(every_n_steps=2, window=2)),
    Entry("LossSpikeMonitor", lambda: LossSpikeMonitor(window=5, warmup=3, log_every_n_steps=2, skip_update=True)),
    Entry("GradNormMonitor", lambda: GradNormMonitor(every_n_steps=1, log_every_n_samples=2, window=2)),
    Entry("LRWarmup", lambda: LRWarmup(warmup_steps=3, rewarm_steps=2, log_every_n_steps=1)),
    Entry("DeadUnitRecycler", lambda: DeadUnitRecycler(every_n_steps=1)),
    Entry("BlockLesion", lambda: BlockLesion(max_batches=2), LesionClassifier),
    Entry("DeadUnits", lambda: DeadUnits(kernels=KernelNormMonitor(every_n_steps=2), lr_warmup=LRWarmup(3))),
    Entry("Rewind", lambda: Rewind(snapshot_every=1, keep=2, skip_batches=1, window=3)),
]

PUBLIC_CALLBACKS = {entry.name for entry in REGISTRY}


def states(callbacks: list[Any]) -> dict[str, Any]:
    """``{state_key: state_dict}`` of every callback with state."""
    return {callback.state_key: callback.state_dict() for callback in callbacks if callback.state_dict()}
