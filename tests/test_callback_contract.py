"""The contract every public callback keeps, driven by tests/helpers/callback_registry.py."""

import inspect
import logging
import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import lightning_deadunits
from tests.helpers.activation_models import hook_count
from tests.helpers.callback_registry import PUBLIC_CALLBACKS, REGISTRY, Entry, states
from tests.helpers.ddp import DDP_OPTIONS, RecordOnEachRank, read_ranks
from tests.helpers.states import identical

QUIET: dict[str, Any] = dict(
    enable_progress_bar=False,
    enable_model_summary=False,
    num_sanity_val_steps=0,
    logger=False,
    log_every_n_steps=1,
)
IDS = [entry.name for entry in REGISTRY]


def _fit(entry: Entry, tmp_path: Path, callbacks: list[Callback], ckpt_path: str | None = None) -> pl.Trainer:
    torch.manual_seed(0)
    trainer = pl.Trainer(default_root_dir=tmp_path, callbacks=callbacks, max_epochs=2, limit_val_batches=2, **QUIET)
    trainer.fit(entry.task(), ckpt_path=ckpt_path)
    return trainer


def test_registry_holds_every_public_callback() -> None:
    public = {
        name
        for name in lightning_deadunits.__all__
        if inspect.isclass(getattr(lightning_deadunits, name))
        and issubclass(getattr(lightning_deadunits, name), Callback)
    }
    assert public - {"MonitorCallback"} == PUBLIC_CALLBACKS


@pytest.mark.parametrize("entry", REGISTRY, ids=IDS)
def test_callback_fits_twice_and_its_state_round_trips(entry: Entry, tmp_path: Path) -> None:
    callback = entry.build()
    _fit(entry, tmp_path / "first", [callback])
    trainer = _fit(entry, tmp_path / "second", [callback])
    fresh = entry.build()
    fresh.load_state_dict(callback.state_dict())
    assert identical(fresh.state_dict(), callback.state_dict())
    assert callback.state_key == fresh.state_key  # cached once, and training changes none of what it names
    assert trainer.global_step == 8
    assert hook_count(trainer.lightning_module) == 0


@pytest.mark.parametrize("entry", REGISTRY, ids=IDS)
def test_callback_resumed_from_a_checkpoint_ends_as_an_uninterrupted_run(entry: Entry, tmp_path: Path) -> None:
    whole = entry.build()
    # at an epoch boundary: a plain DataLoader restarts its epoch on resume
    checkpoint = ModelCheckpoint(tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    _fit(entry, tmp_path / "whole", [whole, checkpoint])
    resumed = entry.build()
    _fit(entry, tmp_path / "resumed", [resumed], ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt"))
    expected = states(_parts(whole))
    got = states(_parts(resumed))
    assert expected.keys() == got.keys()
    for key in expected:
        assert identical(_portable(got[key]), _portable(expected[key])), key


@pytest.mark.parametrize("entry", REGISTRY, ids=IDS)
def test_callback_releases_its_hooks_when_training_step_raises(entry: Entry, tmp_path: Path) -> None:
    task = entry.task()

    def fail(*args: Any) -> None:
        raise RuntimeError("planted failure")

    task.training_step = fail  # type: ignore[method-assign]
    trainer = pl.Trainer(default_root_dir=tmp_path, callbacks=[entry.build()], max_steps=8, **QUIET)
    with pytest.raises(RuntimeError, match="planted failure"):
        trainer.fit(task)
    assert hook_count(task) == 0


@pytest.mark.slow
def test_every_callback_decides_identically_on_two_ranks(tmp_path: Path) -> None:
    callbacks = [entry.build() for entry in REGISTRY if entry.task is REGISTRY[0].task]
    recorder = RecordOnEachRank(tmp_path / "ranks", rank_states)
    torch.manual_seed(0)
    options = {**QUIET, **DDP_OPTIONS}
    trainer = pl.Trainer(default_root_dir=tmp_path, callbacks=[*callbacks, recorder], max_steps=8, **options)
    trainer.fit(REGISTRY[0].task())
    rank0, rank1 = read_ranks(tmp_path / "ranks")
    assert rank0.keys() == rank1.keys() and len(rank0) >= len(callbacks)
    for key in rank0:
        assert identical(rank0[key], rank1[key]), key


def _parts(callback: Any) -> list[Any]:
    return list(getattr(callback, "parts", [callback]))


def rank_states(trainer: pl.Trainer) -> dict[str, Any]:
    """Every deadunits callback's state as JSON-able data, without what belongs to one rank."""
    parts = [part for callback in trainer.callbacks for part in _parts(callback)]  # type: ignore[attr-defined]
    owned = [part for part in parts if type(part).__module__.startswith("lightning_deadunits")]
    return {key: _jsonable(_portable(_without_rank(state))) for key, state in states(owned).items()}


def _jsonable(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return [str(state.dtype), state.tolist()]
    if isinstance(state, dict):
        return {str(k): _jsonable(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return [_jsonable(v) for v in state]
    return state


def _without_rank(state: Any) -> Any:
    """A state without what belongs to one rank: each rank's own spike events (rank, its dump path, its loss)."""
    if isinstance(state, dict):
        return {k: _without_rank(v) for k, v in state.items() if k not in ("events", "dumper", "detector")}
    return state


def _portable(state: Any) -> Any:
    """Tensors on the CPU, and run-specific paths dropped, so two runs' states compare."""
    if isinstance(state, torch.Tensor):
        return state.cpu()
    if isinstance(state, dict):
        return {k: _portable(v) for k, v in state.items() if k != "dump"}
    if isinstance(state, (list, tuple)):
        return type(state)(_portable(v) for v in state)
    if isinstance(state, str):  # e.g. a dump path inside an alarm message
        return re.sub(r"\S*/(whole|resumed)/", "<run>/", state)
    return state


@pytest.mark.parametrize("entry", REGISTRY, ids=IDS)
def test_callback_resumes_from_a_checkpoint_of_an_older_version_with_defaults_and_a_note(
    entry: Entry, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    checkpoint = ModelCheckpoint(tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    _fit(entry, tmp_path / "old", [entry.build(), checkpoint])
    path = tmp_path / "ckpt" / "epoch=0-step=4.ckpt"
    saved = torch.load(path, weights_only=False)
    stripped = 0
    for key, state in saved["callbacks"].items():
        if any(str(key).startswith(name) for name in PUBLIC_CALLBACKS) and len(state) > 1:
            oldest = next(iter(state))  # an older version saved fewer keys: keep only the first
            saved["callbacks"][key] = {oldest: state[oldest]}
            stripped += 1
    torch.save(saved, path)
    with caplog.at_level(logging.INFO, logger="lightning_deadunits"):
        trainer = _fit(entry, tmp_path / "new", [entry.build()], ckpt_path=str(path))
    assert trainer.global_step == 8
    notes = [r for r in caplog.records if "(written by an older version): their defaults are used" in r.getMessage()]
    assert len(notes) == stripped
