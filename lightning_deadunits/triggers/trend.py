"""Alarm on a trend: a reading that keeps rising, or whose fitted slope will cross a limit soon."""

import itertools
import math
from collections.abc import Mapping
from typing import Any, Literal

from lightning_deadunits._validation import check_choice, check_float, check_int, check_optional_float
from lightning_deadunits.triggers.alarm import AlarmLevel
from lightning_deadunits.triggers.rule import Rule

__all__ = ["TrendRule"]

TrendDirection = Literal["rising", "falling"]

_DIRECTIONS: tuple[TrendDirection, ...] = ("rising", "falling")


class TrendRule(Rule):
    r"""Alarm when a reading trends towards trouble before it gets there.

    Two conditions, each enabled by its arguments; the reading is alarming when either holds:

    - **consecutive rises**: the reading rose by more than ``min_rise`` on each of the last ``rising_checks``
      checks (so ``rising_checks + 1`` readings are needed);
    - **projected crossing**: a least-squares line through the last ``window`` readings, against the global
      step, rises significantly (its slope is at least ``min_t`` standard errors above 0) and reaches ``limit``
      within ``horizon`` steps of the latest check (a reading whose fitted value already passed ``limit`` counts,
      with 0 steps to go).

    With ``direction="falling"`` both look downwards (drops instead of rises, crossing ``limit`` from above),
    e.g. for an activation scale collapsing towards 0. Non-finite readings are left out of the history (a
    :class:`~lightning_deadunits.triggers.ThresholdRule` reports them).

    The alarm's ``threshold`` is ``limit`` when set, otherwise the reading before the run of rises. Messages
    read like ``"deadunits/kernels/layer5.dw/dead_frac rising ~0.03 per 500 steps, 0.4 projected by step
    9000"`` (the rate is per mean interval between the fitted checks).

    Noise: ``rising_checks`` alone fires on pure noise now and then (``k`` rises in a row happen with chance
    ``1/(k+1)!`` per check on i.i.d. noise), so give it a ``min_rise`` above the reading's jitter; the projected
    crossing guards against noise with ``min_t``.

    Args:
        keys: glob pattern(s) over logged keys, e.g. ``"deadunits/kernels/*/dead"``.
        rising_checks: fire after this many consecutive rises (>= 1); ``None`` disables the condition.
        min_rise: a change counts as a rise only when larger than this (>= 0).
        limit: the level whose projected crossing fires; ``None`` disables the condition.
        horizon: global steps ahead within which a projected crossing fires (>= 1); needed with ``limit``.
        window: readings in the least-squares fit (>= 3).
        min_t: the fitted slope must be at least this many standard errors above 0 (>= 0; about 2 for a 95%
            one-sided test with a handful of points).
        direction: ``"rising"`` or ``"falling"``.
        level: ``"info"``, ``"warning"`` or ``"error"``.
        patience: consecutive alarming checks needed before the rule fires.
        cooldown: global steps after firing during which the same key cannot fire again.
        name: the rule's name in alarm messages.

    Raises:
        ValueError: if neither condition is enabled, if only one of ``limit`` and ``horizon`` is given, or on an
            out-of-range number.

    Example:
        >>> rule = TrendRule("deadunits/kernels/*/dead", rising_checks=2)
        >>> [len(rule.evaluate({"deadunits/kernels/conv/dead": v}, s, "kernels")) for s, v in enumerate([1, 2, 4])]
        [0, 0, 1]
    """

    def __init__(
        self,
        keys: str | list[str],
        rising_checks: int | None = None,
        min_rise: float = 0.0,
        limit: float | None = None,
        horizon: int | None = None,
        window: int = 5,
        min_t: float = 2.0,
        direction: TrendDirection = "rising",
        level: AlarmLevel = "warning",
        patience: int = 1,
        cooldown: int = 0,
        name: str | None = None,
    ) -> None:
        super().__init__(keys, level=level, patience=patience, cooldown=cooldown, name=name)
        self.rising_checks = None if rising_checks is None else check_int("rising_checks", rising_checks, 1)
        self.min_rise = check_float("min_rise", min_rise, minimum=0.0)
        self.limit = check_optional_float("limit", limit)
        self.horizon = None if horizon is None else check_int("horizon", horizon, minimum=1)
        self.window = check_int("window", window, minimum=3)
        self.min_t = check_float("min_t", min_t, minimum=0.0)
        self.direction: TrendDirection = check_choice("direction", direction, _DIRECTIONS)
        if (self.limit is None) != (self.horizon is None):
            raise ValueError(f"`limit` and `horizon` go together, got limit={limit!r}, horizon={horizon!r}.")
        if self.rising_checks is None and self.limit is None:
            raise ValueError("`TrendRule` needs `rising_checks` or `limit` and `horizon`, got neither.")
        self._history: dict[str, list[tuple[int, float]]] = {}

    def check(self, key: str, value: float, step: int) -> tuple[float, str] | None:
        """Record the reading; return the limit and a message when the trend is alarming."""
        if self._is_nonfinite(value):
            return None
        history = self._history.setdefault(key, [])
        if history and history[-1][0] == step:
            history.pop()
        history.append((step, float(value)))
        del history[: -max(self.window, (self.rising_checks or 0) + 1)]
        return self._projected_crossing(key, history) or self._consecutive_rises(key, history)

    def state_dict(self) -> dict[str, Any]:
        """Return the counters and the recent readings of every key as a plain dict."""
        history = {key: [[step, value] for step, value in points] for key, points in self._history.items()}
        return {**super().state_dict(), "history": history}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore counters and readings from :meth:`state_dict`."""
        super().load_state_dict(state_dict)
        self._history = {
            key: [(int(step), float(value)) for step, value in points]
            for key, points in state_dict.get("history", {}).items()
        }

    def _consecutive_rises(self, key: str, history: list[tuple[int, float]]) -> tuple[float, str] | None:
        if self.rising_checks is None or len(history) < self.rising_checks + 1:
            return None
        recent = [self._oriented(value) for _, value in history[-self.rising_checks - 1 :]]
        if not all(later - earlier > self.min_rise for earlier, later in itertools.pairwise(recent)):
            return None
        (first_step, first), (last_step, last) = history[-self.rising_checks - 1], history[-1]
        message = (
            f"{key} {self._verb} on {self.rising_checks} consecutive checks, {first:.6g} -> {last:.6g} "
            f"(steps {first_step}..{last_step})"
        )
        return (self.limit if self.limit is not None else first), message

    def _projected_crossing(self, key: str, history: list[tuple[int, float]]) -> tuple[float, str] | None:
        if self.limit is None or self.horizon is None or len(history) < self.window:
            return None
        points = history[-self.window :]
        origin = points[0][0]
        xs = [float(step - origin) for step, _ in points]
        ys = [self._oriented(value) for _, value in points]
        fit = _least_squares(xs, ys)
        if fit is None:
            return None
        slope, intercept, t_stat = fit
        if slope <= 0 or t_stat < self.min_t:
            return None
        last_step = points[-1][0]
        to_go = max(0.0, (self._oriented(self.limit) - (intercept + slope * xs[-1])) / slope)
        if to_go > self.horizon:
            return None
        per = (xs[-1] - xs[0]) / (len(xs) - 1)
        message = (
            f"{key} {self._verb} ~{slope * per:.3g} per {per:.0f} steps, {self.limit:.6g} projected by step "
            f"{last_step + round(to_go)}"
        )
        return self.limit, message

    @property
    def _verb(self) -> str:
        return "rising" if self.direction == "rising" else "falling"

    def _oriented(self, value: float) -> float:
        """The reading, negated for ``"falling"``, so that both directions are tested as rises."""
        return value if self.direction == "rising" else -value


def _least_squares(xs: list[float], ys: list[float]) -> tuple[float, float, float] | None:
    """``(slope, intercept, t statistic of the slope)`` of the least-squares line, or ``None`` if x is constant."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    if sxx == 0:
        return None
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sxx
    intercept = mean_y - slope * mean_x
    residuals = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys, strict=True))
    standard_error = math.sqrt(residuals / (n - 2) / sxx)
    return slope, intercept, slope / standard_error if standard_error > 0 else math.copysign(math.inf, slope)
