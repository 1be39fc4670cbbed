"""When to measure: schedules are functions ``step -> bool`` (as in Cockpit), and a gate that fires once per step.

The built-in schedules are small picklable objects (``ddp_spawn`` pickles callbacks), but any function will do.

A probe or monitor takes a :data:`Schedule` instead of inlining ``step % n``; :class:`StepGate` adds the guard every
cadence needs: a step is acted on once, however many hooks see it (gradient accumulation, train end after a check).
"""

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lightning_deadunits._validation import check_int

__all__ = ["Schedule", "StepGate", "at_steps", "every_n_steps"]

Schedule = Callable[[int], bool]
"""A function from the global step to whether something happens at it."""


def every_n_steps(n: int, offset: int = 0) -> Schedule:
    """Steps ``offset``, ``offset + n``, ``offset + 2n``, ...

    Raises:
        ValueError: if ``n < 1`` or ``offset < 0``.

    Example:
        >>> [step for step in range(10) if every_n_steps(4)(step)]
        [0, 4, 8]
    """
    return _EveryNSteps(check_int("n", n, minimum=1), check_int("offset", offset, minimum=0))


@dataclass(frozen=True)
class _EveryNSteps:
    n: int
    offset: int

    def __call__(self, step: int) -> bool:
        return step >= self.offset and (step - self.offset) % self.n == 0


def at_steps(steps: Iterable[int]) -> Schedule:
    """Exactly the given steps.

    Example:
        >>> [step for step in range(10) if at_steps([3, 7])(step)]
        [3, 7]
    """
    chosen = frozenset(check_int("steps", step) for step in steps)
    return chosen.__contains__


class StepGate:
    """Opens once for each step its schedule selects: :meth:`due` is true the first time it is asked about such a step.

    Args:
        schedule: which steps are due.

    Example:
        >>> gate = StepGate(every_n_steps(2))
        >>> [gate.due(step) for step in (0, 0, 1, 2, 2)]
        [True, False, False, True, False]
    """

    def __init__(self, schedule: Schedule) -> None:
        self.schedule = schedule
        self.last_step: int | None = None

    def due(self, step: int) -> bool:
        """Whether ``step`` is scheduled and not yet seen; seeing it closes the gate for that step."""
        if step == self.last_step or not self.schedule(step):
            return False
        self.last_step = step
        return True

    def mark(self, step: int) -> None:
        """Record that ``step`` was acted on outside the schedule (e.g. at train end)."""
        self.last_step = step

    def state_dict(self) -> dict[str, Any]:
        """The last step acted on."""
        return {"last_step": self.last_step}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""
        self.last_step = state_dict.get("last_step")
