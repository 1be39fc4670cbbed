"""What the loss-spike monitor measures: each batch's loss as ``training_step`` computed it, read without stalls.

With the gradient signal, the step's gradient norms travel with the loss (:attr:`BatchLoss.grads`).

In automatic optimization the loss comes from ``on_before_backward``, where Lightning hands it divided by
``accumulate_grad_batches`` and, under fp16 AMP, multiplied by the ``GradScaler``'s scale (a power of two, so
dividing it out is exact); both are undone on the device. In manual optimization it comes from what
``training_step`` returned (a tensor or ``{"loss": ...}``). On CUDA the value can be copied to pinned host memory
without waiting (:meth:`LossProbe.start_host_copy`) and read one batch later.
"""

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_deadunits._compat import loss_scale
from lightning_deadunits.errors import DeadUnitsWarning

__all__ = ["BatchLoss", "LossProbe"]


@dataclass
class BatchLoss:
    """One training batch, from its start to the moment its loss has been judged.

    Attributes:
        step: ``trainer.global_step`` as the batch started (the optimizer steps done before it).
        epoch: the epoch.
        batch_idx: the batch index in the epoch.
        rng: host RNG states before the batch (for dumps), or ``None``.
        loss: the loss on its device, or a pinned host copy in flight (see ``arrived``), or ``None``.
        arrived: the CUDA event after which a pinned ``loss`` may be read, or ``None``.
        grads: the step's global and per-layer gradient norms (see
            :meth:`~lightning_deadunits.probes.grad_norms.GradNormProbe.step_norms`) on the device or in flight like
            the loss, or ``None`` (no optimizer step at this batch, or the gradient signal is off).
        grad_layers: the layer names of ``grads[1:]``.
    """

    step: int
    epoch: int
    batch_idx: int
    rng: dict[str, Any] | None
    loss: Tensor | None = None
    arrived: Any = None
    grads: Tensor | None = None
    grad_layers: list[str] = field(default_factory=list)

    def value(self) -> float:
        """The loss as a float: waits for its own host copy (never for the whole device)."""
        assert self.loss is not None
        if self.arrived is not None:
            self.arrived.synchronize()
        return float(self.loss)

    def grad_values(self) -> tuple[float | None, dict[str, float]]:
        """The global gradient norm (or ``None``) and the per-layer norms, as floats."""
        if self.grads is None:
            return None, {}
        if self.arrived is not None:
            self.arrived.synchronize()
        values = self.grads.tolist()
        return values[0], dict(zip(self.grad_layers, values[1:], strict=True))


class LossProbe:
    """Reads the loss of each training batch into a :class:`BatchLoss`.

    Example:
        >>> probe = LossProbe()
        >>> batch = BatchLoss(step=0, epoch=0, batch_idx=0, rng=None)
        >>> probe.from_outputs(batch, {"loss": torch.tensor(2.5)})
        >>> batch.value()
        2.5
    """

    deferred_devices: tuple[str, ...] = ("cuda",)

    def __init__(self) -> None:
        self.warned_missing = False

    def from_backward(self, trainer: "pl.Trainer", batch: BatchLoss, loss: Tensor) -> None:
        """Record the loss Lightning is about to backpropagate, unscaled (AMP) and un-divided (accumulation)."""
        value = loss.detach().float()
        scale = loss_scale(trainer)
        if scale is not None:
            value = value / scale.to(value.device)
        accumulate = trainer.accumulate_grad_batches
        # Without accumulation there is nothing to undo: one device operation fewer per batch.
        batch.loss = value * accumulate if accumulate != 1 else value

    def from_outputs(self, batch: BatchLoss, outputs: Any) -> None:
        """Record the scalar loss a manual-optimization ``training_step`` returned, if any."""
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, Tensor) and loss.numel() == 1:
            batch.loss = loss.detach().float()

    def warn_if_missing(self, pl_module: "pl.LightningModule", outputs: Any, batch: BatchLoss) -> None:
        """Warn, once, that a manual-optimization ``training_step`` returned no loss for ``batch``.

        In automatic optimization a batch without a loss is one ``training_step`` skipped by returning ``None``.
        """
        if self.warned_missing or pl_module.automatic_optimization:
            return
        self.warned_missing = True
        warnings.warn(
            f"`LossSpikeMonitor` could not read a loss at step {batch.step} (batch {batch.batch_idx}): "
            f"`{type(pl_module).__name__}.training_step` (manual optimization) gave {type(outputs).__name__}. "
            'Return the loss (a tensor or {"loss": ..., "per_sample_loss": ...}) for the monitor to watch it; '
            "batches without a loss are not watched (this warning is not repeated).",
            DeadUnitsWarning,
            stacklevel=2,
        )

    def start_host_copy(self, batch: BatchLoss) -> bool:
        """Start copying a CUDA loss to pinned host memory without waiting, to be read one batch later.

        Returns:
            Whether the loss is to be read later: ``False`` on devices not in :attr:`deferred_devices`, where reading
            it now costs the same.
        """
        loss = batch.loss
        if loss is None or loss.device.type not in self.deferred_devices:
            return False
        if loss.device.type != "cuda":
            return True
        batch.loss = _pinned_copy(loss)
        if batch.grads is not None:
            batch.grads = _pinned_copy(batch.grads)
        batch.arrived = torch.cuda.Event()  # type: ignore[no-untyped-call]
        batch.arrived.record(torch.cuda.current_stream(loss.device))
        return True


def _pinned_copy(tensor: Tensor) -> Tensor:
    """Start copying a CUDA tensor to pinned host memory without waiting."""
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host
