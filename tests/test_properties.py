"""Properties of the pure statistics: what holds for any data, not just the planted cases."""

import copy
import itertools
import math
import statistics

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lightning_deadunits.functional.activations import ChannelStats, channel_stats, dormant_channels, moments
from lightning_deadunits.functional.kernels import dead_kernel_masks
from lightning_deadunits.functional.loss import robust_baseline, spike_limit, spike_scores
from lightning_deadunits.functional.warmup import WARMUP_SHAPES, rewarm_factor, warmup_factor
from lightning_deadunits.metrics.activation_stats import ActivationStats
from lightning_deadunits.metrics.spike_baseline import SpikeBaseline
from lightning_deadunits.triggers.loss_spike import SpikeDetector
from lightning_deadunits.triggers.threshold import ThresholdRule

SITE = ("relu", 0)
# Activations with exact zeros (and -0.0) common, as after a ReLU, and values on both sides of small eps.
VALUES = st.one_of(st.sampled_from([0.0, -0.0, 1e-7, -1e-7]), st.floats(-8, 8, width=32))


def activations(min_batch: int = 1) -> st.SearchStrategy[np.ndarray]:
    shapes = st.tuples(st.integers(min_batch, 6), st.integers(1, 4), st.integers(1, 3))
    return shapes.flatmap(lambda shape: hnp.arrays(np.float32, shape, elements=VALUES))


def cuts(size: int) -> st.SearchStrategy[list[int]]:
    """Sorted cut points splitting `size` rows into non-empty parts."""
    return st.sets(st.integers(1, size - 1), max_size=size - 1).map(sorted) if size > 1 else st.just([])


def parts_of(array: np.ndarray, points: list[int]) -> list[torch.Tensor]:
    return [torch.from_numpy(part) for part in np.split(array, points)]


def merge(parts: list[ChannelStats]) -> dict[str, torch.Tensor | int]:
    """How a reduction (across micro-batches or ranks) combines statistics: sums add, extremes take min/max."""
    assert all(part.near_zero is not None for part in parts)
    return {
        "count": sum(part.count for part in parts),
        "near_zero": sum(part.near_zero for part in parts),  # type: ignore[misc]
        "sum": torch.stack([part.sum.double() for part in parts]).sum(0),
        "sum_sq": torch.stack([part.sum_sq.double() for part in parts]).sum(0),
        "sum_abs": torch.stack([part.sum_abs.double() for part in parts]).sum(0),
        "min": torch.stack([part.min for part in parts]).amin(0),
        "max": torch.stack([part.max for part in parts]).amax(0),
    }


@settings(max_examples=60, deadline=None)
@given(data=st.data(), eps=st.sampled_from([0.0, 1e-6, 0.5]), channel_dim=st.sampled_from([1, -1]))
def test_channel_stats_of_batch_parts_merge_to_those_of_the_whole(
    data: st.DataObject, eps: float, channel_dim: int
) -> None:
    array = data.draw(activations(min_batch=2))
    whole = channel_stats(torch.from_numpy(array), channel_dim, eps)
    merged = merge([channel_stats(part, channel_dim, eps) for part in parts_of(array, data.draw(cuts(len(array))))])
    assert merged["count"] == whole.count
    assert torch.equal(merged["near_zero"], whole.near_zero)  # type: ignore[arg-type]
    assert torch.equal(merged["min"], whole.min) and torch.equal(merged["max"], whole.max)
    for field in ("sum", "sum_sq", "sum_abs"):
        np.testing.assert_allclose(merged[field], getattr(whole, field).double(), rtol=1e-5, atol=1e-4)
    mean, std = moments(merged["sum"].sum(), merged["sum_sq"].sum(), merged["count"] * whole.sum.numel())  # type: ignore[arg-type]
    assert float(mean) == pytest.approx(float(array.astype(np.float64).mean()), rel=1e-5, abs=1e-5)
    # std from float32 sums of squares cancels: it is good to about sqrt(float32 eps) times the largest |x|
    scale = 1e-3 * (1 + float(np.abs(array).max()))
    assert float(std) == pytest.approx(float(array.astype(np.float64).std()), rel=1e-3, abs=scale)


