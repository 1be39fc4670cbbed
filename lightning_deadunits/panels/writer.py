"""The seam between monitors and what shows their readings: any object with these methods is a panel writer."""

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

import lightning.pytorch as pl
import numpy as np
import torch

__all__ = ["PanelWriter"]


@runtime_checkable
class PanelWriter(Protocol):
    """Where a monitor's readings go: scalars to every logger, panels to whatever can show them.

    :class:`~lightning_deadunits.panels.tensorboard.TensorBoardPanels` is the implementation every monitor uses
    by default; a monitor's ``panels`` attribute may be replaced by another (e.g. one writing to another
    dashboard). Methods other than :meth:`scalars` may do nothing where panels cannot be shown; :meth:`active`
    tells a monitor whether drawing is worth it.
    """

    def active(self, trainer: "pl.Trainer") -> bool:
        """Whether panels (histograms, images, text, layouts) are shown at all on this rank."""

    def scalars(self, trainer: "pl.Trainer", metrics: Mapping[str, float], step: int) -> None:
        """Log ``metrics`` at ``step`` through every logger."""

    def layout(self, trainer: "pl.Trainer", categories: Mapping[str, Mapping[str, list[str]]]) -> None:
        """Add (or replace) chart categories: ``{category: {chart title: [tag regex, ...]}}``."""

    def histogram(self, trainer: "pl.Trainer", tag: str, values: torch.Tensor, step: int) -> None:
        """Add a histogram of ``values``."""

    def image(self, trainer: "pl.Trainer", tag: str, image: np.ndarray, step: int) -> None:
        """Add an ``(H, W, 3)`` uint8 image."""

    def text(self, trainer: "pl.Trainer", tag: str, text: str, step: int, replace: bool = False) -> None:
        """Add a Markdown text entry (``replace``: it replaces what the tag holds at ``step``)."""

    def flush(self, trainer: "pl.Trainer") -> None:
        """Make everything written so far visible to readers."""
