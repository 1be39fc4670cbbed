"""Everything that touches TensorBoard. Scalars go to every logger; panels only to TensorBoard loggers."""

import weakref
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard import SummaryWriter

from lightning_deadunits._compat import logger_tags, tensorboard_file_writer
from lightning_deadunits.panels.render import png_bytes

__all__ = ["TensorBoardPanels"]

_LAYOUT_TAG_CHARTS = dict[str, list[Any]]
_HISTOGRAM_BINS = 30


class TensorBoardPanels:
    """The panel writer of every monitor: scalars to all of a trainer's loggers, panels to its TensorBoard loggers.

    It implements :class:`~lightning_deadunits.panels.writer.PanelWriter` and writes on rank zero only.

    With no TensorBoard logger the panel methods do nothing; with no logger at all nothing is written.
    Custom-scalars layouts from several monitors are merged per writer, so each monitor registers only its
    own categories; so are text entries written to one tag at one step (e.g. several alarms).

    Example:
        >>> panels = TensorBoardPanels()  # then panels.scalars(trainer, {"deadunits/x": 1.0}, step=0)
    """

    _layouts: "weakref.WeakKeyDictionary[Any, dict[str, _LAYOUT_TAG_CHARTS]]" = weakref.WeakKeyDictionary()
    _texts: "weakref.WeakKeyDictionary[Any, dict[str, tuple[int, list[str]]]]" = weakref.WeakKeyDictionary()

    @staticmethod
    def writers(trainer: "pl.Trainer") -> list[Any]:
        """The ``SummaryWriter`` of each TensorBoard logger, or an empty list off rank zero."""
        if trainer.global_rank != 0:
            return []
        return [logger.experiment for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]

    def active(self, trainer: "pl.Trainer") -> bool:
        """Whether a TensorBoard logger shows panels on this rank."""
        return bool(self.writers(trainer))

    @staticmethod
    def scalars(trainer: "pl.Trainer", metrics: Mapping[str, float], step: int) -> None:
        """Log ``metrics`` at ``step`` through every logger (loggers write on rank zero only).

        A TensorBoard logger gets them as one event holding every value, as its ``log_metrics`` would write them
        (same tags, prefix included): one event per scalar costs ~0.1 ms each in the writer thread's queue, which
        for the hundred-odd readings of one check is most of the check's cost.
        """
        if not metrics:
            return
        for logger in trainer.loggers:
            # Off rank zero `experiment` is a dummy, and `log_metrics` does nothing.
            if isinstance(logger, TensorBoardLogger) and isinstance(logger.experiment, SummaryWriter):
                values = [
                    Summary.Value(tag=tag, simple_value=float(value))
                    for tag, value in logger_tags(logger, metrics).items()
                ]
                tensorboard_file_writer(logger.experiment).add_summary(Summary(value=values), step)
            else:
                logger.log_metrics(dict(metrics), step=step)

    def layout(self, trainer: "pl.Trainer", categories: Mapping[str, Mapping[str, list[str]]]) -> None:
        """Add (or replace) custom-scalars categories: ``{category: {chart title: [tag regex, ...]}}``."""
        for writer in self.writers(trainer):
            merged = self._layouts.setdefault(writer, {})
            for category, charts in categories.items():
                merged[category] = {title: ["Multiline", list(tags)] for title, tags in charts.items()}
            writer.add_custom_scalars(merged)

    def histogram(self, trainer: "pl.Trainer", tag: str, values: torch.Tensor, step: int) -> None:
        """Add a histogram of the finite ``values`` (moved to CPU only when a TensorBoard logger exists).

        Thirty equal bins over their range, written raw: ``add_histogram``'s default of about 1500 exponential
        buckets costs four times as much (0.4 ms a histogram, a dozen per check), and TensorBoard shows 30 bins.
        """
        writers = self.writers(trainer)
        if not writers or values.numel() == 0:
            return
        data = values.detach().double().cpu().numpy().reshape(-1)
        data = data[np.isfinite(data)]
        if data.size == 0:
            return
        counts, edges = np.histogram(data, bins=_HISTOGRAM_BINS)
        for writer in writers:
            writer.add_histogram_raw(
                tag,
                min=float(data.min()),
                max=float(data.max()),
                num=int(data.size),
                sum=float(data.sum()),
                sum_squares=float(data @ data),
                # TensorBoard reads right bin edges only: an empty bin ending at the left edge keeps it.
                bucket_limits=edges.tolist(),
                bucket_counts=[0, *counts.tolist()],
                global_step=step,
            )

    def image(self, trainer: "pl.Trainer", tag: str, image: np.ndarray, step: int) -> None:
        """Add an ``(H, W, 3)`` uint8 image.

        It is encoded here (:func:`~lightning_deadunits.panels.render.png_bytes`), once for all writers:
        ``add_image`` converts the pixels to float and back and compresses harder, at twice the cost.
        """
        writers = self.writers(trainer)
        if not writers:
            return
        height, width, channels = image.shape
        encoded = Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=png_bytes(image))
        summary = Summary(value=[Summary.Value(tag=tag, image=encoded)])
        for writer in writers:
            tensorboard_file_writer(writer).add_summary(summary, step)

    def text(self, trainer: "pl.Trainer", tag: str, text: str, step: int, replace: bool = False) -> None:
        """Add a markdown text entry.

        TensorBoard shows one text per tag and step (the last written), so entries for the same tag at the same
        step, from any monitor, are joined (one paragraph each) and written again. A panel that is rewritten
        whole each time (a table of all events so far) passes ``replace=True``: its text then replaces what the
        tag holds at that step instead of joining it.
        """
        for writer in self.writers(trainer):
            latest = self._texts.setdefault(writer, {})
            step_texts = latest.get(tag)
            if replace or step_texts is None or step_texts[0] != step:
                step_texts = latest[tag] = (step, [])
            step_texts[1].append(text)
            writer.add_text(tag, "\n\n".join(step_texts[1]), step)

    def flush(self, trainer: "pl.Trainer") -> None:
        """Flush every TensorBoard writer so a reader sees the latest panels."""
        for writer in self.writers(trainer):
            writer.flush()
