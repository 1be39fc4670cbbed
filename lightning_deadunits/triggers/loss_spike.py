"""When a batch is a spike: loss and gradient-norm baselines, a scale floor, warm-up screening, patience, episodes."""

import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from lightning_deadunits._validation import check_float, check_int
from lightning_deadunits.functional.loss import robust_baseline
from lightning_deadunits.metrics.grad_baselines import LayerGradBaselines
from lightning_deadunits.metrics.spike_baseline import SpikeBaseline
from lightning_deadunits.triggers.spike_episodes import SpikeEpisodes

__all__ = ["SpikeDetector", "SpikeVerdict"]

# which signals flagged a batch, by (gradient norm flagged, loss flagged)
_SIGNALS = {(False, False): "", (True, False): "grad_norm", (False, True): "loss", (True, True): "grad_norm+loss"}


@dataclass
class SpikeVerdict:
    """What :meth:`SpikeDetector.update` decided about one loss.

    A plain (not frozen) dataclass: one is made on every training step, and a frozen one's ``__init__`` alone
    cost 4 us of the detector's per-step budget.

    Args:
        step: the global step the loss belongs to.
        loss: the loss.
        baseline: the center the loss was judged against: the median of the accepted losses before this one, or
            during warm-up their falling trend at this step (``None`` while the window is empty).
        spread: their robust standard deviation (1.4826 x the MAD, around the trend when it is followed; ``None``
            while the window is empty).
        ratio: ``1 + (loss - baseline) / |baseline|`` (``None`` while the window is empty).
        score: the robust z-score ``(loss - baseline) / spread`` (``None`` while the window is empty).
        limit: the loss above which it is flagged (``None`` while the window is empty). The log-space condition
            is evaluated only for a loss above the other three, so below them this is their limit.
        flagged: this rank's loss is non-finite, or its loss or gradient norm crossed every threshold; neither
            entered its window.
        spike: a spike batch (on any rank when the detector was given ``agree``): a non-finite loss, or the
            ``patience``-th flagged batch in a row, or a batch of an open episode that is flagged again.
        reason: ``"non-finite"``, ``"ratio and z-score"`` (flagged), ``"warm-up"`` or ``""`` (accepted).
        rebaselined: this loss ended a run of ``rebaseline_after`` flagged losses, which became the new window.
        signal: which signal flagged the batch: ``"loss"``, ``"grad_norm"``, ``"grad_norm+loss"`` or ``""``.
        grad_norm: the global gradient norm of the step (``None`` when not given).
        grad_baseline: the median of the accepted gradient norms (``None`` when unknown).
        grad_score: the gradient norm's robust z-score (``None`` when unknown).
        layers: at a spike, the layers whose gradient norm is furthest above their own median (see
            :class:`~lightning_deadunits.metrics.grad_baselines.LayerGradBaselines`).
        episode: at a spike, the open episode's fields (see :class:`~lightning_deadunits.triggers.SpikeEpisodes`).
        episode_start: this spike started its episode (the alarm is raised here).
        ended_episode: the episode that ended at this batch (more than ``episode_gap`` steps after its last spike).
        late: ``(step, loss, z-score)`` of warm-up losses found to be outliers when warm-up ended, before judging
            had started: reported after the fact.
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
    signal: str = ""
    grad_norm: float | None = None
    grad_baseline: float | None = None
    grad_score: float | None = None
    layers: list[dict[str, Any]] = field(default_factory=list)
    episode: dict[str, Any] | None = None
    episode_start: bool = False
    ended_episode: dict[str, Any] | None = None
    late: list[tuple[int, float, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The verdict as a plain dict."""
        return asdict(self)


