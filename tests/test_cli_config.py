import importlib.util
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from digits_demo import DigitsClassifier
from lightning.pytorch.cli import LightningCLI

from lightning_deadunits.callbacks.kernel_norm_monitor import KernelNormMonitor
from lightning_deadunits.callbacks.lr_warmup import LRWarmup
from lightning_deadunits.triggers.threshold import ThresholdRule
from lightning_deadunits.triggers.trend import TrendRule

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CONFIG = EXAMPLES / "deadunits.yaml"


@pytest.fixture(autouse=True)
def _bare_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI warns when it gets `args` while sys.argv holds pytest's own arguments."""
    monkeypatch.setattr(sys, "argv", ["cli.py"])


def _example_cli() -> ModuleType:
    spec = importlib.util.spec_from_file_location("example_cli", EXAMPLES / "cli.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _callback(cli: LightningCLI, kind: type) -> Any:
    (callback,) = [callback for callback in cli.trainer.callbacks if isinstance(callback, kind)]  # type: ignore[attr-defined]
    return callback


def test_cli_config_puts_every_threshold_into_the_callbacks(tmp_path: Path) -> None:
    cli = LightningCLI(
        DigitsClassifier, run=False, args=["--config", str(CONFIG), f"--trainer.default_root_dir={tmp_path}"]
    )
    monitor = _callback(cli, KernelNormMonitor)
    assert (monitor.every_n_steps, monitor.abs_threshold, monitor.rel_threshold, monitor.bn_threshold) == (
        20,
        1e-6,
        0.1,
        1e-3,
    )
    assert monitor.alarm_handler.specs == ["log"]
    band, projection, rises = monitor.alarms
    assert isinstance(band, ThresholdRule) and (band.keys, band.above, band.patience, band.level) == (
        ("deadunits/kernels/total/dead_frac",),
        0.25,
        2,
        "error",
    )
    assert isinstance(projection, TrendRule)
    assert (projection.limit, projection.horizon, projection.window, projection.cooldown) == (0.4, 2000, 5, 500)
    assert isinstance(rises, TrendRule) and (rises.keys, rises.rising_checks, rises.limit) == (
        ("deadunits/kernels/*/dead",),
        4,
        None,
    )
    warmup = _callback(cli, LRWarmup)
    assert (warmup.warmup_steps, warmup.shape, warmup.rewarm_on, warmup.rewarm_floor, warmup.rewarm_steps) == (
        100,
        "quadratic",
        ("loss/spike",),
        0.1,
        50,
    )
    assert (cli.model.optimizer_name, cli.model.lr) == ("adam", 0.005)


def test_cli_config_accepts_callables_by_dotted_path(tmp_path: Path) -> None:
    config = tmp_path / "callable.yaml"
    config.write_text(CONFIG.read_text().replace("on_alarm: [log] ", "on_alarm: [log, stop, builtins.print] "))
    cli = LightningCLI(
        DigitsClassifier, run=False, args=["--config", str(config), f"--trainer.default_root_dir={tmp_path}"]
    )
    assert _callback(cli, KernelNormMonitor).alarm_handler.specs == ["log", "stop", print]


def test_cli_config_rejects_a_bad_threshold(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFIG.read_text().replace("rewarm_floor: 0.1", "rewarm_floor: 1.5"))
    with pytest.raises(ValueError, match=r"`rewarm_floor` must be a finite number in \[0.0, 1.0\], got 1.5"):
        LightningCLI(DigitsClassifier, run=False, args=["--config", str(bad)])


def test_cli_example_fits_in_fast_mode(tmp_path: Path) -> None:
    fast = [
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.max_steps=3",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        "--model.image_size=16",
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Lightning's few-workers and small-log-interval hints
        cli = _example_cli().main(["fit", "--config", str(CONFIG), *fast])
    assert cli.trainer.global_step == 3
    monitor = _callback(cli, KernelNormMonitor)
    assert [entry["step"] for entry in monitor.history] == [0.0, 3.0]
    assert _callback(cli, LRWarmup).factor(3) == pytest.approx(0.03**2)
    assert list(tmp_path.rglob("events.out.tfevents.*")) and list(tmp_path.rglob("config.yaml"))


def test_cli_config_configures_activation_and_loss_monitors(tmp_path: Path) -> None:
    from lightning_deadunits import ActivationMonitor, LossSpikeMonitor

    cli = LightningCLI(
        DigitsClassifier, run=False, args=["--config", str(CONFIG), f"--trainer.default_root_dir={tmp_path}"]
    )
    activations = _callback(cli, ActivationMonitor)
    assert (activations.every_n_steps, activations.window, activations.dormant_tau) == (20, 10, 0.025)
    assert sorted((rule.name, rule.above, rule.below) for rule in activations.alarms) == [
        ("activation_collapse", None, 1e-6),
        ("activation_explosion", 1000.0, None),
        ("dead_activations", 0.5, None),
    ]
    loss = _callback(cli, LossSpikeMonitor)
    assert (loss.detector.window_size, loss.detector.ratio, loss.skip_update, loss.dumper.max_dumps) == (
        100,
        2.0,
        False,
        20,
    )


def test_cli_bundle_config_builds_the_parts_and_runs(tmp_path: Path) -> None:
    from lightning_deadunits import ActivationMonitor, DeadUnits, KernelNormMonitor, LossSpikeMonitor, LRWarmup

    bundle_config = EXAMPLES / "deadunits_bundle.yaml"
    cli = LightningCLI(
        DigitsClassifier,
        run=False,
        args=["--config", str(bundle_config), f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=3"],
    )
    bundle = _callback(cli, DeadUnits)
    assert [type(part) for part in bundle.parts] == [KernelNormMonitor, ActivationMonitor, LossSpikeMonitor, LRWarmup]
    assert bundle.activations.every_n_steps == 10
    assert bundle.kernels.alarms[0].above == 0.25 and bundle.loss.alarms[0].above == 0.25
    assert bundle.kernels.alarm_handler.specs == ["log", "warn"]
    cli.trainer.fit(cli.model)
    assert bundle.kernels.history and bundle.loss.state_dict()
