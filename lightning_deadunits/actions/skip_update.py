"""Skip an optimizer step: every gradient set to ``None`` as the step begins, so weights and state stay as they are."""

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from lightning_deadunits.actions.action import Action
from lightning_deadunits.triggers.alarm import Alarm

__all__ = ["SkipUpdate"]


class SkipUpdate(Action):
    """Makes the next optimizer step a no-op: called on an alarm, it arms; the step's pre-hook then drops the gradients.

    The gradients are dropped inside ``optimizer.step``, right before the update: Lightning runs the closure
    (forward, backward, every callback's ``on_before_optimizer_step``, gradient clipping) inside the step, so a step
    pre-hook wraps the closure and drops the gradients when it returns; under fp16 AMP the closure has already run
    when the ``GradScaler`` steps, and the pre-hook drops them at once. So every callback sees the step's gradients
    (gradient norms of a spike are read whatever the order of the callbacks), and the ``GradScaler`` has checked
    them for inf/NaN (an overflow backs its scale off as usual, and then the step does not run at all). Torch
    optimizers (all but LBFGS) skip parameters whose gradient is ``None``, so the weights and the optimizer state
    (moments, step counts) stay bit-identical. Runs on every rank, so DDP replicas stay identical. :attr:`count`
    counts the steps it was asked to skip.

    Example:
        >>> skip = SkipUpdate()
    """

    name = "skip_update"

    def __init__(self) -> None:
        self.count = 0
        self.armed = False
        self._handles: list[RemovableHandle] = []

    def attach(self, optimizers: Sequence[Optimizer]) -> None:
        """Hook the optimizers whose steps may be skipped."""
        self.detach()
        self._handles = [optimizer.register_step_pre_hook(self._before_step) for optimizer in optimizers]

    def detach(self) -> None:
        """Remove the hooks and disarm. Safe to call at any time."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.armed = False

    def __call__(self, trainer: "pl.Trainer | None", pl_module: "pl.LightningModule | None", alarm: Alarm) -> None:
        """Skip the coming optimizer step."""
        self.armed = True
        self.count += 1

    def disarm(self) -> None:
        """Forget an armed skip whose step did not run (e.g. a step the ``GradScaler`` skipped for an overflow)."""
        self.armed = False

    def _before_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> tuple[Any, Any] | None:
        # `args` starts with the optimizer itself; the closure comes next or as a keyword.
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self._drop_gradients(optimizer)
            return None

        def closure_then_drop() -> Any:
            loss = closure()
            self._drop_gradients(optimizer)
            return loss

        return args[:1], {**kwargs, "closure": closure_then_drop}

    def _drop_gradients(self, optimizer: Optimizer) -> None:
        if not self.armed:
            return
        self.armed = False
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                parameter.grad = None
