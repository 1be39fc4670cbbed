"""The activation monitor's panels: its layout, per-channel zero-fraction histograms and min/max band charts."""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
from torch import Tensor

from lightning_deadunits.metrics.activation_stats import SiteSummary
from lightning_deadunits.panels.layout import LayoutSpec
from lightning_deadunits.panels.render import band_chart
from lightning_deadunits.panels.writer import PanelWriter

__all__ = ["ACTIVATION_LAYOUT", "ActivationPanels"]

ShowLayout = Callable[["pl.Trainer", LayoutSpec, Mapping[str, Sequence[str]], tuple[str, ...]], None]
"""Registers a custom-scalars layout: the monitor's ``show_layout``."""

ACTIVATION_LAYOUT = LayoutSpec(
    totals={"zero fraction (all layers)": "zero_frac", "dead and dormant channels": "(dead|dormant)"},
    per_layer={
        "zero fraction per layer": "zero_frac",
        "dead channels per layer": "dead",
        "dormant channels per layer": "dormant",
        "max |x| per layer": "max_abs",
        "std per layer": "std",
    },
)


class ActivationPanels:
    """Keeps each site's per-channel min/max over the last ``band_history`` logs and draws the panels and layout.

    Args:
        key: builds the logged key from its parts (the monitor's ``key``).
        log_histograms: per-channel zero-fraction histograms (``<site>/channel_zero_frac``).
        log_images: per-channel band charts of the training logs (``<site>/channel_range``).
        band_history: logs kept for the band chart.
        band_layers: how many sites get a band chart at an image log: those with the most dead channels, then the
            highest zero fraction (each chart takes tens of milliseconds to draw).
        show_layout: registers :data:`ACTIVATION_LAYOUT` for the sites written (the monitor's ``show_layout``;
            ``None``: no layout).

    Example:
        >>> panels = ActivationPanels(lambda *parts: "/".join(parts), True, True, 100, band_layers=4)
    """

    def __init__(
        self,
        key: Callable[..., str],
        log_histograms: bool,
        log_images: bool,
        band_history: int,
        band_layers: int = 4,
        show_layout: ShowLayout | None = None,
    ) -> None:
        self.key = key
        self.show_layout = show_layout
        self.band_layers = band_layers
        self.log_histograms = log_histograms
        self.log_images = log_images
        self.band_history = band_history
        self.channel_ranges: dict[str, list[tuple[int, Tensor, Tensor]]] = {}
        self.worst: list[str] = []

    def remember(self, summaries: Mapping[str, SiteSummary], step: int) -> None:
        """Keep each site's per-channel range of a training log (host tensors), and which sites are the worst."""
        for name, summary in summaries.items():
            ranges = self.channel_ranges.setdefault(name, [])
            ranges.append((step, summary.min.float(), summary.max.float()))
            del ranges[: -self.band_history]
        self.worst = sorted(summaries, key=lambda site: _worst_first(summaries[site]))[: self.band_layers]

    def write(
        self,
        writer: PanelWriter,
        trainer: "pl.Trainer",
        summaries: Mapping[str, SiteSummary],
        step: int,
        scope: tuple[str, ...] = (),
        images: bool = True,
    ) -> None:
        """Show the layout of ``summaries``' sites, draw their histograms and, for training logs (no ``scope``)
        when ``images``, the band charts.
        """  # noqa: D205
        if summaries and self.show_layout is not None:
            self.show_layout(trainer, ACTIVATION_LAYOUT, {"": list(summaries)}, scope)
        if not writer.active(trainer):
            return
        if self.log_histograms:
            for name, summary in summaries.items():
                if summary.channel_zero_frac is not None:
                    tag = self.key(*scope, name, "channel_zero_frac")
                    writer.histogram(trainer, tag, summary.channel_zero_frac, step)
        if images and not scope:
            self.draw_bands(writer, trainer, step)

    def draw_bands(self, writer: PanelWriter, trainer: "pl.Trainer", step: int) -> None:
        """Draw the band charts of the ``band_layers`` worst sites of the latest training log kept, at ``step``."""
        if not (self.log_images and writer.active(trainer)):
            return
        for name in self.worst or list(self.channel_ranges)[: self.band_layers]:
            ranges = self.channel_ranges.get(name, [])
            if ranges and len({low.numel() for _, low, _ in ranges}) == 1:
                lows = np.stack([low.numpy() for _, low, _ in ranges])
                highs = np.stack([high.numpy() for _, _, high in ranges])
                steps = [at for at, _, _ in ranges]
                image = band_chart(lows, highs, steps=steps, layer=name, step=step)
                writer.image(trainer, self.key(name, "channel_range"), image, step)

    def state_dict(self) -> dict[str, Any]:
        """The ranges kept for the band charts."""
        return {"channel_ranges": {name: list(ranges) for name, ranges in self.channel_ranges.items()}}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""
        self.channel_ranges = {name: list(ranges) for name, ranges in state_dict.get("channel_ranges", {}).items()}


def _worst_first(summary: SiteSummary) -> tuple[float, float]:
    """Sort key: most dead channels, then highest zero fraction (sites without zero counting last)."""
    dead = 0.0 if summary.dead is None else float(summary.dead.sum())
    zero = summary.channel_zero_frac
    return -dead, -(float(zero.mean()) if zero is not None and zero.numel() else 0.0)
