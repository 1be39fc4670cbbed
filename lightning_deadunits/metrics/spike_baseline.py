"""One signal's spike baseline: a window of accepted values, the signal's young level, and the spike rule.

The loss and the global gradient norm are each judged by one :class:`SpikeBaseline`; pure Python state, so it
serialises and resumes exactly. This runs on every training step, so the window is also kept sorted: the median
is one lookup and the median absolute deviation a binary search (see :func:`_median_deviation`).
"""

import math
import operator
from bisect import bisect_left, insort
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from lightning_deadunits.functional.loss import MAD_TO_SIGMA, spike_limit, spike_scores

__all__ = ["SpikeBaseline"]

# The first values of a young model lie within a few tens of percent of each other (measured: at most 2.4x apart,
# CNN and character LM, losses and gradient norms); a trained model's span one to two decades (21-99x measured;
# 10 draws of a log-normal with log spread 1 span less than 4x 0.6% of the time).
_TRAINED_SPAN = 4.0
# Fewer first values than this cannot tell: two draws of a young, noisy tiny-batch loss often span 4x.
_START_EVIDENCE = 10
# A signal whose center fell this many times below its young level has a known scale: the young level.
_FALLEN = 10.0
# In log space values below this count as this: a trained model's loss can be exactly 0 in float32.
_LOG_FLOOR = 1e-30
# exp() overflows above this
_LOG_MAX = 709.0
# the fewest accepted values the trend is fitted to (two per third)
_TREND_MIN = 6
# the baseline follows a trend whose fall across the window exceeds this many residual spreads
_TREND_FALL = 3.0


def _log(value: float) -> float:
    return math.log(max(value, _LOG_FLOOR))


class Judgement(NamedTuple):
    """How one value compares with the baseline (every number ``None`` while the baseline cannot judge yet).

    A named tuple: one is made per signal on every step, and a tuple is made several times faster than a frozen
    dataclass.
    """

    baseline: float | None = None
    spread: float | None = None
    ratio: float | None = None
    score: float | None = None
    limit: float | None = None
    flagged: bool = False


def _median(ordered: Sequence[float]) -> float:
    """The median of sorted values, as :func:`statistics.median` computes it."""
    half = len(ordered) // 2
    return ordered[half] if len(ordered) % 2 else (ordered[half - 1] + ordered[half]) / 2


def _median_deviation(ordered: Sequence[float], center: float) -> float:
    """The median of ``|value - center|`` over sorted values, as :func:`statistics.median` gives it, unsorted.

    The distances of the values below ``center`` (read downwards) and of those at or above it (read upwards) are
    two sorted sequences; the middle of their union is found by a binary search over how many of the smallest
    distances come from the first (O(log n) instead of sorting n distances on every step).
    """
    count = len(ordered)
    split = bisect_left(ordered, center)
    below, above = split, count - split
    k = (count - 1) // 2  # the (lower) middle, 0-based
    low, high = max(0, k + 1 - above), min(k + 1, below)
    while low < high:  # smallest i such that the k + 1 smallest distances are i from below, k + 1 - i from above
        i = (low + high) // 2
        if ordered[split + k - i] - center < center - ordered[split - 1 - i]:
            high = i
        else:
            low = i + 1
    i, j = low, k + 1 - low
    middle = max(center - ordered[split - i] if i else -math.inf, ordered[split + j - 1] - center if j else -math.inf)
    if count % 2:
        return middle
    after = min(
        center - ordered[split - 1 - i] if i < below else math.inf,
        ordered[split + j] - center if j < above else math.inf,
    )
    return (middle + after) / 2


