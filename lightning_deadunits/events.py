"""Structured events: what happened in a run (spikes, alarms, stops, actions), as JSON lines, never parsed from display.

Each rank that has something to say appends one JSON object per line to ``<log_dir>/deadunits/events.jsonl``
(rank 0) or ``<log_dir>/deadunits/events-rank<r>.jsonl`` (other ranks, only for what rank 0 cannot know, such as
the dump written by the rank whose loss spiked). Every record has ``"schema"`` (this module's
:data:`EVENTS_SCHEMA`), ``"type"``, ``"prefix"``, ``"source"`` and ``"step"``; the rest depends on the type:

==================  ===========================================================================================
``"spike"``         a loss-spike event: ``epoch``, ``batch_idx``, ``rank``, ``loss``, ``baseline``, ``spread``,
                    ``ratio``, ``spike_score``, ``threshold``, ``reason``, ``local``, ``skipped_update``, ``dump``
``"spike_deaths"``  units that died around the spike at ``step``: ``dead_after_spike`` (``{monitor: {"unit",
                    "before_step", "after_step", "died": {layer: count}}}``); a later record for the same spike
                    adds to the earlier ones
``"alarm"``         an :class:`~lightning_deadunits.Alarm` (its fields)
``"stop"``          training stopped by an alarm: ``reason``
``"action"``        an action taken: ``action`` (e.g. ``"rewarm"``, ``"skip_update"``, ``"recycle"``) and details
==================  ===========================================================================================

Non-finite floats are written as ``NaN``/``Infinity`` (Python's :mod:`json` reads them back). A file cut short by a
crash loses at most its last line: :func:`read_events` skips a line that does not parse.
"""

import json
import logging
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from lightning_deadunits.errors import DeadUnitsWarning

__all__ = ["EVENTS_SCHEMA", "EventLog", "events_file", "read_events"]

log = logging.getLogger("lightning_deadunits")

EVENTS_SCHEMA = 1
_DIRECTORY = "deadunits"


def events_file(log_dir: str | Path, rank: int = 0) -> Path:
    """The events file of ``rank`` in a run's log directory."""
    name = "events.jsonl" if rank == 0 else f"events-rank{rank}.jsonl"
    return Path(log_dir, _DIRECTORY, name)


class EventLog:
    """Appends event records to one JSON-lines file; a failed write warns once and training goes on.

    Args:
        path: the file (its directory is created on the first write); ``None`` until the trainer's log
            directory is known (records written before that are dropped).

    Example:
        >>> import tempfile
        >>> events = EventLog(Path(tempfile.mkdtemp(), "events.jsonl"))
        >>> events.write({"type": "stop", "prefix": "deadunits", "source": "loss", "step": 3, "reason": "spike"})
        >>> read_events(events.path)[0]["reason"]
        'spike'
    """

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = None if path is None else Path(path)
        self._warned = False

    def write(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` (with ``"schema"`` added) as one line; values JSON cannot hold are written as text."""
        if self.path is None:
            return
        line = json.dumps({"schema": EVENTS_SCHEMA, **record}, default=str)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as file:
                file.write(line + "\n")
        except OSError as error:
            if not self._warned:
                self._warned = True
                warnings.warn(
                    f"deadunits could not write its events to {self.path} ({error}); training goes on, and events "
                    "are still kept in the callbacks' state (this warning is not repeated).",
                    DeadUnitsWarning,
                    stacklevel=2,
                )


def read_events(path: str | Path) -> list[dict[str, Any]]:
    """The records of one events file, in order; a line that does not parse (a write cut short) is skipped.

    Raises:
        OSError: if the file cannot be read.
    """
    return list(_records(Path(path).read_text(encoding="utf-8").splitlines()))


def _records(lines: list[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            log.debug("deadunits: skipping an events line that does not parse: %r", line[:200])
            continue
        if isinstance(record, dict):
            yield record
