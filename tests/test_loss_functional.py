import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_deadunits.functional.loss import MAD_TO_SIGMA, robust_baseline, spike_limit, spike_scores


def test_robust_baseline_is_median_and_scaled_mad_for_symmetric_losses() -> None:
    losses = torch.arange(1.0, 22.0)  # 1..21: median 11, MAD 5; q95 = 20 and (20 - 11) / 1.645 < 1.4826 * 5
    center, spread = robust_baseline(losses)
    assert center == 11.0
    assert spread == pytest.approx(MAD_TO_SIGMA * 5.0)
    assert robust_baseline(losses.tolist()[::-1]) == (center, spread)  # any order, a list as well as a tensor


def test_robust_baseline_ignores_an_outlier() -> None:
    losses = torch.cat([torch.arange(1.0, 22.0), torch.tensor([1000.0])])
    center, spread = robust_baseline(losses)
    assert float(center) == 11.5 and float(spread) == pytest.approx(MAD_TO_SIGMA * 5.5)


def test_robust_baseline_does_not_widen_for_a_heavy_upper_tail_the_scale_floor_judges_it() -> None:
    # 90 batches near 0.05 and 10 hard ones at 0.5: the spread stays the MAD's; only the scale floor spares the tail
    losses = torch.tensor([0.05 + 0.001 * (i % 3) for i in range(90)] + [0.5] * 10)
    center, spread = robust_baseline(losses)
    assert float(center) == pytest.approx(0.051)
    assert float(spread) == pytest.approx(MAD_TO_SIGMA * 0.001, rel=1e-4)
    assert spike_limit(center, spread, ratio=2.0, z_score=8.0) == pytest.approx(0.102)
    assert spike_limit(center, spread, ratio=2.0, z_score=8.0, min_excess=0.575) == pytest.approx(0.626)


def test_robust_baseline_of_an_empty_window_is_zero() -> None:
    assert robust_baseline(torch.tensor([])) == (0.0, 0.0)
    assert robust_baseline([]) == (0.0, 0.0)
    assert robust_baseline([2.5]) == (2.5, 0.0)


def test_spike_scores_give_ratio_and_robust_z() -> None:
    assert spike_scores(9.0, 3.0, 0.5) == (3.0, 12.0)
    assert spike_scores(3.0, 3.0, 0.5) == (1.0, 0.0)


def test_spike_ratio_stays_meaningful_for_negative_and_zero_baselines() -> None:
    ratio, _ = spike_scores(-5.0, -10.0, 1.0)
    assert ratio == 1.5  # half of |baseline| above it
    assert [spike_scores(loss, 0.0, 0.0)[0] for loss in (0.0, 0.1, -0.1)] == [1.0, math.inf, -math.inf]
    assert spike_scores(math.inf, 2.0, 0.1) == (math.inf, math.inf)


def test_spike_scores_of_a_flat_window_use_a_floor_not_a_division_by_zero() -> None:
    assert spike_scores(2.0, 2.0, 0.0)[1] == 0.0
    _, z = spike_scores(2.1, 2.0, 0.0)
    assert math.isfinite(z) and z > 1e3


def test_spike_scores_of_nan_are_nan() -> None:
    ratio, z = spike_scores(math.nan, 1.0, 0.1)
    assert math.isnan(ratio) and math.isnan(z)


@settings(max_examples=200, deadline=None)
@given(
    loss=st.floats(-100, 100, width=32),
    center=st.floats(-50, 50, width=32),
    spread=st.floats(0, 10, width=32),
    ratio=st.floats(1.01, 10),
    z_score=st.floats(0.1, 20),
)
def test_spike_limit_is_where_both_thresholds_are_crossed(
    loss: float, center: float, spread: float, ratio: float, z_score: float
) -> None:
    limit = spike_limit(center, spread, ratio, z_score)
    scores = spike_scores(loss, center, spread)
    both = scores[0] > ratio and scores[1] > z_score
    if abs(loss - limit) > 1e-3 * max(1.0, abs(limit)):  # away from the boundary, where rounding decides
        assert both == (loss > limit)


def _contaminated(fraction: float) -> tuple[list[float], float]:
    """100 losses: calm ones within 1 +- 0.05, and ``fraction`` of them replaced by 10.0; also the calm spread."""
    outliers = round(100 * fraction)
    calm = [1 + 0.01 * ((i * 7) % 11 - 5) for i in range(100 - outliers)]
    return calm + [10.0] * outliers, robust_baseline(calm)[1]


@pytest.mark.parametrize("fraction", [0.04, 0.10, 0.20, 0.30])
def test_robust_baseline_median_holds_with_up_to_30_percent_outliers(fraction: float) -> None:
    losses, _ = _contaminated(fraction)
    center, _ = robust_baseline(losses)
    assert center == pytest.approx({0.04: 1.0, 0.10: 1.01, 0.20: 1.01, 0.30: 1.02}[fraction])


@pytest.mark.parametrize("fraction", [0.04, 0.10, 0.20, 0.30])
def test_robust_baseline_spread_ignores_outliers_so_their_level_is_still_a_spike(fraction: float) -> None:
    losses, calm_spread = _contaminated(fraction)
    center, spread = robust_baseline(losses)
    assert spread <= 2 * calm_spread
    _, z = spike_scores(10.0, center, spread)
    assert z > 8.0  # the default `z_score` of SpikeDetector
