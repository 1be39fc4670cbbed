"""Fault injection: a dump or a monitor fails in every way we know of; training completes (or stops as documented),
nothing already written is lost, and the message says what happened."""

import dataclasses
import errno
import io
import math
import os
import subprocess
import sys
import tempfile
import warnings
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_deadunits import ActivationMonitor, DeadUnits, KernelNormMonitor, LossSpikeMonitor
from lightning_deadunits.actions.batch_dump import BatchDumper
from lightning_deadunits.cli import main as deadunits
from lightning_deadunits.dumps import DUMP_FORMAT, decode, encode, load_dump
from lightning_deadunits.errors import DeadUnitsWarning
from tests.helpers.odd_models import OddTask, SmallConvNet, image_data, structured

ROOT = Path(__file__).resolve().parents[1]
QUIET: dict[str, Any] = dict(
    accelerator="cpu",
    logger=False,
    enable_checkpointing=False,
    enable_progress_bar=False,
    enable_model_summary=False,
)
STEPS = 6
SPIKE_BATCH = 3


def _spiking_task() -> OddTask:
    """Six batches, one per step; batch 3's loss reads 100 times higher (a spike for `_spike_monitor`)."""
    return OddTask(
        SmallConvNet(), [structured("tensor_tuple", *pair) for pair in image_data(STEPS)], spikes={SPIKE_BATCH: 100.0}
    )


def _spike_monitor(dump_dir: Path, **options: Any) -> LossSpikeMonitor:
    return LossSpikeMonitor(window=4, warmup=2, ratio=10, dump_dir=dump_dir, **options)


def _fit(task: pl.LightningModule, callbacks: list[pl.Callback], tmp_path: Path, **options: Any) -> pl.Trainer:
    trainer = pl.Trainer(callbacks=callbacks, default_root_dir=tmp_path, **{**QUIET, "max_epochs": 1, **options})
    trainer.fit(task)
    return trainer


def _ours(record: pytest.WarningsRecorder) -> list[str]:
    """The package's warnings among those recorded (Lightning adds advice on tiny runs)."""
    return [str(warning.message) for warning in record if issubclass(warning.category, DeadUnitsWarning)]


def _files(directory: Path) -> list[str]:
    return sorted(path.name for path in directory.iterdir()) if directory.exists() else []


# --- the dump directory and the disk -------------------------------------------------------------------------------


def _read_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    # root ignores file modes, so the file system's answer is injected where the dumper creates its file
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    return tmp_path / "dumps"


def _parent_is_a_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    (tmp_path / "a_file").write_text("not a directory")
    return tmp_path / "a_file" / "dumps"


def _disk_full(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    def fill_then_fail(obj: Any, file: Any) -> None:
        file.write(b"PK\x03\x04 half a dump")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", fill_then_fail)
    return tmp_path / "dumps"


def _interrupted_before_rename(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    def interrupted(source: Any, target: Any) -> None:
        raise RuntimeError("interrupted between write and rename")

    monkeypatch.setattr(os, "link", interrupted)
    return tmp_path / "dumps"


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        (
            _read_only,
            r"Could not write spike dump .*dumps/\S*step00000003-rank0-batch00003\.pt: .*Read-only file system",
        ),
        (_parent_is_a_file, r"Could not write spike dump .*a_file/dumps/\S*step00000003-rank0-batch00003\.pt: "),
        (_disk_full, r"Could not write spike dump .*No space left on device"),
        (_interrupted_before_rename, r"Could not write spike dump .*interrupted between write and rename"),
    ],
    ids=["read-only", "parent-is-a-file", "disk-full", "exception-before-rename"],
)
def test_a_dump_that_cannot_be_written_warns_and_training_completes(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fault: Callable[[pytest.MonkeyPatch, Path], Path],
    message: str,
) -> None:
    dump_dir = fault(monkeypatch, tmp_path)
    monitor = _spike_monitor(dump_dir)
    with pytest.warns(DeadUnitsWarning, match=message) as record:
        trainer = _fit(_spiking_task(), [monitor], tmp_path)
    assert len(_ours(record)) == 1
    assert trainer.global_step == STEPS and monitor.spike_steps == [SPIKE_BATCH]
    assert monitor.events[0]["dump"] is None and monitor.dumper.count == 0
    assert monitor.dumper.last_skip_reason is not None and monitor.dumper.last_skip_reason.startswith("could not")
    assert [name for name in _files(dump_dir) if not name.startswith(".")] == []  # nothing under a final name
    assert [name for name in _files(dump_dir) if name.endswith(".tmp")] == []  # and no temporary left behind


