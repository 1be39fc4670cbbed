"""Alarm when a reading leaves a fixed band."""

from lightning_deadunits._validation import check_optional_float
from lightning_deadunits.triggers.alarm import AlarmLevel
from lightning_deadunits.triggers.rule import Rule

__all__ = ["ThresholdRule"]


class ThresholdRule(Rule):
    """Alarm when a reading is above ``above`` or below ``below``. A non-finite reading is always alarming.

    Args:
        keys: glob pattern(s) over logged keys, e.g. ``"deadunits/activations/*/zero_frac"``.
        above: alarm when the reading is strictly greater than this.
        below: alarm when the reading is strictly less than this.
        level: ``"info"``, ``"warning"`` or ``"error"``.
        patience: consecutive alarming checks needed before the rule fires.
        cooldown: global steps after firing during which the same key cannot fire again.
        name: the rule's name in alarm messages.

    Raises:
        ValueError: if neither ``above`` nor ``below`` is given, if ``below > above``, or if a number is not finite.

    Example:
        >>> rule = ThresholdRule("deadunits/kernels/total/dead_rel", above=10)
        >>> [alarm.value for alarm in rule.evaluate({"deadunits/kernels/total/dead_rel": 12.0}, 5, "kernels")]
        [12.0]
    """

    def __init__(
        self,
        keys: str | list[str],
        above: float | None = None,
        below: float | None = None,
        level: AlarmLevel = "warning",
        patience: int = 1,
        cooldown: int = 0,
        name: str | None = None,
    ) -> None:
        super().__init__(keys, level=level, patience=patience, cooldown=cooldown, name=name)
        self.above = check_optional_float("above", above)
        self.below = check_optional_float("below", below)
        if self.above is None and self.below is None:
            raise ValueError("`ThresholdRule` needs `above` or `below`, got neither.")
        if self.above is not None and self.below is not None and self.below > self.above:
            raise ValueError(f"`below` must not exceed `above`, got below={below!r}, above={above!r}.")

    def check(self, key: str, value: float, step: int) -> tuple[float, str] | None:
        """Return the crossed limit and a message when ``value`` is outside the band."""
        if self._is_nonfinite(value):
            limit = self.above if self.above is not None else self.below
            return float(limit), f"{key} is {value} (not finite) at step {step}"  # type: ignore[arg-type]
        if self.above is not None and value > self.above:
            return self.above, f"{key} = {value:.6g} rose above {self.above:.6g} at step {step}"
        if self.below is not None and value < self.below:
            return self.below, f"{key} = {value:.6g} fell below {self.below:.6g} at step {step}"
        return None
