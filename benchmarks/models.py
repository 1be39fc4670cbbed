"""The models the benchmark trains, their data, and the LightningModule that trains them.

A model kind is a name in ``MODELS`` and a function of the base width that returns the model, its data and the
batch size; ``--models`` offers every name registered there.
"""

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_deadunits.probes.module_kinds import DEFAULT_ACTIVATION_TYPES

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # the demo's model and data live there
from char_lm import CharLM, char_windows, stdlib_text
from digits_demo import MobileNetLike, digits_dataset


class Built(NamedTuple):
    """A model ready to train: the module, its data set and the batch size."""

    model: nn.Module
    data: TensorDataset
    batch_size: int


class ResidualCNN(nn.Module):
    """A ResNet-style CNN: a stem, then ``stages`` of ``blocks`` residual blocks whose width doubles (and whose
    resolution halves) from one stage to the next, global pooling and a linear head."""

    def __init__(self, width: int = 32, stages: int = 3, blocks: int = 2, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        layers: list[nn.Module] = []
        channels = width
        for stage in range(stages):
            out = width * 2**stage
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(ResidualBlock(channels, out, stride))
                channels = out
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))  # type: ignore[no-any-return]


class ResidualBlock(nn.Module):
    def __init__(self, channels: int, out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out, out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.relu2 = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or channels != out:
            self.shortcut = nn.Sequential(nn.Conv2d(channels, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x: Tensor) -> Tensor:
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(y + self.shortcut(x))  # type: ignore[no-any-return]


class BenchModule(pl.LightningModule):
    def __init__(self, model: nn.Module, data: TensorDataset, batch_size: int) -> None:
        super().__init__()
        self.model = model
        self.data = data
        self.batch_size = batch_size

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        inputs, labels = batch
        logits = self.model(inputs)
        if logits.dim() == 3:  # a language model's (N, T, vocabulary): classes second, a loss per token
            logits = logits.transpose(1, 2)
        per_sample = F.cross_entropy(logits, labels, reduction="none").reshape(len(labels), -1).mean(1)
        return {"loss": per_sample.mean(), "per_sample_loss": per_sample.detach()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader[Any]:
        # Its own generator: every run sees the same batches in the same order, whatever runs beside it.
        order = torch.Generator().manual_seed(0)
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True, drop_last=True, generator=order)


@functools.cache
def _digits(size: int) -> TensorDataset:
    return digits_dataset(size, "all")


@functools.cache
def _images(channels: int, size: int, count: int = 2048) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(count, channels, size, size, generator=generator)
    return TensorDataset(images, torch.randint(0, 10, (count,), generator=generator))


def _mobilenet(width: int) -> Built:
    """The demo's MobileNet-like CNN on scikit-learn's digits upsampled to 16x16 (``width`` does not apply)."""
    return Built(MobileNetLike(), _digits(16), 32)


def _resnet(width: int) -> Built:
    """The ResNet-style CNN of base width ``width`` on random 3x16x16 images."""
    return Built(ResidualCNN(width=width), _images(3, 16), 32)


@functools.cache
def _char_windows(seq_len: int) -> TensorDataset:
    codes, targets, _ = char_windows(stdlib_text(), seq_len).tensors
    return TensorDataset(codes, targets)


def _charlm(width: int) -> Built:
    """The examples' character-level transformer LM (2 pre-norm layers of width 64, feed-forward 256, causal) on
    64-character windows of the standard library's sources (``width`` does not apply). Its feed-forward ReLU is an
    ``nn.ReLU`` module here, so that the activation monitor, which hooks modules, sees it."""
    model = CharLM(width=64, layers=2, heads=4, ffn=256, seq_len=64)
    for layer in model.encoder.layers:
        layer.activation = nn.ReLU()
    return Built(model, _char_windows(64), 32)


def _tiny(width: int) -> Built:
    """A tiny MobileNet-like CNN on 8x8 digits, for smoke runs (``width`` does not apply)."""
    return Built(MobileNetLike(widths=(8, 8, 16)), _digits(8), 32)


MODELS: dict[str, Callable[[int], Built]] = {
    "mobilenet": _mobilenet,
    "resnet": _resnet,
    "charlm": _charlm,
    "tiny": _tiny,
}


def build_model(kind: str, width: int) -> Built:
    """The model ``kind`` of base width ``width``, its weights drawn from seed 0: every run of a kind starts from
    the same initial weights."""
    if kind not in MODELS:
        raise ValueError(f"unknown model {kind!r}")
    torch.manual_seed(0)
    return MODELS[kind](width)


def activation_values(built: Built) -> int:
    """Values the activation monitor reads in one sampled step (outputs of the watched activation modules), for a
    batch of the model's own data."""
    total = 0

    def count(module: nn.Module, inputs: Any, output: Tensor) -> None:
        nonlocal total
        total += output.numel()

    watched = [m for m in built.model.modules() if isinstance(m, DEFAULT_ACTIVATION_TYPES)]
    handles = [m.register_forward_hook(count) for m in watched]
    inputs = built.data[: built.batch_size][0]
    with torch.no_grad():
        built.model(inputs)
    for handle in handles:
        handle.remove()
    return total
