"""Spike episodes: flagged batches no more than ``gap`` steps apart are one episode (a spike and its aftershocks)."""

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["SpikeEpisodes"]


class SpikeEpisodes:
    """Groups flagged batches into episodes with ``start_step``, ``peak_step``, ``end_step``, ``length``,
    ``peak_loss``, ``peak_score``, ``signal`` and the peak's per-layer gradient attribution ``layers``.

    An episode starts at a flagged batch more than ``gap`` steps after the last flagged one, grows with each
    flagged batch within ``gap`` steps of its last, and ends at the first batch more than ``gap`` steps after it.

    Args:
        gap: the most steps between two flagged batches of one episode (>= 0).

    Example:
        >>> episodes = SpikeEpisodes(gap=2)
        >>> episodes.update(10, True, 9.0, 50.0, "loss", [])[1]
        True
        >>> episodes.update(11, True, 12.0, 70.0, "loss", [])[0]["length"]
        2
        >>> episodes.update(14, False, 1.0, 0.0, "", [])[2]["peak_step"]
        11
    """  # noqa: D205

    def __init__(self, gap: int = 5) -> None:
        self.gap = gap
        self.current: dict[str, Any] | None = None
        self.count = 0

    def update(
        self, step: int, flagged: bool, loss: float, score: float, signal: str, layers: list[dict[str, Any]]
    ) -> tuple[dict[str, Any] | None, bool, dict[str, Any] | None]:
        """Add one batch; return ``(the open episode or None, whether this batch started it, an ended episode)``."""
        ended = None
        if self.current is not None and step - self.current["end_step"] > self.gap:
            ended, self.current = self.current, None
        if not flagged:
            return self.current, False, ended
        score = math.inf if math.isnan(score) else score
        started = self.current is None
        if self.current is None:
            self.count += 1
            self.current = {"start_step": step, "length": 0, "peak_score": -math.inf, "signals": []}
        episode = self.current
        episode["end_step"] = step
        episode["length"] += 1
        episode["signals"] = sorted({*episode["signals"], *signal.split("+")})
        episode["signal"] = "+".join(episode["signals"])
        if score > episode["peak_score"]:
            episode.update(peak_step=step, peak_loss=loss, peak_score=score, layers=layers)
        return episode, started, ended

    def finish(self) -> dict[str, Any] | None:
        """End the open episode (training ended) and return it, or ``None``."""
        ended, self.current = self.current, None
        return ended

    def state_dict(self) -> dict[str, Any]:
        """The open episode and the episode count."""
        return {"current": None if self.current is None else dict(self.current), "count": self.count}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; missing keys keep their defaults."""
        current = state_dict.get("current")
        self.current = None if current is None else dict(current)
        self.count = int(state_dict.get("count", 0))
