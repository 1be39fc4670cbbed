"""The one in-memory logger of the tests: keeps what ``log_metrics`` receives, in order."""

from typing import Any

from lightning.pytorch.loggers import Logger
from typing_extensions import override


class MemoryLogger(Logger):
    """A logger Lightning knows nothing special about.

    ``records`` holds every ``(step, key, value)`` in order (NaN kept as the string ``"nan"`` so records compare);
    ``metrics`` is ``{key: {step: value}}`` (the last float logged at a step, NaN as NaN); ``keep=False`` keeps
    nothing, so logging code paths run without the logger itself growing.
    """

    def __init__(self, keep: bool = True) -> None:
        super().__init__()
        self.keep = keep
        self.records: list[tuple[int, str, float | str]] = []

    @property
    def metrics(self) -> dict[str, dict[int, float]]:
        series: dict[str, dict[int, float]] = {}
        for step, key, value in self.records:
            series.setdefault(key, {})[step] = float(value)
        return series

    def series(self, key: str) -> dict[int, float]:
        """``{step: value}`` of one key."""
        return self.metrics.get(key, {})

    @property
    @override
    def name(self) -> str:
        return "memory"

    @property
    @override
    def version(self) -> int:
        return 0

    @override
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.keep:
            for key, value in sorted(metrics.items()):
                self.records.append((int(step or 0), key, "nan" if value != value else float(value)))

    @override
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass
