import copy
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_deadunits.callbacks.block_lesion import BlockLesion
from lightning_deadunits.errors import DeadUnitsWarning
from lightning_deadunits.probes.lesion import BlockLesionProbe, LesionResult, default_lesion_step, lesion_blocks
from tests.helpers.ddp import DDP_OPTIONS, RecordOnEachRank, read_ranks
from tests.helpers.residual_models import (
    DictBatchClassifier,
    LesionClassifier,
    LesionLossClassifier,
    TinyResNet,
    self_labelled_images,
)

TRAINER_OPTIONS: dict[str, Any] = dict(
    max_epochs=1,
    limit_train_batches=1,
    enable_progress_bar=False,
    enable_model_summary=False,
    enable_checkpointing=False,
)


def _model_and_loader(batch_size: int = 8) -> tuple[TinyResNet, DataLoader[Any]]:
    model = TinyResNet()
    return model, DataLoader(self_labelled_images(model), batch_size=batch_size)


def _mean_loss(model: nn.Module, batches: Iterable[Any]) -> float:
    with torch.no_grad():
        losses, counts = zip(
            *[(F.cross_entropy(model(x), y, reduction="sum"), len(y)) for x, y in batches], strict=True
        )
    return float(torch.stack(losses).sum()) / sum(counts)


def test_lesion_blocks_planted_zero_branch_is_free_and_strong_branch_matters() -> None:
    model, loader = _model_and_loader()
    result = lesion_blocks(model, loader)
    assert result.baseline["accuracy"] == 1.0
    assert set(result.deltas) == {"important", "dead"}
    assert result.deltas["dead"] == {"loss": 0.0, "accuracy": 0.0}
    assert result.deltas["important"]["loss"] > 0.3
    assert result.deltas["important"]["accuracy"] < -0.5
    assert "downsampling" in result.skipped["down"]


def test_lesion_blocks_delta_equals_loss_of_model_without_the_block() -> None:
    model, loader = _model_and_loader()
    result = lesion_blocks(model, loader)
    without = copy.deepcopy(model)
    without.important = nn.Identity()  # type: ignore[assignment]
    assert result.baseline["loss"] == pytest.approx(_mean_loss(model, loader), rel=1e-6)
    assert result.baseline["loss"] + result.deltas["important"]["loss"] == pytest.approx(
        _mean_loss(without, loader), rel=1e-6
    )


def test_lesion_blocks_leaves_model_forward_weights_and_mode_unchanged() -> None:
    model, loader = _model_and_loader()
    model.train()
    images = next(iter(loader))[0]
    with torch.no_grad():
        before_output = model.eval()(images)
    model.train()
    before_state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    lesion_blocks(model, loader)
    assert model.training
    assert all(module.training for module in model.modules())
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before_state[name]), name
    with torch.no_grad():
        assert torch.equal(model.eval()(images), before_output)


def test_lesion_blocks_removes_hooks_when_the_step_fails() -> None:
    model, loader = _model_and_loader()

    def failing_step(module: nn.Module, batch: Any) -> Any:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        lesion_blocks(model, loader, step=failing_step)
    assert all(not module._forward_hooks for module in model.modules())


def test_lesion_blocks_max_batches_uses_only_the_first_batches() -> None:
    model, loader = _model_and_loader(batch_size=8)
    first = [next(iter(loader))]
    assert lesion_blocks(model, loader, max_batches=1).baseline["loss"] == pytest.approx(
        _mean_loss(model, first), rel=1e-6
    )


def test_lesion_blocks_weights_unequal_batches_by_size() -> None:
    model, _ = _model_and_loader()
    loader = DataLoader(self_labelled_images(model, count=11), batch_size=4)
    assert lesion_blocks(model, loader).baseline["loss"] == pytest.approx(_mean_loss(model, loader), rel=1e-6)


@pytest.mark.parametrize(
    ("blocks", "exclude", "lesioned", "skipped"),
    [
        (["important", "down"], [], {"important"}, {"down"}),
        ([], ["important"], {"dead"}, {"down"}),
        (["model.*"], [], set(), set()),
        (["important.conv1"], [], {"important.conv1"}, set()),
    ],
)
def test_lesion_blocks_candidates_from_globs(
    blocks: list[str], exclude: list[str], lesioned: set[str], skipped: set[str]
) -> None:
    model, loader = _model_and_loader()
    result = lesion_blocks(model, loader, blocks=blocks, exclude=exclude)
    assert set(result.deltas) == lesioned
    assert set(result.skipped) == skipped


