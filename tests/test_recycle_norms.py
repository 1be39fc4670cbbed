"""Recycling keeps the network's function through per-unit normalisation and refuses normalisation across units."""

import logging
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn

from lightning_deadunits.actions.recycle import mixing_refusal, recycle_units
from lightning_deadunits.callbacks.dead_unit_recycler import DeadUnitRecycler
from lightning_deadunits.callbacks.kernel_norm_monitor import KernelNormMonitor
from lightning_deadunits.probes.unit_flow import UnitFlowTracer
from tests.helpers.memory_logger import MemoryLogger

DEAD = [2, 5]
SUPPORTED = ["none", "batchnorm", "instancenorm", "groupnorm_per_channel", "residual"]
REFUSED = {"layernorm": "LayerNorm", "groupnorm": "GroupNorm"}


class Block(nn.Module):
    """`fc2(relu(norm(fc1(x))))` (plus `x` for the residual topology), as 1x1 convolutions on `(N, 8, L)`, or as
    linear layers on `(N, L, 8)` for LayerNorm; units 2 and 5 of `fc1` planted dead (zero rows, negative bias)."""

    def __init__(self, topology: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.topology = topology
        channels_last = topology == "layernorm"
        self.fc1: nn.Module = nn.Linear(8, 12) if channels_last else nn.Conv1d(8, 12, 1)
        self.fc2: nn.Module = nn.Linear(12, 8) if channels_last else nn.Conv1d(12, 8, 1)
        norms: dict[str, nn.Module] = {
            "batchnorm": nn.BatchNorm1d(12),
            "instancenorm": nn.InstanceNorm1d(12, affine=True),
            "groupnorm_per_channel": nn.GroupNorm(12, 12),
            "layernorm": nn.LayerNorm(12),
            "groupnorm": nn.GroupNorm(3, 12),
        }
        self.norm = norms.get(topology, nn.Identity())
        self.relu = nn.ReLU()
        with torch.no_grad():
            self.fc1.weight[DEAD] = 0.0  # type: ignore[index]
            self.fc1.bias[DEAD] = -1.0  # type: ignore[index]
            bias = getattr(self.norm, "bias", None)
            if isinstance(bias, Tensor):
                bias[DEAD] = -1.0  # a constant channel normalises to its beta: keep it below 0

    def forward(self, x: Tensor) -> Tensor:
        out = self.fc2(self.relu(self.norm(self.fc1(x))))
        return out + x if self.topology == "residual" else out  # type: ignore[no-any-return]


def _inputs(topology: str) -> Tensor:
    x = torch.randn(6, 8, 5, generator=torch.Generator().manual_seed(1))
    return x.transpose(1, 2).contiguous() if topology == "layernorm" else x


def _traced(model: Block, x: Tensor) -> UnitFlowTracer:
    tracer = UnitFlowTracer()
    tracer.start(model, {"fc1": model.fc1, "fc2": model.fc2})
    model(x)
    tracer.finish()
    return tracer


@pytest.mark.parametrize("topology", SUPPORTED)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_recycling_keeps_the_output_through_every_supported_topology(topology: str, mode: str) -> None:
    model, x = Block(topology), _inputs(topology)
    tracer = _traced(model, x)
    assert tracer.consumers["fc1"] == ["fc2"] and "fc1" not in tracer.mixers
    model.train(mode == "train")
    with torch.no_grad():
        before = model(x)
    units = torch.zeros(12, dtype=torch.bool)
    units[DEAD] = True
    modules = dict(model.named_modules())
    norms = [modules[name] for name in tracer.norms.get("fc1", [])]
    recycle_units(model.fc1, units, seed=3, consumers=[model.fc2], norms=norms)
    with torch.no_grad():
        after = model(x)
    assert float((after - before).abs().max()) <= 1e-6
    assert float(model.fc1.weight[DEAD].abs().sum()) > 0  # type: ignore[index]  # fresh incoming weights


@pytest.mark.parametrize("topology", REFUSED)
def test_normalisation_across_units_is_found_and_would_change_the_output(topology: str) -> None:
    model, x = Block(topology), _inputs(topology)
    tracer = _traced(model, x)
    assert tracer.mixers == {"fc1": ["norm"]}
    with torch.no_grad():
        before = model(x)
    units = torch.zeros(12, dtype=torch.bool)
    units[DEAD] = True
    recycle_units(model.fc1, units, seed=3, consumers=[model.fc2], norms=[model.norm])
    with torch.no_grad():
        assert float((model(x) - before).abs().max()) > 1e-2  # what the refusal prevents


class BlockTask(pl.LightningModule):
    def __init__(self, topology: str) -> None:
        super().__init__()
        self.model = Block(topology)
        self.x = _inputs(topology)

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return self.model(batch).pow(2).mean()  # type: ignore[no-any-return]

    def train_dataloader(self) -> torch.utils.data.DataLoader[Tensor]:
        return torch.utils.data.DataLoader([self.x] * 3, batch_size=None)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("topology", ["layernorm", "groupnorm", "batchnorm"])
def test_recycler_refuses_normalisation_across_units_with_the_documented_message(
    tmp_path: Path, topology: str, caplog: pytest.LogCaptureFixture
) -> None:
    task = BlockTask(topology)
    before = task.model.fc1.weight.detach().clone()
    memory = MemoryLogger()
    callbacks = [KernelNormMonitor(every_n_steps=1, rel_threshold=0.0), DeadUnitRecycler(every_n_steps=1)]
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=callbacks,
        logger=[memory],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    with caplog.at_level(logging.INFO, logger="lightning_deadunits"):
        trainer.fit(task)
    recycled = memory.series("deadunits/recycle/model.fc1/recycled")
    refusal = mixing_refusal("model.fc1", [("model.norm", task.model.norm)])
    if topology == "batchnorm":
        assert max(recycled.values()) == 2  # ceil(0.1 * 12) units at a time: per-unit normalisation is fine
        assert refusal not in caplog.text
        return
    assert recycled and set(recycled.values()) == {0.0}
    assert torch.equal(task.model.fc1.weight.detach(), before)
    assert refusal in caplog.text and f"'model.norm' ({REFUSED[topology]})" in refusal
