"""Odd models, set-ups and inputs: each works with every monitor sampling every step, or fails clearly."""

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins import MixedPrecision
from torch import nn

from lightning_deadunits import DeadUnits, DeadUnitsWarning, load_dump
from tests.helpers.activation_models import hook_count
from tests.helpers.memory_logger import MemoryLogger
from tests.helpers.odd_models import (
    BATCH_KINDS,
    NaNHidden,
    OddTask,
    ReusedReluNet,
    SmallConvNet,
    TinyMLP,
    every_step_bundle,
    image_data,
    structured,
)

SPIKE_BATCH = 4
CONV_NET_SITES = {"model.relu1", "model.relu2"}
CONV_NET_LAYERS = {"model.conv1", "model.conv2", "model.head"}


def _frozen_conv_net() -> nn.Module:
    model = SmallConvNet()
    model.conv1.requires_grad_(False)
    model.bn1.requires_grad_(False)
    return model


@dataclass
class Case:
    """An odd model or set-up: the activation call sites and weight layers the monitors must report."""

    model: Callable[[], nn.Module] = SmallConvNet
    sites: set[str] = field(default_factory=lambda: set(CONV_NET_SITES))
    layers: set[str] = field(default_factory=lambda: set(CONV_NET_LAYERS))
    task: dict[str, Any] = field(default_factory=dict)
    trainer: dict[str, Any] = field(default_factory=dict)


CASES = {
    "no_conv_layers": Case(TinyMLP, {"model.relu"}, {"model.fc1", "model.fc2"}),
    "frozen_layers": Case(_frozen_conv_net),
    "module_called_three_times": Case(
        ReusedReluNet,
        {f"model.body.relu#{call}" for call in range(3)},
        {"model.body.conv1", "model.body.conv2", "model.body.conv3", "model.head"},
    ),
    "inplace_activations": Case(lambda: SmallConvNet(inplace=True)),
    "channels_last": Case(
        lambda: SmallConvNet().to(memory_format=torch.channels_last),  # type: ignore[call-overload]
        task={"channels_last": True},
    ),
    "bf16_mixed": Case(trainer={"precision": "bf16-mixed"}),
    # Lightning turns "16-mixed" into bf16 on CPU; the plugin with a CPU GradScaler runs true fp16 autocast.
    "fp16_mixed": Case(trainer={"plugins": [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]}),
    "gradient_accumulation": Case(trainer={"accumulate_grad_batches": 2}),
    "two_optimizers_manual": Case(task={"manual": True}),
}


def _fit(
    tmp_path: Path, case: Case, compile_model: bool = False, logger: Any = None
) -> tuple[DeadUnits, MemoryLogger, OddTask]:
    model = case.model()
    task = OddTask(model, [structured("tensor_tuple", *pair) for pair in image_data(8)], **case.task)
    task.spikes = {SPIKE_BATCH: 100.0}
    memory = MemoryLogger()
    bundle = every_step_bundle(dump_dir=tmp_path / "dumps")
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[bundle],
        logger=[memory, *([logger] if logger else [])],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **case.trainer,
    )
    trainer.fit(torch.compile(task, backend="eager") if compile_model else task)  # type: ignore[arg-type]
    return bundle, memory, task


def _reported(memory: MemoryLogger, source: str) -> set[str]:
    return {key.split("/")[2] for key in memory.metrics if key.startswith(f"deadunits/{source}/")} - {"total"}


def _check_every_monitor_ran(bundle: DeadUnits, memory: MemoryLogger, task: OddTask, case: Case) -> None:
    kernels, activations, loss = bundle.kernels, bundle.activations, bundle.loss
    warmup = bundle.parts[-1]
    assert kernels is not None and activations is not None and loss is not None
    assert _reported(memory, "activations") == case.sites
    assert _reported(memory, "kernels") == case.layers
    assert [event["batch_idx"] for event in loss.events] == [SPIKE_BATCH]
    # the spike alarm re-warms from the next optimizer step
    (rewarm_start,) = warmup.rewarm_starts  # type: ignore[attr-defined]
    assert loss.spike_steps[0] <= rewarm_start <= loss.spike_steps[0] + 2
    assert "deadunits/lr/factor" in memory.metrics
    for key, series in memory.metrics.items():
        if key.startswith("deadunits/") and key != "deadunits/loss/spike_score":
            assert all(math.isfinite(value) for value in series.values()), key
    assert hook_count(task) == 0


