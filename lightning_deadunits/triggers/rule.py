"""The base of every trigger: key matching, patience and cooldown, with their state."""

import fnmatch
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

from lightning_deadunits._validation import check_choice, check_int, check_strings
from lightning_deadunits.triggers.alarm import Alarm, AlarmLevel

__all__ = ["Rule"]

_LEVELS: tuple[AlarmLevel, ...] = ("info", "warning", "error")


class Rule(ABC):
    """Decides when readings are alarming. Pure Python state, so it serialises into a checkpoint.

    A rule watches every reading whose key matches one of its glob ``keys``. A reading is *alarming* when the
    subclass's condition holds; the rule fires once the condition has held on ``patience`` consecutive
    checks of that key, and then stays quiet for that key until ``cooldown`` global steps have passed.

    Args:
        keys: glob pattern(s) over logged keys, e.g. ``"deadunits/kernels/*/dead_rel"``.
        level: ``"info"``, ``"warning"`` or ``"error"``.
        patience: consecutive alarming checks needed before the rule fires (>= 1).
        cooldown: global steps after firing during which the same key cannot fire again (>= 0).
        name: the rule's name in alarm messages; defaults to the class name.

    Raises:
        ValueError: if ``level``, ``patience`` or ``cooldown`` is out of range.
        TypeError: if ``keys`` is not a string or a list of strings.
    """

    def __init__(
        self,
        keys: str | list[str],
        level: AlarmLevel = "warning",
        patience: int = 1,
        cooldown: int = 0,
        name: str | None = None,
    ) -> None:
        self.keys = check_strings("keys", keys)
        self.level: AlarmLevel = check_choice("level", level, _LEVELS)
        self.patience = check_int("patience", patience, minimum=1)
        self.cooldown = check_int("cooldown", cooldown, minimum=0)
        self.name = type(self).__name__ if name is None else name
        self._streaks: dict[str, int] = {}
        self._last_fired: dict[str, int] = {}

    def matches(self, key: str) -> bool:
        """Whether this rule watches ``key``."""
        return any(fnmatch.fnmatchcase(key, pattern) for pattern in self.keys)

    def evaluate(self, readings: Mapping[str, float], step: int, source: str) -> list[Alarm]:
        """Feed one check's readings to the rule and return the alarms it fires at ``step``."""
        alarms = []
        for key, value in readings.items():
            if not self.matches(key):
                continue
            verdict = self.check(key, value, step)
            if verdict is None:
                self._streaks[key] = 0
                continue
            threshold, message = verdict
            self._streaks[key] = self._streaks.get(key, 0) + 1
            last = self._last_fired.get(key)
            cooling = last is not None and step - last < self.cooldown
            if self._streaks[key] >= self.patience and not cooling:
                self._last_fired[key] = step
                self._streaks[key] = 0
                alarms.append(Alarm(source, key, float(value), threshold, self.level, message, step, self.name))
        return alarms

    @abstractmethod
    def check(self, key: str, value: float, step: int) -> tuple[float, str] | None:
        """Return ``(threshold, message)`` if ``value`` is alarming, else ``None``.

        Subclasses keep whatever history they need here; it must go into :meth:`state_dict`.
        """

    def state_dict(self) -> dict[str, Any]:
        """Return the rule's counters as a plain dict."""
        return {"streaks": dict(self._streaks), "last_fired": dict(self._last_fired)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore counters from :meth:`state_dict`; keys missing from older checkpoints keep their defaults."""
        self._streaks = dict(state_dict.get("streaks", {}))
        self._last_fired = dict(state_dict.get("last_fired", {}))

    @staticmethod
    def _is_nonfinite(value: float) -> bool:
        return not math.isfinite(value)
