"""The batches a rewind took out of training, by data position, and their removal from the data stream."""

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl

from lightning_deadunits._compat import drop_next_train_batch

__all__ = ["SkippedBatches"]


class SkippedBatches:
    """Batch positions ``(epoch, batch_idx)`` never to train on, kept as ranges, saved in checkpoints.

    :meth:`drop_upcoming` takes the batches at the next positions out of the fit loop's data fetcher unused (they
    count as processed batches, so ``batch_idx`` keeps naming positions in the epoch's data). This works the same
    for map-style and iterable loaders, with or without a sampler, because it reads them through the iterator
    Lightning itself reads (each skipped batch is loaded, then dropped); it cannot drop past the end of an epoch.
    A run resumed from a checkpoint drops the saved positions when its ``batch_idx`` reaches them. Positions are
    Lightning's: after a mid-epoch resume a resumable (stateful) loader continues its data where it stopped, but a
    plain one restarts the epoch's data while ``batch_idx`` continues (Lightning warns about it), so the data of
    skipped positions can come back; checkpoint at epoch ends or use a resumable loader.

    Example:
        >>> skipped = SkippedBatches()
        >>> skipped.add(0, 5, 9)
        >>> skipped.contains(0, 7), skipped.count
        (True, 5)
    """

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int, int]] = []

    @property
    def count(self) -> int:
        """How many positions are skipped."""
        return sum(last - first + 1 for _, first, last in self.ranges)

    def add(self, epoch: int, first: int, last: int) -> None:
        """Skip the positions ``first`` to ``last`` (both included) of ``epoch``; an empty range adds nothing."""
        if last >= first:
            self.ranges.append((epoch, first, last))

    def contains(self, epoch: int, batch_idx: int) -> bool:
        """Whether position ``batch_idx`` of ``epoch`` is skipped."""
        return any(e == epoch and first <= batch_idx <= last for e, first, last in self.ranges)

    def undo_since(
        self, trainer: "pl.Trainer", snapshot: tuple[int, int], epoch: int, batch_idx: int, more: int
    ) -> range:
        """Skip the batches of ``epoch`` trained since a snapshot, up to ``batch_idx``, and the ``more`` after it.

        Args:
            trainer: the trainer, whose coming batches are dropped at once (within the epoch).
            snapshot: the data position ``(epoch, batch_idx)`` of the snapshot restored; from an earlier epoch,
                this epoch's batches are skipped from its first.
            epoch: the epoch trained in before the rewind.
            batch_idx: the last batch trained before the rewind.
            more: batches after ``batch_idx`` to skip too.

        Returns:
            The positions skipped in ``epoch``: those undone and those dropped now.
        """
        first = snapshot[1] + 1 if snapshot[0] == epoch else 0
        self.add(epoch, first, batch_idx + more)
        return range(first, batch_idx + 1 + len(self.drop_upcoming(trainer)))

    def drop_upcoming(self, trainer: "pl.Trainer") -> list[int]:
        """Drop the coming batches while their positions are skipped; their positions."""
        dropped: list[int] = []
        epoch_loop = trainer.fit_loop.epoch_loop
        while self.contains(trainer.current_epoch, epoch_loop.batch_idx + 1) and drop_next_train_batch(trainer):
            dropped.append(epoch_loop.batch_idx)
        return dropped

    def state_dict(self) -> dict[str, Any]:
        """The ranges."""
        return {"ranges": [list(span) for span in self.ranges]}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; missing keys keep their defaults."""
        self.ranges = [(int(e), int(first), int(last)) for e, first, last in state_dict.get("ranges", [])]