class SpikeBaseline:
    r"""Judges one signal's values against a robust baseline of its recent accepted values.

    A finite value :math:`x` at step :math:`t` is *flagged* when all of these hold against the center :math:`c`
    and robust spread :math:`s` of the last ``window`` accepted values:

    .. math:: x > c\,\mathrm{ratio}, \quad (x - c) / s > z, \quad x - c > \mathrm{min\_excess} \cdot |r|

    where :math:`r`, the *reference*, is the median of the first ``provisional`` accepted values (the signal's
    level while training was young). The third condition is the scale floor: late in training a near-zero median
    makes an ordinary hard batch many times the median and many spreads above it, yet its excess is tiny next to
    the loss's own scale.

    **The baseline.** Once warm-up is over, :math:`c` is the median and :math:`s = 1.4826\,\mathrm{MAD}`. During
    warm-up a young run's loss falls fast: a median lags behind it and the fall widens the MAD (the LM of the
    benchmark falls from 4.9 to 3.2 in 15 steps; the median of those, 3.8, put the limit above a corrupted batch's
    5.4). So from 6 accepted values on, the baseline follows the trend: Tukey's resistant line (the slope joins the
    medians of the oldest and the newest third of the window, a rising slope counts as 0 since a slow rise is what
    a blow-up looks like; the intercept is the median residual) gives :math:`c` at step :math:`t`, and :math:`s` is
    1.4826x the median absolute residual. The line is used only when its fall across the window exceeds 3 residual
    spreads; a flat noisy window keeps its median.

    **A signal that starts trained.** Its first ``provisional`` values (at least 10: fewer cannot tell, and the
    test is not taken) span more than 4x (a young model's lie
    within a few tens of percent of each other, at most 2.4x apart in the benchmark; a trained model's are a
    near-zero median with hard batches 20-100x it: fine-tuning, or resuming without the detector's state). Then
    :math:`r` is that near-zero level and the floor no floor, so until the signal's median falls a decade below
    :math:`r`, a flagged value must also lie ``z_score`` robust spreads above the median :math:`\ell` of the
    window's log values (a scale-free size for a heavy-tailed signal):

    .. math:: \ln x > \ell + z \cdot 1.4826\, \mathrm{median}_i |\ln x_i - \ell|.

    A trained CNN's ordinary hard batches measured up to 5.3 such spreads above the median, corrupted batches 6.7
    or more. If warm-up screening removes spikes from the first values, the test is taken again without them.

    Judging starts after ``provisional`` accepted values (a provisional baseline), so spikes early in warm-up are
    kept out of the window. When the window first holds ``warmup`` values it is *screened*: values that its own
    baseline flags (they came before judging started) are removed and returned, so they are reported late.

    Args:
        window: accepted values in the baseline (>= 2).
        warmup: accepted values after which the window is screened (1 ... ``window``).
        ratio: a spike exceeds this multiple of the median (> 1).
        z_score: ... and this many robust spreads above it (> 0).
        min_excess: ... and exceeds the median by this fraction of the reference (>= 0).
        provisional: accepted values before judging starts, whose median is the reference (1 ... ``warmup``).

    Example:
        >>> baseline = SpikeBaseline(window=20, warmup=5, ratio=2.0, z_score=8.0, min_excess=0.25, provisional=3)
        >>> screened_out = [baseline.accept(step, 1.0 + 0.01 * (step % 3)) for step in range(10)]
        >>> baseline.judge(5.0, step=10).flagged, baseline.judge(1.02, step=10).flagged
        (True, False)
    """

    def __init__(
        self, window: int, warmup: int, ratio: float, z_score: float, min_excess: float, provisional: int
    ) -> None:
        self.ratio = ratio
        self.z_score = z_score
        self.min_excess = min_excess
        self.warmup = warmup
        self.provisional = provisional
        self.window: deque[tuple[int, float]] = deque(maxlen=window)
        self.ordered: list[float] = []
        self._fit: tuple[float, float, float] | None = None  # (slope, intercept, spread) of this window, once made
        # The window's steps and values as two lists while the trend is fitted (warm-up), kept up to date by
        # `accept` rather than unpacked from the window at every fit; `None` until needed and after a replacement.
        self._columns: tuple[list[int], list[float]] | None = None
        self._steps_ascending = True  # the window's steps never decrease (as training writes them)
        self._first_third = (0, 0.0)  # (size, median) of the oldest third of the columns' values
        self.reference: float | None = None
        self.started_trained = False
        self.screened = False

    @property
    def warming_up(self) -> bool:
        """Whether the window has not been screened yet (fewer than ``warmup`` values accepted so far)."""
        return not self.screened

    def values(self) -> list[float]:
        """The accepted values, oldest first."""
        return [value for _, value in self.window]

    def center(self, step: int) -> tuple[float, float]:
        """``(center, spread)`` the value at ``step`` is judged against (the window must not be empty)."""
        slope, intercept, spread = self._fitted()
        return intercept + slope * step, spread

    def log_limit(self) -> float:
        """The value ``z_score`` robust spreads above the median of the window's log values."""
        logs = [_log(value) for value in self.ordered]  # sorted too; made only for values above the linear limit
        center = _median(logs)
        limit = center + self.z_score * MAD_TO_SIGMA * _median_deviation(logs, center)
        return math.exp(limit) if limit < _LOG_MAX else math.inf

    def judge(self, value: float, step: int) -> Judgement:
        """Compare a finite ``value`` at ``step`` with the baseline; unflagged while fewer than ``provisional``."""
        if not self.window:
            return Judgement()
        center, spread = self.center(step)
        ratio, score = spike_scores(value, center, spread)
        reference = center if self.reference is None else self.reference
        limit = spike_limit(center, spread, self.ratio, self.z_score, self.min_excess * abs(reference))
        # a signal that started trained has no young level, so until it falls a decade below its first level the
        # size is also judged in log space; only above the linear limit, since it cannot lower it (a few
        # microseconds saved on every ordinary step)
        if (
            value > limit
            and self.started_trained
            and self.ordered[0] >= 0
            and _median(self.ordered) * _FALLEN >= reference
        ):
            limit = max(limit, self.log_limit())
        return Judgement(center, spread, ratio, score, limit, len(self.window) >= self.provisional and value > limit)

    def accept(self, step: int, value: float) -> list[tuple[int, float, float]]:
        """Let ``value`` into the window; the first time it holds ``warmup`` values, screen it.

        Returns:
            ``(step, value, z-score)`` of every value the screening removed (empty otherwise).
        """
        window, columns = self.window, self._columns
        if len(window) == window.maxlen:
            self.ordered.pop(bisect_left(self.ordered, window[0][1]))
            if columns is not None:
                del columns[0][0], columns[1][0]
                self._first_third = (0, 0.0)
        if columns is not None:
            steps, values = columns
            self._steps_ascending = self._steps_ascending and (not steps or step >= steps[-1])
            steps.append(step)
            values.append(value)
        window.append((step, value))
        insort(self.ordered, value)
        self._fit = None
        if self.reference is None and len(window) >= self.provisional:
            self._set_reference(self.ordered)
        if self.screened or len(window) < self.warmup:
            return []
        outliers, kept = self._screen()
        self.screened = True
        if outliers and kept:  # spikes among the first values: the young level and the start test go without them
            self._set_reference(sorted(value for _, value in kept[: self.provisional]))
        self.replace(kept)
        return outliers

    def replace(self, items: list[tuple[int, float]]) -> None:
        """Make ``items`` the window (a lasting new level)."""
        self.window.clear()
        self.window.extend(items)
        self.ordered = sorted(value for _, value in self.window)
        self._fit = None
        self._columns = None

    def state_dict(self) -> dict[str, Any]:
        """The window, the reference and the flags, as plain Python values."""
        return {
            "window": [list(item) for item in self.window],
            "reference": self.reference,
            "started_trained": self.started_trained,
            "screened": self.screened,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; missing keys keep their defaults."""
        # checkpoints before episodes kept bare values, without their steps
        items = [item if isinstance(item, (list, tuple)) else (-1, item) for item in state_dict.get("window", [])]
        self.replace([(int(step), float(value)) for step, value in items])
        reference = state_dict.get("reference")
        self.reference = None if reference is None else float(reference)
        self.started_trained = bool(state_dict.get("started_trained", False))
        self.screened = bool(state_dict.get("screened", len(self.window) >= self.warmup))

    def _set_reference(self, ordered: Sequence[float]) -> None:
        """The young level, and whether the signal started trained, from its first values (sorted)."""
        self.reference = _median(ordered)
        self.started_trained = (
            len(ordered) >= _START_EVIDENCE
            and ordered[0] >= 0
            and ordered[-1] > _TRAINED_SPAN * max(ordered[0], _LOG_FLOOR)
        )

    def _fitted(self) -> tuple[float, float, float]:
        """``(slope, intercept, spread)`` of the window, made once per window (screening judges every value of the
        window against it): the warm-up trend where it applies, else the level.
        """  # noqa: D205
        if self._fit is None:
            self._fit = self._trend() or self._level()
        return self._fit

    def _level(self) -> tuple[float, float, float]:
        """``(0, median, 1.4826 x MAD)`` of the window: the baseline once warm-up is over, or without a trend."""
        center = _median(self.ordered)
        return 0.0, center, MAD_TO_SIGMA * _median_deviation(self.ordered, center)

    def _trend(self) -> tuple[float, float, float] | None:
        """``(slope, intercept, spread)`` of Tukey's resistant line through the window's ``(step, value)`` items,
        during warm-up (from two values per third on) and when the window falls along it; else ``None``.

        The slope joins the medians of the oldest and the newest third; a rising slope counts as 0 (a slow rise is
        what a blow-up looks like). The line is followed when its fall across the window exceeds ``_TREND_FALL``
        residual spreads (a young run's loss); a flat, noisy window (a trained model) keeps its level.
        """  # noqa: D205
        count = len(self.window)
        if self.screened or count < _TREND_MIN:
            return None
        if self._columns is None:
            steps = [step for step, _ in self.window]
            self._columns = steps, [value for _, value in self.window]
            self._steps_ascending = all(map(operator.le, steps, steps[1:]))
            self._first_third = (0, 0.0)
        steps, values = self._columns
        third = count // 3
        if self._steps_ascending:  # the thirds of the steps are sorted already: their medians are lookups
            run = _median_between(steps, count - third, count) - _median_between(steps, 0, third)
        else:
            run = _median(sorted(steps[-third:])) - _median(sorted(steps[:third]))
        if self._first_third[0] != third:  # the oldest third changes only when it grows (the window only grows)
            self._first_third = third, _median(sorted(values[:third]))
        rise = _median(sorted(values[-third:])) - self._first_third[1]
        if run <= 0 or rise >= 0:  # flat or rising: the level
            return None
        slope = rise / run
        residuals = [value - slope * step for step, value in zip(steps, values, strict=True)]
        residuals.sort()
        intercept = _median(residuals)
        spread = MAD_TO_SIGMA * _median_deviation(residuals, intercept)
        falls = -slope * (steps[-1] - steps[0]) > _TREND_FALL * spread
        return (slope, intercept, spread) if falls else None

    def _screen(self) -> tuple[list[tuple[int, float, float]], list[tuple[int, float]]]:
        """Judge every value of the window against the window's own baseline.

        Returns:
            ``(step, value, z-score)`` of the values it flags, and the ``(step, value)`` items it keeps.
        """
        slope, intercept, spread = self._fitted()
        # Every limit is at least the center plus `z_score` raw spreads (the spread is floored, never lowered), and
        # the sums round alike, so a value at or below that is never flagged: only the others are judged in full.
        margin = self.z_score * spread
        outliers: list[tuple[int, float, float]] = []
        kept: list[tuple[int, float]] = []
        for item in self.window:
            step, value = item
            if value > intercept + slope * step + margin:
                judgement = self.judge(value, step)
                if judgement.flagged:
                    outliers.append((step, value, math.inf if judgement.score is None else judgement.score))
                    continue
            kept.append(item)
        return outliers, kept


def _median_between(ordered: Sequence[float], start: int, stop: int) -> float:
    """The median of the sorted ``ordered[start:stop]`` (not empty), as :func:`_median` of that slice gives it."""
    half = start + (stop - start) // 2
    return ordered[half] if (stop - start) % 2 else (ordered[half - 1] + ordered[half]) / 2
