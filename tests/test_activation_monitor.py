import gc
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn

from lightning_deadunits.callbacks.activation_monitor import ActivationMonitor
from lightning_deadunits.errors import DeadUnitsWarning
from lightning_deadunits.metrics.activation_stats import ActivationStats
from lightning_deadunits.probes.activations import DEFAULT_ACTIVATION_TYPES, ActivationProbe
from lightning_deadunits.triggers.alarm import Alarm
from lightning_deadunits.triggers.threshold import ThresholdRule
from tests.helpers.activation_models import (
    ConvRelu,
    Fixed,
    FunctionalRelu,
    IdentityRelu,
    ModuleRelu,
    ReusedRelu,
    TokenMLP,
    TwoBlocks,
    hook_count,
    image_batches,
)
from tests.helpers.events import load_events
from tests.helpers.memory_logger import MemoryLogger

KEY = "deadunits/activations"


def _fit(
    tmp_path: Path, lit: pl.LightningModule, monitor: ActivationMonitor, max_steps: int = 4, **kwargs: Any
) -> MemoryLogger:
    memory = MemoryLogger()
    options: dict[str, Any] = dict(
        max_steps=max_steps,
        logger=[memory],
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        log_every_n_steps=1,  # the monitor's default logs once per sample then: the planted numbers are per sample
    )
    options.update(kwargs)
    pl.Trainer(callbacks=[monitor], **options).fit(lit)
    return memory


def _reference(outputs: list[Tensor], channel_axis: int = 1, eps: float = 0.0, tau: float = 0.025) -> dict[str, Any]:
    """Layer statistics of the pooled `outputs`, in float64 numpy: the independent computation."""
    per_channel = np.concatenate(
        [np.moveaxis(o.detach().double().numpy(), channel_axis, 0).reshape(o.shape[channel_axis], -1) for o in outputs],
        axis=1,
    )
    mean_abs = np.abs(per_channel).mean(axis=1)
    quiet = np.abs(per_channel) <= eps
    return {
        "zero_frac": quiet.mean(),
        "mean": per_channel.mean(),
        "std": per_channel.std(),
        "min": per_channel.min(),
        "max": per_channel.max(),
        "max_abs": np.abs(per_channel).max(),
        "dormant": float((mean_abs <= tau * mean_abs.mean()).sum()),
        "all_quiet": quiet.all(axis=1),
    }


@pytest.mark.parametrize("inplace", [False, True])
def test_activation_monitor_reports_planted_dead_channels_exactly(tmp_path: Path, inplace: bool) -> None:
    model = ConvRelu(kill=(1, 4), inplace=inplace)
    batches = image_batches(4)
    monitor = ActivationMonitor(every_n_steps=1, window=2)
    memory = _fit(tmp_path, Fixed(model, batches), monitor)
    with torch.no_grad():
        expected = [_reference([model(batch)]) for batch in batches]
    assert memory.series(f"{KEY}/model.relu/dead") == dict.fromkeys(range(4), 2.0)
    assert memory.series(f"{KEY}/model.relu/dead_frac") == dict.fromkeys(range(4), 2 / 6)
    assert memory.series(f"{KEY}/total/dead") == dict.fromkeys(range(4), 2.0)
    zero_frac = memory.series(f"{KEY}/model.relu/zero_frac")
    assert zero_frac == pytest.approx({step: e["zero_frac"] for step, e in enumerate(expected)}, abs=1e-12)
    assert all(value >= 2 / 6 for value in zero_frac.values())
    assert monitor.dead_counts == {"model.relu": 2.0}
    assert monitor.dead_counts_step == 3
    assert monitor.dead_masks["model.relu"].tolist() == [False, True, False, False, True, False]