def test_a_missing_dump_directory_is_created_with_its_parents(tmp_path: Path) -> None:
    dump_dir = tmp_path / "no" / "such" / "dumps"
    monitor = _spike_monitor(dump_dir)
    _fit(_spiking_task(), [monitor], tmp_path)
    (name,) = _files(dump_dir)  # the monitor's tag, if any, comes first
    assert name.endswith("step00000003-rank0-batch00003.pt") and monitor.events[0]["dump"] == str(dump_dir / name)
    assert load_dump(dump_dir / name).metadata["batch_idx"] == SPIKE_BATCH


def test_spike_monitors_sharing_a_dump_dir_and_a_rerun_never_replace_a_dump(tmp_path: Path) -> None:
    dump_dir = tmp_path / "dumps"
    first, second = _spike_monitor(dump_dir), _spike_monitor(dump_dir, prefix="other")
    _fit(_spiking_task(), [first, second], tmp_path)
    paths = [Path(monitor.events[0]["dump"]) for monitor in (first, second)]
    assert paths[0] != paths[1] and _files(dump_dir) == sorted(path.name for path in paths)
    written = {path.name: path.read_bytes() for path in paths}
    rerun = _spike_monitor(dump_dir)
    _fit(_spiking_task(), [rerun], tmp_path)
    assert len(_files(dump_dir)) == 3 and rerun.events[0]["dump"] not in [str(path) for path in paths]
    assert {name: (dump_dir / name).read_bytes() for name in written} == written  # earlier dumps untouched


_KILLED_DURING_DUMP = """
import os, signal, sys
import torch
from lightning_deadunits.actions.batch_dump import BatchDumper

save = torch.save

def killed(obj, file):
    if sys.argv[2] == "mid-write":
        file.write(b"PK\\x03\\x04 the first bytes")
    else:
        save(obj, file)
    file.flush()
    os.kill(os.getpid(), signal.SIGKILL)

torch.save = killed
BatchDumper(sys.argv[1]).write("step00000003-rank0", {"batch": torch.ones(1000)}, {"loss": 9.0})
"""


