"""One test per private Lightning or torch internal used through lightning_deadunits._compat."""

import random
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_deadunits import _compat

QUIET: dict[str, Any] = dict(
    logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False
)


class Recording(pl.LightningModule):
    """Regresses on 6 one-sample batches whose input is the batch's index; records the indices it trained on."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(1, 1)
        self.seen: list[int] = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (inputs,) = batch
        self.seen.append(int(inputs.item()))
        return self.layer(inputs).square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(TensorDataset(torch.arange(6.0).unsqueeze(1)), batch_size=1)


class At(pl.Callback):
    """Runs ``action(trainer)`` at the start of the batches in ``batches``."""

    def __init__(self, action: Any, batches: set[int]) -> None:
        self.action, self.batches, self.results = action, batches, []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if batch_idx in self.batches:
            self.results.append(self.action(trainer))


def _fit(tmp_path: Path, *callbacks: pl.Callback, **options: Any) -> tuple[pl.Trainer, Recording]:
    module = Recording()
    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=1, callbacks=list(callbacks), **{**QUIET, **options})
    trainer.fit(module)
    return trainer, module


def test_grad_scaler_and_its_scale_are_read_from_the_precision_plugin(tmp_path: Path) -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    probe = At(lambda trainer: (_compat.grad_scaler(trainer), _compat.loss_scale(trainer)), {1})
    _fit(tmp_path, probe, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    ((found, scale),) = probe.results
    assert found is scaler and isinstance(scale, torch.Tensor) and float(scale) == scaler.get_scale()
    plain = At(lambda trainer: (_compat.grad_scaler(trainer), _compat.loss_scale(trainer)), {1})
    _fit(tmp_path / "plain", plain)
    assert plain.results == [(None, None)]


def test_log_every_n_steps_is_the_trainers() -> None:
    assert _compat.log_every_n_steps(pl.Trainer(log_every_n_steps=7, **QUIET)) == 7


def test_logger_tags_and_file_writer_follow_the_tensorboard_logger(tmp_path: Path) -> None:
    logger = TensorBoardLogger(tmp_path, name="", version="", prefix="run")
    assert _compat.logger_tags(logger, {"deadunits/x": 1.0}) == {"run-deadunits/x": 1.0}
    assert callable(_compat.tensorboard_file_writer(logger.experiment).add_summary)


def test_step_progress_round_trip_sets_the_global_step_back(tmp_path: Path) -> None:
    saved: dict[str, Any] = {}

    def save_or_load(trainer: pl.Trainer) -> int:
        if not saved:
            saved.update(_compat.step_progress(trainer))
        else:
            _compat.load_step_progress(trainer, saved)
        return trainer.global_step

    probe = At(save_or_load, {2, 4})
    trainer, _ = _fit(tmp_path, probe)
    assert probe.results == [2, 2]  # read at step 2; at batch 4 (step 4) set back to 2
    assert trainer.global_step == 4  # batches 4 and 5 stepped from 2


def test_drop_next_train_batch_skips_exactly_one_batch_and_stops_at_the_epoch_end(tmp_path: Path) -> None:
    probe = At(_compat.drop_next_train_batch, {1, 4})
    _, module = _fit(tmp_path, probe)
    assert module.seen == [0, 1, 3, 4] and probe.results == [True, True]


def test_distinct_symbolic_sizes_is_a_context_manager() -> None:
    with _compat.distinct_symbolic_sizes():
        pass


def test_numpy_generator_fingerprint_changes_exactly_when_numpy_draws() -> None:
    first = _compat.numpy_generator_fingerprint()
    assert first is not None and first == _compat.numpy_generator_fingerprint()
    np.random.rand()
    assert _compat.numpy_generator_fingerprint() != first


def test_python_generator_fingerprint_changes_exactly_when_random_draws_or_its_gaussian_changes() -> None:
    first = _compat.python_generator_fingerprint()
    assert first is not None and first == _compat.python_generator_fingerprint()  # CPython: readable
    random.random()
    drawn = _compat.python_generator_fingerprint()
    assert drawn != first
    random.gauss()  # draws twice, caches the second Gaussian
    cached = _compat.python_generator_fingerprint()
    random.gauss()  # takes the cached Gaussian: no draw, only `gauss_next` changes
    assert cached != drawn and _compat.python_generator_fingerprint() != cached
    random.setstate(random.getstate())  # set in place: still the same object, still read
    assert _compat.python_generator_fingerprint() == _compat.python_generator_fingerprint()


def test_foreach_norms_are_each_tensors_2_norm_in_float32() -> None:
    norms = _compat.foreach_norms([torch.tensor([3.0, 4.0]), torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.bfloat16)])
    assert [norm.dtype for norm in norms] == [torch.float32, torch.float32]
    assert [norm.item() for norm in norms] == [5.0, 2.0]


def test_torch_functions_undispatched_hides_calls_from_an_active_mode() -> None:
    seen: list[Any] = []

    class Recorder(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with Recorder():
        torch.relu(torch.ones(1))
        with _compat.torch_functions_undispatched():
            torch.sigmoid(torch.ones(1))
    assert torch.relu in seen and torch.sigmoid not in seen
