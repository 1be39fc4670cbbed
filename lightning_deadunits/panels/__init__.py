"""How readings are shown: TensorBoard panels and the figures in them (also drawn by ``deadunits report``)."""

from lightning_deadunits.panels.layout import LayoutSpec, build_layout
from lightning_deadunits.panels.render import band_chart, bar_chart, heatmap_grid, png_bytes, series_chart
from lightning_deadunits.panels.tensorboard import TensorBoardPanels
from lightning_deadunits.panels.writer import PanelWriter

__all__ = [
    "LayoutSpec",
    "PanelWriter",
    "TensorBoardPanels",
    "band_chart",
    "bar_chart",
    "build_layout",
    "heatmap_grid",
    "png_bytes",
    "series_chart",
]
