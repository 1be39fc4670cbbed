"""Math on recent losses: a robust baseline (median and spread) and how far a loss sits above it.

Losses are host scalars, one per step, and a baseline looks at a window of about a hundred of them: plain Python
floats, which at that size are several times cheaper than tensor operations (this runs on every training step).
"""

import math
import statistics
from collections.abc import Iterable

from torch import Tensor

__all__ = ["MAD_TO_SIGMA", "robust_baseline", "spike_limit", "spike_scores"]

MAD_TO_SIGMA = 1.4826
"""Scales a median absolute deviation to a standard deviation for normally distributed values."""

_UPPER_QUANTILE_CUTS = 20  # the 19th of 20-quantile cut points is the 95th percentile
_UPPER_QUANTILE_TO_SIGMA = 1.6449  # the normal distribution's 95th percentile, in standard deviations

# A window of identical losses has spread 0; the z-score then divides by this fraction of the baseline instead.
_RELATIVE_SCALE_FLOOR = 1e-6
_ABSOLUTE_SCALE_FLOOR = 1e-12


def robust_baseline(losses: Iterable[float] | Tensor) -> tuple[float, float]:
    """Return ``(median, spread)`` of finite ``losses``: their median and a robust standard deviation above it.

    ``spread = max(1.4826 * MAD, (q95 - median) / 1.645)``: the median absolute deviation scaled to a standard
    deviation, or, when the losses have a heavy upper tail (small batches late in training, where a few hard
    batches sit far above a near-zero median), the distance to their 95th percentile scaled likewise. For
    normal noise both agree; the MAD alone would call every hard batch of a skewed run a spike. Both ignore a
    few outliers (up to half for the median and MAD, 5% for the percentile), so a spike left in a window
    barely moves them. Medians and the percentile interpolate linearly as numpy's do; an empty window gives
    zeros. A tensor is read as its flattened values.

    Example:
        >>> center, spread = robust_baseline([1.0, 2.0, 3.0, 4.0, 5.0])
        >>> center, round(spread, 4)
        (3.0, 1.4826)
    """
    values = sorted(losses.detach().flatten().tolist() if isinstance(losses, Tensor) else map(float, losses))
    if not values:
        return 0.0, 0.0
    center = float(statistics.median(values))
    by_mad = MAD_TO_SIGMA * statistics.median(abs(value - center) for value in values)
    upper = values[-1]
    if len(values) > 1:
        upper = statistics.quantiles(values, n=_UPPER_QUANTILE_CUTS, method="inclusive")[-1]
    return center, max(by_mad, (upper - center) / _UPPER_QUANTILE_TO_SIGMA)


def _floored(center: float, spread: float) -> float:
    """The spread, floored so that a flat window does not divide by zero."""
    return max(spread, _RELATIVE_SCALE_FLOOR * abs(center) + _ABSOLUTE_SCALE_FLOOR)


def spike_scores(loss: float, center: float, spread: float) -> tuple[float, float]:
    """Return ``(ratio, z)`` of ``loss`` against a baseline from :func:`robust_baseline`.

    ``ratio = 1 + (loss - median) / |median|``, which is ``loss / median`` for a positive median and stays
    meaningful for negative losses (log-likelihoods); a zero median gives ``inf`` above it and 1 at it.
    ``z = (loss - median) / spread``, the robust z-score. A NaN loss gives NaN scores.

    Example:
        >>> spike_scores(9.0, 3.0, 0.5)
        (3.0, 12.0)
    """
    if math.isnan(loss):
        return math.nan, math.nan
    excess = loss - center
    # A zero median: any excess is infinitely many times it, no excess is the baseline itself.
    unscaled = math.copysign(math.inf, excess) if excess else 1.0
    return (1 + excess / abs(center) if center else unscaled), excess / _floored(center, spread)


def spike_limit(center: float, spread: float, ratio: float, z_score: float) -> float:
    """The loss above which both ``spike_scores(...)`` exceed ``ratio`` and ``z_score``: the limit a spike crosses.

    Example:
        >>> spike_limit(2.0, 0.1, ratio=2.0, z_score=6.0)
        4.0
    """
    return max(center + (ratio - 1) * abs(center), center + z_score * _floored(center, spread))
