"""Pure tensor math on recent losses: a robust baseline (median and spread) and how far a loss sits above it."""

import torch
from torch import Tensor

from lightning_deadunits.functional.kernels import median, sorted_quantile

__all__ = ["MAD_TO_SIGMA", "robust_baseline", "spike_limit", "spike_scores"]

MAD_TO_SIGMA = 1.4826
"""Scales a median absolute deviation to a standard deviation for normally distributed values."""

_UPPER_QUANTILE = 0.95
_UPPER_QUANTILE_TO_SIGMA = 1.6449  # the normal distribution's 95th percentile, in standard deviations

# A window of identical losses has spread 0; the z-score then divides by this fraction of the baseline instead.
_RELATIVE_SCALE_FLOOR = 1e-6
_ABSOLUTE_SCALE_FLOOR = 1e-12


def robust_baseline(losses: Tensor) -> tuple[Tensor, Tensor]:
    """Return ``(median, spread)`` of ``losses``: their median and a robust standard deviation above it.

    ``spread = max(1.4826 * MAD, (q95 - median) / 1.645)``: the median absolute deviation scaled to a standard
    deviation, or, when the losses have a heavy upper tail (small batches late in training, where a few hard
    batches sit far above a near-zero median), the distance to their 95th percentile scaled likewise. For
    normal noise both agree; the MAD alone would call every hard batch of a skewed run a spike. Both ignore a
    few outliers (up to half for the median and MAD, 5% for the percentile), so a spike left in a window
    barely moves them. Medians follow numpy (mean of the two middle values); an empty window gives zeros.

    Example:
        >>> center, spread = robust_baseline(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
        >>> float(center), round(float(spread), 4)
        (3.0, 1.4826)
    """
    if losses.numel() == 0:
        zero = losses.new_zeros((), dtype=torch.float32)
        return zero, zero
    values = losses.float().flatten()
    ordered = values.sort().values
    center = sorted_quantile(ordered, 0.5)
    by_mad = MAD_TO_SIGMA * median((values - center).abs())
    by_tail = (sorted_quantile(ordered, _UPPER_QUANTILE) - center) / _UPPER_QUANTILE_TO_SIGMA
    return center, torch.maximum(by_mad, by_tail)


def _floored(center: Tensor, spread: Tensor) -> Tensor:
    """The spread, floored so that a flat window does not divide by zero."""
    return torch.maximum(spread, _RELATIVE_SCALE_FLOOR * center.abs() + _ABSOLUTE_SCALE_FLOOR)


def spike_scores(loss: Tensor, center: Tensor, spread: Tensor) -> tuple[Tensor, Tensor]:
    """Return ``(ratio, z)`` of ``loss`` (any shape) against a baseline from :func:`robust_baseline`.

    ``ratio = 1 + (loss - median) / |median|``, which is ``loss / median`` for a positive median and stays
    meaningful for negative losses (log-likelihoods); a zero median gives ``inf`` above it and 1 at it.
    ``z = (loss - median) / spread``, the robust z-score. A NaN loss gives NaN scores.

    Example:
        >>> ratio, z = spike_scores(torch.tensor(9.0), torch.tensor(3.0), torch.tensor(0.5))
        >>> float(ratio), float(z)
        (3.0, 12.0)
    """
    excess = loss.float() - center
    ratio = torch.nan_to_num(1 + excess / center.abs(), nan=1.0, posinf=float("inf"), neginf=float("-inf"))
    ratio = torch.where(torch.isnan(loss), loss.float(), ratio)
    return ratio, excess / _floored(center, spread)


def spike_limit(center: Tensor, spread: Tensor, ratio: float, z_score: float) -> Tensor:
    """The loss above which both ``spike_scores(...)`` exceed ``ratio`` and ``z_score``: the limit a spike crosses.

    Example:
        >>> float(spike_limit(torch.tensor(2.0), torch.tensor(0.1), ratio=2.0, z_score=6.0))
        4.0
    """
    by_ratio = center + (ratio - 1) * center.abs()
    by_z = center + z_score * _floored(center, spread)
    return torch.maximum(by_ratio, by_z)
