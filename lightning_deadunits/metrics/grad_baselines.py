"""Per-layer gradient-norm baselines: which layers' gradients blew up at a spike, against their own recent norms."""

import statistics
from collections import deque
from collections.abc import Mapping
from typing import Any

__all__ = ["LayerGradBaselines"]


class LayerGradBaselines:
    """Keeps each layer's last ``window`` gradient norms and ranks the layers of a spike by norm over median.

    Args:
        window: recent norms kept per layer (>= 1).
        top: the most layers an attribution names.

    Example:
        >>> baselines = LayerGradBaselines(window=10)
        >>> for _ in range(5):
        ...     baselines.accept({"conv1": 1.0, "fc": 2.0})
        >>> baselines.attribute({"conv1": 40.0, "fc": 2.0})[0]
        {'layer': 'conv1', 'norm': 40.0, 'baseline': 1.0, 'ratio': 40.0}
    """

    def __init__(self, window: int = 100, top: int = 5) -> None:
        self.window = window
        self.top = top
        self.norms: dict[str, deque[float]] = {}

    def accept(self, norms: Mapping[str, float]) -> None:
        """Add one step's per-layer norms (a step not flagged as a spike)."""
        history = self.norms
        for layer, norm in norms.items():
            recent = history.get(layer)
            if recent is None:  # not `setdefault`, which would build a deque for every layer on every step
                recent = history[layer] = deque(maxlen=self.window)
            recent.append(norm)

    def attribute(self, norms: Mapping[str, float]) -> list[dict[str, Any]]:
        """The layers whose norm is furthest above their own median, most first (``ratio``: norm over median)."""
        rows: list[dict[str, Any]] = []
        for layer, norm in norms.items():
            history = self.norms.get(layer)
            if not history:
                continue
            median = float(statistics.median(history))
            ratio = norm / median if median > 0 else float("inf") if norm > 0 else 1.0
            rows.append({"layer": layer, "norm": norm, "baseline": median, "ratio": ratio})
        rows.sort(key=lambda row: -float(row["ratio"]))
        return rows[: self.top]

    def state_dict(self) -> dict[str, Any]:
        """Each layer's recent norms, as plain Python values."""
        return {"norms": {layer: list(history) for layer, history in self.norms.items()}}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; missing keys keep their defaults."""
        self.norms = {
            layer: deque(map(float, history), maxlen=self.window)
            for layer, history in state_dict.get("norms", {}).items()
        }
