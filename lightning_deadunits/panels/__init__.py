"""How readings are shown: TensorBoard panels and the images in them."""

from lightning_deadunits.panels.layout import LayoutSpec, build_layout
from lightning_deadunits.panels.render import band_chart, bar_chart, heatmap_grid
from lightning_deadunits.panels.tensorboard import TensorBoardPanels
from lightning_deadunits.panels.writer import PanelWriter

__all__ = ["LayoutSpec", "PanelWriter", "TensorBoardPanels", "band_chart", "bar_chart", "build_layout", "heatmap_grid"]
