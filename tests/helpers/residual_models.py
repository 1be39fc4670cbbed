"""Tiny residual and plain models for the lesion and recycling tests, with planted dead parts."""

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_deadunits.callbacks.monitor import MonitorCallback


class ResidualBlock(nn.Module):
    """``x + conv(relu(conv(x)))``; with ``zero_branch`` the last conv is all zeros, so the block is the identity."""

    def __init__(self, channels: int, scale: float = 1.0, zero_branch: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        with torch.no_grad():
            self.conv2.weight.mul_(0.0 if zero_branch else scale)
            self.conv2.bias.mul_(0.0 if zero_branch else scale)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))  # type: ignore[no-any-return]


class DownBlock(nn.Module):
    """A downsampling block (stride 2, more channels): its output shape differs from its input's."""

    def __init__(self, channels_in: int, channels_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels_in, channels_out, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.conv(x))


class TinyResNet(nn.Module):
    """stem, ``important`` (a block with a strong branch), ``down`` (downsampling), ``dead`` (zero branch), head.

    The stem is scaled down and the head up, so that the logits come mostly from the important block's branch.
    """

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.important = ResidualBlock(4, scale=6.0)
        self.down = DownBlock(4, 8)
        self.dead = ResidualBlock(8, zero_branch=True)
        self.head = nn.Linear(8, classes)
        with torch.no_grad():
            self.stem.weight.mul_(0.1)
            self.stem.bias.mul_(0.1)
            self.head.weight.mul_(30.0)

    def forward(self, x: Tensor) -> Tensor:
        x = self.dead(self.down(self.important(F.relu(self.stem(x)))))
        return self.head(x.mean(dim=(2, 3)))  # type: ignore[no-any-return]


def self_labelled_images(model: nn.Module, count: int = 32, size: int = 8, seed: int = 1) -> TensorDataset:
    """Random images labelled with ``model``'s own predictions, so the intact model is 100 % accurate."""
    images = torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        labels = model(images).argmax(dim=1)
    return TensorDataset(images, labels)


class LesionClassifier(pl.LightningModule):
    """Validates ``TinyResNet`` on self-labelled images; trains with ``lr=0`` so nothing changes."""

    def __init__(self, batch_size: int = 8, count: int = 32) -> None:
        super().__init__()
        self.model = TinyResNet()
        self.data = self_labelled_images(self.model, count)
        self.batch_size = batch_size

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)  # type: ignore[no-any-return]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, labels = batch
        return F.cross_entropy(self(images), labels)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, labels = batch
        self.log("val_loss", F.cross_entropy(self(images), labels))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.data, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.data, batch_size=self.batch_size)


class DictBatchClassifier(LesionClassifier):
    """Validation batches are dicts, which the default lesion protocol cannot read; ``lesion_loss`` can."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", F.cross_entropy(self(batch["x"]), batch["y"]))

    def val_dataloader(self) -> DataLoader[Any]:
        pairs = [{"x": x, "y": y} for x, y in self.data]
        return DataLoader(pairs, batch_size=self.batch_size)  # type: ignore[arg-type]


class LesionLossClassifier(DictBatchClassifier):
    """Defines the lesion protocol for its dict batches, with a mean-squared-error loss on the logits."""

    def lesion_loss(self, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        logits = self(batch["x"])
        return logits.pow(2).mean(), logits, batch["y"]


class ConvChain(nn.Module):
    """conv ``a`` -> BatchNorm -> ReLU -> conv ``b`` (grouped) -> ReLU -> pool -> linear ``fc1`` -> ReLU -> ``fc2``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act_a = nn.ReLU()
        self.b = nn.Conv2d(8, 6, 3, padding=1, groups=2)
        self.act_b = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(6, 5)
        self.act_fc = nn.ReLU()
        self.fc2 = nn.Linear(5, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.act_b(self.b(self.act_a(self.bn(self.a(x))))))
        return self.fc2(self.act_fc(self.fc1(x.flatten(1))))  # type: ignore[no-any-return]


class ChainModule(pl.LightningModule):
    """Trains ``ConvChain`` with Adam on random images; ``dead_filters`` of conv ``a`` are zero at the start."""

    def __init__(self, lr: float = 1e-3, dead_filters: tuple[int, ...] = (), batches: int = 4) -> None:
        super().__init__()
        self.model = ConvChain()
        with torch.no_grad():
            for index in dead_filters:
                self.model.a.weight[index] = 0.0
                self.model.a.bias[index] = 0.0
        self.lr = lr
        self.batches = batches

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)  # type: ignore[no-any-return]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, labels = batch
        return F.cross_entropy(self(images), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader[Any]:
        generator = torch.Generator().manual_seed(2)
        images = torch.randn(self.batches * 4, 3, 6, 6, generator=generator)
        labels = torch.randint(0, 4, (self.batches * 4,), generator=generator)
        return DataLoader(TensorDataset(images, labels), batch_size=4)


class PlantedMasks(MonitorCallback):
    """A stand-in monitor that reports ``masks`` (``{name: unit indices}``) as dead at each of ``at_steps``.

    ``rank_masks`` adds per-rank indices (``{rank: {name: indices}}``), to test that ranks agree.
    """

    source = "planted"

    def __init__(
        self,
        masks: dict[str, tuple[int, ...]],
        units: dict[str, int],
        at_steps: tuple[int, ...] = (1,),
        rank_masks: dict[int, dict[str, tuple[int, ...]]] | None = None,
    ) -> None:
        super().__init__(prefix="deadunits", alarms=(), on_alarm=("log",))
        self.masks = masks
        self.units = units
        self.at_steps = at_steps
        self.rank_masks = rank_masks or {}

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step not in self.at_steps:
            return
        planted = {name: list(indices) for name, indices in self.masks.items()}
        for name, indices in self.rank_masks.get(trainer.global_rank, {}).items():
            planted.setdefault(name, []).extend(indices)
        masks = {}
        for name, indices in planted.items():
            mask = torch.zeros(self.units[name], dtype=torch.bool, device=pl_module.device)
            mask[list(indices)] = True
            masks[name] = mask
        self.publish(trainer, self.reading(trainer.global_step, {}, dead_masks=masks))