@settings(max_examples=40, deadline=None)
@given(
    data=st.data(),
    samples=st.integers(1, 4),
    window=st.integers(1, 4),
    reset_after=st.integers(0, 4),
)
def test_activation_stats_fed_in_parts_equal_the_whole(
    data: st.DataObject, samples: int, window: int, reset_after: int
) -> None:
    channels = data.draw(st.integers(1, 4))
    whole, split = ActivationStats(), ActivationStats()
    for index in range(samples):
        rows = data.draw(st.integers(2, 6))
        array = data.draw(hnp.arrays(np.float32, (rows, channels, 2), elements=VALUES))
        whole.begin_sample()
        whole.update(SITE, channel_stats(torch.from_numpy(array)))
        split.begin_sample()  # one sample, several micro-batches (gradient accumulation, or ranks before sync)
        for part in parts_of(array, data.draw(cuts(rows))):
            split.update(SITE, channel_stats(part))
        if index + 1 == reset_after:
            whole.reset_period()
            split.reset_period()
    assume(whole.summarise(window))  # a period reset by the last sample holds nothing to compare
    expected, got = whole.summarise(window)[SITE], split.summarise(window)[SITE]
    assert got.count == expected.count
    for field in ("near_zero", "min", "max", "dead"):
        assert torch.equal(getattr(got, field), getattr(expected, field)), field
    for field in ("sum", "sum_sq", "sum_abs"):
        np.testing.assert_allclose(getattr(got, field), getattr(expected, field), rtol=1e-5, atol=1e-4)
    assert torch.equal(split.dead_masks(window)[SITE], whole.dead_masks(window)[SITE])


@settings(max_examples=60, deadline=None)
@given(
    l1=hnp.arrays(np.float32, st.integers(1, 12), elements=st.one_of(st.just(0.0), st.just(1e-40), st.floats(0, 5))),
    abs_thresholds=st.tuples(st.floats(0, 2), st.floats(0, 2)).map(sorted),
    rel_thresholds=st.tuples(st.floats(0, 1), st.floats(0, 1)).map(sorted),
)
def test_dead_kernel_masks_only_grow_with_either_threshold(
    l1: np.ndarray, abs_thresholds: list[float], rel_thresholds: list[float]
) -> None:
    norms = torch.from_numpy(l1)
    low_abs, low_rel, median = dead_kernel_masks(norms, abs_thresholds[0], rel_thresholds[0])
    high_abs, high_rel, same_median = dead_kernel_masks(norms, abs_thresholds[1], rel_thresholds[1])
    assert torch.equal(median, same_median)
    assert not (low_abs & ~high_abs).any() and not (low_rel & ~high_rel).any()
    # a permutation of the filters permutes the verdicts
    order = torch.randperm(len(norms))
    permuted_abs, permuted_rel, _ = dead_kernel_masks(norms[order], abs_thresholds[0], rel_thresholds[0])
    assert torch.equal(permuted_abs, low_abs[order]) and torch.equal(permuted_rel, low_rel[order])
    if abs_thresholds[0] == 0 and rel_thresholds[0] == 0:
        assert not (low_abs | low_rel).any()


@settings(max_examples=60, deadline=None)
@given(
    mean_abs=hnp.arrays(np.float32, st.integers(1, 10), elements=st.floats(0, 10, width=32)),
    taus=st.tuples(st.floats(0, 1), st.floats(0, 1)).map(sorted),
    array=activations(),
    eps=st.tuples(st.floats(0, 2), st.floats(0, 2)).map(sorted),
)
def test_dormant_and_near_zero_counts_only_grow_with_their_tolerances(
    mean_abs: np.ndarray, taus: list[float], array: np.ndarray, eps: list[float]
) -> None:
    scores = torch.from_numpy(mean_abs)
    assert not (dormant_channels(scores, taus[0]) & ~dormant_channels(scores, taus[1])).any()
    low, high = (channel_stats(torch.from_numpy(array), 1, e).near_zero for e in eps)
    assert low is not None and high is not None and bool((low <= high).all())