def test_lesion_blocks_custom_metric_and_missing_targets() -> None:
    model, loader = _model_and_loader()

    def top_logit(logits: Tensor, targets: Tensor) -> Tensor:
        return logits.max(dim=1).values.mean()

    result = lesion_blocks(model, loader, metrics={"top_logit": top_logit})
    assert set(result.baseline) == {"loss", "top_logit"}
    assert result.deltas["dead"]["top_logit"] == 0.0

    def loss_only(module: nn.Module, batch: Any) -> tuple[Tensor, None, None]:
        return default_lesion_step(module, batch)[0], None, None

    result = lesion_blocks(model, loader, step=loss_only)
    assert set(result.baseline) == {"loss"}
    assert set(result.deltas["important"]) == {"loss"}


def test_lesion_blocks_accuracy_skipped_for_non_classifier_outputs() -> None:
    model, loader = _model_and_loader()

    def regression(module: nn.Module, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        outputs = module(batch[0])
        targets = torch.zeros_like(outputs)
        return F.mse_loss(outputs, targets), outputs, targets

    assert set(lesion_blocks(model, loader, step=regression).baseline) == {"loss"}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(max_batches=0), ValueError, "`max_batches` must be an int >= 1, got 0"),
        (dict(metrics={"loss": lambda lo, t: lo.sum()}), ValueError, "`metrics` names must be .* got 'loss'"),
        (dict(metrics={"a/b": lambda lo, t: lo.sum()}), ValueError, "`metrics` names must be .* got 'a/b'"),
        (dict(metrics={"m": 3}), TypeError, r"`metrics\['m'\]` must be callable, got 3"),
        (dict(blocks=[1]), TypeError, "`blocks` must be a string or a list of strings"),
        (dict(step="x"), TypeError, "`step` must be callable, got 'x'"),
    ],
)
def test_lesion_blocks_rejects_bad_arguments(kwargs: dict[str, Any], error: type, match: str) -> None:
    model, loader = _model_and_loader()
    with pytest.raises(error, match=match):
        lesion_blocks(model, loader, **kwargs)


def test_lesion_blocks_rejects_unreadable_batches_and_no_batches() -> None:
    model, _ = _model_and_loader()
    with pytest.raises(TypeError, match=r"needs batches `\(inputs, targets, ...\)` of tensors, got dict"):
        lesion_blocks(model, [{"x": torch.zeros(1, 3, 8, 8)}])
    with pytest.raises(ValueError, match="`batches` is empty"):
        lesion_blocks(model, [])


def test_lesion_probe_default_candidates_are_block_class_names() -> None:
    model, _ = _model_and_loader()
    assert list(BlockLesionProbe().candidates(model)) == ["important", "down", "dead"]


def test_block_lesion_logs_deltas_image_and_skips(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lesion = BlockLesion(max_batches=2)
    logger = TensorBoardLogger(tmp_path, name="", version="")
    trainer = pl.Trainer(default_root_dir=tmp_path, logger=logger, callbacks=[lesion], **TRAINER_OPTIONS)
    with caplog.at_level(logging.INFO, logger="lightning_deadunits"):
        trainer.fit(LesionClassifier())
    assert "`BlockLesion` skips model.down" in caplog.text
    readings = lesion.history[-1]
    assert readings["deadunits/lesion/model.dead/delta_loss"] == 0.0
    assert readings["deadunits/lesion/model.dead/delta_accuracy"] == 0.0
    assert readings["deadunits/lesion/model.important/delta_loss"] > 0.3
    assert readings["deadunits/lesion/baseline/accuracy"] == 1.0
    assert not any("model.down" in key for key in readings)
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0, "scalars": 0, "tensors": 0}).Reload()
    assert "deadunits/lesion/delta_loss_per_block" in events.Tags()["images"]
    assert "deadunits/lesion/model.important/delta_loss" in events.Tags()["scalars"]
    assert "deadunits/lesion/skipped/text_summary" in events.Tags()["tensors"]


def test_block_lesion_every_n_epochs_and_never_in_sanity_check(tmp_path: Path) -> None:
    lesion = BlockLesion(every_n_epochs=2, max_batches=1)
    options = {**TRAINER_OPTIONS, "max_epochs": 4, "num_sanity_val_steps": 1}
    trainer = pl.Trainer(default_root_dir=tmp_path, logger=False, callbacks=[lesion], **options)
    trainer.fit(LesionClassifier())
    assert [readings["epoch"] for readings in lesion.history] == [1.0, 3.0]