@pytest.mark.parametrize("moment", ["mid-write", "before-rename"])
def test_a_process_killed_during_a_dump_leaves_nothing_under_the_final_name(tmp_path: Path, moment: str) -> None:
    dump_dir = tmp_path / "dumps"
    dump_dir.mkdir()
    (dump_dir / "step00000003-rank0.pt").write_bytes(b"an earlier dump")
    result = subprocess.run(
        [sys.executable, "-c", _KILLED_DURING_DUMP, str(dump_dir), moment],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == -9, result.stderr.decode()[-2000:]
    finals = [name for name in _files(dump_dir) if not name.startswith(".")]
    assert finals == ["step00000003-rank0.pt"] and (dump_dir / "step00000003-rank0.pt").read_bytes() == (
        b"an earlier dump"
    )
    (leftover,) = [name for name in _files(dump_dir) if name.startswith(".")]  # the hidden temporary only
    assert leftover.startswith(".step00000003-rank0.") and leftover.endswith(".tmp")


# --- reading a damaged or hostile file ----------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _overwrite_header(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[:64] = bytes(64)
    path.write_bytes(bytes(data))


def _flip_a_data_bit(path: Path) -> None:
    # the batch's bytes, found by value: torch.load would read the changed value without complaint
    data = bytearray(path.read_bytes())
    marker = torch.arange(64, dtype=torch.float32)[40:42].numpy().tobytes()
    at = data.find(marker)
    assert at > 0
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def _empty(path: Path) -> None:
    path.write_bytes(b"")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_truncate, "is not a readable lightning-deadunits dump"),
        (_overwrite_header, "is not a readable lightning-deadunits dump"),
        (_flip_a_data_bit, "is a corrupt lightning-deadunits dump: its contents do not match the checksum"),
        (_empty, "is not a readable lightning-deadunits dump"),
    ],
    ids=["truncated", "header-overwritten", "data-bit-flipped", "emptied"],
)
def test_a_dump_damaged_after_writing_is_rejected_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], damage: Callable[[Path], None], message: str
) -> None:
    path = BatchDumper(tmp_path).write("step1", {"batch": torch.arange(64, dtype=torch.float32)}, {"loss": 1.0})
    assert path is not None and load_dump(path).metadata["loss"] == 1.0
    damage(path)
    with pytest.raises(ValueError, match=message):
        load_dump(path)
    assert deadunits(["dump", "show", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"deadunits dump show: cannot read {path}: {path} ") and message in captured.err


class _CreatesAFile:
    """Unpickled, this runs `touch <marker>`: what a hostile dump would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return os.system, (f"touch {self.marker}",)


def test_a_dump_that_would_run_code_is_refused_and_the_code_never_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker, path = tmp_path / "pwned", tmp_path / "hostile.pt"
    torch.save({"format": DUMP_FORMAT, "metadata": {}, "batch": _CreatesAFile(marker)}, path)
    with pytest.raises(ValueError, match=f"{path} is not a readable lightning-deadunits dump: .*Weights only load"):
        load_dump(path)
    assert deadunits(["dump", "show", str(path)]) == 2 and "cannot read" in capsys.readouterr().err
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is real: an unsafe load runs it
    assert marker.exists()


# --- every batch structure round-trips; what cannot be stored becomes a placeholder --------------------------------

Record = namedtuple("Record", "inputs extra")


@dataclasses.dataclass
class Example:
    features: Any
    label: Any


_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.uint8]
_DTYPES += [torch.bool, torch.complex64]
_tensors = st.builds(
    lambda dtype, shape, seed: (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 50).to(dtype),
    st.sampled_from(_DTYPES),
    st.lists(st.integers(0, 3), max_size=3),
    st.integers(0, 2**16),
)
_arrays = st.builds(
    lambda dtype, values: np.array(values, dtype=dtype),
    st.sampled_from([np.float32, np.float64, np.int32, np.int64, np.uint8, np.bool_, np.complex128]),
    st.lists(st.integers(0, 100), max_size=5),
)
_numpy_scalars = st.builds(lambda value: np.float64(value), st.floats(allow_nan=False)) | st.builds(
    np.int32, st.integers(-(2**31), 2**31 - 1)
)
_hashable = st.none() | st.booleans() | st.integers() | st.text(max_size=5) | st.binary(max_size=5)
_leaves = (
    _hashable
    | st.floats(allow_nan=True)
    | st.complex_numbers(allow_nan=False)
    | _tensors
    | _arrays
    | _numpy_scalars
    | st.frozensets(_hashable, max_size=3)
)


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    keys = st.text(max_size=4) | st.integers(-5, 5)
    return (
        st.lists(children, max_size=3)
        | st.lists(children, max_size=3).map(tuple)
        | st.dictionaries(keys, children, max_size=3)
        | st.builds(Record, children, children)
        | st.builds(Example, children, children)
        | st.sets(_hashable, max_size=3)
    )


_batches = st.recursive(_leaves, _containers, max_leaves=12)


def _same(original: Any, restored: Any) -> bool:
    """Whether `restored` is what `decode(encode(original))` promises (see the table in `dumps`)."""
    if isinstance(original, torch.Tensor):
        return (
            isinstance(restored, torch.Tensor)
            and restored.dtype == original.dtype
            and restored.shape == original.shape
            and torch.equal(restored, original)
        )
    if isinstance(original, np.ndarray):
        return restored.dtype == original.dtype and np.array_equal(restored, original)
    if isinstance(original, np.generic):
        return type(restored) is type(original.item()) and restored == original.item()
    if isinstance(original, float) and math.isnan(original):
        return isinstance(restored, float) and math.isnan(restored)
    if isinstance(original, tuple) and hasattr(original, "_fields"):
        return (
            type(restored).__name__ == type(original).__name__
            and restored._fields == original._fields
            and all(_same(a, b) for a, b in zip(original, restored, strict=True))
        )
    if dataclasses.is_dataclass(original):
        names = [field.name for field in dataclasses.fields(original)]
        return (
            type(restored).__name__ == type(original).__name__
            and [field.name for field in dataclasses.fields(restored)] == names
            and all(_same(getattr(original, name), getattr(restored, name)) for name in names)
        )
    if isinstance(original, (set, frozenset)):
        return isinstance(restored, set) and restored == set(original)
    if isinstance(original, (list, tuple)):
        return (
            type(restored) is type(original)
            and len(restored) == len(original)
            and all(_same(a, b) for a, b in zip(original, restored, strict=True))
        )
    if isinstance(original, dict):
        return list(restored) == list(original) and all(_same(original[key], restored[key]) for key in original)
    return type(restored) is type(original) and restored == original


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=_batches)
def test_every_supported_batch_round_trips_through_the_safe_loader(batch: Any) -> None:
    unsaved: list[str] = []
    buffer = io.BytesIO()
    torch.save(encode(batch, unsaved), buffer)
    buffer.seek(0)
    restored = decode(torch.load(buffer, weights_only=True))
    assert unsaved == []
    assert _same(batch, restored)


_unsupported = st.sampled_from(
    [
        (np.array(["a", "bc"]), "numpy.ndarray[<U2]", [2]),
        (np.array(["2020-01-01"], dtype="datetime64[D]"), "numpy.ndarray[datetime64[D]]", [1]),
        (np.array([1.0, 2.0], dtype=">f8"), "numpy.ndarray[>f8]", [2]),
        (np.zeros(2, dtype=[("x", "i4")]), "numpy.ndarray[[('x', '<i4')]]", [2]),
        (np.array([None, 1], dtype=object), "numpy.ndarray[object]", [2]),
        (np.timedelta64(3, "s"), "numpy.timedelta64", []),
        (io.StringIO("open file"), "_io.StringIO", None),
        (len, "builtins.builtin_function_or_method", None),
    ]
)


@settings(max_examples=40, deadline=None)
@given(batch=_batches, extra=_unsupported)
def test_unsupported_leaves_become_described_placeholders_beside_the_rest(
    batch: Any, extra: tuple[Any, str, list[int] | None]
) -> None:
    value, type_name, shape = extra
    unsaved: list[str] = []
    buffer = io.BytesIO()
    torch.save(encode({"batch": batch, "odd": [value]}, unsaved), buffer)
    buffer.seek(0)
    restored = decode(torch.load(buffer, weights_only=True))
    assert unsaved == [type_name]
    assert _same(batch, restored["batch"])
    (placeholder,) = restored["odd"]
    assert placeholder["__deadunits__"] == "unsaved"
    assert (placeholder["type"], placeholder["shape"]) == (type_name, shape)
    assert placeholder["repr"] == repr(value)[:200]


def test_a_spike_on_a_batch_of_numpy_strings_and_dates_is_dumped_and_training_goes_on(tmp_path: Path) -> None:
    pairs = image_data(STEPS)
    batches = [
        {
            "x": x,
            "y": y,
            "names": np.array([f"img{i}", "b"]),
            "taken": np.array(["2024-01-0" + str(i + 1)] * 2, "M8[D]"),
        }
        for i, (x, y) in enumerate(pairs)
    ]
    monitor = _spike_monitor(tmp_path / "dumps")
    with pytest.warns(DeadUnitsWarning, match=r"could not store values of type \['numpy.ndarray\[<U4\]'") as record:
        trainer = _fit(OddTask(SmallConvNet(), batches, spikes={SPIKE_BATCH: 100.0}), [monitor], tmp_path)
    assert len(_ours(record)) == 1 and trainer.global_step == STEPS
    batch, metadata = load_dump(monitor.events[0]["dump"])
    assert torch.equal(batch["x"], pairs[SPIKE_BATCH][0])
    assert batch["names"]["repr"] == "array(['img3', 'b'], dtype='<U4')" and batch["names"]["shape"] == [2]
    assert metadata["unsaved"] == ["numpy.ndarray[<U4]", "numpy.ndarray[datetime64[D]]"]


# --- monitors on odd models ----------------------------------------------------------------------------------------


class ScaleOnly(nn.Module):
    """No convolution, no linear layer, no activation: one scalar weight."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3)).unsqueeze(1) * self.scale


def _frozen_but_head() -> nn.Module:
    model = SmallConvNet()
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name.startswith("head."))
    return model


