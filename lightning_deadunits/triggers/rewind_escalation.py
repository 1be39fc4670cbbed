"""When a spike calls for a rewind: a one-batch spike is left to the update skip, an episode or a repeat rewinds."""

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

from lightning_deadunits._validation import check_int
from lightning_deadunits.triggers.alarm import Alarm

__all__ = ["RewindEscalation"]

Decision = Literal["rewind", "give_up"]


@dataclass(frozen=True)
class Episode:
    """Where a spike episode started: the alarm's source and step, the batch count and the data position."""

    source: str
    step: int
    batch: int
    epoch: int
    batch_idx: int
    reason: str = "spike"


class RewindEscalation:
    """Hears alarms and episode lengths on a monotonic batch clock, and says when to rewind or give up.

    - A first matching alarm (no other within ``window`` batches) opens an episode and asks for nothing: the
      monitor's update skip handles a one-batch spike.
    - A reading of the same source with ``<prefix>/<source>/episode_length >= 2`` (the episode goes on), or a second
      matching alarm within ``window`` batches (a repeated spike), asks for a rewind to before the episode start.
    - A rewind asked for when ``max_rewinds`` rewinds already happened in the last ``window`` batches gives up.

    The clock counts training batches, never going back when a rewind sets ``global_step`` back. Every rank hears
    the same alarms and readings, so every rank decides the same.

    Args:
        on: globs over ``alarm.route`` (``"<source>/<stat>"``) that open or repeat an episode.
        max_rewinds: rewinds allowed within ``window`` batches.
        window: batches within which a second alarm is a repeat and rewinds are counted.

    Example:
        >>> escalation = RewindEscalation(("loss/spike",), max_rewinds=2, window=100)
    """

    def __init__(self, on: Sequence[str], max_rewinds: int, window: int) -> None:
        self.on = tuple(on)
        self.max_rewinds = check_int("max_rewinds", max_rewinds, minimum=0)
        self.window = check_int("window", window, minimum=1)
        self.episode: Episode | None = None
        self.alarm_batches: list[int] = []
        self.rewind_batches: list[int] = []
        self.pending: Episode | None = None

    def matches(self, alarm: Alarm) -> bool:
        """Whether ``alarm``'s route matches ``on``."""
        return any(fnmatch.fnmatchcase(alarm.route, pattern) for pattern in self.on)

    def hear_alarm(self, alarm: Alarm, batch: int, epoch: int, batch_idx: int) -> None:
        """A matching alarm at batch ``batch`` (data position ``epoch``, ``batch_idx``)."""
        self.alarm_batches = [seen for seen in self.alarm_batches if batch - seen < self.window]
        if self.alarm_batches and self.episode is not None:
            self.pending = Episode(**{**asdict(self.episode), "reason": "repeated spike"})
        else:
            self.episode = Episode(alarm.source, alarm.step, batch, epoch, batch_idx)
        self.alarm_batches.append(batch)

    def hear_reading(self, source: str, scalars: Mapping[str, float], episode_key: str) -> None:
        """A reading of ``source``: an ``episode_key`` of 2 or more continues the open episode of that source."""
        if self.episode is not None and self.episode.source == source and scalars.get(episode_key, 0.0) >= 2:
            self.pending = Episode(**{**asdict(self.episode), "reason": "spike episode"})

    def decide(self, batch: int) -> tuple[Decision, Episode] | None:
        """What to do at the end of batch ``batch`` about what was heard; clears the request."""
        episode, self.pending = self.pending, None
        if episode is None:
            return None
        self.episode, self.alarm_batches = None, []  # after a rewind or a stop, the next spike is a first one
        self.rewind_batches = [seen for seen in self.rewind_batches if batch - seen < self.window]
        if len(self.rewind_batches) >= self.max_rewinds:
            return "give_up", episode
        self.rewind_batches.append(batch)
        return "rewind", episode

    def state_dict(self) -> dict[str, Any]:
        """The open episode and the recent alarms and rewinds."""
        return {
            "episode": None if self.episode is None else asdict(self.episode),
            "alarm_batches": list(self.alarm_batches),
            "rewind_batches": list(self.rewind_batches),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; missing keys keep their defaults."""
        episode = state_dict.get("episode")
        self.episode = None if episode is None else Episode(**episode)
        self.alarm_batches = [int(batch) for batch in state_dict.get("alarm_batches", [])]
        self.rewind_batches = [int(batch) for batch in state_dict.get("rewind_batches", [])]
