"""Skip the coming optimizer step: every gradient set to ``None``, so torch optimizers leave weights and state alone."""

import lightning.pytorch as pl

from lightning_deadunits._compat import grad_scaler, optimizer_handles_unscaling
from lightning_deadunits.actions.action import Action
from lightning_deadunits.triggers.alarm import Alarm

__all__ = ["SkipUpdate"]


class SkipUpdate(Action):
    """Makes the optimizer step about to run a no-op; call it from ``on_before_optimizer_step``.

    Torch optimizers (all but LBFGS) skip parameters whose gradient is ``None``, so the weights and the optimizer
    state (moments, step counts) stay bit-identical. Under fp16 AMP the ``GradScaler`` still sees this step's
    gradients first (an overflow backs its scale off as usual). Runs on every rank, so DDP replicas stay identical.
    :attr:`count` counts the skipped steps.

    Example:
        >>> skip = SkipUpdate()
    """

    name = "skip_update"

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, trainer: "pl.Trainer | None", pl_module: "pl.LightningModule | None", alarm: Alarm) -> None:
        """Drop the gradients of every optimizer of ``trainer``."""
        if trainer is None:
            return
        scaler = grad_scaler(trainer)
        for optimizer in trainer.optimizers:
            if scaler is not None and optimizer_handles_unscaling(optimizer):
                # Lightning leaves unscaling to such (fused) optimizers; without gradients the scaler would record
                # no inf check and fail in update(), so let it check this step's gradients now.
                scaler.unscale_(optimizer)
            for group in optimizer.param_groups:
                for parameter in group["params"]:
                    parameter.grad = None
        self.count += 1
