"""Which units died around each loss spike: the dead counts of every monitor before and after it."""

from collections.abc import Mapping
from typing import Any

from lightning_deadunits.readings import Reading

__all__ = ["SpikeDeathLedger"]


class SpikeDeathLedger:
    """Relates spikes to the dead counts that monitors push (kernels, activations...).

    It keeps the latest pushed reading of each monitor (``"<prefix>/<source>"``). A spike opened with the counts
    known as its batch started (:meth:`snapshot`) is resolved, per monitor, by that monitor's first reading with a
    later step, whether it arrived before the spike was judged or after: the order of the callbacks does not matter.

    Example:
        >>> ledger = SpikeDeathLedger()
        >>> ledger.hear(Reading("deadunits", "kernels", 0, {}, {"conv": 1.0}, unit="kernels"))
        >>> pending = ledger.snapshot()
        >>> ledger.hear(Reading("deadunits", "kernels", 10, {}, {"conv": 4.0}, unit="kernels"))
        >>> ledger.resolve(step=5, pending=pending)
        {'deadunits/kernels': {'unit': 'kernels', 'before_step': 0, 'after_step': 10, 'died': {'conv': 3.0}}}
    """

    def __init__(self) -> None:
        self.latest: dict[str, Reading] = {}

    def hear(self, reading: Reading) -> None:
        """Keep ``reading`` if it counts dead things."""
        if reading.dead_counts or reading.dead_masks:
            self.latest[reading.origin] = reading

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """``{monitor: {"step", "counts", "unit"}}``: the counts known now, to compare later ones with."""
        return {
            origin: {"step": reading.step, "counts": dict(reading.dead_counts), "unit": reading.unit}
            for origin, reading in self.latest.items()
        }

    def resolve(self, step: int, pending: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """Resolve (and remove from ``pending``) every monitor that has read after ``step``.

        Returns:
            ``{monitor: {"unit", "before_step", "after_step", "died": {layer: count}}}`` for the resolved ones.
        """
        resolved = {}
        for origin, before in list(pending.items()):
            after = self.latest.get(origin)
            if after is None or after.step <= step:
                continue
            del pending[origin]
            counts: Mapping[str, float] = before["counts"]
            resolved[origin] = {
                "unit": after.unit,
                "before_step": before["step"],
                "after_step": after.step,
                "died": {
                    layer: count - counts.get(layer, 0.0)
                    for layer, count in after.dead_counts.items()
                    if count > counts.get(layer, 0.0)
                },
            }
        return resolved
