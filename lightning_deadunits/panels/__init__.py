"""How readings are shown: TensorBoard panels and the images in them."""

from lightning_deadunits.panels.render import band_chart, bar_chart, heatmap_grid
from lightning_deadunits.panels.tensorboard import TensorBoardPanels

__all__ = ["TensorBoardPanels", "band_chart", "bar_chart", "heatmap_grid"]
