"""Per-filter death history: the step each filter became dead, and how many came back."""

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

__all__ = ["KernelDeathTracker"]

ALIVE = -1


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
