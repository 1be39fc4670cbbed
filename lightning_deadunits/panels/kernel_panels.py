"""The kernel-norm monitor's panels: its layout, per-layer norm histograms, the dead-per-layer chart and heat maps."""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

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


class _Layer(Protocol):
    """What the panels need of a layer's reading (a ``probes.LayerKernels``)."""

    name: str
    kind: str
    l1: Tensor

    @property
    def dead(self) -> Tensor: ...


@dataclass
class KernelPanels:
    """Draws one check's panels (TensorBoard only: nothing is computed when no writer shows panels).

    Args:
        key: builds the logged key from its parts (the monitor's ``key``).
        title: the figures' title (the monitor's ``<prefix>/<source>``).
        rules: ``{stat: legend label}`` of the dead-kernel rules, in the order drawn.
        log_histograms: per-layer histograms of filter L1 norms (``<layer>/l1``).
        log_images: the dead-per-layer bar chart (depthwise layers marked) and heat maps.
        heatmap_layers: how many layers (most dead first) get ``|w|`` heat maps.

    Example:
        >>> panels = KernelPanels(lambda *p: "/".join(p), "deadunits/kernels", {"dead_abs": "abs"}, True, True, 3)
    """

    key: Callable[..., str]
    title: str
    rules: Mapping[str, str]
    log_histograms: bool
    log_images: bool
    heatmap_layers: int

    def write(
        self,
        writer: PanelWriter,
        trainer: "pl.Trainer",
        modules: Mapping[str, nn.Module],
        layers: Sequence[_Layer],
        counts: Sequence[Mapping[str, float]],
        step: int,
        images: bool = True,
    ) -> None:
        """Draw ``layers`` with their per-rule ``counts`` at ``step`` (images only when ``images``)."""
        if not writer.active(trainer):
            return
        if self.log_histograms:
            for layer in layers:
                writer.histogram(trainer, self.key(layer.name, "l1"), layer.l1, step)
        if images:
            self.write_images(writer, trainer, modules, layers, counts, step)

    def write_images(
        self,
        writer: PanelWriter,
        trainer: "pl.Trainer",
        modules: Mapping[str, nn.Module],
        layers: Sequence[_Layer],
        counts: Sequence[Mapping[str, float]],
        step: int,
    ) -> None:
        """Draw the bar chart and heat maps of ``layers`` with their per-rule ``counts`` at ``step``."""
        if not (self.log_images and writer.active(trainer)):
            return
        dead = np.array([layer_counts["dead"] for layer_counts in counts])
        chart = bar_chart(
            [layer.name for layer in layers],
            {label: [layer_counts.get(stat, 0.0) for layer_counts in counts] for stat, label in self.rules.items()},
            total=("any rule", dead),
            marked=[layer.kind == "depthwise" for layer in layers],
            marked_label="depthwise layer",
            title=f"{self.title}: dead filters per layer",
            value_label="dead filters (count)",
            step=step,
        )
        writer.image(trainer, self.key("dead_per_layer"), chart, step)
        for index in sorted(range(len(layers)), key=lambda i: -dead[i])[: self.heatmap_layers]:
            layer = layers[index]
            maps = filter_heatmaps(modules[layer.name]) if layer.name in modules else None
            if maps is not None:
                tiles = list(maps[:_MAX_HEATMAP_FILTERS].numpy())
                marks = layer.dead[:_MAX_HEATMAP_FILTERS].tolist()
                image = heatmap_grid(tiles, layer=layer.name, step=step, dead=marks)
                writer.image(trainer, self.key("heatmap", layer.name), image, step)
