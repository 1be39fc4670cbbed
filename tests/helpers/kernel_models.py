"""Tiny models with known layers for the kernel-norm tests."""

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


class AllKinds(nn.Module):
    """One layer of every kind; the BatchNorm after `pw` is registered before it, so name order misleads."""

    def __init__(self) -> None:
        super().__init__()
        self.bn_for_pw = nn.BatchNorm2d(16)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.pw = nn.Conv2d(8, 16, 1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.grouped = nn.Conv2d(16, 8, 3, padding=1, groups=4)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2, groups=2)
        self.conv1d = nn.Conv1d(6, 5, 3)
        self.head = nn.Linear(5, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(self.bn_for_pw(self.pw(x)))
        x = F.relu(self.dw(x))
        x = self.up(self.grouped(x))
        x = self.conv1d(x.flatten(2)).mean(dim=2)
        return self.head(x)  # type: ignore[no-any-return]


class LitWrapper(pl.LightningModule):
    """Trains any model on random images with a regression-to-zero loss; `lr=0` keeps weights fixed."""

    def __init__(self, model: nn.Module, lr: float = 0.0, size: int = 8, batches: int = 4) -> None:
        super().__init__()
        self.model = model
        self.lr = lr
        self.size = size
        self.batches = batches

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)  # type: ignore[no-any-return]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        (x,) = batch
        return self(x).pow(2).mean()  # type: ignore[no-any-return]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader[Any]:
        data = torch.randn(self.batches * 2, 3, self.size, self.size, generator=torch.Generator().manual_seed(1))
        return DataLoader(TensorDataset(data), batch_size=2)