def test_activation_monitor_measures_each_call_of_a_reused_inplace_relu(tmp_path: Path) -> None:
    model = ReusedRelu(inplace=True)
    batches = image_batches(4)
    monitor = ActivationMonitor(every_n_steps=2, window=3)
    memory = _fit(tmp_path, Fixed(model, batches), monitor)
    with torch.no_grad():
        calls = [model.call_outputs(batch) for batch in batches]
    for call in range(3):
        for step in (0, 2):
            expected = _reference([calls[step][call]])
            for stat in ("zero_frac", "mean", "std", "min", "max", "max_abs", "dormant"):
                logged = memory.series(f"{KEY}/model.relu#{call}/{stat}")
                assert logged[step] == pytest.approx(expected[stat], rel=1e-5, abs=1e-6), (call, step, stat)
        window_quiet = _reference([calls[0][call]])["all_quiet"] & _reference([calls[2][call]])["all_quiet"]
        assert monitor.dead_masks[f"model.relu#{call}"].tolist() == window_quiet.tolist()
    assert monitor.dead_masks["model.relu#1"][1]  # the planted channel of the second call
    assert f"{KEY}/model.relu/zero_frac" not in memory.metrics


def test_activation_monitor_restarts_call_indices_with_each_parent_forward(tmp_path: Path) -> None:
    monitor = ActivationMonitor(every_n_steps=1)
    memory = _fit(tmp_path, Fixed(TwoBlocks(), image_batches(2)), monitor, max_steps=2)
    layers = {key.split("/")[2] for key in memory.metrics if key.endswith("/dead")} - {"total"}
    assert layers == {f"model.block{b}.relu#{c}" for b in (1, 2) for c in range(3)}


def test_activation_monitor_dead_over_window_differs_from_per_batch_sparsity(tmp_path: Path) -> None:
    # three features through ReLU(identity): 0 is active in the first batch only, 1 never, 2 always
    batches = []
    for step in range(4):
        batch = torch.tensor([[-1.0, -1.0, 1.0], [-1.0, -2.0, 2.0]])
        if step == 0:
            batch[1, 0] = 3.0
        batches.append(batch)
    monitor = ActivationMonitor(every_n_steps=1, window=2)
    memory = _fit(tmp_path, Fixed(IdentityRelu(), batches), monitor)
    silent_in_batch = [int((batch <= 0).all(dim=0).sum()) for batch in batches]
    assert silent_in_batch == [1, 2, 2, 2]  # per-batch sparsity: feature 0 looks dead from step 1
    assert memory.series(f"{KEY}/model.relu/dead") == {0: 1.0, 1: 1.0, 2: 2.0, 3: 2.0}  # window: from step 2
    assert memory.series(f"{KEY}/model.relu/zero_frac") == {0: 3 / 6, 1: 4 / 6, 2: 4 / 6, 3: 4 / 6}


def test_activation_monitor_pools_samples_of_a_log_period(tmp_path: Path) -> None:
    model = ConvRelu()
    batches = image_batches(4)
    monitor = ActivationMonitor(every_n_steps=1, log_every_n_samples=2)
    memory = _fit(tmp_path, Fixed(model, batches), monitor)
    with torch.no_grad():
        outputs = [model(batch) for batch in batches]
    std = memory.series(f"{KEY}/model.relu/std")
    assert std == pytest.approx({1: _reference(outputs[:2])["std"], 3: _reference(outputs[2:])["std"]}, rel=1e-5)


@pytest.mark.parametrize(("every_n_steps", "logged_steps"), [(1, [2, 5, 6]), (2, [0, 2, 4, 6]), (5, [0, 5])])
def test_activation_monitor_samples_every_step_but_logs_at_the_trainers_cadence(
    tmp_path: Path, every_n_steps: int, logged_steps: list[int]
) -> None:
    # Sampling is not logging: with the trainer logging every 3 steps, sampling every step logs every 3 samples
    # (each log pooling them, the last one at train end), sampling every 2 or 5 steps logs every sample.
    model = ConvRelu()
    batches = image_batches(7)
    monitor = ActivationMonitor(every_n_steps=every_n_steps)
    memory = _fit(tmp_path, Fixed(model, batches), monitor, max_steps=7, log_every_n_steps=3)
    std = memory.series(f"{KEY}/model.relu/std")
    assert sorted(std) == logged_steps
    if every_n_steps == 1:
        with torch.no_grad():
            outputs = [model(batch) for batch in batches]
        assert std[2] == pytest.approx(_reference(outputs[:3])["std"], rel=1e-5)
        assert std[5] == pytest.approx(_reference(outputs[3:6])["std"], rel=1e-5)