LOSSES = st.lists(st.floats(0.125, 50, width=32), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None)
@given(losses=LOSSES, shift=st.floats(-20, 20, width=32), scale=st.floats(0.125, 8, width=32))
def test_robust_baseline_ignores_order_and_follows_shifts_and_scales(
    losses: list[float], shift: float, scale: float
) -> None:
    values = torch.tensor(losses, dtype=torch.float64)
    center, spread = robust_baseline(values)
    assert float(spread) >= 0
    permuted = robust_baseline(values[torch.randperm(len(values))])
    assert float(permuted[0]) == float(center) and float(permuted[1]) == float(spread)
    tolerance = 1e-4 * (1 + float(values.abs().max()) * max(1.0, scale))
    shifted = robust_baseline(values + shift)
    assert float(shifted[0]) == pytest.approx(float(center) + shift, abs=tolerance)
    assert float(shifted[1]) == pytest.approx(float(spread), abs=tolerance)
    scaled = robust_baseline(values * scale)
    assert float(scaled[0]) == pytest.approx(float(center) * scale, abs=tolerance)
    assert float(scaled[1]) == pytest.approx(float(spread) * scale, abs=tolerance)


@settings(max_examples=60, deadline=None)
@given(losses=st.lists(st.floats(0.125, 50, width=32), min_size=3, max_size=30), data=st.data())
def test_robust_baseline_median_stays_inside_the_data_under_a_minority_of_outliers(
    losses: list[float], data: st.DataObject
) -> None:
    outliers = data.draw(st.lists(st.floats(1e3, 1e6), max_size=len(losses) - 2))
    center, _ = robust_baseline(torch.tensor(losses + outliers))
    assert min(losses) <= float(center) <= max(losses)


def _warm_detector(losses: list[float], ratio: float, z_score: float) -> SpikeDetector:
    detector = SpikeDetector(window=len(losses), warmup=len(losses), ratio=ratio, z_score=z_score)
    for step, loss in enumerate(losses):
        detector.update(loss, step)
    return detector


@settings(max_examples=100, deadline=None)
@given(
    values=st.lists(st.one_of(st.floats(-10, 10), st.sampled_from([0.0, 1.0, 2.0])), min_size=1, max_size=40),
    evicted=st.integers(0, 30),
)
def test_sorted_window_baseline_equals_the_median_and_mad_of_its_values(values: list[float], evicted: int) -> None:
    """The per-step baseline (a sorted window, the MAD by binary search) is exactly ``robust_baseline``'s."""
    baseline = SpikeBaseline(window=20, warmup=1, ratio=2.0, z_score=6.0, min_excess=0.0, provisional=1)
    baseline.screened = True  # judged against the median, not a trend
    for step, value in enumerate(values + values[:evicted]):  # past 20 values the oldest leave the window
        baseline.accept(step, value)
    assert baseline.ordered == sorted(baseline.values())
    assert baseline.center(step=len(values)) == robust_baseline(baseline.values())


def _from_scratch(baseline: SpikeBaseline, step: int) -> tuple[float, float]:
    """The center and spread at ``step`` as first written: the level and Tukey's line recomputed from the window."""
    steps, values = [s for s, _ in baseline.window], [v for _, v in baseline.window]
    center, spread = robust_baseline(values)
    if not baseline.screened and len(values) >= 6:
        third = len(values) // 3
        run = statistics.median(steps[-third:]) - statistics.median(steps[:third])
        rise = statistics.median(values[-third:]) - statistics.median(values[:third])
        if run > 0 and rise < 0:
            slope = rise / run
            intercept, line_spread = robust_baseline([v - slope * s for s, v in zip(steps, values, strict=True)])
            if -slope * (steps[-1] - steps[0]) > 3.0 * line_spread:
                return intercept + slope * step, line_spread
    return center + 0.0 * step, spread