@pytest.mark.parametrize("name", list(CASES))
def test_every_monitor_runs_on_an_odd_model_or_set_up(tmp_path: Path, name: str) -> None:
    case = CASES[name]
    bundle, memory, task = _fit(tmp_path, case)
    _check_every_monitor_ran(bundle, memory, task, case)


def test_frozen_layers_are_watched_and_stay_unchanged(tmp_path: Path) -> None:
    torch.manual_seed(0)
    before = _frozen_conv_net().conv1.weight.detach().clone()
    torch.manual_seed(0)
    _, memory, task = _fit(tmp_path, CASES["frozen_layers"])
    assert torch.equal(task.model.conv1.weight, before)
    median = float(torch.quantile(before.abs().flatten(1).sum(1), 0.5))
    medians = memory.series("deadunits/kernels/model.conv1/norm_median")
    assert len(medians) == 9 and all(value == pytest.approx(median) for value in medians.values())


def test_channels_last_reads_the_same_numbers_as_contiguous(tmp_path: Path) -> None:
    torch.manual_seed(0)
    _, contiguous, _ = _fit(tmp_path / "contiguous", Case())
    torch.manual_seed(0)
    _, channels_last, _ = _fit(tmp_path / "channels_last", CASES["channels_last"])
    assert channels_last.metrics.keys() == contiguous.metrics.keys()
    for key, series in contiguous.metrics.items():
        if key.startswith("deadunits/") and "spike_score" not in key:
            assert channels_last.metrics[key] == pytest.approx(series, rel=1e-4, abs=1e-5), key


@pytest.mark.slow  # about 10 s of TorchDynamo tracing on two CPU cores
def test_compiled_model_is_measured_exactly_as_the_eager_one(tmp_path: Path) -> None:
    # The "eager" backend runs TorchDynamo's tracing (where hooks on compiled modules are handled) without the
    # minute-long C++ compilation of the default inductor backend on CPU.
    torch.manual_seed(0)
    _, eager, _ = _fit(tmp_path / "eager", Case())
    torch.manual_seed(0)
    bundle, compiled, task = _fit(tmp_path / "compiled", Case(), compile_model=True)
    _check_every_monitor_ran(bundle, compiled, task, Case())
    # the same values; under TorchDynamo float sums may be added in another order (last bits of a std)
    assert compiled.metrics.keys() == eager.metrics.keys()
    for key, series in eager.metrics.items():
        assert compiled.metrics[key] == pytest.approx(series, rel=1e-6, nan_ok=True), key


def _decoded_inputs(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, dict):
        return batch["x"], batch["y"]
    if hasattr(batch, "x"):
        return batch.x, batch.y
    return batch[0], batch[1]


@pytest.mark.parametrize("kind", BATCH_KINDS)
def test_batches_of_any_structure_are_dumped_and_read_back(tmp_path: Path, kind: str) -> None:
    pairs = image_data(6)
    task = OddTask(SmallConvNet(), [structured(kind, *pair) for pair in pairs], spikes={SPIKE_BATCH: 100.0})
    bundle = every_step_bundle(dump_dir=tmp_path / "dumps")
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[bundle],
        logger=False,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    if kind == "opaque":
        with pytest.warns(
            DeadUnitsWarning, match=r"could not store values of type \['tests.helpers.odd_models.Opaque'"
        ):
            trainer.fit(task)
    else:
        trainer.fit(task)
    assert bundle.loss is not None
    (event,) = bundle.loss.events
    batch, metadata = load_dump(event["dump"])
    x, y = _decoded_inputs(batch)
    assert torch.equal(x, pairs[SPIKE_BATCH][0]) and torch.equal(y, pairs[SPIKE_BATCH][1])
    assert metadata["batch_idx"] == SPIKE_BATCH
    if kind == "namedtuple":
        assert type(batch).__name__ == "XYBatch" and batch.tag == "tag"
    elif kind == "dataclass":
        assert type(batch).__name__ == "PairBatch" and batch.note is None
    elif kind == "strings_and_none":
        assert batch["names"] == ["sample0", "sample1"] and batch["mask"] is None
    elif kind == "opaque":
        assert batch["extra"]["repr"] == "Opaque()" and metadata["unsaved"] == ["tests.helpers.odd_models.Opaque"]


