from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_deadunits import GradNormMonitor, Reading
from lightning_deadunits.probes.grad_norms import GradNormProbe
from tests.helpers.memory_logger import MemoryLogger

QUIET: dict[str, Any] = dict(enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
KEY = "deadunits/grads"


class DeadRowNet(pl.LightningModule):
    """`net.0` row 1 is dead (zero weights, bias -10, behind a ReLU): its gradient is exactly zero on every batch."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        with torch.no_grad():
            self.net[0].weight[1] = 0.0
            self.net[0].bias[1] = -10.0
        generator = torch.Generator().manual_seed(3)
        self.data = TensorDataset(
            torch.randn(32, 4, generator=generator), torch.randint(0, 2, (32,), generator=generator)
        )

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        inputs, labels = batch
        return F.cross_entropy(self.net(inputs), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.data, batch_size=8)


class GradientRecorder(pl.Callback):
    """Norms computed independently (numpy, float64) from the gradients the optimizer is about to use."""

    def __init__(self) -> None:
        self.layers: dict[int, dict[str, float]] = {}
        self.total: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: Any, optimizer: Any) -> None:
        grads = {name: p.grad.detach().double().numpy() for name, p in pl_module.named_parameters()}
        squares = {name: float(np.sum(g * g)) for name, g in grads.items()}
        step = trainer.global_step
        self.layers[step] = {
            layer: squares[f"{layer}.weight"] + squares[f"{layer}.bias"] for layer in ("net.0", "net.2")
        }
        self.total[step] = sum(squares.values())


class Heard(pl.Callback):
    def __init__(self) -> None:
        self.readings: list[Reading] = []

    def on_deadunits_reading(self, trainer: pl.Trainer, pl_module: Any, reading: Reading) -> None:
        self.readings.append(reading)


def _fit(tmp_path: Path, monitor: GradNormMonitor, **options: Any) -> tuple[MemoryLogger, GradientRecorder, Heard]:
    torch.manual_seed(0)
    logger, recorder, heard = MemoryLogger(), GradientRecorder(), Heard()
    trainer = pl.Trainer(
        default_root_dir=tmp_path, callbacks=[recorder, monitor, heard], logger=logger, **{**QUIET, **options}
    )
    trainer.fit(DeadRowNet())
    return logger, recorder, heard


def test_grad_norms_are_the_root_mean_square_of_each_period_and_the_dead_row_is_found(tmp_path: Path) -> None:
    monitor = GradNormMonitor(every_n_steps=1, log_every_n_samples=2, window=2)
    logger, recorder, heard = _fit(tmp_path, monitor, max_steps=4)
    for logged_at, period in ((1, (0, 1)), (3, (2, 3))):
        for layer in ("net.0", "net.2"):
            expected = np.sqrt(np.mean([recorder.layers[step][layer] for step in period]))
            assert logger.metrics[f"{KEY}/{layer}/norm"][logged_at] == pytest.approx(expected, rel=1e-5)
        expected_total = np.sqrt(np.mean([recorder.total[step] for step in period]))
        assert logger.metrics[f"{KEY}/total/norm"][logged_at] == pytest.approx(expected_total, rel=1e-5)
        assert logger.metrics[f"{KEY}/net.0/zero_rows"][logged_at] == 1.0
        assert logger.metrics[f"{KEY}/net.2/zero_rows"][logged_at] == 0.0
        assert logger.metrics[f"{KEY}/total/zero_rows"][logged_at] == 1.0
    assert sorted(logger.metrics[f"{KEY}/total/norm"]) == [1, 3]
    (first, second) = [reading for reading in heard.readings if reading.source == "grads"]
    assert (first.step, second.step) == (1, 3)
    assert second.dead_masks["net.0"].tolist() == [False, True, False]
    assert second.dead_counts == {"net.0": 1.0, "net.2": 0.0}


def test_grad_norms_are_read_after_accumulation_on_sampled_steps_only(tmp_path: Path) -> None:
    monitor = GradNormMonitor(every_n_steps=2, window=1)
    logger, recorder, _ = _fit(tmp_path, monitor, max_steps=4, accumulate_grad_batches=2)
    assert sorted(logger.metrics[f"{KEY}/total/norm"]) == [0, 2]  # optimizer steps 0 and 2 of 0..3
    for step in (0, 2):
        assert logger.metrics[f"{KEY}/total/norm"][step] == pytest.approx(np.sqrt(recorder.total[step]), rel=1e-5)


def test_a_row_counts_as_gradient_dead_only_after_a_whole_window_of_zero_gradients(tmp_path: Path) -> None:
    monitor = GradNormMonitor(every_n_steps=1, window=3)
    model = DeadRowNet()
    monitor.probe.attach(model)
    for sample, live in enumerate([True, False, False, False]):
        model.zero_grad()
        inputs = torch.randn(8, 4)
        if live:  # one batch that reaches row 1: its gradient is nonzero once
            with torch.no_grad():
                model.net[0].bias[1] = 10.0
        model.net(inputs).sum().backward()
        with torch.no_grad():
            model.net[0].bias[1] = -10.0
        monitor.probe.sample()
        _, _, dead = monitor.probe.summary(window=3)
        assert dead["net.0"].tolist() == [False, sample >= 3, False], sample


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_n_steps": 0}, r"`every_n_steps` must be an int >= 1, got 0"),
        ({"log_every_n_samples": -1}, r"`log_every_n_samples` must be an int >= 1, got -1"),
        ({"window": 1.5}, r"`window` must be an int >= 1, got 1.5"),
        ({"include": 3}, r"`include` must be a string or a list of strings, got 3"),
    ],
)
def test_grad_norm_monitor_rejects_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        GradNormMonitor(**kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grad_norm_probe_step_norms_equal_the_norms_of_each_parameter(dtype: torch.dtype) -> None:
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.Conv2d(3, 4, 1, bias=False), nn.Flatten(), nn.Linear(16, 5), nn.Linear(5, 2)
    ).to(dtype)
    model[4].weight.requires_grad_(False)  # frozen weight: the layer is not reported; its bias still counts
    model(torch.randn(2, 2, 4, 4, dtype=dtype)).sum().backward()
    model[3].bias.grad = None  # a bias without a gradient: the weight alone
    probe = GradNormProbe()
    probe.attach(model)
    for _ in range(2):  # the second reuses the cached layout of gradients
        found = probe.step_norms()
        assert found is not None
        norms, layers = found
        assert layers == ["0", "1", "3"] and norms.dtype == torch.float32
        total, *layer_norms = norms.tolist()
        by_layer = dict(zip(layers, layer_norms, strict=True))
        grads = {
            name: [p.grad.double() for p in module.parameters() if p.grad is not None]
            for name, module in model.named_children()
        }
        expected = [sum(float(g.square().sum()) for gs in grads.values() for g in gs)]
        expected += [sum(float(g.square().sum()) for g in grads[name]) for name in layers]
        np.testing.assert_allclose(np.square([total, *by_layer.values()]), expected, rtol=1e-5)
    model[3].bias.grad = torch.ones_like(model[3].bias)  # the layout changes: the bias counts again
    found = probe.step_norms()
    assert found is not None
    total, *layer_norms = found[0].tolist()
    by_layer = dict(zip(found[1], layer_norms, strict=True))
    assert by_layer["3"] ** 2 == pytest.approx(float(model[3].weight.grad.float().square().sum()) + 5, rel=1e-5)
    probe.sample()
    norms_by_layer, device_total, _ = probe.summary(window=1)
    assert device_total is not None and float(device_total) == pytest.approx(total, rel=1e-6)
    assert float(norms_by_layer["3"]) == pytest.approx(by_layer["3"], rel=1e-6)
