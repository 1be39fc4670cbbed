"""The validated constructor arguments of :class:`~lightning_deadunits.Rewind`."""

from collections.abc import Sequence
from dataclasses import dataclass

from lightning_deadunits._validation import check_bool, check_int, check_strings, set_validated

__all__ = ["RewindSettings"]


@dataclass(frozen=True)
class RewindSettings:
    """Rewind's arguments, checked (see ``Rewind`` for their meaning); ``on`` becomes a tuple of globs.

    Raises:
        ValueError: on an out-of-range number.
        TypeError: if ``on`` is not a string or a list of strings, or ``rewarm`` not a bool.

    Example:
        >>> RewindSettings(50, 3, 200, "loss/spike", 3, 1000, True, 2**30).on
        ('loss/spike',)
    """

    snapshot_every: int
    keep: int
    skip_batches: int
    on: str | Sequence[str]
    max_rewinds: int
    window: int
    rewarm: bool
    max_bytes: int

    def __post_init__(self) -> None:
        set_validated(
            self,
            snapshot_every=check_int("snapshot_every", self.snapshot_every, minimum=1),
            keep=check_int("keep", self.keep, minimum=1),
            skip_batches=check_int("skip_batches", self.skip_batches, minimum=0),
            on=check_strings("on", self.on),
            max_rewinds=check_int("max_rewinds", self.max_rewinds, minimum=0),
            window=check_int("window", self.window, minimum=1),
            rewarm=check_bool("rewarm", self.rewarm),
            max_bytes=check_int("max_bytes", self.max_bytes, minimum=1),
        )
