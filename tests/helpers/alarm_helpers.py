"""Planted alarms, a tiny regressor with every scheduler, and an LR recorder for the alarm and warmup tests."""

from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_deadunits.actions.alarm_handler import AlarmAction
from lightning_deadunits.callbacks.monitor import MonitorCallback
from lightning_deadunits.triggers.rule import Rule
from lightning_deadunits.triggers.threshold import ThresholdRule

SPIKE_KEY = "deadunits/loss/spike"

SchedulerName = Literal["step", "exponential", "onecycle", "plateau"]


class PlantedReadings(MonitorCallback):
    """Publishes planted readings `{global_step: {key: value}}` at the end of the batch where that step is reached
    (or, with `inside_step=True`, from `on_before_optimizer_step` of that step, i.e. inside `optimizer.step`).

    Each step is published once, even under gradient accumulation (several batches end at the same step).
    """

    source: ClassVar[str] = "loss"

    def __init__(
        self,
        readings: dict[int, dict[str, float]],
        alarms: list[Rule],
        on_alarm: list[AlarmAction] | None = None,
        prefix: str = "deadunits",
        inside_step: bool = False,
    ) -> None:
        super().__init__(prefix=prefix, alarms=alarms, on_alarm=on_alarm or [])
        self.readings = readings
        self.inside_step = inside_step
        self.published: set[int] = set()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.inside_step:
            self._publish_planted(trainer)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.inside_step:
            self._publish_planted(trainer)

    def _publish_planted(self, trainer: pl.Trainer) -> None:
        step = trainer.global_step
        if step in self.readings and step not in self.published:
            self.published.add(step)
            self.publish(trainer, self.reading(step, self.readings[step]))


def spikes_at(*steps: int, inside_step: bool = False) -> PlantedReadings:
    """A monitor raising the loss-spike alarm (`deadunits/loss/spike`, source `loss`) at each of `steps`."""
    return PlantedReadings(
        {step: {SPIKE_KEY: 1.0} for step in steps},
        [ThresholdRule(SPIKE_KEY, above=0.5, name="spike")],
        inside_step=inside_step,
    )


class LRRecorder(Callback):
    """Records, per optimizer step, `(global_step, optimizer index, [lr of each group])` as the optimizer runs it
    (`on_before_optimizer_step` fires inside `optimizer.step`, after LRWarmup's pre-hook), and the groups' LRs at
    every batch start (what schedulers and `LearningRateMonitor` see)."""

    def __init__(self) -> None:
        self.effective: list[tuple[int, int, list[float]]] = []
        self.scheduled: list[tuple[int, list[float]]] = []

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self.scheduled.append((trainer.global_step, _lrs(trainer.optimizers[0])))

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self.effective.append((trainer.global_step, trainer.optimizers.index(optimizer), _lrs(optimizer)))

    def lrs_by_step(self, optimizer: int = 0) -> dict[int, list[float]]:
        return {step: lrs for step, index, lrs in self.effective if index == optimizer}


def _lrs(optimizer: torch.optim.Optimizer) -> list[float]:
    return [float(group["lr"]) for group in optimizer.param_groups]


class TinyRegressor(pl.LightningModule):
    """Two linear layers (two param groups when `group_lrs` has two entries) on 64 random samples, batch 4.

    `scheduler` adds a per-step StepLR, ExponentialLR, OneCycleLR or ReduceLROnPlateau; the plateau scheduler
    watches a constant metric so it reduces the LR on the same steps in every run. `fail_at_step` raises inside
    the training step (within `optimizer.step`) at that global step.
    """

    def __init__(
        self,
        group_lrs: tuple[float, ...] = (0.1,),
        scheduler: SchedulerName | None = None,
        total_steps: int = 16,
        fail_at_step: int | None = None,
    ) -> None:
        super().__init__()
        self.first = nn.Linear(4, 8)
        self.second = nn.Linear(8, 1)
        self.group_lrs = group_lrs
        self.scheduler_name = scheduler
        self.total_steps = total_steps
        self.fail_at_step = fail_at_step

    def forward(self, x: Tensor) -> Tensor:
        return self.second(torch.tanh(self.first(x)))  # type: ignore[no-any-return]

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if self.trainer.global_step == self.fail_at_step:
            raise RuntimeError(f"planted failure at step {self.fail_at_step}")
        x, y = batch
        self.log("flat", 1.0, on_step=True, on_epoch=False)
        return torch.nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> Any:
        if len(self.group_lrs) == 1:
            groups: list[dict[str, Any]] = [{"params": self.parameters(), "lr": self.group_lrs[0]}]
        else:
            groups = [
                {"params": self.first.parameters(), "lr": self.group_lrs[0]},
                {"params": self.second.parameters(), "lr": self.group_lrs[1]},
            ]
        optimizer = torch.optim.SGD(groups, lr=self.group_lrs[0], momentum=0.9)
        if self.scheduler_name is None:
            return optimizer
        scheduler: Any
        if self.scheduler_name == "step":
            scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
        elif self.scheduler_name == "exponential":
            scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.8)
        elif self.scheduler_name == "onecycle":
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=list(self.group_lrs), total_steps=self.total_steps
            )
        else:
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=0.5, patience=1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "monitor": "flat"}}

    def train_dataloader(self) -> DataLoader[Any]:
        generator = torch.Generator().manual_seed(1)
        data = TensorDataset(torch.randn(64, 4, generator=generator), torch.randn(64, 1, generator=generator))
        return DataLoader(data, batch_size=4)


class TwoOptimizerRegressor(TinyRegressor):
    """Manual optimization with one SGD per layer (lrs 0.1 and 0.02), both stepped on every batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        first, second = self.optimizers()  # type: ignore[misc]
        first.zero_grad()
        second.zero_grad()
        self.manual_backward(loss)
        first.step()
        second.step()
        return loss

    def configure_optimizers(self) -> Any:
        return [torch.optim.SGD(self.first.parameters(), lr=0.1), torch.optim.SGD(self.second.parameters(), lr=0.02)]


def quiet_trainer(tmp_path: Path, callbacks: list[Any], **kwargs: Any) -> pl.Trainer:
    """A CPU trainer with no logger, checkpoint, validation, progress bar or summary unless `kwargs` ask."""
    options: dict[str, Any] = dict(
        max_steps=12,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        accelerator="cpu",
        devices=1,
        default_root_dir=tmp_path,
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)
