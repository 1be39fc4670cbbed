import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from lightning_deadunits.callbacks.activation_monitor import ActivationMonitor
from tests.helpers.activation_models import Fixed, ReusedRelu, image_batches
from tests.helpers.ddp import DDP_OPTIONS, RecordOnEachRank, read_ranks
from tests.helpers.spike_models import rows_seen


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


class BranchOnPositiveBatches(nn.Module):
    """conv -> ReLU, then a second ReLU only for batches with a positive mean: a data-dependent branch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.branch = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.conv(x))
        return self.branch(out - 1) if x.mean() > 0 else out  # type: ignore[no-any-return]


@pytest.mark.slow
def test_a_branch_taken_on_one_rank_only_stops_every_rank_with_the_same_error_not_a_hang(tmp_path: Path) -> None:
    # the samples DDP's (shuffling) sampler gives rank 0 are positive, rank 1's negative: the branch runs on rank 0 only
    samples = -torch.rand(4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    samples[rows_seen(4, rank=0, world_size=2)] *= -1
    trainer = pl.Trainer(
        max_steps=2,
        logger=False,
        callbacks=[ActivationMonitor(every_n_steps=1, window=2, log_every_n_samples=1)],
        default_root_dir=tmp_path,
        **{**DDP_OPTIONS, "strategy": DDPStrategy(start_method="spawn", timeout=timedelta(seconds=60))},
    )
    started = time.monotonic()
    with pytest.raises(Exception, match=r"ActivationStats.sync: the ranks hold different entries or sizes") as error:
        trainer.fit(Fixed(BranchOnPositiveBatches(), list(samples.split(2))))
    assert time.monotonic() - started < 50  # the collectives would time out after 60 s
    assert "`model.branch#0`: rank 0 (4, 4), rank 1 missing" in str(error.value)