class ReplaceBlockAtEpochStart(pl.Callback):
    """At the start of epoch 1, swaps `conv2` and `relu2` for new modules (as surgery or a growing model does)."""

    def __init__(self) -> None:
        self.replaced: list[nn.Module] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 1:
            model = pl_module.model  # type: ignore[union-attr]
            self.replaced = [model.conv2, model.relu2]
            model.conv2, model.relu2 = nn.Conv2d(4, 5, 3, padding=1), nn.ReLU()
            trainer.strategy.setup_optimizers(trainer)  # the new parameters train too


MONITORS: dict[str, Callable[[Path], pl.Callback]] = {
    "kernels": lambda tmp_path: KernelNormMonitor(every_n_steps=1),
    "activations": lambda tmp_path: ActivationMonitor(every_n_steps=1, log_every_n_samples=1, window=2),
    "loss": lambda tmp_path: _spike_monitor(tmp_path / "dumps"),
    "bundle": lambda tmp_path: DeadUnits(
        kernels=KernelNormMonitor(every_n_steps=1),
        activations=ActivationMonitor(every_n_steps=1, log_every_n_samples=1, window=2),
        loss=_spike_monitor(tmp_path / "dumps"),
    ),
}


def _hooks(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if module._forward_hooks or module._forward_pre_hooks]


