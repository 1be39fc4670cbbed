"""The record every trigger produces and every action consumes."""

from dataclasses import asdict, dataclass
from typing import Any, Literal

__all__ = ["Alarm", "AlarmLevel"]

AlarmLevel = Literal["info", "warning", "error"]


@dataclass(frozen=True)
class Alarm:
    """One alarming reading.

    Args:
        source: the monitor that produced the reading (``"kernels"``, ``"activations"``, ``"loss"``...).
        key: the logged key of the reading, e.g. ``"deadunits/kernels/total/dead_rel"``.
        value: the reading.
        threshold: the limit it crossed (for trend rules, the limit it is projected to cross).
        level: ``"info"``, ``"warning"`` or ``"error"``.
        message: a sentence a person can act on.
        step: the global step of the reading.
        rule: the name of the rule that fired.
        stat: the reading's name within its source: the key after ``<prefix>/<source>/`` (e.g. ``"total/dead_rel"``,
            ``"spike"``); listeners route on ``(source, stat)``, so a custom ``prefix`` does not change it.

    Example:
        >>> Alarm("kernels", "deadunits/kernels/total/dead_rel", 12.0, 10.0, "warning", "12 dead", 100, "dead")
        Alarm(source='kernels', key='deadunits/kernels/total/dead_rel', value=12.0, threshold=10.0, ...)
    """

    source: str
    key: str
    value: float
    threshold: float
    level: AlarmLevel
    message: str
    step: int
    rule: str = ""
    stat: str = ""

    @property
    def route(self) -> str:
        """``"<source>/<stat>"``, what listeners match (e.g. ``"loss/spike"``)."""
        return f"{self.source}/{self.stat}"

    def to_dict(self) -> dict[str, Any]:
        """Return the alarm as a plain, JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Alarm":
        """Rebuild an alarm from :meth:`to_dict`'s output."""
        return cls(**{name: value for name, value in data.items() if name in cls.__dataclass_fields__})