def test_activation_monitor_logs_a_partial_period_at_train_end(tmp_path: Path) -> None:
    monitor = ActivationMonitor(every_n_steps=2, log_every_n_samples=2)
    memory = _fit(tmp_path, Fixed(ConvRelu(), image_batches(5)), monitor, max_steps=5)
    assert sorted(memory.series(f"{KEY}/total/zero_frac")) == [2, 4]  # samples 0, 2 then 4 alone at the end


def test_activation_monitor_counts_a_sample_per_optimizer_step_under_accumulation(tmp_path: Path) -> None:
    model = ConvRelu()
    batches = image_batches(4)
    monitor = ActivationMonitor(every_n_steps=1)
    memory = _fit(tmp_path, Fixed(model, batches), monitor, max_steps=2, accumulate_grad_batches=2)
    with torch.no_grad():
        outputs = [model(batch) for batch in batches]
    mean = memory.series(f"{KEY}/model.relu/mean")
    assert mean == pytest.approx({0: _reference(outputs[:2])["mean"], 1: _reference(outputs[2:])["mean"]}, rel=1e-5)
    assert monitor.stats.samples == 2


def test_activation_monitor_uses_last_dim_for_linear_token_outputs(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(2)
    batches = [torch.randn(2, 4, 5, generator=generator) for _ in range(2)]
    model = TokenMLP()
    auto = ActivationMonitor(every_n_steps=1)
    memory = _fit(tmp_path, Fixed(model, batches), auto, max_steps=2)
    assert auto.dead_masks["model.act"].shape == (7,)
    with torch.no_grad():
        expected = _reference([model(batches[1])], channel_axis=2, eps=1e-6)
    assert memory.series(f"{KEY}/model.act/dormant")[1] == expected["dormant"]
    forced = ActivationMonitor(every_n_steps=1, channel_dim=1)
    _fit(tmp_path, Fixed(model, batches), forced, max_steps=1)
    assert forced.dead_masks["model.act"].shape == (4,)


def test_activation_monitor_pre_activation_mode_equals_relu_modules(tmp_path: Path) -> None:
    functional = FunctionalRelu()
    reference = ModuleRelu()
    reference.load_state_dict(functional.state_dict())
    batches = image_batches(2)
    pre = ActivationMonitor(every_n_steps=1, watch="pre_activations", exclude=["*head"])
    modules = ActivationMonitor(every_n_steps=1)
    pre_memory = _fit(tmp_path, Fixed(functional, batches), pre, max_steps=2)
    module_memory = _fit(tmp_path, Fixed(reference, batches), modules, max_steps=2)
    assert not any("model.conv1/" in key for key in pre_memory.metrics)  # it feeds bn1: dropped
    assert pre.probe.skipped == {"model.conv1"}
    for pre_layer, module_layer in (("model.bn1", "model.act1"), ("model.conv2", "model.act2")):
        for stat in ("zero_frac", "dead", "dormant", "mean", "std", "min", "max"):
            assert pre_memory.series(f"{KEY}/{pre_layer}/{stat}") == pytest.approx(
                module_memory.series(f"{KEY}/{module_layer}/{stat}"), rel=1e-6
            ), (pre_layer, stat)


def test_activation_monitor_measures_pooling_on_request(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2, return_indices=True))
    lit = Fixed(model, image_batches(1, size=6))
    lit.training_step = lambda batch, batch_idx: lit.model(batch[0])[0].sum()  # type: ignore[method-assign]
    with_pools = ActivationMonitor(every_n_steps=1, pooling=True)
    memory = _fit(tmp_path, lit, with_pools, max_steps=1)
    assert f"{KEY}/model.2/zero_frac" in memory.metrics
    without = ActivationMonitor(every_n_steps=1)
    assert f"{KEY}/model.2/zero_frac" not in _fit(tmp_path, lit, without, max_steps=1).metrics


