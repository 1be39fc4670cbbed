"""One signal's spike baseline: a window of accepted values, the signal's young level, and the spike rule.

The loss and the global gradient norm are each judged by one :class:`SpikeBaseline`; pure Python state, so it
serialises and resumes exactly.
"""

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lightning_deadunits.functional.loss import robust_baseline, spike_limit, spike_scores

__all__ = ["SpikeBaseline"]


@dataclass(frozen=True)
class Judgement:
    """How one value compares with the baseline (every number ``None`` while the baseline cannot judge yet)."""

    baseline: float | None = None
    spread: float | None = None
    ratio: float | None = None
    score: float | None = None
    limit: float | None = None
    flagged: bool = False


class SpikeBaseline:
    """Judges one signal's values against a robust baseline of its recent accepted values.

    A finite value is *flagged* when all three hold against the median and robust spread (1.4826 x MAD) of the
    last ``window`` accepted values: it exceeds ``ratio`` times the median, it lies ``z_score`` spreads above it,
    and its excess over the median exceeds ``min_excess`` times the *reference*, the median of the first
    ``provisional`` accepted values (the signal's level while training was young; until then the current median).
    The third condition is the scale floor: late in training a near-zero median makes an ordinary hard batch
    many times the median and many spreads above it, yet its excess is tiny next to the loss's own scale.

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
        >>> baseline.judge(5.0).flagged, baseline.judge(1.02).flagged
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
        self.reference: float | None = None
        self.screened = False

    @property
    def warming_up(self) -> bool:
        """Whether the window has not been screened yet (fewer than ``warmup`` values accepted so far)."""
        return not self.screened

    def values(self) -> list[float]:
        """The accepted values, oldest first."""
        return [value for _, value in self.window]

    def judge(self, value: float) -> Judgement:
        """Compare a finite ``value`` with the baseline; unflagged while fewer than ``provisional`` are accepted."""
        if not self.window:
            return Judgement()
        center, spread = robust_baseline(self.values())
        ratio, score = spike_scores(value, center, spread)
        floor = self.min_excess * abs(center if self.reference is None else self.reference)
        limit = spike_limit(center, spread, self.ratio, self.z_score, floor)
        judging = len(self.window) >= self.provisional
        return Judgement(center, spread, ratio, score, limit, judging and value > limit)

    def accept(self, step: int, value: float) -> list[tuple[int, float, float]]:
        """Let ``value`` into the window; the first time it holds ``warmup`` values, screen it.

        Returns:
            ``(step, value, z-score)`` of every value the screening removed (empty otherwise).
        """
        self.window.append((step, value))
        if self.reference is None and len(self.window) >= self.provisional:
            self.reference = robust_baseline(self.values())[0]
        if self.screened or len(self.window) < self.warmup:
            return []
        self.screened = True
        judgements = [(item, self.judge(item[1])) for item in self.window]
        outliers = [(s, v, math.inf if j.score is None else j.score) for (s, v), j in judgements if j.flagged]
        self.replace([item for item, judgement in judgements if not judgement.flagged])
        return outliers

    def replace(self, items: list[tuple[int, float]]) -> None:
        """Make ``items`` the window (a lasting new level)."""
        self.window.clear()
        self.window.extend(items)

    def state_dict(self) -> dict[str, Any]:
        """The window and the reference, as plain Python values."""
        return {"window": [list(item) for item in self.window], "reference": self.reference, "screened": self.screened}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; missing keys keep their defaults."""
        self.window.clear()
        # checkpoints before episodes kept bare values, without their steps
        items = [item if isinstance(item, (list, tuple)) else (-1, item) for item in state_dict.get("window", [])]
        self.window.extend((int(step), float(value)) for step, value in items)
        reference = state_dict.get("reference")
        self.reference = None if reference is None else float(reference)
        self.screened = bool(state_dict.get("screened", len(self.window) >= self.warmup))