def test_block_lesion_uses_lesion_loss_protocol(tmp_path: Path) -> None:
    lesion = BlockLesion(max_batches=4)
    trainer = pl.Trainer(default_root_dir=tmp_path, logger=False, callbacks=[lesion], **TRAINER_OPTIONS)
    module = LesionLossClassifier()
    trainer.fit(module)
    with torch.no_grad():
        expected = float(module(module.data.tensors[0]).pow(2).mean())
    readings = lesion.history[-1]
    assert readings["deadunits/lesion/baseline/loss"] == pytest.approx(expected, rel=1e-5)
    assert readings["deadunits/lesion/model.dead/delta_loss"] == 0.0


def test_block_lesion_warns_on_unreadable_batches(tmp_path: Path) -> None:
    lesion = BlockLesion()
    trainer = pl.Trainer(default_root_dir=tmp_path, logger=False, callbacks=[lesion], **TRAINER_OPTIONS)
    with pytest.warns(DeadUnitsWarning, match="cannot read validation batches of type dict"):
        trainer.fit(DictBatchClassifier())
    assert lesion.history == []


def test_block_lesion_warns_when_no_candidate(tmp_path: Path) -> None:
    lesion = BlockLesion(blocks=["nothing.*"])
    trainer = pl.Trainer(default_root_dir=tmp_path, logger=False, callbacks=[lesion], **TRAINER_OPTIONS)
    with pytest.warns(DeadUnitsWarning, match="found no candidate block in LesionClassifier"):
        trainer.fit(LesionClassifier())
    assert lesion.history == []


def test_block_lesion_validate_leaves_module_unchanged(tmp_path: Path) -> None:
    module = LesionClassifier()
    before = {name: tensor.clone() for name, tensor in module.state_dict().items()}
    lesion = BlockLesion()
    trainer = pl.Trainer(default_root_dir=tmp_path, logger=False, callbacks=[lesion], **TRAINER_OPTIONS)
    trainer.validate(module, verbose=False)
    assert lesion.last_result is not None and lesion.last_result.deltas["model.dead"]["loss"] == 0.0
    assert all(torch.equal(tensor, before[name]) for name, tensor in module.state_dict().items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in module.modules())


def test_block_lesion_state_dict_round_trip(tmp_path: Path) -> None:
    lesion = BlockLesion(max_batches=1)
    trainer = pl.Trainer(default_root_dir=tmp_path, logger=False, callbacks=[lesion], **TRAINER_OPTIONS)
    trainer.fit(LesionClassifier())
    restored = BlockLesion(max_batches=1)
    restored.load_state_dict(lesion.state_dict())
    assert restored.state_dict() == lesion.state_dict()
    assert restored.last_result == lesion.last_result
    assert isinstance(restored.last_result, LesionResult)
    fresh = BlockLesion()
    fresh.load_state_dict({})
    assert fresh.last_result is None and fresh.history == []


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(every_n_epochs=0), ValueError, "`every_n_epochs` must be an int >= 1, got 0"),
        (dict(max_batches=0), ValueError, "`max_batches` must be an int >= 1, got 0"),
        (dict(log_images="yes"), TypeError, "`log_images` must be a bool, got 'yes'"),
        (dict(exclude=[None]), TypeError, "`exclude` must be a string or a list of strings"),
        (dict(prefix="/x"), ValueError, "`prefix` must be a non-empty string"),
    ],
)
def test_block_lesion_rejects_bad_arguments(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        BlockLesion(**kwargs)


def _last_lesion(trainer: pl.Trainer) -> dict[str, Any]:
    lesion = next(callback for callback in trainer.callbacks if isinstance(callback, BlockLesion))  # type: ignore[attr-defined]
    assert lesion.last_result is not None
    return lesion.last_result.to_dict()


def test_block_lesion_ddp_sums_every_rank_exactly(tmp_path: Path) -> None:
    module = LesionClassifier(batch_size=4, count=16)
    expected = lesion_blocks(module.model, DataLoader(module.data, batch_size=4))
    callbacks = [BlockLesion(max_batches=2), RecordOnEachRank(tmp_path, _last_lesion)]
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        logger=False,
        callbacks=callbacks,
        max_epochs=1,
        limit_train_batches=1,
        num_sanity_val_steps=0,
        **DDP_OPTIONS,
    )
    trainer.fit(module)
    ranks = read_ranks(tmp_path)
    assert ranks[0] == ranks[1]
    assert ranks[0]["baseline"] == pytest.approx(expected.baseline, rel=1e-5)
    assert ranks[0]["deltas"]["model.dead"] == {"loss": 0.0, "accuracy": 0.0}
    assert ranks[0]["deltas"]["model.important"] == pytest.approx(expected.deltas["important"], rel=1e-5)