def test_activation_monitor_skips_zero_counts_for_bounded_activations_unless_asked(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Conv2d(4, 4, 1), nn.Sigmoid())
    memory = _fit(tmp_path, Fixed(model, image_batches(1)), ActivationMonitor(every_n_steps=1), max_steps=1)
    assert f"{KEY}/model.1/std" in memory.metrics and f"{KEY}/model.1/zero_frac" not in memory.metrics
    asked = ActivationMonitor(every_n_steps=1, eps={nn.Tanh: 0.5})
    memory = _fit(tmp_path, Fixed(model, image_batches(1)), asked, max_steps=1)
    assert f"{KEY}/model.1/zero_frac" in memory.metrics and f"{KEY}/model.3/zero_frac" not in memory.metrics


@pytest.mark.parametrize("model_type", [ConvRelu, FunctionalRelu])
def test_activation_monitor_hooks_exist_only_on_sampled_steps(tmp_path: Path, model_type: type[nn.Module]) -> None:
    counts: list[int] = []
    lit = Fixed(model_type(), image_batches(5), on_step=lambda module: counts.append(hook_count(module)))
    _fit(tmp_path, lit, ActivationMonitor(every_n_steps=2), max_steps=5)
    # the enter/leave pair on every module that keeps the stack of enclosing modules for functional call sites;
    # with a module ReLU, also its hook and its parent's call-index reset
    function_mode = 2 * len(list(lit.modules()))
    if model_type is ConvRelu:  # no activation function called: later steps hook the ReLU alone, without the mode
        assert counts == [2 + function_mode, 0, 2, 0, 2]
    else:  # the first forward also traces the linear head (a channels-last producer)
        assert counts == [2 + function_mode, 0, function_mode, 0, function_mode]
    assert hook_count(lit) == 0


def test_activation_monitor_removes_hooks_after_an_exception(tmp_path: Path) -> None:
    lit = Fixed(ConvRelu(), image_batches(4), fail_at_step=2)
    monitor = ActivationMonitor(every_n_steps=1)
    with pytest.raises(RuntimeError, match="planted failure"):
        _fit(tmp_path, lit, monitor)
    assert hook_count(lit) == 0 and monitor.probe.hooks_attached == 0


def test_activation_monitor_keeps_no_activation_alive(tmp_path: Path) -> None:
    lit = Fixed(ReusedRelu(inplace=True), image_batches(3))
    _fit(tmp_path, lit, ActivationMonitor(every_n_steps=1, on_validation=True), max_steps=3)
    gc.collect()
    assert len(lit.output_refs) == 3
    assert all(ref() is None for ref in lit.output_refs)


def test_activation_monitor_measures_whole_validation_passes(tmp_path: Path) -> None:
    model = ConvRelu(kill=(2,))
    val_batches = image_batches(3, seed=5)
    lit = Fixed(model, image_batches(2), val_batches=val_batches)
    monitor = ActivationMonitor(every_n_steps=100, on_validation=True)
    counts: list[int] = []
    lit.validation_step = lambda batch, batch_idx: counts.append(hook_count(lit)) or lit(batch[0])  # type: ignore[method-assign]
    memory = _fit(tmp_path, lit, monitor, max_steps=2, limit_val_batches=None, val_check_interval=2)
    with torch.no_grad():
        expected = _reference([model(batch) for batch in val_batches])
    assert memory.series(f"{KEY}/val/model.relu/zero_frac") == pytest.approx({2: expected["zero_frac"]}, abs=1e-12)
    assert memory.series(f"{KEY}/val/model.relu/dead") == {2: float(expected["all_quiet"].sum())}
    assert expected["all_quiet"][2]
    measured = 2 + 2 * len(list(lit.modules()))  # the ReLU's pair, and the enclosing-module stack's pair per module
    assert counts == [0, 0, measured, measured, measured]  # the sanity check unmeasured, then the real pass
    assert monitor.dead_counts_step == 0  # validation leaves the training dead counts alone
    assert hook_count(lit) == 0


