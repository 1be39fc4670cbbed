"""Capture everything training needs to continue exactly, and put it back: the state a rewind restores."""

import random
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from lightning_deadunits._compat import grad_scaler, load_step_progress, step_progress
from lightning_deadunits.actions.batch_dump import rng_states
from lightning_deadunits.triggers.rewind_escalation import Episode

__all__ = ["TrainingState", "rewind_event"]


class TrainingState:
    """Reads and writes the training state of a trainer as one nested structure of tensors and plain values.

    The state holds the module's parameters and buffers (non-persistent ones too), every optimizer's and LR
    scheduler's state, the fp16 AMP ``GradScaler``, the torch (CPU and CUDA), numpy and Python RNG states, the loop
    counters behind ``trainer.global_step`` (:func:`~lightning_deadunits._compat.step_progress`) and the
    ``state_dict`` of each of ``callbacks``. :meth:`capture` reads it without a host sync except for the scaler
    (whose ``state_dict`` reads its scale); keep it in a :class:`~lightning_deadunits.actions.snapshot_ring.
    SnapshotRing`, and :meth:`restore` writes a captured state back bit for bit.

    Args:
        callbacks: the callbacks whose state is part of the snapshot.

    Example:
        >>> state = TrainingState(callbacks=[])
        >>> snapshot = state.capture(trainer)  # doctest: +SKIP
        >>> state.restore(trainer, snapshot)  # doctest: +SKIP
    """

    def __init__(self, callbacks: Sequence[Callback]) -> None:
        self.callbacks = list(callbacks)

    def capture(self, trainer: "pl.Trainer") -> dict[str, Any]:
        """The state of ``trainer`` now (tensors are the live ones: copy them before training goes on)."""
        module = trainer.lightning_module
        scaler = grad_scaler(trainer)
        return {
            "parameters": dict(module.named_parameters()),
            "buffers": dict(module.named_buffers()),
            "optimizers": [optimizer.state_dict() for optimizer in trainer.optimizers],
            "schedulers": [config.scheduler.state_dict() for config in trainer.lr_scheduler_configs],
            "scaler": None if scaler is None else scaler.state_dict(),
            "rng": rng_states(),
            "progress": step_progress(trainer),
            "callbacks": [callback.state_dict() for callback in self.callbacks],
        }

    def restore(self, trainer: "pl.Trainer", state: dict[str, Any]) -> None:
        """Write ``state`` (from :meth:`capture`, its tensors owned by the caller) back into ``trainer``."""
        module = trainer.lightning_module
        with torch.no_grad():
            for name, parameter in module.named_parameters():
                parameter.copy_(state["parameters"][name])
                parameter.grad = None  # gradients accumulated towards the undone step must not be applied
            for name, buffer in module.named_buffers():
                buffer.copy_(state["buffers"][name])
        for optimizer, optimizer_state in zip(trainer.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(optimizer_state)
        for config, scheduler_state in zip(trainer.lr_scheduler_configs, state["schedulers"], strict=True):
            config.scheduler.load_state_dict(scheduler_state)
        scaler = grad_scaler(trainer)
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        set_rng_states(state["rng"])
        load_step_progress(trainer, state["progress"])
        for callback, callback_state in zip(self.callbacks, state["callbacks"], strict=True):
            callback.load_state_dict(callback_state)


def rewind_event(
    trainer: "pl.Trainer", episode: Episode, snapshot_step: int, from_step: int, epoch: int, skipped: range
) -> tuple[str, dict[str, Any]]:
    """What a rewind did, said and as the fields of its ``"action"`` event (after ``type``, ``prefix``, ``source``
    and ``step``), read after the restore (the learning rates are those training goes on with).

    Args:
        trainer: the trainer, rewound.
        episode: the spike episode that caused it.
        snapshot_step: the global step of the snapshot restored.
        from_step: the global step before the rewind.
        epoch: the epoch whose batches were skipped.
        skipped: the positions skipped in ``epoch``.

    Returns:
        ``(message, fields)``.
    """  # noqa: D205
    lrs = [float(group["lr"]) for optimizer in trainer.optimizers for group in optimizer.param_groups]
    message = (
        f"rewound from step {from_step} to the snapshot of step {snapshot_step} after a {episode.reason} "
        f"starting at step {episode.step}; skipped batches {skipped.start}-{skipped.stop - 1} of epoch {epoch}"
    )
    fields = {
        "action": "rewind",
        "reason": episode.reason,
        "episode_start": episode.step,
        "snapshot_step": snapshot_step,
        "from_step": from_step,
        "epoch": epoch,
        "skipped_batch_indices": list(skipped),
        "lr": lrs,
    }
    return message, fields


def set_rng_states(states: dict[str, Any]) -> None:
    """Set the generators read by :func:`~lightning_deadunits.actions.batch_dump.rng_states` back to ``states``."""
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "torch.cuda" in states:
        torch.cuda.set_rng_state_all(states["torch.cuda"])