@settings(max_examples=150, deadline=None)
@given(
    noise=st.lists(st.one_of(st.floats(-1, 1), st.just(0.0), st.floats(2, 40)), min_size=1, max_size=45),
    gaps=st.lists(st.sampled_from([1, 1, 1, 2, 0, -5]), min_size=45, max_size=45),
    shape=st.tuples(st.sampled_from([0.0, 0.01, 0.2]), st.sampled_from([0.0, 0.05, 1.0])),
    sizes=st.tuples(st.integers(2, 30), st.integers(1, 30), st.integers(1, 10)),
    probe=st.floats(0.0, 60.0),
    replace=st.tuples(st.integers(0, 60), st.booleans()),
)
def test_incremental_baseline_fits_judges_and_screens_as_from_scratch(
    noise: list[float],
    gaps: list[int],
    shape: tuple[float, float],
    sizes: tuple[int, int, int],
    probe: float,
    replace: tuple[int, bool],
) -> None:
    """The per-step baseline (columns kept by ``accept``, the oldest third's median kept, steps' medians by lookup,
    screened above a bound) decides and reports exactly what the from-scratch rule does."""
    fall, scatter = shape
    window = sizes[0]
    warmup = min(sizes[1], window)
    baseline = SpikeBaseline(window, warmup, 1.5, 6.0, 0.25, provisional=min(sizes[2], warmup))
    step = 0
    for index, (jitter, gap) in enumerate(zip(noise, gaps, strict=False)):
        step += gap  # steps may repeat or go back (old checkpoints, odd loops): medians of thirds sort them then
        value = 10.0 - fall * step + (jitter if jitter >= 2 else scatter * jitter)  # lines, noise, outliers
        if index == replace[0]:  # a rebaseline: the columns are built again (a full window: the next one evicts)
            line = [(earlier, 13.0 - fall * earlier) for earlier in range(step - window, step)]  # another line
            baseline.replace(line if replace[1] else list(baseline.window)[::2])
        judgement = baseline.judge(probe, step)
        if baseline.window:
            center, spread = _from_scratch(baseline, step)
            assert (judgement.baseline, judgement.spread) == (center, spread) == baseline.center(step)
            assert (judgement.ratio, judgement.score) == spike_scores(probe, center, spread)
            reference = center if baseline.reference is None else baseline.reference
            limit = spike_limit(center, spread, 1.5, 6.0, 0.25 * abs(reference))
            assert judgement.limit == limit or (baseline.started_trained and judgement.limit >= limit)
        before = copy.deepcopy(baseline)
        outliers = baseline.accept(step, value)
        if baseline.screened and not before.screened:  # screened now: every value judged in full, as at first
            before.warmup = 10**9
            before.accept(step, value)
            assert before.center(step) == _from_scratch(before, step)  # the fit the screening judged against
            judged = [(item, before.judge(item[1], item[0])) for item in before.window]
            expected = [(s, v, math.inf if j.score is None else j.score) for (s, v), j in judged if j.flagged]
            assert outliers == expected
            assert list(baseline.window) == [item for item, j in judged if not j.flagged]


def test_baseline_fit_after_a_replacement_and_an_eviction_in_warm_up_is_from_scratch() -> None:
    """The columns the warm-up line is fitted to follow a rebaseline, a full window's eviction and a step back."""
    baseline = SpikeBaseline(window=12, warmup=12, ratio=1.5, z_score=6.0, min_excess=0.25, provisional=5)
    for step in range(10):
        baseline.accept(step, 10 - 0.2 * step)
    assert baseline.center(10) == _from_scratch(baseline, 10) == (8.0, 0.0)  # on the line
    baseline.replace([(step, 13 - 0.3 * step + 0.01 * (step % 3)) for step in range(10, 22)])  # a new, full window
    assert baseline.center(22) == _from_scratch(baseline, 22)
    baseline.warmup = 100  # not screened at the next value: the window evicts its oldest instead
    baseline.accept(22, 13 - 0.3 * 22)
    assert len(baseline.window) == 12 and baseline.center(23) == _from_scratch(baseline, 23)
    back = SpikeBaseline(window=30, warmup=30, ratio=1.5, z_score=6.0, min_excess=0.25, provisional=5)
    for step in [*range(15), 10]:  # a step back after the columns were made: the newest third's steps unsorted
        back.judge(0.0, step)
        back.accept(step, 10 - 0.2 * step)
    assert back.center(30) == _from_scratch(back, 30) == (4.0, 0.0)


