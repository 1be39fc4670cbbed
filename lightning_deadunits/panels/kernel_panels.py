"""The kernel-norm monitor's panels: its layout, per-layer norm histograms, the dead-per-layer chart and heat maps."""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import lightning.pytorch as pl
import numpy as np
from torch import Tensor, nn

from lightning_deadunits.functional.kernels import filter_heatmaps
from lightning_deadunits.panels.layout import LayoutSpec
from lightning_deadunits.panels.render import bar_chart, heatmap_grid
from lightning_deadunits.panels.writer import PanelWriter

__all__ = ["KERNEL_LAYOUT", "KernelPanels"]

KERNEL_LAYOUT = LayoutSpec(
    totals={
        "dead filters (all rules)": "dead",
        "dead filters by rule": "dead_(abs|rel|bn)",
        "new dead and revived per check": "(newly_dead|revived)",
    },
    per_layer={
        "{group}: dead filters": "dead",
        "{group}: dead fraction": "dead_frac",
        "{group}: median filter L1": "norm_median",
    },
    group_category="{group} layers",
)
"""Totals, then one category per layer kind (conv, depthwise, linear...)."""

_MAX_HEATMAP_FILTERS = 256


@dataclass
class KernelPanels:
    """Draws one check's panels (TensorBoard only: nothing is computed when no writer shows panels).

    Args:
        key: builds the logged key from its parts (the monitor's ``key``).
        log_histograms: per-layer histograms of filter L1 norms (``<layer>/l1``).
        log_images: the dead-per-layer bar chart (depthwise layers highlighted) and heat maps.
        heatmap_layers: how many layers (most dead first) get ``|w|`` heat maps.

    Example:
        >>> panels = KernelPanels(lambda *parts: "/".join(("deadunits/kernels", *parts)), True, True, 3)
    """

    key: Callable[..., str]
    log_histograms: bool
    log_images: bool
    heatmap_layers: int

    def write(
        self,
        writer: PanelWriter,
        trainer: "pl.Trainer",
        layers: Sequence[tuple[str, str, Tensor]],
        dead: Sequence[float],
        modules: Mapping[str, nn.Module],
        step: int,
    ) -> None:
        """Draw ``layers`` (``(name, kind, per-filter L1)``) with their ``dead`` counts at ``step``."""
        if not writer.active(trainer):
            return
        if self.log_histograms:
            for name, _, l1 in layers:
                writer.histogram(trainer, self.key(name, "l1"), l1, step)
        if not self.log_images:
            return
        counts = np.array(dead)
        depthwise = np.array([kind == "depthwise" for _, kind, _ in layers])
        writer.image(trainer, self.key("dead_per_layer"), bar_chart(counts, highlight=depthwise), step)
        for index in sorted(range(len(layers)), key=lambda i: -counts[i])[: self.heatmap_layers]:
            name = layers[index][0]
            maps = filter_heatmaps(modules[name]) if name in modules else None
            if maps is not None:
                tiles = list(maps[:_MAX_HEATMAP_FILTERS].numpy())
                writer.image(trainer, self.key("heatmap", name), heatmap_grid(tiles), step)
