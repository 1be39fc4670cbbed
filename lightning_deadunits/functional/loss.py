"""Math on recent losses: a robust baseline (median and spread) and how far a loss sits above it.

Losses (and gradient norms) are host scalars, one per step, and a baseline looks at a window of about a hundred of
them: plain Python
floats, which at that size are several times cheaper than tensor operations (this runs on every training step).
"""

import math
import statistics
from collections.abc import Iterable

from torch import Tensor

__all__ = ["MAD_TO_SIGMA", "robust_baseline", "spike_limit", "spike_scores"]

MAD_TO_SIGMA = 1.4826
"""Scales a median absolute deviation to a standard deviation for normally distributed values."""

# A window of identical losses has spread 0; the z-score then divides by this fraction of the baseline instead.
_RELATIVE_SCALE_FLOOR = 1e-6
_ABSOLUTE_SCALE_FLOOR = 1e-12


def robust_baseline(losses: Iterable[float] | Tensor) -> tuple[float, float]:
    """Return ``(median, spread)`` of finite ``losses``: their median and ``1.4826 x`` their median absolute deviation.

    Both have a 50% breakdown point: up to half of the window may be outliers (spikes of a contaminated warm-up)
    without moving them far, so a loss at the outliers' level still scores a large z. A heavy upper tail of benign
    hard batches (late in training) is *not* widened into the spread here: the detector's scale floor
    (:func:`spike_limit`'s ``min_excess``) tells those apart from spikes. Medians interpolate linearly as numpy's
    do; an empty window gives zeros. A tensor is read as its flattened values.

    Example:
        >>> center, spread = robust_baseline([1.0, 2.0, 3.0, 4.0, 5.0])
        >>> center, round(spread, 4)
        (3.0, 1.4826)
    """
    values = losses.detach().flatten().tolist() if isinstance(losses, Tensor) else list(map(float, losses))
    if not values:
        return 0.0, 0.0
    center = float(statistics.median(values))
    return center, MAD_TO_SIGMA * statistics.median(abs(value - center) for value in values)


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


def spike_limit(center: float, spread: float, ratio: float, z_score: float, min_excess: float = 0.0) -> float:
    """The loss above which ``spike_scores`` exceed ``ratio`` and ``z_score`` and the excess exceeds ``min_excess``.

    ``min_excess`` is the scale floor, an absolute excess over the median; the result is the limit a spike crosses.

    Example:
        >>> spike_limit(2.0, 0.1, ratio=2.0, z_score=6.0)
        4.0
        >>> spike_limit(0.01, 0.001, ratio=2.0, z_score=6.0, min_excess=0.5)
        0.51
    """
    return max(center + (ratio - 1) * abs(center), center + z_score * _floored(center, spread), center + min_excess)
