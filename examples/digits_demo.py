"""The demo's model and data: a small MobileNet-like CNN on scikit-learn's digits, upsampled (ships offline).

Used by the examples (``from digits_demo import DigitsClassifier``: a script's folder is on ``sys.path``), the
benchmarks and the tests (which put this folder on ``sys.path``). Not part of the package: it needs
``scikit-learn`` (the ``examples`` extra) for the data.
"""

from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["DigitsClassifier", "MobileNetLike", "digits_dataset"]


def digits_dataset(size: int = 32, split: Literal["train", "val", "all"] = "all", seed: int = 0) -> TensorDataset:
    """scikit-learn's 8x8 digits (1,797 images), upsampled to ``size x size`` and standardised.

    ``split`` takes a fixed 80/20 shuffle of the images (``seed``); ``"all"`` returns every image.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = (images - images.mean()) / images.std()
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(labels))
    chosen = {"train": order[:cut], "val": order[cut:], "all": order}[split]
    return TensorDataset(images[chosen], labels[chosen])


class MobileNetLike(nn.Module):
    """Blocks of [1x1 conv, BatchNorm, ReLU, depthwise 3x3 conv, ReLU], then global pooling and a linear head.

    Args:
        widths: output channels of each block; a block with stride 2 follows every change of width.
        in_channels: input channels.
        num_classes: outputs of the head.
    """

    def __init__(
        self, widths: tuple[int, ...] = (32, 32, 64, 64, 128, 128), in_channels: int = 1, num_classes: int = 10
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)]
        previous = widths[0]
        for width in widths:
            stride = 2 if width != previous else 1
            layers += [
                nn.Conv2d(previous, width, 1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.Conv2d(width, width, 3, stride=stride, padding=1, groups=width),
                nn.ReLU(),
            ]
            previous = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(previous, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of shape ``(N, num_classes)``."""
        return self.head(self.features(x).mean(dim=(2, 3)))  # type: ignore[no-any-return]


class DigitsClassifier(pl.LightningModule):
    """A LightningModule around any classifier, trained on :func:`digits_dataset` with Adam or SGD.

    ``training_step`` returns ``{"loss": ..., "per_sample_loss": ...}`` (the per-sample losses protocol).

    Args:
        model: the network (default :class:`MobileNetLike`).
        optimizer: ``"adam"`` (coupled L2 weight decay, the zero-kernel recipe) or ``"sgd"`` (momentum 0.9).
        lr: learning rate.
        weight_decay: L2 weight decay.
        batch_size: batch size of both loaders.
        image_size: side of the upsampled digits.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        optimizer: Literal["adam", "sgd"] = "adam",
        lr: float = 5e-3,
        weight_decay: float = 5e-4,
        batch_size: int = 32,
        image_size: int = 32,
    ) -> None:
        super().__init__()
        self.model = model if model is not None else MobileNetLike()
        self.optimizer_name = optimizer
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.image_size = image_size

    def forward(self, x: Tensor) -> Tensor:
        """Logits."""
        return self.model(x)  # type: ignore[no-any-return]

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """Cross-entropy, with the per-sample losses for the spike monitor."""
        images, labels = batch
        per_sample = F.cross_entropy(self(images), labels, reduction="none")
        loss = per_sample.mean()
        self.log("train_loss", loss, prog_bar=True)
        return {"loss": loss, "per_sample_loss": per_sample.detach()}

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Validation loss and accuracy."""
        images, labels = batch
        logits = self(images)
        self.log("val_loss", F.cross_entropy(logits, labels))
        self.log("val_acc", (logits.argmax(dim=1) == labels).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam with coupled L2 decay, or SGD with momentum."""
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)

    def train_dataloader(self) -> DataLoader[Any]:
        """Shuffled training split."""
        return DataLoader(digits_dataset(self.image_size, "train"), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader[Any]:
        """Validation split."""
        return DataLoader(digits_dataset(self.image_size, "val"), batch_size=256)
