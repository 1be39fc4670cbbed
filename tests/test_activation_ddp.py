from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_deadunits.callbacks.activation_monitor import ActivationMonitor
from tests.helpers.activation_models import Fixed, ReusedRelu, image_batches
from tests.helpers.ddp import DDP_OPTIONS, RecordOnEachRank, read_ranks


def _record(trainer: pl.Trainer) -> dict[str, Any]:
    (monitor,) = [c for c in trainer.callbacks if isinstance(c, ActivationMonitor)]  # type: ignore[attr-defined]
    return {
        "readings": monitor.readings,
        "dead_masks": {name: mask.tolist() for name, mask in monitor.dead_masks.items()},
        "history": monitor.history,
    }


class LeakyConvs(nn.Module):
    """conv -> LeakyReLU, twice: negative outputs, so minima differ by channel and by rank."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.act = nn.LeakyReLU(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.act(self.conv1(x))))  # type: ignore[no-any-return]


@pytest.mark.slow
@pytest.mark.parametrize("model_class", [ReusedRelu, LeakyConvs])
def test_activation_monitor_under_ddp_equals_one_process_over_the_global_batches(
    tmp_path: Path, model_class: type[nn.Module]
) -> None:
    torch.manual_seed(0)
    model = model_class()
    # global batches of 4; under DDP each rank takes every other sample, so step s sees global batch s, split
    global_batches = [torch.cat(pair) for pair in zip(image_batches(3), image_batches(3, seed=2), strict=True)]
    per_rank_batches = [half for batch in global_batches for half in batch.split(2)]

    def fit(batches: list[torch.Tensor], directory: Path, **options: Any) -> None:
        monitor = ActivationMonitor(every_n_steps=1, window=2, log_every_n_samples=3)
        trainer = pl.Trainer(
            max_steps=3,
            logger=False,
            callbacks=[monitor, RecordOnEachRank(directory, _record)],
            default_root_dir=tmp_path,
            **options,
        )
        trainer.fit(Fixed(model, batches))

    fit(per_rank_batches, tmp_path / "ddp", **DDP_OPTIONS)
    fit(
        global_batches,
        tmp_path / "single",
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    (single,) = read_ranks(tmp_path / "single", world_size=1)
    for rank in read_ranks(tmp_path / "ddp"):
        assert rank["readings"].keys() == single["readings"].keys()
        assert rank["readings"] == pytest.approx(single["readings"], rel=1e-6, abs=1e-9)
        assert rank["dead_masks"] == single["dead_masks"]
        assert rank["history"] == single["history"]
    if model_class is ReusedRelu:
        assert single["readings"]["deadunits/activations/model.relu#1/dead"] >= 1
        return
    # the minima are negative and differ between the ranks' halves, so only a MIN reduction gives the global one
    with torch.no_grad():
        first_site = [model.act(model.conv1(batch)) for batch in per_rank_batches]  # type: ignore[operator]
    rank_minima = [min(float(out.min()) for out in first_site[rank::2]) for rank in range(2)]
    global_min = single["readings"]["deadunits/activations/model.act#0/min"]
    assert global_min == pytest.approx(min(rank_minima)) and global_min < 0
    assert rank_minima[0] != pytest.approx(rank_minima[1])
