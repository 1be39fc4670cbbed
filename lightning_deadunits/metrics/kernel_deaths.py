"""Per-filter death history: the step each filter became dead, and how many came back."""

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

__all__ = ["KERNEL_TOTALS", "KernelDeathTracker"]

ALIVE = -1

KERNEL_TOTALS = ("filters", "dead_abs", "dead_rel", "dead_bn", "dead", "newly_dead", "revived")
"""The per-layer counts that are summed into ``total/<stat>``."""


class _LayerReading(Protocol):
    """What :meth:`KernelDeathTracker.count` needs of a layer's reading (a ``probes.LayerKernels``)."""

    name: str
    kind: str
    l1: Tensor
    norm_median: Tensor
    dead_abs: Tensor
    dead_rel: Tensor
    dead_bn: Tensor | None

    @property
    def dead(self) -> Tensor: ...


class KernelDeathTracker:
    """Keeps, for every filter of every layer, the global step since which it has been dead (``-1``: alive),
    and per layer the running count of revivals. Tensors stay on the weights' device between checks.

    Example:
        >>> tracker = KernelDeathTracker()
        >>> new, revived = tracker.update("conv", torch.tensor([True, False]), step=10)
        >>> tracker.dead_since["conv"].tolist(), int(new), int(revived)
        ([10, -1], 1, 0)
    """  # noqa: D205

    def __init__(self) -> None:
        self.dead_since: dict[str, Tensor] = {}
        self.revived_total: dict[str, Tensor] = {}

    def update(self, name: str, dead: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """Record one check of layer ``name``; return ``(newly_dead, revived)`` counts as 0-d device tensors.

        A layer seen for the first time, or whose filter count changed, starts a fresh history.
        """
        since = self.dead_since.get(name)
        if since is None or since.shape != dead.shape:
            since = torch.full(dead.shape, ALIVE, dtype=torch.long, device=dead.device)
            self.revived_total[name] = torch.zeros((), dtype=torch.long, device=dead.device)
        since = since.to(dead.device)
        was_dead = since != ALIVE
        newly_dead = dead & ~was_dead
        revived = was_dead & ~dead
        self.dead_since[name] = torch.where(newly_dead, torch.full_like(since, step), since).masked_fill(revived, ALIVE)
        self.revived_total[name] = self.revived_total[name].to(dead.device) + revived.sum()
        return newly_dead.sum(), revived.sum()

    def state_dict(self) -> dict[str, Any]:
        """CPU copies of the history."""
        return {
            "dead_since": {name: t.cpu() for name, t in self.dead_since.items()},
            "revived_total": {name: t.cpu() for name, t in self.revived_total.items()},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; the next :meth:`update` moves it to the weights' device."""
        self.dead_since = {name: t.clone() for name, t in state_dict.get("dead_since", {}).items()}
        self.revived_total = {name: t.clone() for name, t in state_dict.get("revived_total", {}).items()}

    def count(self, layers: Sequence[_LayerReading], step: int) -> tuple[list[dict[str, float]], dict[str, float]]:
        """Record one check of every layer; return per-layer counts and their totals, in one device-to-host copy.

        Per layer: ``filters``, ``dead_abs``, ``dead_rel`` and ``norm_median`` (not for BatchNorm readings),
        ``dead_bn`` (layers with a paired BatchNorm), ``dead``, ``dead_frac``, ``newly_dead``, ``revived``. Totals:
        the sums of :data:`KERNEL_TOTALS` and ``dead_frac`` over every filter.
        """
        stats = []
        for layer in layers:
            newly_dead, revived = self.update(layer.name, layer.dead, step)
            dead_bn = layer.dead_bn.sum() if layer.dead_bn is not None else newly_dead.new_zeros(())
            row = (
                layer.dead_abs.sum(),
                layer.dead_rel.sum(),
                dead_bn,
                layer.dead.sum(),
                layer.norm_median,
                newly_dead,
                revived,
            )
            stats.append(torch.stack([value.float() for value in row]))
        if not stats:
            return [], {}
        host = torch.stack([row.to(stats[0].device) for row in stats]).cpu().tolist()
        counts = [_layer_counts(layer, values) for layer, values in zip(layers, host, strict=True)]
        totals = {stat: sum(layer.get(stat, 0.0) for layer in counts) for stat in KERNEL_TOTALS}
        totals["dead_frac"] = totals["dead"] / totals["filters"] if totals["filters"] else 0.0
        return counts, totals


def _layer_counts(layer: _LayerReading, values: list[float]) -> dict[str, float]:
    dead_abs, dead_rel, dead_bn, dead, norm_median, newly_dead, revived = values
    filters = float(layer.l1.numel())
    counts = {"filters": filters}
    if layer.kind != "batchnorm":
        counts.update(dead_abs=dead_abs, dead_rel=dead_rel, norm_median=norm_median)
    if layer.dead_bn is not None:
        counts["dead_bn"] = dead_bn
    counts.update(dead=dead, dead_frac=dead / filters if filters else 0.0, newly_dead=newly_dead, revived=revived)
    return counts
