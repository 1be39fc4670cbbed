import os
import socket
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_deadunits.functional.activations import channel_stats
from lightning_deadunits.metrics._sync import LayoutMismatchError, agree_on_layout
from lightning_deadunits.metrics.activation_stats import ActivationStats, SiteSummary

SITE = ("relu", 0)


def _feed(stats: ActivationStats, batches: list[torch.Tensor], eps: float | None = 0.0) -> None:
    for batch in batches:
        stats.begin_sample()
        stats.update(SITE, channel_stats(batch, 1, eps))


def _active(*channels: int) -> torch.Tensor:
    """A (2, 3) batch whose listed channels hold a positive value and every other value is 0."""
    batch = torch.zeros(2, 3)
    batch[1, list(channels)] = 1.0
    return batch


def test_dead_masks_cover_the_last_window_samples() -> None:
    stats = ActivationStats()
    expected = []
    for active in [(0, 1), (1,), (), (2,), ()]:
        _feed(stats, [_active(*active)])
        expected.append(stats.dead_masks(window=2)[SITE].tolist())
    # window 2: a channel is dead when it was active in neither of the last two samples (fewer at the start)
    assert expected == [
        [False, False, True],
        [False, False, True],
        [True, False, True],
        [True, True, False],
        [True, True, False],
    ]


def test_summary_pools_the_period_and_reset_keeps_the_window() -> None:
    stats = ActivationStats()
    first, second = torch.tensor([[0.0, 2.0], [0.0, 4.0]]), torch.tensor([[1.0, -1.0], [0.0, 3.0]])
    _feed(stats, [first, second])
    summary = stats.summarise(window=5)[SITE]
    both = torch.cat([first, second]).double()
    assert summary.count == 4
    assert summary.near_zero is not None and summary.near_zero.tolist() == [3, 0]
    assert summary.sum.tolist() == both.sum(0).tolist()
    assert summary.sum_sq.tolist() == both.square().sum(0).tolist()
    assert summary.sum_abs.tolist() == both.abs().sum(0).tolist()
    assert (summary.min.tolist(), summary.max.tolist()) == ([0.0, -1.0], [1.0, 4.0])
    assert summary.dead is not None and summary.dead.tolist() == [False, False]
    readings = summary.readings(dormant_tau=0.1)
    assert readings["zero_frac"] == 3 / 8
    assert readings["mean"] == pytest.approx(both.mean().item())
    assert readings["std"] == pytest.approx(both.std(unbiased=False).item())
    assert (readings["min"], readings["max"], readings["max_abs"]) == (-1.0, 4.0, 4.0)
    stats.reset_period()
    assert stats.summarise(window=5) == {}
    _feed(stats, [torch.zeros(2, 2)])
    assert stats.dead_masks(window=1)[SITE].tolist() == [True, True]
    assert stats.dead_masks(window=2)[SITE].tolist() == [False, False]  # both active in the previous sample


def test_summary_without_eps_has_no_zero_counts() -> None:
    stats = ActivationStats()
    _feed(stats, [torch.tensor([[0.5, -0.5]])], eps=None)
    summary = stats.summarise(window=1)[SITE]
    assert summary.near_zero is None and summary.dead is None
    assert "zero_frac" not in summary.readings(0.1) and "dead" not in summary.readings(0.1)
    assert stats.dead_masks(window=1) == {}


def test_site_with_new_channel_count_starts_afresh() -> None:
    stats = ActivationStats()
    _feed(stats, [torch.ones(2, 3)])
    _feed(stats, [torch.zeros(2, 4)])
    summary = stats.summarise(window=3)[SITE]
    assert summary.channels == 4 and summary.count == 2
    assert summary.dead is not None and summary.dead.all()


def test_activation_stats_state_dict_round_trip() -> None:
    stats = ActivationStats()
    _feed(stats, [_active(0), _active(1), torch.randn(2, 3)])
    stats.update(("tanh", 1), channel_stats(torch.randn(4, 2), 1, None))
    restored = ActivationStats()
    restored.load_state_dict(stats.state_dict())
    assert restored.samples == 3
    for window in (1, 2, 5):
        assert {k: v.tolist() for k, v in restored.dead_masks(window).items()} == {
            k: v.tolist() for k, v in stats.dead_masks(window).items()
        }
    original, copy = stats.summarise(2), restored.summarise(2)
    assert original.keys() == copy.keys()
    for site in original:
        _assert_same_summary(original[site], copy[site])
    batch = torch.randn(2, 3)
    for target in (stats, restored):
        target.begin_sample()
        target.update(SITE, channel_stats(batch))
    _assert_same_summary(stats.summarise(2)[SITE], restored.summarise(2)[SITE])


def _assert_same_summary(left: SiteSummary, right: SiteSummary) -> None:
    assert left.count == right.count
    for field in ("near_zero", "sum", "sum_sq", "sum_abs", "min", "max", "dead"):
        a, b = getattr(left, field), getattr(right, field)
        assert (a is None and b is None) or torch.equal(a, b), field