class SpikeDetector:
    r"""Flags batches whose loss or gradient norm jumps far above its own robust baseline; groups them in episodes.

    **The rule.** Each signal (the loss; the global gradient norm when given) keeps the last ``window`` accepted
    values, their center :math:`c` (the median :math:`m`), robust spread :math:`s = 1.4826\,\mathrm{MAD}` and a
    *reference* :math:`r`, the median of its first ``provisional`` accepted values (its level while training was
    young). A value :math:`x` is flagged when

    .. math:: x > c\,\mathrm{ratio}, \quad (x - c) / s > z, \quad x - c > \mathrm{min\_excess} \cdot |r|

    (``grad_min_excess`` instead of ``min_excess`` for the gradient norm).

    The first two say "far above the recent losses"; the third, the scale floor, says "and large for this
    loss": late in a converged run the median nears 0, so an ordinary batch with one misclassified sample is
    20x the median and 9 spreads above it, but its excess is a few percent of the young loss. The MAD ignores up
    to half of the window, so a contaminated warm-up cannot widen the spread.

    *Young runs*: during warm-up the loss falls fast and a median lags; when the window falls along a line (its
    fall exceeds 3 residual spreads), :math:`c` is Tukey's resistant line (slope at most 0) at the current step and
    :math:`s` the robust spread of its residuals. *Runs that start trained* (fine-tuning, resuming without the
    detector's state; recognised by its first ``provisional`` values, at least 10, spanning more than 4x):
    :math:`r` is then a near-zero level and the floor no floor, so until the signal's median has fallen a decade
    below :math:`r`, a flagged value must also lie ``z_score`` robust spreads above the median of the window's log
    values. See
    :class:`~lightning_deadunits.metrics.spike_baseline.SpikeBaseline` for the details and the measurements.

    Judging starts after ``provisional`` accepted values (a provisional baseline, so spikes during warm-up are
    caught and kept out); when ``warmup`` values have been accepted, the window is screened by its own baseline and
    the outliers from before judging started are removed and reported in :attr:`SpikeVerdict.late` (the reference
    is then taken again without them). A NaN or infinite loss is always flagged; a non-finite gradient norm is
    ignored (fp16 AMP overflows are the ``GradScaler``'s business). Flagged values never enter a window;
    ``rebaseline_after`` flagged losses in a row become the new window (a lasting change of level, e.g. a new data
    phase). The per-step work is a few microseconds of host Python (a sorted window: the median is a lookup, the
    MAD a binary search; ``benchmarks/spikes.py`` measures it).

    **Spikes and episodes.** A flagged batch is a spike once ``patience`` batches in a row were flagged (or while
    its episode is open). With ``agree`` (under DDP: ``reduce_boolean_decision``) every rank gets the same spike
    decision. Spikes no more than ``episode_gap`` steps apart form one episode
    (:class:`~lightning_deadunits.triggers.SpikeEpisodes`); per-layer gradient norms of a spike are compared with
    their own recent medians (:class:`~lightning_deadunits.metrics.grad_baselines.LayerGradBaselines`).

    Args:
        window: accepted values each baseline looks at (>= 2).
        warmup: accepted values that fix the reference and end warm-up (1 ... ``window``).
        ratio: a spike exceeds this multiple of the median (> 1).
        z_score: ... and this many robust spreads above it (> 0).
        patience: consecutive flagged batches that make a spike (>= 1).
        rebaseline_after: flagged losses in a row after which they become the baseline (``None``: never).
        min_excess: ... and its excess over the median exceeds this fraction of the reference (>= 0).
        provisional: accepted values before judging starts (1 ... ``warmup``; default ``min(10, warmup)``).
        episode_gap: the most steps between two spikes of one episode (>= 0).
        grad_min_excess: the gradient norm's scale floor, as a multiple of its young level (>= 0). Gradient norms
            are far more heavy-tailed than losses: late in a converged run an ordinary hard batch's gradient norm
            is 10-30x the median and reaches the norm the model had at initialisation, so a gradient spike must
            exceed the median by 4x that level (corrupted batches measured 14-120x it, see the benchmark).

    Raises:
        ValueError: on an out-of-range argument, ``warmup > window`` or ``provisional > warmup``.

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
        ratio: float = 1.5,
        z_score: float = 6.0,
        patience: int = 1,
        rebaseline_after: int | None = 100,
        min_excess: float = 0.25,
        provisional: int | None = None,
        episode_gap: int = 5,
        grad_min_excess: float = 4.0,
    ) -> None:
        self.window_size = check_int("window", window, minimum=2)
        self.warmup = check_int("warmup", warmup, minimum=1)
        if self.warmup > self.window_size:
            raise ValueError(f"`warmup` must not exceed `window` ({window}), got {warmup!r}.")
        self.ratio = check_float("ratio", ratio, minimum=1.0, min_inclusive=False)
        self.z_score = check_float("z_score", z_score, minimum=0.0, min_inclusive=False)
        self.patience = check_int("patience", patience, minimum=1)
        self.rebaseline_after = None if rebaseline_after is None else check_int("rebaseline_after", rebaseline_after, 1)
        self.min_excess = check_float("min_excess", min_excess, minimum=0.0)
        self.provisional = min(10, self.warmup) if provisional is None else check_int("provisional", provisional, 1)
        if self.provisional > self.warmup:
            raise ValueError(f"`provisional` must not exceed `warmup` ({warmup}), got {provisional!r}.")
        self.episode_gap = check_int("episode_gap", episode_gap, minimum=0)
        self.grad_min_excess = check_float("grad_min_excess", grad_min_excess, minimum=0.0)
        thresholds = (self.window_size, self.warmup, self.ratio, self.z_score)
        self.loss_baseline = SpikeBaseline(*thresholds, self.min_excess, self.provisional)
        self.grad_baseline = SpikeBaseline(*thresholds, self.grad_min_excess, self.provisional)
        self.layer_baselines = LayerGradBaselines(self.window_size)
        self.episodes = SpikeEpisodes(self.episode_gap)
        self.recent: deque[tuple[int, float]] = deque(maxlen=self.window_size)
        self._streak = 0
        self._flagged_run: list[tuple[int, float]] = []

    @property
    def window(self) -> list[float]:
        """The accepted losses, oldest first."""
        return self.loss_baseline.values()

    @property
    def warming_up(self) -> bool:
        """Whether fewer than ``warmup`` losses have been accepted (the loss's reference is not fixed yet)."""
        return self.loss_baseline.warming_up

    def update(
        self,
        loss: float,
        step: int,
        grad_norm: float | None = None,
        layer_norms: Mapping[str, float] | None = None,
        agree: Callable[[bool], bool] | None = None,
    ) -> SpikeVerdict:
        """Judge one batch, share the spike decision through ``agree``, update the windows and the episodes.

        Args:
            loss: the batch's loss.
            step: its global step.
            grad_norm: the global gradient norm of its optimizer step (``None``: not judged).
            layer_norms: per-layer gradient norms of that step, for attribution.
            agree: turns this rank's spike decision into everyone's (``None``: this rank alone).
        """
        self.recent.append((step, loss))
        warming_up = not self.loss_baseline.screened
        finite = math.isfinite(loss)
        judged = self.loss_baseline.judge(loss if finite else 0.0, step)
        grad_finite = grad_norm is not None and math.isfinite(grad_norm)
        grad = self.grad_baseline.judge(grad_norm, step) if grad_finite and grad_norm is not None else None
        loss_flagged = not finite or judged.flagged
        grad_flagged = grad is not None and grad.flagged
        flagged = loss_flagged or grad_flagged
        signal = _SIGNALS[grad_flagged, loss_flagged]
        reason = "non-finite" if not finite else "ratio and z-score" if flagged else ""
        self._streak = self._streak + 1 if flagged and finite else 0
        spike = not finite or (flagged and (self._streak >= self.patience or self.episodes.current is not None))
        if spike and self._streak >= self.patience:
            self._streak = 0
        if agree is not None:
            spike = bool(agree(spike))
        layers = self.layer_baselines.attribute(layer_norms) if spike and layer_norms else []
        score = -math.inf
        if flagged:  # the episode's peak score: the larger of the two, inf without a baseline or for a NaN/Inf loss
            scores = [value for value in (judged.score, None if grad is None else grad.score) if value is not None]
            score = max(scores) if scores and finite else math.inf
        episode, started, ended = self.episodes.update(step, spike, loss, score, signal, layers)
        late: list[tuple[int, float, float]] = []
        rebaselined = False
        if not loss_flagged:
            late = self.loss_baseline.accept(step, loss)
            self._flagged_run.clear()
        elif math.isfinite(loss) and self.rebaseline_after is not None:
            self._flagged_run.append((step, loss))
            if len(self._flagged_run) >= self.rebaseline_after:
                self.loss_baseline.replace(self._flagged_run)
                self._flagged_run = []
                self._streak = 0
                rebaselined = True
        else:
            self._flagged_run.clear()
        if grad_finite and not grad_flagged and grad_norm is not None:
            self.grad_baseline.accept(step, grad_norm)
        if layer_norms and not flagged:
            self.layer_baselines.accept(layer_norms)
        return SpikeVerdict(
            step,
            loss,
            judged.baseline,
            judged.spread,
            judged.ratio if finite else None if judged.ratio is None else math.nan,
            judged.score if finite else None if judged.score is None else math.nan,
            judged.limit,
            flagged=flagged,
            spike=spike,
            reason=reason or ("warm-up" if warming_up else ""),
            rebaselined=rebaselined,
            signal=signal,
            grad_norm=grad_norm,
            grad_baseline=None if grad is None else grad.baseline,
            grad_score=None if grad is None else grad.score,
            layers=layers,
            episode=None if episode is None or not spike else dict(episode),
            episode_start=started,
            ended_episode=ended,
            late=late,
        )

    def finish(self) -> dict[str, Any] | None:
        """End the open episode (training ended) and return it, or ``None``."""
        return self.episodes.finish()

    def baseline(self) -> tuple[float, float] | None:
        """``(median, spread)`` of the accepted losses, or ``None`` when none has been accepted."""
        values = self.window
        return robust_baseline(values) if values else None

    def state_dict(self) -> dict[str, Any]:
        """Both baselines, the layer baselines, the episodes, the recent losses and the counters, as plain values."""
        return {
            "loss_baseline": self.loss_baseline.state_dict(),
            "grad_baseline": self.grad_baseline.state_dict(),
            "layer_baselines": self.layer_baselines.state_dict(),
            "episodes": self.episodes.state_dict(),
            "recent": [list(item) for item in self.recent],
            "streak": self._streak,
            "flagged_run": [list(item) for item in self._flagged_run],
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; keys missing from older checkpoints keep their defaults."""
        self.loss_baseline.load_state_dict(state_dict.get("loss_baseline", {"window": state_dict.get("window", [])}))
        self.grad_baseline.load_state_dict(state_dict.get("grad_baseline", {}))
        self.layer_baselines.load_state_dict(state_dict.get("layer_baselines", {}))
        self.episodes.load_state_dict(state_dict.get("episodes", {}))
        self.recent = deque(
            ((int(step), float(loss)) for step, loss in state_dict.get("recent", [])), maxlen=self.window_size
        )
        self._streak = int(state_dict.get("streak", 0))
        self._flagged_run = [
            (int(item[0]), float(item[1])) if isinstance(item, (list, tuple)) else (-1, float(item))
            for item in state_dict.get("flagged_run", [])
        ]
