"""Tiny models, batches of every structure, odd training set-ups, loggers and a held-memory count, for the
robustness, resume and leak tests."""

import collections
import dataclasses
import functools
import math
import types
from collections.abc import Iterable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_deadunits import ActivationMonitor, DeadUnits, KernelNormMonitor, LossSpikeMonitor, LRWarmup
from tests.helpers.activation_models import ReusedRelu


class SmallConvNet(nn.Module):
    """conv -> BatchNorm -> ReLU -> conv -> ReLU -> mean over space -> linear head, on (N, 3, 4, 4) images."""

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu1 = nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.relu2 = nn.ReLU(inplace=inplace)
        self.head = nn.Linear(5, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.head(x.mean(dim=(2, 3)))  # type: ignore[no-any-return]


class TinyMLP(nn.Module):
    """Linear -> ReLU -> Linear on (N, 3, 4, 4) images flattened: not a single convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(48, 8)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(8, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.relu(self.fc1(x.flatten(1))))  # type: ignore[no-any-return]


class ReusedReluNet(nn.Module):
    """One ReLU module called three times per forward (`ReusedRelu`), then a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = ReusedRelu(inplace=True)
        self.head = nn.Linear(6, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x).mean(dim=(2, 3)))  # type: ignore[no-any-return]


class NaNHidden(SmallConvNet):
    """`SmallConvNet` whose second ReLU sees a NaN while `poison` is set (by the task) and the loss stays finite:
    the head reads the activations through `nan_to_num`."""

    def __init__(self) -> None:
        super().__init__()
        self.poison = False

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv2(self.relu1(self.bn1(self.conv1(x))))
        if self.poison:
            x = x.clone()
            x[0, 0, 0, 0] = math.nan
        x = torch.nan_to_num(self.relu2(x))
        return self.head(x.mean(dim=(2, 3)))  # type: ignore[no-any-return]


XYBatch = collections.namedtuple("XYBatch", "x y tag")


@dataclasses.dataclass
class PairBatch:
    """A dataclass batch: Lightning moves its tensor fields to the device like a dict's."""

    x: Tensor
    y: Tensor
    note: str | None


class Opaque:
    """A value no dump can store (neither tensor, container nor plain value): saved as its repr with a warning."""

    def __repr__(self) -> str:
        return "Opaque()"


BATCH_KINDS = ("tensor_tuple", "dict", "namedtuple", "dataclass", "strings_and_none", "opaque")


def structured(kind: str, x: Tensor, y: Tensor) -> Any:
    """`(x, y)` packed as `kind` (one of `BATCH_KINDS`)."""
    if kind == "tensor_tuple":
        return (x, y)
    if kind == "dict":
        return {"x": x, "y": y}
    if kind == "namedtuple":
        return XYBatch(x, y, "tag")
    if kind == "dataclass":
        return PairBatch(x, y, None)
    if kind == "strings_and_none":
        return {"x": x, "y": y, "names": [f"sample{i}" for i in range(len(x))], "mask": None}
    if kind == "opaque":
        return {"x": x, "y": y, "extra": Opaque()}
    raise ValueError(kind)


def inputs_of(batch: Any) -> tuple[Tensor, Tensor]:
    """`(x, y)` out of any batch `structured` builds."""
    if isinstance(batch, dict):
        return batch["x"], batch["y"]
    if isinstance(batch, PairBatch):
        return batch.x, batch.y
    return batch[0], batch[1]


def image_data(count: int, size: int = 2, seed: int = 0) -> list[tuple[Tensor, Tensor]]:
    """`count` pairs of `size` random (3, 4, 4) images and scalar targets."""
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 3, 4, 4, generator=generator), torch.randn(size, 1, generator=generator))
        for _ in range(count)
    ]


def _as_is(batch: Any) -> Any:
    return batch


class OddTask(pl.LightningModule):
    """Regresses `model(x)` onto `y` over fixed batches of any structure, one per step, in order.

    Args:
        model: the network.
        batches: the training batches, yielded exactly as given (any structure `inputs_of` reads).
        lr: SGD learning rate.
        spikes: `{batch index: factor}`: that batch's loss reads `factor` times higher, with its gradient unchanged
            (the monitors see a spike and training stays sane).
        loss_scale: `{batch index: factor}` multiplying that batch's loss, gradient included (NaN, Inf).
        manual: manual optimization with two optimizers (the head, and everything else), both stepped per batch.
        channels_last: move images to the channels-last memory format before the forward.
        poison_batches: batch indices at which `model.poison` is set (see `NaNHidden`).
        fail_at_step: raise inside `training_step` at this global step.

    An empty batch is forwarded (so hooks see empty tensors) and then skipped (`training_step` returns None).
    """

    def __init__(
        self,
        model: nn.Module,
        batches: list[Any],
        lr: float = 0.05,
        spikes: dict[int, float] | None = None,
        loss_scale: dict[int, float] | None = None,
        manual: bool = False,
        channels_last: bool = False,
        poison_batches: Iterable[int] = (),
        fail_at_step: int | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.batches = batches
        self.lr = lr
        self.spikes = spikes or {}
        self.loss_scale = loss_scale or {}
        self.automatic_optimization = not manual
        self.channels_last = channels_last
        self.poison_batches = set(poison_batches)
        self.fail_at_step = fail_at_step

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)  # type: ignore[no-any-return]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        if self.global_step == self.fail_at_step:
            raise RuntimeError(f"planted failure at step {self.fail_at_step}")
        if hasattr(self.model, "poison"):
            self.model.poison = batch_idx in self.poison_batches
        x, y = inputs_of(batch)
        output = self(x)
        if x.shape[0] == 0:
            return None
        loss = F.mse_loss(output.float(), y) * self.loss_scale.get(batch_idx, 1.0)
        loss = loss + (self.spikes.get(batch_idx, 1.0) - 1) * loss.detach()
        if self.automatic_optimization:
            return loss
        optimizers = self.optimizers()
        for optimizer in optimizers:  # type: ignore[union-attr]
            optimizer.zero_grad()
        self.manual_backward(loss)
        for optimizer in optimizers:  # type: ignore[union-attr]
            optimizer.step()
        return loss.detach()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = inputs_of(batch)
        self.log("val_loss", F.mse_loss(self(x), y))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def configure_optimizers(self) -> Any:
        if self.automatic_optimization:
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        head = [p for name, p in self.named_parameters() if name.startswith("model.head.")]
        body = [p for name, p in self.named_parameters() if not name.startswith("model.head.")]
        return [torch.optim.SGD(body, lr=self.lr), torch.optim.SGD(head, lr=self.lr / 2)]

    def train_dataloader(self) -> DataLoader[Any]:
        return _loader(self.batches)

    def val_dataloader(self) -> DataLoader[Any]:
        return _loader(self.batches[:2])

    def test_dataloader(self) -> DataLoader[Any]:
        return _loader(self.batches[:2])