def test_an_empty_batch_is_skipped_by_every_monitor(tmp_path: Path) -> None:
    batches: list[Any] = [structured("tensor_tuple", *pair) for pair in image_data(5)]
    batches[2] = (torch.zeros(0, 3, 4, 4), torch.zeros(0, 1))
    task = OddTask(TinyMLP(), batches)
    memory = MemoryLogger()
    bundle = every_step_bundle()
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[bundle],
        logger=memory,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(task)  # the skipped batch still counts as an optimizer step (Lightning steps with no gradient)
    assert trainer.global_step == 5 and bundle.loss is not None and bundle.activations is not None
    assert [step for step, _ in bundle.loss.detector.recent] == [0, 1, 3, 4]
    assert sorted(memory.series("deadunits/activations/model.relu/zero_frac")) == [0, 1, 3, 4]
    assert sorted(memory.series("deadunits/activations/total/channels")) == [0, 1, 3, 4]
    assert hook_count(task) == 0


@pytest.mark.parametrize("where", ["nan_input", "inf_input", "nan_loss", "inf_loss", "nan_activation"])
def test_non_finite_inputs_activations_and_losses_are_reported_and_never_crash(tmp_path: Path, where: str) -> None:
    pairs = image_data(6)
    if where.endswith("_input"):
        pairs[3][0][0, 0, 0, 0] = math.nan if where == "nan_input" else math.inf
    loss_scale = {3: math.nan if where == "nan_loss" else math.inf} if where.endswith("_loss") else {}
    model = NaNHidden() if where == "nan_activation" else SmallConvNet()
    batches = [structured("tensor_tuple", *pair) for pair in pairs]
    task = OddTask(model, batches, loss_scale=loss_scale, poison_batches=[3])
    memory = MemoryLogger()
    bundle = every_step_bundle(dump_dir=tmp_path / "dumps", skip_update=True, max_abs_above=1e6)
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[bundle],
        logger=[memory, TensorBoardLogger(tmp_path, name="", version="")],  # panels see the non-finite values
        default_root_dir=tmp_path,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(task)
    assert trainer.global_step == 6 and bundle.loss is not None and bundle.activations is not None
    assert all(torch.isfinite(parameter).all() for parameter in task.parameters())
    max_abs = memory.series("deadunits/activations/model.relu2/max_abs")
    assert all(math.isfinite(max_abs[step]) for step in (2, 4, 5))
    alarms = {(alarm.step, alarm.key) for alarm in bundle.activations.alarm_log}
    if where == "nan_activation":
        assert bundle.loss.spike_steps == []
        assert math.isnan(max_abs[3]) and (3, "deadunits/activations/model.relu2/max_abs") in alarms
        return
    assert bundle.loss.spike_steps == [3] and bundle.loss.events[0]["reason"] == "non-finite"
    assert bundle.loss.skipped_updates == 1
    if where.endswith("_input"):
        assert not math.isfinite(max_abs[3]) and (3, "deadunits/activations/model.relu2/max_abs") in alarms


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_validate_or_test_only_run_leaves_the_training_probes_idle(tmp_path: Path, stage: str) -> None:
    task = OddTask(SmallConvNet(), [structured("tensor_tuple", *pair) for pair in image_data(3)])
    memory = MemoryLogger()
    bundle = every_step_bundle()
    trainer = pl.Trainer(
        callbacks=[bundle],
        logger=memory,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    getattr(trainer, stage)(task)
    assert "val_loss" in memory.metrics
    assert not [key for key in memory.metrics if key.startswith("deadunits/")]
    assert bundle.kernels is not None and bundle.kernels.history == [] and bundle.kernels.last_check_step is None
    assert bundle.loss is not None and not bundle.loss.detector.recent
    assert bundle.activations is not None and bundle.activations.stats.sites == {}
    assert hook_count(task) == 0
