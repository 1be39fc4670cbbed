"""When a loss is a spike: a robust baseline of recent accepted losses, thresholds, warm-up and patience."""

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from lightning_deadunits._validation import check_float, check_int
from lightning_deadunits.functional.loss import robust_baseline, spike_limit, spike_scores

__all__ = ["SpikeDetector", "SpikeVerdict"]


@dataclass(frozen=True)
class SpikeVerdict:
    """What :meth:`SpikeDetector.update` decided about one loss.

    Args:
        step: the global step the loss belongs to.
        loss: the loss.
        baseline: median of the accepted losses before this one (``None`` while the window is empty).
        spread: their robust standard deviation (see :func:`~lightning_deadunits.functional.loss.robust_baseline`;
            ``None`` while the window is empty).
        ratio: ``1 + (loss - baseline) / |baseline|`` (``None`` while the window is empty).
        score: the robust z-score ``(loss - baseline) / spread`` (``None`` while the window is empty).
        limit: the loss above which both thresholds are crossed (``None`` while the window is empty).
        flagged: the loss is non-finite, or crossed both thresholds after warm-up; it did not enter the window.
        spike: a spike event: a non-finite loss, or the ``patience``-th consecutive flagged loss.
        reason: ``"non-finite"``, ``"ratio and z-score"`` (flagged), ``"warm-up"`` or ``""`` (accepted).
        rebaselined: this loss ended a run of ``rebaseline_after`` flagged losses, which became the new window.
    """

    step: int
    loss: float
    baseline: float | None
    spread: float | None
    ratio: float | None
    score: float | None
    limit: float | None
    flagged: bool
    spike: bool
    reason: str
    rebaselined: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The verdict as a plain dict."""
        return asdict(self)


class SpikeDetector:
    """Flags losses far above a robust baseline of recent losses; pure Python state, so it serialises.

    The baseline is the median and a robust standard deviation (the larger of 1.4826 x MAD and the distance
    from the median to the 95th percentile over 1.645, see
    :func:`~lightning_deadunits.functional.loss.robust_baseline`) of the last ``window`` *accepted* losses. A
    finite loss is *flagged* when, after ``warmup`` losses have been accepted, it exceeds both ``ratio`` times
    the baseline (``1 + (loss - median) / |median| > ratio``) and ``z_score`` robust standard deviations above
    it (``(loss - median) / spread > z_score``). A non-finite loss is always flagged.
    Flagged losses never enter the window, so a spike cannot raise the baseline that judges the next one.

    A *spike* (event) is a non-finite loss (at once, also during warm-up), or the ``patience``-th flagged finite
    loss in a row (the count then restarts). After ``rebaseline_after`` flagged finite losses in a row the
    detector takes them as the new normal: they replace the window (a lasting change of loss level, e.g. a new
    data phase, would otherwise be flagged forever, and with ``skip_update`` training would never move again).

    Args:
        window: how many accepted losses the baseline looks at (>= 2).
        warmup: accepted losses before any finite loss is judged (1 ... ``window``).
        ratio: the loss must exceed this multiple of the baseline (> 1).
        z_score: ... and this many robust standard deviations above it (> 0).
        patience: consecutive flagged losses that make a spike (>= 1).
        rebaseline_after: flagged losses in a row after which they become the baseline (``None``: never).

    Raises:
        ValueError: on an out-of-range argument or ``warmup > window``.

    Example:
        >>> detector = SpikeDetector(window=20, warmup=5)
        >>> [detector.update(1.0 + 0.01 * (i % 3), step=i).spike for i in range(6)]
        [False, False, False, False, False, False]
        >>> detector.update(5.0, step=6).spike, detector.update(float("nan"), step=7).reason
        (True, 'non-finite')
    """

    def __init__(
        self,
        window: int = 100,
        warmup: int = 50,
        ratio: float = 2.0,
        z_score: float = 8.0,
        patience: int = 1,
        rebaseline_after: int | None = 100,
    ) -> None:
        self.window_size = check_int("window", window, minimum=2)
        self.warmup = check_int("warmup", warmup, minimum=1)
        if self.warmup > self.window_size:
            raise ValueError(f"`warmup` must not exceed `window` ({window}), got {warmup!r}.")
        self.ratio = check_float("ratio", ratio, minimum=1.0, min_inclusive=False)
        self.z_score = check_float("z_score", z_score, minimum=0.0, min_inclusive=False)
        self.patience = check_int("patience", patience, minimum=1)
        self.rebaseline_after = None if rebaseline_after is None else check_int("rebaseline_after", rebaseline_after, 1)
        self.window: deque[float] = deque(maxlen=self.window_size)
        self.recent: deque[tuple[int, float]] = deque(maxlen=self.window_size)
        self._streak = 0
        self._flagged_run: list[float] = []

    @property
    def warming_up(self) -> bool:
        """Whether fewer than ``warmup`` losses have been accepted, so finite losses are not judged yet."""
        return len(self.window) < self.warmup

    def update(self, loss: float, step: int) -> SpikeVerdict:
        """Judge one loss against the current baseline, then let it into the window unless it was flagged."""
        self.recent.append((step, loss))
        scores = self._scores(loss)
        if not math.isfinite(loss):  # ends a run of flagged finite losses, as an accepted loss does
            self._streak = 0
            self._flagged_run.clear()
            return SpikeVerdict(step, loss, *scores, flagged=True, spike=True, reason="non-finite")
        if self.warming_up:
            self.window.append(loss)
            return SpikeVerdict(step, loss, *scores, flagged=False, spike=False, reason="warm-up")
        _, _, ratio, score, _ = scores
        assert ratio is not None and score is not None
        if not (ratio > self.ratio and score > self.z_score):
            self._streak = 0
            self._flagged_run.clear()
            self.window.append(loss)
            return SpikeVerdict(step, loss, *scores, flagged=False, spike=False, reason="")
        self._streak += 1
        if self.rebaseline_after is not None:  # only a re-baseline reads the run; without one it would grow forever
            self._flagged_run.append(loss)
        spike = self._streak >= self.patience
        if spike:
            self._streak = 0
        rebaselined = self.rebaseline_after is not None and len(self._flagged_run) >= self.rebaseline_after
        if rebaselined:
            self.window.clear()
            self.window.extend(self._flagged_run)
            self._flagged_run.clear()
            self._streak = 0
        return SpikeVerdict(
            step, loss, *scores, flagged=True, spike=spike, reason="ratio and z-score", rebaselined=rebaselined
        )

    def baseline(self) -> tuple[float, float] | None:
        """``(median, spread)`` of the accepted losses, or ``None`` when none has been accepted."""
        if not self.window:
            return None
        return robust_baseline(self.window)

    def state_dict(self) -> dict[str, Any]:
        """The window, the recent losses and the counters, as plain Python values."""
        return {
            "window": list(self.window),
            "recent": [list(item) for item in self.recent],
            "streak": self._streak,
            "flagged_run": list(self._flagged_run),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; keys missing from older checkpoints keep their defaults."""
        self.window = deque((float(loss) for loss in state_dict.get("window", [])), maxlen=self.window_size)
        self.recent = deque(
            ((int(step), float(loss)) for step, loss in state_dict.get("recent", [])), maxlen=self.window_size
        )
        self._streak = int(state_dict.get("streak", 0))
        self._flagged_run = [float(loss) for loss in state_dict.get("flagged_run", [])]

    def _scores(self, loss: float) -> tuple[float | None, float | None, float | None, float | None, float | None]:
        """``(baseline, spread, ratio, score, limit)`` of ``loss`` against the window, all ``None`` if it is empty."""
        if not self.window:
            return None, None, None, None, None
        center, spread = robust_baseline(self.window)
        ratio, score = spike_scores(loss, center, spread)
        return center, spread, ratio, score, spike_limit(center, spread, self.ratio, self.z_score)