def _loader(batches: list[Any]) -> DataLoader[Any]:
    return DataLoader(batches, batch_size=None, collate_fn=_as_is)  # type: ignore[arg-type]


def every_step_bundle(dump_dir: Any = None, skip_update: bool = False, **activation_options: Any) -> DeadUnits:
    """`DeadUnits` with all three monitors sampling and logging every step, and LR warmup over two steps; the loss
    monitor judges after two losses and flags only losses ten times the baseline (planted spikes are 100x)."""
    return DeadUnits(
        kernels=KernelNormMonitor(every_n_steps=1),
        activations=ActivationMonitor(every_n_steps=1, log_every_n_samples=1, window=2, **activation_options),
        loss=LossSpikeMonitor(
            window=4, warmup=2, ratio=10, log_every_n_steps=1, skip_update=skip_update, dump_dir=dump_dir
        ),
        lr_warmup=LRWarmup(warmup_steps=2, rewarm_steps=2, log_every_n_steps=1),
    )


# What callbacks point at without owning it, and code (functions, classes), which holds no run data.
_NOT_OWNED: tuple[type, ...] = (
    nn.Module,
    pl.Trainer,
    Logger,
    torch.optim.Optimizer,
    DataLoader,
    type,
    types.FunctionType,
    types.MethodType,
    types.BuiltinFunctionType,
    functools.partial,
)


def held_by(roots: Iterable[Any]) -> dict[str, int]:
    """What `roots` (callbacks) hold: tensors, their elements and every other object, reached through attributes,
    containers and dataclasses; the model, trainer, loggers, optimizers and loaders they point at are not theirs.
    """
    seen: set[int] = set()
    counts = {"tensors": 0, "elements": 0, "objects": 0}
    stack = list(roots)
    while stack:
        item = stack.pop()
        if id(item) in seen or isinstance(item, _NOT_OWNED):
            continue
        seen.add(id(item))
        counts["objects"] += 1
        if isinstance(item, Tensor):
            counts["tensors"] += 1
            counts["elements"] += item.numel()
        elif isinstance(item, dict):
            stack += [*item.keys(), *item.values()]
        elif isinstance(item, (list, tuple, set, frozenset, collections.deque)):
            stack += list(item)
        elif hasattr(item, "__dict__"):
            stack += list(vars(item).values())
    return counts


class GatedRelu(nn.Module):
    """`head(relu(x * gate))` on 3 features, and a frozen `spare` linear layer (never called) whose first row is 0:
    one kernel dead from the start."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.ones(3))
        self.relu = nn.ReLU()
        self.head = nn.Linear(3, 1)
        self.spare = nn.Linear(3, 2)
        with torch.no_grad():
            self.spare.weight[0] = 0
        self.spare.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.relu(x * self.gate))  # type: ignore[no-any-return]


def rank_features(
    rank: int, batches: int, spike_batches: Iterable[int] = (), seed: int = 0
) -> list[tuple[Tensor, Tensor]]:
    """Batches of 4 samples for rank `rank`: feature 0 negative everywhere (its ReLU channel is dead), feature 1
    negative on rank 0 only (dead there, alive in the global batch), feature 2 positive; targets of
    `spike_batches` are 100x larger (a loss spike on this rank only)."""
    generator = torch.Generator().manual_seed(seed + rank)
    data = []
    for index in range(batches):
        x = torch.rand(4, 3, generator=generator) + 0.1
        x[:, 0] *= -1
        if rank == 0:
            x[:, 1] *= -1
        y = torch.randn(4, 1, generator=generator) * (100.0 if index in spike_batches else 1.0)
        data.append((x, y))
    return data


class PerRankTask(OddTask):
    """`OddTask` whose batches depend on the rank (`batches_by_rank[global_rank]`); train with
    `use_distributed_sampler=False` so each rank reads exactly its own."""

    def __init__(self, model: nn.Module, batches_by_rank: list[list[Any]], **options: Any) -> None:
        super().__init__(model, batches_by_rank[0], **options)
        self.batches_by_rank = batches_by_rank

    def train_dataloader(self) -> DataLoader[Any]:
        return _loader(self.batches_by_rank[self.global_rank])