def _global_batches() -> list[torch.Tensor]:
    """Pre-activation values (negative and positive) of 3 samples, 4 rows each: rank 0 takes row 0, rank 1 the rest."""
    generator = torch.Generator().manual_seed(3)
    batches = [torch.randn(4, 3, 2, generator=generator) for _ in range(3)]
    batches[0][0, 0, 0] = -5.0  # the global minimum of channel 0 is on rank 0 ...
    batches[0][2, 2, 1] = -6.0  # ... that of channel 2 on rank 1
    batches[2][0, 2, 0] = 7.0  # the global maximum of channel 2 on rank 0
    batches[1][:, 1] = batches[2][:, 1] = 0.0  # channel 1 quiet in the last two samples: dead over window 2
    batches[1][:, 2] = 0.0  # channel 2 quiet in sample 1 only
    batches[2][1:, 0] = 0.0  # channel 0 active in sample 2 on rank 0 only (rank 0 sees the first row)
    batches[1][:, 0] = 0.0
    return batches


def _half(batch: torch.Tensor, rank: int) -> torch.Tensor:
    # rank 1 sees three times as many positions as rank 0, so an average of per-rank averages would be wrong
    return batch[:1] if rank == 0 else batch[1:]


def _run_on_two_ranks(worker: Callable[[int, Path], None], out: Path) -> None:
    """Run ``worker(rank, out)`` in two forked processes joined by a gloo group that times out in 20 s."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.start_processes(_in_group, args=(port, worker, out), nprocs=2, start_method="fork")


def _in_group(rank: int, port: int, worker: Callable[[int, Path], None], out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=20))
    try:
        worker(rank, out)
    finally:
        dist.destroy_process_group()


def _sync_halves(rank: int, out: Path) -> None:
    stats = ActivationStats()
    for batch in _global_batches():
        stats.begin_sample()
        stats.update(SITE, channel_stats(_half(batch, rank), 1, 0.0))
    stats.sync()
    torch.save(stats.summarise(window=2)[SITE], out / f"rank{rank}.pt")


def test_sync_across_two_ranks_equals_one_process(tmp_path: Path) -> None:
    _run_on_two_ranks(_sync_halves, tmp_path)
    single = ActivationStats()
    _feed(single, _global_batches())
    expected = single.summarise(window=2)[SITE]
    for rank in range(2):
        reduced = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert reduced.count == expected.count == 2 * 12
        for field in ("near_zero", "sum", "sum_sq", "sum_abs", "min", "max", "dead"):
            np.testing.assert_allclose(getattr(reduced, field).numpy(), getattr(expected, field).numpy(), rtol=1e-6)
        assert reduced.readings(0.1) == pytest.approx(expected.readings(0.1))
    assert expected.dead is not None and expected.dead.tolist() == [False, True, False]
    assert expected.min[0] == -5.0 and expected.min[2] == -6.0 and expected.max[2] == 7.0
    alone = []
    for rank in range(2):
        rank_alone = ActivationStats()
        _feed(rank_alone, [_half(batch, rank) for batch in _global_batches()])
        alone.append(rank_alone.summarise(window=2)[SITE])
    # what sync corrects: each rank alone misses an extreme the other holds, and rank 1 calls channel 0 dead
    assert alone[0].min[2] > -6.0 and alone[1].min[0] > -5.0 and alone[1].max[2] < 7.0
    assert alone[1].dead is not None and alone[1].dead.tolist() == [True, True, False]


def _branch_on_rank0(rank: int, out: Path) -> None:
    _sync_expecting_mismatch(rank, out, {0: [SITE, ("branch", 0)], 1: [SITE]})


def _nothing_on_rank1(rank: int, out: Path) -> None:
    _sync_expecting_mismatch(rank, out, {0: [SITE], 1: []})


def _wider_on_rank1(rank: int, out: Path) -> None:
    _sync_expecting_mismatch(rank, out, {0: [SITE], 1: [SITE]}, channels=3 + rank)


def _sync_expecting_mismatch(rank: int, out: Path, sites: dict[int, list[tuple[str, int]]], channels: int = 3) -> None:
    stats = ActivationStats()
    stats.begin_sample()
    for site in sites[rank]:
        stats.update(site, channel_stats(torch.randn(2, channels), 1, 0.0))
    try:
        stats.sync()
    except LayoutMismatchError as error:
        (out / f"rank{rank}.txt").write_text(str(error))


@pytest.mark.parametrize(
    ("worker", "difference"),
    [
        (_branch_on_rank0, "`branch#0`: rank 0 (4, 3), rank 1 missing"),
        (_nothing_on_rank1, "`relu#0`: rank 0 (4, 3), rank 1 missing"),
        (_wider_on_rank1, "`relu#0`: rank 0 (4, 3), rank 1 (4, 4)"),
    ],
)
def test_sync_raises_the_same_error_on_every_rank_when_the_call_sites_differ(
    tmp_path: Path, worker: Callable[[int, Path], None], difference: str
) -> None:
    started = time.monotonic()
    _run_on_two_ranks(worker, tmp_path)
    assert time.monotonic() - started < 15  # the group times out after 20 s: no collective waited for it
    messages = [(tmp_path / f"rank{rank}.txt").read_text() for rank in range(2)]
    assert messages[0] == messages[1]
    assert messages[0].startswith("ActivationStats.sync: the ranks hold different entries or sizes")
    assert f"Differences: {difference}." in messages[0]


def test_agree_on_layout_checks_its_arguments_and_is_silent_without_a_group() -> None:
    agree_on_layout("test", ["a#0"], [(4, 3)])
    with pytest.raises(ValueError, match="`names` and `sizes` must have the same length, got 1 and 0"):
        agree_on_layout("test", ["a#0"], [])
