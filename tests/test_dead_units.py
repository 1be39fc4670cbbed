from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from digits_demo import DigitsClassifier, MobileNetLike
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_deadunits import (
    ActivationMonitor,
    DeadUnits,
    KernelNormMonitor,
    LossSpikeMonitor,
    LRWarmup,
    ThresholdRule,
)
from tests.helpers.events import load_events


def _fit(tmp_path: Path, callback: pl.Callback, max_steps: int = 6, **kwargs: Any) -> pl.Trainer:
    trainer = pl.Trainer(
        max_steps=max_steps,
        callbacks=[callback],
        logger=TensorBoardLogger(tmp_path, name="", version=""),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        **kwargs,
    )
    model = DigitsClassifier(model=MobileNetLike(widths=(8, 8, 16)), image_size=16)
    trainer.fit(model)
    return trainer


def test_default_bundle_logs_all_three_families_on_the_demo_model(tmp_path: Path) -> None:
    bundle = DeadUnits(
        activations=ActivationMonitor(every_n_steps=2), loss=LossSpikeMonitor(warmup=2), lr_warmup=LRWarmup(4)
    )
    trainer = _fit(tmp_path, bundle)
    scalars = load_events(tmp_path).Tags()["scalars"]
    assert "deadunits/kernels/total/dead" in scalars
    assert "deadunits/activations/total/zero_frac" in scalars
    assert "deadunits/loss/value" in scalars
    assert "deadunits/lr/factor" in scalars
    assert [type(cb) for cb in trainer.callbacks[:5]] == [  # type: ignore[attr-defined]
        DeadUnits,
        KernelNormMonitor,
        ActivationMonitor,
        LossSpikeMonitor,
        LRWarmup,
    ]


def test_parts_get_every_hook_once_and_are_not_inserted_twice(tmp_path: Path) -> None:
    bundle = DeadUnits(activations=False, loss=False)
    trainer = _fit(tmp_path, bundle, max_steps=2)
    kernels = bundle.kernels
    assert kernels is not None and [h["step"] for h in kernels.history] == [0.0, 2.0]
    trainer.fit(trainer.lightning_module)  # a second fit on the same trainer runs setup again
    assert trainer.callbacks.count(kernels) == 1  # type: ignore[attr-defined]


def test_parts_can_be_switched_off(tmp_path: Path) -> None:
    bundle = DeadUnits(kernels=False, activations=False)
    assert bundle.kernels is None and bundle.activations is None and isinstance(bundle.loss, LossSpikeMonitor)
    _fit(tmp_path, bundle, max_steps=3)
    scalars = load_events(tmp_path).Tags()["scalars"]
    assert not any(tag.startswith("deadunits/kernels/") for tag in scalars)
    assert "deadunits/loss/value" in scalars


def test_shared_alarms_are_copied_into_each_part_and_prefix_applies(tmp_path: Path) -> None:
    rule = ThresholdRule("*/total/dead", above=1e9)
    bundle = DeadUnits(alarms=[rule], prefix="du")
    assert bundle.kernels is not None and bundle.activations is not None
    assert bundle.kernels.alarms[0] is not rule and bundle.kernels.alarms[0] is not bundle.activations.alarms[0]
    assert bundle.kernels.prefix == bundle.activations.prefix == "du"


def test_bundle_state_round_trips_through_a_checkpoint(tmp_path: Path) -> None:
    bundle = DeadUnits(activations=ActivationMonitor(every_n_steps=2))
    trainer = _fit(tmp_path, bundle, max_steps=4)
    ckpt = tmp_path / "a.ckpt"
    trainer.save_checkpoint(ckpt)
    states = torch.load(ckpt, weights_only=True)["callbacks"]
    assert bundle.kernels is not None and bundle.kernels.state_key in states
    resumed = DeadUnits(activations=ActivationMonitor(every_n_steps=2))
    trainer2 = pl.Trainer(
        max_steps=6, callbacks=[resumed], logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, limit_val_batches=0,
    )  # fmt: skip
    trainer2.fit(DigitsClassifier(model=MobileNetLike(widths=(8, 8, 16)), image_size=16), ckpt_path=ckpt)
    assert resumed.kernels is not None
    assert [h["step"] for h in resumed.kernels.history] == [0.0, 4.0, 6.0]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"kernels": "yes"}, TypeError, "`kernels` must be an instance of KernelNormMonitor, True or False, got 'yes'"),
        ({"activations": 3}, TypeError, "`activations` must be an instance of ActivationMonitor, True or False, got 3"),
        ({"loss": None}, TypeError, "`loss` must be an instance of LossSpikeMonitor, True or False, got None"),
        ({"lr_warmup": 100}, TypeError, "`lr_warmup` must be an LRWarmup or None, got 100"),
        ({"on_alarm": ["page"]}, ValueError, "`on_alarm` must be one of"),
        ({"prefix": ""}, ValueError, "`prefix` must be a non-empty string"),
    ],
)
def test_bad_arguments_are_rejected(kwargs: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        DeadUnits(**kwargs)


def test_bundle_parts_built_from_true_check_kernels_every_100_steps_and_log_every_second_sample() -> None:
    bundle = DeadUnits()
    assert bundle.kernels is not None and bundle.kernels.every_n_steps == 100
    assert bundle.activations is not None
    assert (bundle.activations.every_n_steps, bundle.activations.log_every_n_samples) == (50, 2)
    given = KernelNormMonitor()
    assert DeadUnits(kernels=given).kernels is given and given.every_n_steps == 50  # an instance is used as it is
