"""Tiny models and a fixed-weight LightningModule for the activation-monitor tests."""

import weakref
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


class ConvRelu(nn.Module):
    """conv (3 -> 6 channels) then ReLU; `kill` channels get a bias of -1e4, so they are exactly 0 on any input."""

    def __init__(self, kill: tuple[int, ...] = (), inplace: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.relu = nn.ReLU(inplace=inplace)
        with torch.no_grad():
            self.conv.bias[list(kill)] = -1e4

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.conv(x))  # type: ignore[no-any-return]


class ReusedRelu(nn.Module):
    """One ReLU module called three times per forward (as torchvision's Bottleneck does), after three convs."""

    def __init__(self, inplace: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.conv3 = nn.Conv2d(5, 6, 3, padding=1)
        self.relu = nn.ReLU(inplace=inplace)
        with torch.no_grad():
            self.conv2.bias[1] = -1e4

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x))
        return self.relu(self.conv3(x))  # type: ignore[no-any-return]

    def call_outputs(self, x: Tensor) -> list[Tensor]:
        """The three ReLU outputs, computed without the module (the independent reference)."""
        first = F.relu(self.conv1(x))
        second = F.relu(self.conv2(first))
        return [first, second, F.relu(self.conv3(second))]


class TwoBlocks(nn.Module):
    """Two `ReusedRelu` blocks in sequence: call indices restart with each block's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.block1 = ReusedRelu(inplace=False)
        self.adapt = nn.Conv2d(6, 3, 1)
        self.block2 = ReusedRelu(inplace=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.block2(self.adapt(self.block1(x)))  # type: ignore[no-any-return]


class FunctionalRelu(nn.Module):
    """conv -> BatchNorm -> F.relu -> conv -> F.relu, with a linear head: no activation module to hook."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.head = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.conv2(x))
        return self.head(x.mean(dim=(2, 3)))  # type: ignore[no-any-return]


class ModuleRelu(FunctionalRelu):
    """`FunctionalRelu` with the same layers and nn.ReLU modules in place of F.relu (the reference)."""

    def __init__(self) -> None:
        super().__init__()
        self.act1 = nn.ReLU()
        self.act2 = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.conv2(x))
        return self.head(x.mean(dim=(2, 3)))  # type: ignore[no-any-return]


class TokenMLP(nn.Module):
    """(N, T, F) tokens through Linear -> GELU: channels are the last dim."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 7)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.fc(x))  # type: ignore[no-any-return]


class IdentityRelu(nn.Module):
    """ReLU of a learnable identity map: what goes in positive comes out, so the data plants every activation."""

    def __init__(self, features: int = 3) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(features))
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(x * self.scale)  # type: ignore[no-any-return]


class Fixed(pl.LightningModule):
    """Trains `model` on the fixed `batches` (in order, one per step); `lr=0` keeps every activation reproducible.

    `on_forward(self, output)` is called with every forward's output (e.g. to take a weakref to it);
    `fail_at_step` raises inside `training_step` at that global step.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: list[Tensor],
        lr: float = 0.0,
        val_batches: list[Tensor] | None = None,
        on_step: Callable[["Fixed"], None] | None = None,
        fail_at_step: int | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.batches = batches
        self.val_batches = val_batches
        self.lr = lr
        self.on_step = on_step
        self.fail_at_step = fail_at_step
        self.output_refs: list[weakref.ref[Tensor]] = []

    def forward(self, x: Tensor) -> Tensor:
        output: Tensor = self.model(x)
        self.output_refs.append(weakref.ref(output))
        return output

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if self.on_step is not None:
            self.on_step(self)
        if self.global_step == self.fail_at_step:
            raise RuntimeError("planted failure")
        (x,) = batch
        return self(x).pow(2).mean()  # type: ignore[no-any-return]

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        (x,) = batch
        self(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader[Any]:
        return _loader(self.batches)

    def val_dataloader(self) -> DataLoader[Any]:
        return _loader(self.val_batches or [])


def _loader(batches: list[Tensor]) -> DataLoader[Any]:
    size = batches[0].shape[0] if batches else 1
    data = torch.cat(batches) if batches else torch.zeros(0, 1)
    return DataLoader(TensorDataset(data), batch_size=size, shuffle=False)


def image_batches(count: int, size: int = 4, seed: int = 1) -> list[Tensor]:
    """`count` batches of 2 random 3-channel `size` x `size` images."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, size, size, generator=generator) for _ in range(count)]


def hook_count(model: nn.Module) -> int:
    """Forward and forward-pre hooks on every module of `model`."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