def _fit_collecting_warnings(task: OddTask, callbacks: list[pl.Callback], tmp_path: Path) -> list[str]:
    """Fit two epochs; return the package's warnings (the others are Lightning's advice on tiny runs)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(task, callbacks, tmp_path, max_epochs=2)
    return [str(warning.message) for warning in caught if issubclass(warning.category, DeadUnitsWarning)]


NOTHING_TO_WATCH = {
    "kernels": ["`KernelNormMonitor` found no layer to watch in OddTask (types ['_ConvNd', 'Linear']"],
    "activations": ["`ActivationMonitor` found no module to watch in OddTask (types ['ReLU', 'ReLU6'"],
    "loss": [],
}
NOTHING_TO_WATCH["bundle"] = NOTHING_TO_WATCH["kernels"] + NOTHING_TO_WATCH["activations"]


@pytest.mark.parametrize("monitor", list(MONITORS))
def test_a_model_with_nothing_to_monitor_trains_to_the_end_with_one_warning_per_monitor(
    tmp_path: Path, monitor: str
) -> None:
    task = OddTask(ScaleOnly(), [structured("tensor_tuple", *pair) for pair in image_data(STEPS)])
    messages = _fit_collecting_warnings(task, [MONITORS[monitor](tmp_path)], tmp_path)
    assert task.trainer.global_step == 2 * STEPS
    assert len(messages) == len(NOTHING_TO_WATCH[monitor])
    assert all(message.startswith(start) for message, start in zip(messages, NOTHING_TO_WATCH[monitor], strict=True))
    assert all(message.endswith("it will log nothing.") or "pre_activations" in message for message in messages)
    assert _hooks(task) == []


@pytest.mark.parametrize("monitor", list(MONITORS))
def test_a_frozen_model_with_a_trainable_head_trains_to_the_end(tmp_path: Path, monitor: str) -> None:
    task = OddTask(_frozen_but_head(), [structured("tensor_tuple", *pair) for pair in image_data(STEPS)])
    frozen = {name: p.detach().clone() for name, p in task.model.named_parameters() if not p.requires_grad}
    messages = _fit_collecting_warnings(task, [MONITORS[monitor](tmp_path)], tmp_path)
    assert task.trainer.global_step == 2 * STEPS and messages == []
    assert all(torch.equal(p, frozen[name]) for name, p in task.model.named_parameters() if name in frozen)
    assert _hooks(task) == []


def _replaced_fit(tmp_path: Path, monitor: str) -> tuple[OddTask, ReplaceBlockAtEpochStart, pl.Callback]:
    task = OddTask(SmallConvNet(), [structured("tensor_tuple", *pair) for pair in image_data(STEPS)])
    surgeon, callback = ReplaceBlockAtEpochStart(), MONITORS[monitor](tmp_path)
    messages = _fit_collecting_warnings(task, [surgeon, callback], tmp_path)
    assert task.trainer.global_step == 2 * STEPS and messages == []
    return task, surgeon, callback


@pytest.mark.parametrize("monitor", list(MONITORS))
def test_modules_replaced_between_epochs_train_to_the_end_and_keep_no_hooks(tmp_path: Path, monitor: str) -> None:
    task, surgeon, _ = _replaced_fit(tmp_path, monitor)
    assert len(surgeon.replaced) == 2 and all(_hooks(module) == [] for module in surgeon.replaced)
    assert _hooks(task) == []


@pytest.mark.parametrize("monitor", ["kernels", "activations"])
def test_modules_replaced_between_epochs_are_the_ones_measured(tmp_path: Path, monitor: str) -> None:
    task, _, callback = _replaced_fit(tmp_path, monitor)
    if isinstance(callback, KernelNormMonitor):
        assert callback.probe.layers["model.conv2"] is task.model.conv2
    else:
        assert any(key.startswith("deadunits/activations/model.relu2/") for key in callback.readings)


@pytest.mark.parametrize("monitor", list(MONITORS))
def test_an_exception_inside_training_step_propagates_and_releases_every_hook(tmp_path: Path, monitor: str) -> None:
    task = OddTask(
        SmallConvNet(), [structured("tensor_tuple", *pair) for pair in image_data(STEPS)], fail_at_step=SPIKE_BATCH
    )
    with pytest.raises(RuntimeError, match=f"planted failure at step {SPIKE_BATCH}"):
        _fit(task, [MONITORS[monitor](tmp_path)], tmp_path)
    assert _hooks(task) == []
