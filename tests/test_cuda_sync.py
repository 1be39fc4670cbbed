from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from digits_demo import MobileNetLike, digits_dataset
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_deadunits import ActivationMonitor, DeadUnits, GradNormMonitor, KernelNormMonitor
from lightning_deadunits.callbacks.loss_spike_monitor import LossSpikeMonitor
from lightning_deadunits.dumps import load_dump
from lightning_deadunits.functional import activations as functional_activations
from lightning_deadunits.probes.loss import LossProbe
from tests.helpers.spike_models import DigitsMLP, digits_with_dirty_batches

STEPS = 12  # DeadUnits samples at step 0 only (every_n_steps=50); the checks at train end come after the guard


class DigitsOnDevice(pl.LightningModule):
    """A tiny MobileNet on 8 x 8 digits that already live on the device, so no batch is copied from the host."""

    def __init__(self, device: torch.device, model: nn.Module | None = None, channels_last: bool = False) -> None:
        super().__init__()
        self.model = model or MobileNetLike(widths=(8, 8, 16))
        self.channels_last = channels_last
        images, labels = digits_dataset(8, "train").tensors
        self.data = TensorDataset(images[:512].to(device), labels[:512].to(device))

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        images, labels = batch
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        per_sample = F.cross_entropy(self.model(images), labels, reduction="none")
        return {"loss": per_sample.mean(), "per_sample_loss": per_sample.detach()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.data, batch_size=32)


class FunctionalConvNet(nn.Module):
    """Convolutions whose activations are functions called in ``forward`` (no activation module to hook)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.head = nn.Linear(16, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = F.gelu(self.conv2(F.relu(self.conv1(x))))
        return self.head(x.mean(dim=(2, 3)))  # type: ignore[no-any-return]


class SyncDebugGuard(pl.Callback):
    """Put first, it turns ``set_sync_debug_mode("error")`` on as batches between sampling points start; put last,
    it turns it off as they end: every hook of the callbacks in between, the forward, backward and optimizer step
    then run with any device synchronisation raising."""

    def __init__(self, role: str) -> None:
        self.role = role
        self.guarded_steps: list[int] = []

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.role == "on" and 0 < trainer.global_step < STEPS - 1:
            self.guarded_steps.append(trainer.global_step)
            torch.cuda.set_sync_debug_mode("error")

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.role == "off":
            torch.cuda.set_sync_debug_mode("default")


def _monitors() -> dict[str, Callable[[], list[pl.Callback]]]:
    """Every monitor, each at a setting whose sampling points fall between the guarded steps: measuring on the
    device there must not wait for it; logging (one host transfer) comes at step 0 or at train end only."""
    every_step = lambda: [ActivationMonitor(every_n_steps=1)]  # noqa: E731
    return {
        "bare": lambda: [],
        "DeadUnits": lambda: [DeadUnits()],
        "ActivationMonitor every step": every_step,
        "ActivationMonitor every step, functional activations": every_step,
        "ActivationMonitor every step, channels last": every_step,
        "GradNormMonitor every step": lambda: [GradNormMonitor(every_n_steps=1, log_every_n_samples=50)],
        "KernelNormMonitor": lambda: [KernelNormMonitor()],
        "LossSpikeMonitor": lambda: [LossSpikeMonitor()],
        "LossSpikeMonitor without gradient signal": lambda: [LossSpikeMonitor(grad_signal=False)],
    }


def _module(name: str, device: torch.device) -> DigitsOnDevice:
    if name.endswith("functional activations"):
        return DigitsOnDevice(device, FunctionalConvNet())
    return DigitsOnDevice(device, channels_last=name.endswith("channels last"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fused", [False, True], ids=["eager statistics", "fused statistics"])
@pytest.mark.parametrize("name", list(_monitors()))
def test_monitors_make_no_device_sync_between_sampling_points(
    tmp_path: Path, name: str, fused: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if fused and "Activation" not in name and name != "DeadUnits":
        pytest.skip("no activation statistics")
    # Fused: the compiled (Triton) statistics kernel from the first measured tensor on, compiled at step 0.
    monkeypatch.setattr(functional_activations, "COMPILE_AFTER_CALLS", 0 if fused else None)
    module = _module(name, torch.device("cuda"))
    first, last = SyncDebugGuard("on"), SyncDebugGuard("off")
    callbacks = _monitors()[name]()
    trainer = pl.Trainer(
        accelerator="cuda",
        devices=1,
        max_steps=STEPS,
        callbacks=[first, *callbacks, last],
        logger=TensorBoardLogger(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    try:
        trainer.fit(module)  # the bare run shows that Lightning and the model alone do not sync either
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert first.guarded_steps == list(range(1, STEPS - 1))
    if name == "DeadUnits":
        bundle = callbacks[0]
        assert isinstance(bundle, DeadUnits)
        assert bundle.loss is not None and bundle.kernels is not None and bundle.activations is not None
        # every loss was judged (the last one at train end), and the monitors measured at their sampling points
        assert [step for step, _ in bundle.loss.detector.recent] == list(range(STEPS))
        assert bundle.kernels.last_check_step == STEPS and bundle.activations.last_log_step == 0
    if name.startswith("ActivationMonitor every step"):
        monitor = callbacks[0]
        assert isinstance(monitor, ActivationMonitor)
        assert monitor.stats.samples == STEPS and monitor.last_log_step == STEPS - 1  # one log, at train end
        sites = {monitor.probe.site_name(site) for site in monitor.stats.sites}
        if name.endswith("functional activations"):
            assert sites == {"model:relu#0", "model:gelu#0"}
    if fused:
        assert functional_activations._FUSED.variants, "the fused kernel did not run"


def _spike_run(tmp_path: Path, **monitor_options: Any) -> tuple[LossSpikeMonitor, pl.Trainer]:
    torch.manual_seed(0)
    monitor = LossSpikeMonitor(window=30, warmup=20, **monitor_options)
    trainer = pl.Trainer(
        max_steps=60,
        callbacks=[monitor],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(DigitsMLP(digits_with_dirty_batches(dirty_batches=[40, 59])))
    return monitor, trainer


def test_loss_read_one_batch_late_gives_the_same_spikes_dumps_and_baseline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On CUDA the loss is read one batch late so that reading it never waits for the device; run that path on CPU.
    at_once, _ = _spike_run(tmp_path / "at_once")
    monkeypatch.setattr(LossProbe, "deferred_devices", ("cpu",))
    late, _ = _spike_run(tmp_path / "late")
    assert at_once.spike_steps == late.spike_steps == [40, 59]  # the last one judged at train end
    for expected, event in zip(at_once.events, late.events, strict=True):
        assert {**event, "dump": None} == {**expected, "dump": None}
        (batch, metadata), (expected_batch, expected_metadata) = load_dump(event["dump"]), load_dump(expected["dump"])
        assert all(a.equal(b) for a, b in zip(batch, expected_batch, strict=True))
        assert metadata["per_sample_loss"].equal(expected_metadata["per_sample_loss"])
    assert late.detector.state_dict() == at_once.detector.state_dict()


def test_loss_read_one_batch_late_stops_one_batch_later(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(LossProbe, "deferred_devices", ("cpu",))
    late, trainer = _spike_run(tmp_path, on_alarm=["stop"])
    assert late.spike_steps == [40] and late.stop_step == 40 and trainer.global_step == 42