@settings(max_examples=60, deadline=None)
@given(
    losses=st.lists(st.floats(0.5, 5, width=32), min_size=3, max_size=20),
    loss=st.floats(0, 200, width=32),
    excess=st.floats(0, 100, width=32),
    ratios=st.tuples(st.floats(1.01, 5), st.floats(1.01, 5)).map(sorted),
    z_scores=st.tuples(st.floats(0.1, 20), st.floats(0.1, 20)).map(sorted),
)
def test_spike_verdicts_are_monotone_in_the_loss_and_in_both_thresholds(
    losses: list[float], loss: float, excess: float, ratios: list[float], z_scores: list[float]
) -> None:
    strict = _warm_detector(losses, ratios[1], z_scores[1])
    lenient = copy.deepcopy(strict)  # the same window, judged with lower thresholds
    for baseline in (lenient.loss_baseline, lenient.grad_baseline):
        baseline.ratio, baseline.z_score = ratios[0], z_scores[0]
    flagged = copy.deepcopy(strict).update(loss, len(losses)).flagged
    assert not flagged or copy.deepcopy(strict).update(loss + excess, len(losses)).flagged
    assert not flagged or lenient.update(loss, len(losses)).flagged
    center, spread = robust_baseline(losses)
    (low_ratio, low_z), (high_ratio, high_z) = (spike_scores(value, center, spread) for value in (loss, loss + excess))
    assert low_ratio <= high_ratio and low_z <= high_z


@settings(max_examples=60, deadline=None)
@given(
    value=st.floats(-100, 100),
    more=st.floats(0, 100),
    limits=st.tuples(st.floats(-100, 100), st.floats(-100, 100)).map(sorted),
)
def test_threshold_rules_fire_monotonically_in_the_value_and_the_limit(
    value: float, more: float, limits: list[float]
) -> None:
    def fires(rule: ThresholdRule, reading: float) -> bool:
        return bool(rule.evaluate({"deadunits/x": reading}, 0, "test"))

    low, high = limits
    if fires(ThresholdRule("deadunits/x", above=high), value):
        assert fires(ThresholdRule("deadunits/x", above=high), value + more)
        assert fires(ThresholdRule("deadunits/x", above=low), value)
    if fires(ThresholdRule("deadunits/x", below=low), value):
        assert fires(ThresholdRule("deadunits/x", below=low), value - more)
        assert fires(ThresholdRule("deadunits/x", below=high), value)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.sampled_from(WARMUP_SHAPES),
    steps=st.integers(1, 50),
    start=st.integers(0, 30),
    floor=st.floats(0, 1),
)
def test_warmup_factors_rise_from_their_start_to_one(shape: str, steps: int, start: int, floor: float) -> None:
    warmup = [warmup_factor(step, steps, shape) for step in range(steps + 3)]  # type: ignore[arg-type]
    assert all(0 <= a <= b <= 1 for a, b in itertools.pairwise(warmup)) and warmup[-1] == 1.0
    rewarm = [rewarm_factor(step, start, floor, steps, shape) for step in range(start, start + steps + 2)]  # type: ignore[arg-type]
    assert rewarm[0] == pytest.approx(floor) and rewarm[-1] == 1.0
    assert all(floor - 1e-12 <= a <= b + 1e-12 <= 1 + 1e-12 for a, b in itertools.pairwise(rewarm))
