"""Tiny classifiers on the digits with planted dirty batches, for the loss-spike tests."""

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from digits_demo import digits_dataset
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

DIRTY_SAMPLES = (2, 7, 11)
"""Positions, inside a dirty batch, of the corrupted samples."""


def digits_with_dirty_batches(
    batch_size: int = 16,
    dirty_batches: Sequence[int] = (),
    nan_batches: Sequence[int] = (),
    scale: float = 25.0,
    rank: int = 0,
    world_size: int = 1,
) -> TensorDataset:
    """``(images, labels, sample ids)`` of the 8 x 8 digits, in a fixed order.

    In each batch of ``dirty_batches`` (positions in an unshuffled loader of ``batch_size``, or in the first epoch
    of rank ``rank`` of ``world_size`` under DDP) the samples at ``DIRTY_SAMPLES`` get inputs scaled by ``scale``
    and a wrong label; each of ``nan_batches`` gets a NaN pixel in its first sample.
    """
    images, labels = digits_dataset(8, "train").tensors
    images, labels = images.clone(), labels.clone()
    order = rows_seen(len(labels), rank, world_size)
    for batch in dirty_batches:
        rows = [order[batch * batch_size + position] for position in DIRTY_SAMPLES]
        images[rows] *= scale
        labels[rows] = (labels[rows] + 5) % 10
    for batch in nan_batches:
        images[order[batch * batch_size], 0, 0, 0] = float("nan")
    return TensorDataset(images, labels, torch.arange(len(labels)))


def rows_seen(size: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """The dataset rows rank ``rank`` reads in its first epoch: all in order alone; under DDP, Lightning's
    training sampler (always shuffled, seed 0) gives each rank its own share.
    """
    if world_size == 1:
        return list(range(size))
    return list(DistributedSampler(range(size), num_replicas=world_size, rank=rank, shuffle=True, seed=0))


class DigitsMLP(pl.LightningModule):
    """An MLP (``net.1``: 64 -> 32, ``net.3``: 32 -> 10) returning ``{"loss", "per_sample_loss", "sample_ids"}``.

    About 90 batches of 16 per epoch.

    Args:
        data: a dataset from :func:`digits_with_dirty_batches`.
        batch_size: batch size of the unshuffled loader.
        lr: the learning rate.
        per_sample: return the per-sample losses and ids (else only the loss tensor).
        optimizer: ``"adam"``, ``"fused_adam"`` (Adam with ``fused=True``) or ``"sgd"`` (no momentum: a weight
            row without gradient stays where it is).
    """

    def __init__(
        self,
        data: TensorDataset,
        batch_size: int = 16,
        lr: float = 1e-2,
        per_sample: bool = True,
        optimizer: str = "adam",
    ) -> None:
        super().__init__()
        self.data = data
        self.batch_size = batch_size
        self.lr = lr
        self.per_sample = per_sample
        self.optimizer_name = optimizer
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        images, labels, ids = batch
        per_sample = F.cross_entropy(self.net(images), labels, reduction="none")
        loss = per_sample.mean()
        if not self.per_sample:
            return loss
        return {"loss": loss, "per_sample_loss": per_sample.detach(), "sample_ids": ids}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        return torch.optim.Adam(self.parameters(), lr=self.lr, fused=self.optimizer_name == "fused_adam")

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=False)


class ManualDigitsMLP(DigitsMLP):
    """The same network in manual optimization; ``training_step`` returns the loss only if ``return_loss``."""

    def __init__(self, data: TensorDataset, return_loss: bool = True, **kwargs: Any) -> None:
        super().__init__(data, **kwargs)
        self.automatic_optimization = False
        self.return_loss = return_loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        images, labels, _ = batch
        optimizer = self.optimizers()
        loss = F.cross_entropy(self.net(images), labels)
        optimizer.zero_grad()  # type: ignore[union-attr]
        self.manual_backward(loss)
        optimizer.step()  # type: ignore[union-attr]
        return loss.detach() if self.return_loss else None
