"""The validated constructor arguments of :class:`~lightning_deadunits.DeadUnitRecycler`."""

from collections.abc import Sequence
from dataclasses import dataclass

from lightning_deadunits._validation import check_bool, check_float, check_int, check_strings, set_validated

__all__ = ["RecyclerSettings"]


@dataclass(frozen=True)
class RecyclerSettings:
    """The recycler's arguments, checked (see ``DeadUnitRecycler`` for their meaning); string lists become tuples.

    Raises:
        ValueError: on an out-of-range number.
        TypeError: on a wrongly typed argument.

    Example:
        >>> RecyclerSettings(100, 0.1, (), ["fc*"], (), True, 0).include
        ('fc*',)
    """

    every_n_steps: int
    max_fraction: float
    sources: Sequence[str]
    include: Sequence[str]
    exclude: Sequence[str]
    require_consumer: bool
    seed: int

    def __post_init__(self) -> None:
        set_validated(
            self,
            every_n_steps=check_int("every_n_steps", self.every_n_steps, minimum=1),
            max_fraction=check_float("max_fraction", self.max_fraction, 0.0, 1.0, min_inclusive=False),
            sources=check_strings("sources", self.sources),
            include=check_strings("include", self.include),
            exclude=check_strings("exclude", self.exclude),
            require_consumer=check_bool("require_consumer", self.require_consumer),
            seed=check_int("seed", self.seed, minimum=0),
        )
