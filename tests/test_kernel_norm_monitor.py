from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_deadunits import DeadUnitsWarning, KernelNormMonitor, ThresholdRule
from lightning_deadunits._strategies import reject_sharded_strategy
from tests.helpers.events import load_events, scalar_series
from tests.helpers.kernel_models import AllKinds, LitWrapper


def _trainer(tmp_path: Path, callbacks: list[Any], **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = dict(
        max_steps=4,
        logger=TensorBoardLogger(tmp_path, name="", version=""),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


def _plant(model: AllKinds) -> None:
    """stem: filter 0 exactly 0, filter 1 at 1e-40; dw: filter 3 at 5% of the layer median; head row 2 zero."""
    with torch.no_grad():
        model.stem.weight[0] = 0
        model.stem.weight[1] = 1e-40
        l1 = model.dw.weight.abs().flatten(1).sum(1)
        model.dw.weight[3] *= 0.05 * l1.median() / l1[3]
        model.head.weight[2] = 0
        model.bn_for_pw.weight[[5, 7]] = 0


def _rows(module: nn.Module) -> np.ndarray:
    weight = module.weight.detach().float().numpy()
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        g = module.groups
        per_group = weight.reshape(g, weight.shape[0] // g, weight.shape[1], -1).transpose(0, 2, 1, 3)
        return per_group.reshape(g * weight.shape[1], -1)
    return weight.reshape(weight.shape[0], -1)


def test_planted_dead_filters_are_counted_exactly(tmp_path: Path) -> None:
    model = AllKinds()
    _plant(model)
    monitor = KernelNormMonitor(every_n_steps=2)
    _trainer(tmp_path, [monitor]).fit(LitWrapper(model, lr=0.0))
    events = load_events(tmp_path)
    expected = {
        "stem": (2, 2, None),
        "pw": (0, 0, 2),
        "dw": (0, 1, None),
        "grouped": (0, 0, None),
        "up": (0, 0, None),
        "conv1d": (0, 0, None),
        "head": (1, 1, None),
    }
    for layer, (dead_abs, dead_rel, dead_bn) in expected.items():
        assert scalar_series(events, f"deadunits/kernels/model.{layer}/dead_abs") == dict.fromkeys((0, 2, 4), dead_abs)
        assert scalar_series(events, f"deadunits/kernels/model.{layer}/dead_rel") == dict.fromkeys((0, 2, 4), dead_rel)
        bn_tag = f"deadunits/kernels/model.{layer}/dead_bn"
        if dead_bn is None:
            assert bn_tag not in events.Tags()["scalars"]
        else:
            assert scalar_series(events, bn_tag) == dict.fromkeys((0, 2, 4), dead_bn)
    assert scalar_series(events, "deadunits/kernels/total/dead_abs")[4] == 3
    assert scalar_series(events, "deadunits/kernels/total/dead_rel")[4] == 4
    assert scalar_series(events, "deadunits/kernels/total/dead_bn")[4] == 2
    assert scalar_series(events, "deadunits/kernels/total/dead")[4] == 6
    assert monitor.probe.bn_to_layer == {"model.bn_for_pw": "model.pw"}
    assert monitor.probe.kinds == {
        "model.stem": "conv", "model.pw": "conv", "model.dw": "depthwise", "model.grouped": "grouped",
        "model.up": "transpose", "model.conv1d": "conv", "model.head": "linear",
    }  # fmt: skip
    assert torch.nonzero(monitor.dead_masks["model.pw"]).flatten().tolist() == [5, 7]


def test_logged_counts_equal_independent_counts_from_final_weights(tmp_path: Path) -> None:
    model = AllKinds()
    _plant(model)
    monitor = KernelNormMonitor(every_n_steps=3, rel_threshold=0.3)
    _trainer(tmp_path, [monitor], max_steps=7).fit(LitWrapper(model, lr=0.5))
    events = load_events(tmp_path)
    assert sorted(scalar_series(events, "deadunits/kernels/total/dead")) == [0, 3, 6, 7]
    for name in ("stem", "pw", "dw", "grouped", "up", "conv1d", "head"):
        l1 = np.abs(_rows(getattr(model, name))).sum(1)
        assert scalar_series(events, f"deadunits/kernels/model.{name}/dead_abs")[7] == int((l1 < 1e-6).sum())
        assert scalar_series(events, f"deadunits/kernels/model.{name}/dead_rel")[7] == int(
            (l1 < 0.3 * np.median(l1)).sum()
        )
        assert scalar_series(events, f"deadunits/kernels/model.{name}/norm_median")[7] == pytest.approx(
            np.median(l1), rel=1e-5
        )


def test_panels_are_written_to_tensorboard(tmp_path: Path) -> None:
    model = AllKinds()
    _plant(model)
    _trainer(tmp_path, [KernelNormMonitor(every_n_steps=2, heatmap_layers=2)]).fit(LitWrapper(model))
    tags = load_events(tmp_path).Tags()
    assert "deadunits/kernels/dead_per_layer" in tags["images"]
    assert "deadunits/kernels/heatmap/model.stem" in tags["images"]
    assert "deadunits/kernels/model.stem/l1" in tags["histograms"]
    assert "custom_scalars__config__" in tags["tensors"]


def test_no_panels_when_switched_off(tmp_path: Path) -> None:
    _trainer(tmp_path, [KernelNormMonitor(log_histograms=False, log_images=False)]).fit(LitWrapper(AllKinds()))
    tags = load_events(tmp_path).Tags()
    assert tags["images"] == [] and tags["histograms"] == []


class _KillFilter(pl.Callback):
    """Zeroes stem filter 4 after the optimizer step that makes global_step == 3, restores it at step 6."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, *args: Any) -> None:
        with torch.no_grad():
            if trainer.global_step == 3:
                self.saved = pl_module.model.stem.weight[4].clone()
                pl_module.model.stem.weight[4] = 0
            if trainer.global_step == 6:
                pl_module.model.stem.weight[4] = self.saved


def test_death_step_growth_and_revival_are_tracked(tmp_path: Path) -> None:
    monitor = KernelNormMonitor(every_n_steps=1)
    _trainer(tmp_path, [_KillFilter(), monitor], max_steps=8).fit(LitWrapper(AllKinds(), lr=0.0))
    events = load_events(tmp_path)
    newly = scalar_series(events, "deadunits/kernels/model.stem/newly_dead")
    revived = scalar_series(events, "deadunits/kernels/model.stem/revived")
    assert [step for step, value in newly.items() if value] == [3]
    assert [step for step, value in revived.items() if value] == [6]
    assert monitor.tracker.dead_since["model.stem"].tolist() == [-1] * 8
    assert int(monitor.tracker.revived_total["model.stem"]) == 1


def test_checks_only_on_scheduled_steps_with_gradient_accumulation(tmp_path: Path) -> None:
    monitor = KernelNormMonitor(every_n_steps=2)
    trainer = _trainer(tmp_path, [monitor], max_steps=5, accumulate_grad_batches=2)
    trainer.fit(LitWrapper(AllKinds(), lr=0.1, batches=12))
    steps = sorted(scalar_series(load_events(tmp_path), "deadunits/kernels/total/dead"))
    assert steps == [0, 2, 4, 5]


def test_threshold_alarm_fires_on_planted_dead_filters(tmp_path: Path) -> None:
    seen = []
    rule = ThresholdRule("deadunits/kernels/total/dead", above=2)
    model = AllKinds()
    _plant(model)
    _trainer(tmp_path, [KernelNormMonitor(every_n_steps=2, alarms=[rule], on_alarm=[seen.append])]).fit(
        LitWrapper(model)
    )
    assert [(a.step, a.value, a.key) for a in seen] == [
        (0, 6.0, "deadunits/kernels/total/dead"),
        (2, 6.0, "deadunits/kernels/total/dead"),
        (4, 6.0, "deadunits/kernels/total/dead"),
    ]
    assert "deadunits/alarms/text_summary" in load_events(tmp_path).Tags()["tensors"]


def test_state_round_trip_and_resume_continues_history(tmp_path: Path) -> None:
    model = AllKinds()
    first = KernelNormMonitor(every_n_steps=2)
    trainer = _trainer(tmp_path, [first], max_steps=4, enable_checkpointing=True)
    lit = LitWrapper(model, lr=0.1, batches=8)
    trainer.fit(lit)
    ckpt = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)["callbacks"][first.state_key]
    assert state["last_check_step"] == 4
    assert [h["step"] for h in state["history"]] == [0.0, 2.0, 4.0]

    resumed = KernelNormMonitor(every_n_steps=2)
    _trainer(tmp_path / "b", [resumed], max_steps=8).fit(LitWrapper(model, lr=0.1, batches=8), ckpt_path=ckpt)
    assert [h["step"] for h in resumed.history] == [0.0, 2.0, 4.0, 6.0, 8.0]
    assert resumed.probe.bn_to_layer == {"model.bn_for_pw": "model.pw"}

    copy = KernelNormMonitor(every_n_steps=2)
    copy.load_state_dict(resumed.state_dict())
    assert copy.history == resumed.history
    assert copy.tracker.dead_since.keys() == resumed.tracker.dead_since.keys()


def test_two_instances_with_different_settings_have_distinct_state_keys() -> None:
    assert KernelNormMonitor(rel_threshold=0.1).state_key != KernelNormMonitor(rel_threshold=0.2).state_key


def test_include_exclude_and_types_select_layers(tmp_path: Path) -> None:
    monitor = KernelNormMonitor(include=["*w*"], exclude=["*.pw"], layer_types=[nn.Conv2d])
    _trainer(tmp_path, [monitor], max_steps=1).fit(LitWrapper(AllKinds()))
    assert sorted(monitor.probe.layers) == ["model.dw"]


def test_model_without_watched_layers_warns_and_logs_nothing(tmp_path: Path) -> None:
    monitor = KernelNormMonitor(include=["encoder.*"])
    with pytest.warns(DeadUnitsWarning, match="found no layer to watch"):
        _trainer(tmp_path, [monitor], max_steps=1).fit(LitWrapper(AllKinds()))
    assert monitor.history == []


def test_pairing_hooks_are_removed_after_first_step_and_on_exception(tmp_path: Path) -> None:
    class Boom(LitWrapper):
        def training_step(self, batch: Any, batch_idx: int) -> Any:
            self(batch[0])
            raise RuntimeError("boom")

    monitor = KernelNormMonitor()
    model = AllKinds()
    with pytest.raises(RuntimeError, match="boom"):
        _trainer(tmp_path, [monitor]).fit(Boom(model))
    assert monitor.probe.hooks_attached == 0
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_sharded_strategies_are_rejected_at_setup() -> None:
    from lightning.pytorch.strategies import FSDPStrategy

    with pytest.raises(ValueError, match=r"does not support sharded strategies.*FSDPStrategy"):
        reject_sharded_strategy(SimpleNamespace(strategy=FSDPStrategy()), "KernelNormMonitor")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_n_steps": 0}, "`every_n_steps` must be an int >= 1, got 0"),
        ({"every_n_steps": 2.5}, "`every_n_steps` must be an int >= 1, got 2.5"),
        ({"abs_threshold": -1.0}, r"`abs_threshold` must be a finite number in \[0.0, inf\], got -1.0"),
        ({"rel_threshold": 1.5}, r"`rel_threshold` must be a finite number in \[0.0, 1.0\], got 1.5"),
        ({"bn_threshold": float("nan")}, "`bn_threshold` must be a finite number"),
        ({"heatmap_layers": -1}, "`heatmap_layers` must be an int >= 0, got -1"),
        ({"on_alarm": ["shout"]}, "`on_alarm` must be one of 'log', 'warn', 'stop', 'raise', got 'shout'"),
        ({"prefix": "a/"}, "`prefix` must be a non-empty string"),
    ],
)
def test_bad_numbers_and_choices_raise_value_error(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        KernelNormMonitor(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"include": [1]}, "`include` must be a string or a list of strings, got"),
        ({"exclude": 3}, "`exclude` must be a string or a list of strings, got 3"),
        ({"layer_types": ["Conv2d"]}, "`layer_types` must be a class or a list of classes"),
        ({"log_images": "yes"}, "`log_images` must be a bool, got 'yes'"),
        ({"log_histograms": 1}, "`log_histograms` must be a bool, got 1"),
        ({"alarms": ["dead > 3"]}, "`alarms` must be a list of Rule objects"),
    ],
)
def test_bad_types_raise_type_error(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(TypeError, match=message):
        KernelNormMonitor(**kwargs)


def test_kernel_images_are_drawn_at_every_nth_check_and_at_the_train_end_check(tmp_path: Path) -> None:
    monitor = KernelNormMonitor(every_n_steps=2, images_every_n_checks=2, heatmap_layers=0)
    _trainer(tmp_path, [monitor], max_steps=7).fit(LitWrapper(AllKinds()))
    events = load_events(tmp_path)
    # checks at 0 (fit start), 2, 4, 6 and 7 (train end): images at the 1st and 3rd, and at train end
    assert [event.step for event in events.Images("deadunits/kernels/dead_per_layer")] == [0, 4, 7]
    assert len(events.Histograms("deadunits/kernels/model.stem/l1")) == 5


def test_kernel_images_of_the_last_check_are_drawn_when_training_ends_on_it(tmp_path: Path) -> None:
    monitor = KernelNormMonitor(every_n_steps=2, images_every_n_checks=10, heatmap_layers=1)
    _trainer(tmp_path, [monitor], max_steps=6).fit(LitWrapper(AllKinds()))
    events = load_events(tmp_path)
    # checks at 0 (fit start), 2, 4 and 6, the last step: images at the first and, at train end, of the last
    assert [event.step for event in events.Images("deadunits/kernels/dead_per_layer")] == [0, 6]
    heatmaps = [tag for tag in events.Tags()["images"] if tag.startswith("deadunits/kernels/heatmap/")]
    assert len(heatmaps) == 1 and [event.step for event in events.Images(heatmaps[0])] == [0, 6]
    assert len(events.Histograms("deadunits/kernels/model.stem/l1")) == 4