def test_activation_monitor_runs_under_trainer_validate(tmp_path: Path) -> None:
    lit = Fixed(ConvRelu(kill=(0,)), image_batches(1), val_batches=image_batches(2))
    memory = MemoryLogger()
    trainer = pl.Trainer(
        callbacks=[ActivationMonitor(on_validation=True)],
        logger=[memory],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.validate(lit)
    assert memory.series(f"{KEY}/val/model.relu/dead")[0] >= 1.0


def test_activation_monitor_alarms_on_dead_explosion_and_collapse(tmp_path: Path) -> None:
    fired: list[Alarm] = []
    monitor = ActivationMonitor(
        every_n_steps=1,
        dead_frac_above=0.5,
        max_abs_above=1e-3,
        std_below=1e6,
        alarms=[ThresholdRule(f"{KEY}/total/dead", above=3)],
        on_alarm=[fired.append],
    )
    _fit(tmp_path, Fixed(ConvRelu(kill=(0, 1, 2, 3)), image_batches(1)), monitor, max_steps=1)
    keys = {(alarm.rule, alarm.key) for alarm in fired}
    assert keys == {
        ("dead_activations", f"{KEY}/model.relu/dead_frac"),
        ("dead_activations", f"{KEY}/total/dead_frac"),
        ("activation_explosion", f"{KEY}/model.relu/max_abs"),
        ("activation_collapse", f"{KEY}/model.relu/std"),
        ("ThresholdRule", f"{KEY}/total/dead"),
    }
    assert all(alarm.source == "activations" for alarm in fired)
    quiet: list[Alarm] = []
    calm = ActivationMonitor(every_n_steps=1, dead_frac_above=0.9, on_alarm=[quiet.append])
    _fit(tmp_path, Fixed(ConvRelu(kill=(0, 1, 2, 3)), image_batches(1)), calm, max_steps=1)
    assert quiet == []


def test_activation_monitor_writes_tensorboard_panels(tmp_path: Path) -> None:
    monitor = ActivationMonitor(every_n_steps=1)
    logger = TensorBoardLogger(tmp_path, name="", version="")
    _fit(tmp_path, Fixed(ReusedRelu(), image_batches(3)), monitor, max_steps=3, logger=logger)
    tags = load_events(tmp_path).Tags()
    assert f"{KEY}/model.relu#1/zero_frac" in tags["scalars"]
    assert f"{KEY}/model.relu#1/channel_zero_frac" in tags["histograms"]
    assert f"{KEY}/model.relu#2/channel_range" in tags["images"]
    assert "custom_scalars__config__" in tags["tensors"]
    assert len(monitor.channel_ranges["model.relu#0"]) == 3


def test_activation_monitor_under_bf16_autocast_counts_exactly(tmp_path: Path) -> None:
    monitor = ActivationMonitor(every_n_steps=1, window=1)
    memory = _fit(tmp_path, Fixed(ConvRelu(kill=(3,)), image_batches(2)), monitor, max_steps=2, precision="bf16-mixed")
    assert memory.series(f"{KEY}/model.relu/dead") == {0: 1.0, 1: 1.0}
    assert 0 < memory.series(f"{KEY}/model.relu/std")[1] < 10


def test_activation_monitor_state_dict_round_trip_resumes_the_window(tmp_path: Path) -> None:
    batches = [torch.tensor([[1.0, -1.0, 1.0]]), torch.tensor([[-1.0, -1.0, 1.0]])]
    first = ActivationMonitor(every_n_steps=1, window=3, log_every_n_samples=3)
    _fit(tmp_path, Fixed(IdentityRelu(), batches), first, max_steps=2)
    saved = tmp_path / "monitor.pt"
    torch.save(first.state_dict(), saved)
    resumed = ActivationMonitor(every_n_steps=1, window=3, log_every_n_samples=3)
    resumed.load_state_dict(torch.load(saved, weights_only=False))
    assert _plain(resumed.state_dict()) == _plain(first.state_dict())
    later = [torch.tensor([[-1.0, -1.0, -1.0]])]
    memory = _fit(tmp_path, Fixed(IdentityRelu(), later), resumed, max_steps=1)
    # feature 0 was active two samples ago: alive over a 3-sample window that spans the checkpoint
    assert resumed.dead_masks["model.relu"].tolist() == [False, True, False]
    assert memory.series(f"{KEY}/model.relu/zero_frac") == {0: 1.0}  # the restarted trainer's step 0
    assert resumed.history[-1]["dead"] == 1.0


def _plain(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.tolist()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


def test_activation_monitor_warns_when_nothing_is_watched(tmp_path: Path) -> None:
    with pytest.warns(DeadUnitsWarning, match="found no module to watch"):
        _fit(tmp_path, Fixed(FunctionalRelu(), image_batches(1)), ActivationMonitor(functional=False), max_steps=1)


def test_activation_monitor_warns_and_carries_on_when_a_module_cannot_be_measured(tmp_path: Path) -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))
            self.broken = nn.ReLU()
            self.fine = nn.ReLU()

        def forward(self, x: Tensor) -> Tensor:
            self.broken(x.sum())  # a 0-d output has no channels: measuring it fails
            return self.fine(x * self.scale)  # type: ignore[no-any-return]

    monitor = ActivationMonitor(every_n_steps=1)
    with pytest.warns(DeadUnitsWarning, match="cannot measure 'model.broken'"):
        memory = _fit(tmp_path, Fixed(Odd(), image_batches(2)), monitor, max_steps=2)
    assert f"{KEY}/model.fine/zero_frac" in memory.metrics
    assert f"{KEY}/model.broken/zero_frac" not in memory.metrics


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"every_n_steps": 0}, ValueError, "`every_n_steps` must be an int >= 1, got 0"),
        ({"log_every_n_samples": 0}, ValueError, "`log_every_n_samples` must be an int >= 1, got 0"),
        ({"window": 0}, ValueError, "`window` must be an int >= 1, got 0"),
        ({"eps": -1.0}, ValueError, r"`eps` must be None, a number >= 0, .*got -1.0"),
        ({"eps": {nn.ReLU: -0.1}}, ValueError, r"`eps` must be None, a number >= 0, .*got \{<class"),
        ({"eps": "small"}, TypeError, r"`eps` must be None, a number >= 0, .*got 'small'"),
        ({"dormant_tau": 1.5}, ValueError, r"`dormant_tau` must be a finite number in \[0.0, 1.0\], got 1.5"),
        ({"include": 3}, TypeError, "`include` must be a string or a list of strings, got 3"),
        ({"exclude": [3]}, TypeError, r"`exclude` must be a string or a list of strings, got \[3\]"),
        ({"layer_types": ["relu"]}, TypeError, r"`layer_types` must be a class or a list of classes"),
        ({"watch": "weights"}, ValueError, "`watch` must be one of 'activations', 'pre_activations', got 'weights'"),
        ({"pre_activation_fn": 1}, TypeError, "`pre_activation_fn` must be callable, got 1"),
        ({"pooling": "yes"}, TypeError, "`pooling` must be a bool, got 'yes'"),
        ({"channel_dim": 2}, ValueError, "`channel_dim` must be one of 'auto', 1, -1, got 2"),
        ({"on_validation": 1}, TypeError, "`on_validation` must be a bool, got 1"),
        ({"log_histograms": None}, TypeError, "`log_histograms` must be a bool, got None"),
        ({"log_images": None}, TypeError, "`log_images` must be a bool, got None"),
        ({"band_history": 0}, ValueError, "`band_history` must be an int >= 1, got 0"),
        ({"dead_frac_above": 2.0}, ValueError, r"`dead_frac_above` must be a finite number in \[0.0, 1.0\], got 2.0"),
        ({"max_abs_above": -1}, ValueError, r"`max_abs_above` must be a finite number in \[0.0, inf\], got -1"),
        ({"std_below": float("nan")}, ValueError, r"`std_below` must be a finite number in \[0.0, inf\], got nan"),
        ({"alarms": ["rule"]}, TypeError, "`alarms` must be a list of Rule objects"),
        ({"on_alarm": ["shout"]}, ValueError, "`on_alarm` must be one of"),
        ({"prefix": "/x"}, ValueError, "`prefix` must be a non-empty string"),
    ],
)
def test_activation_monitor_rejects_bad_arguments(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        ActivationMonitor(**kwargs)


def test_activation_monitor_moves_statistics_to_the_host_once_per_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    transfers: list[tuple[str, int]] = []

    def counting(method: str) -> Any:
        original = getattr(Tensor, method)

        def wrapper(self: Tensor, *args: Any, **kwargs: Any) -> Any:
            caller = sys._getframe(1).f_code.co_filename
            if "lightning_deadunits" in caller:
                transfers.append((method, step[0]))
            return original(self, *args, **kwargs)

        return wrapper

    step = [0]
    for method in ("cpu", "item", "tolist", "numpy"):
        monkeypatch.setattr(Tensor, method, counting(method))
    lit = Fixed(ReusedRelu(), image_batches(4), on_step=lambda module: step.__setitem__(0, module.global_step))
    _fit(tmp_path, lit, ActivationMonitor(every_n_steps=2, window=2), max_steps=4)
    assert transfers == [("cpu", 0), ("cpu", 2)]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_activation_hooks_never_sync_with_the_host_on_cuda() -> None:
    model = ReusedRelu(inplace=True).cuda()
    probe = ActivationProbe(DEFAULT_ACTIVATION_TYPES)
    probe.attach(model)
    stats = ActivationStats()
    images = torch.randn(4, 3, 8, 8, device="cuda")
    stats.begin_sample()
    probe.start(stats)
    torch.cuda.set_sync_debug_mode("error")  # any host sync inside the hooks raises
    try:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(images)
    finally:
        torch.cuda.set_sync_debug_mode("default")
        probe.stop()
    summaries = stats.summarise(window=1)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        outputs = model.call_outputs(images)
    for call, output in enumerate(outputs):
        summary = summaries[("relu", call)]
        assert summary.near_zero is not None
        assert summary.near_zero.tolist() == (output == 0).sum(dim=(0, 2, 3)).double().cpu().tolist()
        assert summary.max.tolist() == output.float().amax(dim=(0, 2, 3)).double().cpu().tolist()
    assert summaries[("relu", 1)].dead is not None and bool(summaries[("relu", 1)].dead[1])


def test_activation_band_charts_go_to_the_sites_with_the_most_dead_channels(tmp_path: Path) -> None:
    monitor = ActivationMonitor(every_n_steps=1, band_layers=1, log_every_n_samples=1)
    logger = TensorBoardLogger(tmp_path, name="", version="")
    _fit(tmp_path, Fixed(ReusedRelu(), image_batches(2)), monitor, max_steps=2, logger=logger)
    images = [tag for tag in load_events(tmp_path).Tags()["images"] if tag.endswith("/channel_range")]
    assert monitor.dead_counts == {"model.relu#0": 0.0, "model.relu#1": 1.0, "model.relu#2": 0.0}
    assert images == [f"{KEY}/model.relu#1/channel_range"]  # the call site with the dead channel (conv2's bias)


def test_activation_band_charts_start_at_the_nth_log_and_are_drawn_once_more_at_train_end(tmp_path: Path) -> None:
    monitor = ActivationMonitor(every_n_steps=1, log_every_n_samples=1, images_every_n_logs=2, band_layers=1)
    logger = TensorBoardLogger(tmp_path, name="", version="")
    _fit(tmp_path, Fixed(ReusedRelu(), image_batches(5)), monitor, max_steps=5, logger=logger)
    events = load_events(tmp_path)
    # logs at steps 0-4: band charts at the 2nd and 4th, and at train end (the last log, step 4, drew none)
    assert [event.step for event in events.Images(f"{KEY}/model.relu#1/channel_range")] == [1, 3, 4]
    assert len(events.Histograms(f"{KEY}/model.relu#1/channel_zero_frac")) == 5  # histograms at every log


def test_activation_monitor_rejects_a_negative_band_layers() -> None:
    with pytest.raises(ValueError, match=r"`band_layers` must be an int >= 0, got -1"):
        ActivationMonitor(band_layers=-1)
