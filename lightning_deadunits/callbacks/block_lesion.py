"""Lesions each residual block at the end of validation and logs how much loss and accuracy it carries."""

import logging
import re
import warnings
from collections.abc import Mapping, Sequence
from functools import cached_property
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn
from typing_extensions import override

from lightning_deadunits._strategies import reject_sharded_strategy
from lightning_deadunits._validation import check_bool, check_int
from lightning_deadunits.actions.alarm_handler import AlarmAction
from lightning_deadunits.callbacks.monitor import MonitorCallback
from lightning_deadunits.errors import DeadUnitsWarning
from lightning_deadunits.panels.render import bar_chart
from lightning_deadunits.probes.lesion import (
    BlockLesionProbe,
    LesionMetric,
    LesionResult,
    LesionStep,
    default_lesion_step,
    reads_default_batch,
)
from lightning_deadunits.triggers.rule import Rule

__all__ = ["BlockLesion"]

log = logging.getLogger("lightning_deadunits")


class BlockLesion(MonitorCallback):
    r"""Measures what each residual block contributes (Veit et al. 2016): at the end of validation, each block's
    output is replaced by its input in turn and the first ``max_batches`` validation batches are rerun.

    A block whose deletion barely moves the loss is one the network routes around (trained ResNets shrug off
    most single-block deletions, except the downsampling ones); a block with a zero residual branch gives exactly 0.
    The probe, with the candidate rules (``blocks`` globs, or class names containing ``Block`` or
    ``Bottleneck``) and the skipping of blocks whose output shape differs from their input's (downsampling; noted
    once in the ``lightning_deadunits`` log and a TensorBoard text panel), is
    :class:`~lightning_deadunits.probes.lesion.BlockLesionProbe`; :func:`~lightning_deadunits.lesion_blocks` is
    the same as a plain function.

    **Protocol.** The batches are those ``validation_step`` received from the first validation dataloader (already
    on the device), kept until the end of the validation epoch. For each batch, if the LightningModule defines
    ``lesion_loss(batch) -> (loss, logits, targets)`` it is called (``loss`` the batch's mean loss; ``logits`` and
    ``targets`` may be ``None`` when there is no metric to compute); otherwise the batch must be ``(x, y, ...)``:
    ``logits = pl_module(x)`` and ``loss = cross_entropy(logits, y)``. The default metric is torchmetrics'
    multiclass accuracy over dim 1 of the logits (counted only when the logits and integer targets have classifier
    shapes). Passes run in eval mode under ``torch.no_grad()`` and the precision plugin's validation context; every
    hook is removed afterwards. Each lesion costs ``max_batches`` forwards per block, plus one intact pass.

    **DDP.** Every rank lesions its own batches and the sums and counts are added across ranks (one all-reduce),
    so the means are exactly those of all the ranks' batches together. Blocks' output shapes must not depend on
    the data (every rank must lesion the same blocks).

    Logged keys (``<p>`` is ``prefix``, ``<block>`` the module name, ``<metric>`` each metric's name):

    ====================================  =========================================================
    ``<p>/lesion/<block>/delta_loss``     loss with the block lesioned minus the intact loss
    ``<p>/lesion/<block>/delta_<metric>`` the same for each metric (negative: the block helped)
    ``<p>/lesion/baseline/loss``          the intact model's loss on the same batches
    ``<p>/lesion/baseline/<metric>``      the intact model's metrics
    ====================================  =========================================================

    With a TensorBoard logger it also writes a bar chart of ``|delta_loss|`` per block
    (``<p>/lesion/delta_loss_per_block``; red bars: lesioning lowered the loss), a custom-scalars layout and, when
    the skipped blocks change, a text panel listing them (``<p>/lesion/skipped``).

    Args:
        every_n_epochs: lesion at the end of validation of every this many epochs (>= 1).
        max_batches: validation batches rerun per lesion (>= 1).
        blocks: globs over module names selecting the candidate blocks (empty: Block/Bottleneck class names).
        exclude: globs over module names to leave out.
        metrics: ``{name: metric(logits, targets) -> 0-d tensor}``; ``None`` is ``{"accuracy": ...}``.
        log_images: write the bar chart (TensorBoard only).
        alarms: :class:`~lightning_deadunits.triggers.Rule` objects over the logged keys.
        on_alarm: actions for fired alarms (``"log"``, ``"warn"``, ``"stop"``, ``"raise"`` or callables).
        prefix: first part of every logged key.

    Raises:
        ValueError: on an out-of-range number, a bad metric name, an unknown action, or (at setup) a sharded
            strategy.
        TypeError: on a wrongly typed argument.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[BlockLesion(blocks=["layer?.?"], max_batches=8)])  # doctest: +SKIP
    """  # noqa: D205

    source = "lesion"

    def __init__(
        self,
        every_n_epochs: int = 1,
        max_batches: int = 4,
        blocks: Sequence[str] = (),
        exclude: Sequence[str] = (),
        metrics: Mapping[str, LesionMetric] | None = None,
        log_images: bool = True,
        alarms: Sequence[Rule] = (),
        on_alarm: Sequence[AlarmAction] = ("log",),
        prefix: str = "deadunits",
    ) -> None:
        super().__init__(prefix=prefix, alarms=alarms, on_alarm=on_alarm)
        self.every_n_epochs = check_int("every_n_epochs", every_n_epochs, minimum=1)
        self.max_batches = check_int("max_batches", max_batches, minimum=1)
        self.probe = BlockLesionProbe(blocks, exclude, metrics)
        self.log_images = check_bool("log_images", log_images)
        self.last_result: LesionResult | None = None
        self.history: list[dict[str, float]] = []
        self._batches: list[Any] = []
        self._candidates: dict[str, nn.Module] = {}
        self._noted_skips: dict[str, str] = {}

    @cached_property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            every_n_epochs=self.every_n_epochs,
            max_batches=self.max_batches,
            blocks=self.probe.block_globs,
            exclude=self.probe.exclude,
        )

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        reject_sharded_strategy(trainer, type(self).__name__)
        self._candidates = self.probe.candidates(pl_module)
        if not self._candidates:
            warnings.warn(
                f"`BlockLesion` found no candidate block in {type(pl_module).__name__} (blocks="
                f"{list(self.probe.block_globs) or 'class names with Block/Bottleneck'}, exclude="
                f"{list(self.probe.exclude)}); it will log nothing. Pass `blocks` globs over module names.",
                DeadUnitsWarning,
                stacklevel=2,
            )

    @override
    def on_validation_batch_end(
        self,
        trainer: "pl.Trainer",
        pl_module: "pl.LightningModule",
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if dataloader_idx == 0 and len(self._batches) < self.max_batches and self._scheduled(trainer):
            self._batches.append(batch)

    @override
    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        batches, self._batches = self._batches, []
        if self._candidates and self._scheduled(trainer):
            self.lesion(trainer, pl_module, batches)

    @override
    def release(self) -> None:
        self._batches = []

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **self.base_state(),
            "history": list(self.history),
            "last_result": None if self.last_result is None else self.last_result.to_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.load_base_state(state_dict)
        self.history = list(state_dict.get("history", []))
        last = state_dict.get("last_result")
        self.last_result = None if last is None else LesionResult.from_dict(last)

    def lesion(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batches: Sequence[Any]
    ) -> dict[str, float]:
        """Lesion every candidate over ``batches`` (this rank's), log the readings and return them.

        Every rank must call it at the same time (the sums are reduced across ranks).
        """
        step = self._lesion_step(pl_module, batches)
        if step is None:
            return {}
        names = list(self._candidates)
        if batches:
            with trainer.precision_plugin.val_step_context():
                sums = self.probe.run(pl_module, batches, step, self._candidates)
        else:  # a rank without batches still joins the reduction
            sums = torch.zeros(1 + len(names), 2 * len(self.probe.stats), device=pl_module.device)
        sums = trainer.strategy.reduce(sums, reduce_op="sum")
        result = self.probe.summarise(sums.cpu().tolist(), names)
        readings = {self.key("baseline", stat): value for stat, value in result.baseline.items()}
        for block, deltas in result.deltas.items():
            readings.update({self.key(block, f"delta_{stat}"): value for stat, value in deltas.items()})
        self.last_result = result
        self.history.append({"step": float(trainer.global_step), "epoch": float(trainer.current_epoch), **readings})
        self.publish(trainer, self.reading(trainer.global_step, readings))
        self._write_panels(trainer, result)
        return readings

    def _lesion_step(self, pl_module: "pl.LightningModule", batches: Sequence[Any]) -> LesionStep | None:
        lesion_loss = getattr(pl_module, "lesion_loss", None)
        if callable(lesion_loss):
            return lambda model, batch: lesion_loss(batch)
        if batches and not reads_default_batch(batches[0]):
            warnings.warn(
                f"`BlockLesion` cannot read validation batches of type {type(batches[0]).__name__}: the default "
                "protocol needs `(inputs, targets, ...)`. Define `lesion_loss(batch) -> (loss, logits, targets)` on "
                f"{type(pl_module).__name__}; no lesion this epoch.",
                DeadUnitsWarning,
                stacklevel=2,
            )
            return None
        return default_lesion_step

    def _scheduled(self, trainer: "pl.Trainer") -> bool:
        return not trainer.sanity_checking and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _write_panels(self, trainer: "pl.Trainer", result: LesionResult) -> None:
        new_skips = {name: why for name, why in result.skipped.items() if self._noted_skips.get(name) != why}
        if new_skips:
            self._noted_skips.update(new_skips)
            notes = [f"- `{name}`: {why}" for name, why in new_skips.items()]
            if trainer.global_rank == 0:
                log.info("`BlockLesion` skips %s", "; ".join(f"{name} ({why})" for name, why in new_skips.items()))
            self.panels.text(
                trainer, self.key("skipped"), "Blocks not lesioned:\n\n" + "\n".join(notes), trainer.global_step
            )
        if not self.panels.active(trainer):
            return
        self._show_layout(trainer)
        if self.log_images and result.deltas:
            delta_loss = np.array([deltas.get("loss", 0.0) for deltas in result.deltas.values()])
            image = bar_chart(
                list(result.deltas),
                {"loss change": delta_loss},
                title=f"{self.prefix}/{self.source}: loss change when each block is lesioned",
                value_label="lesioned loss - intact loss",
                step=trainer.global_step,
            )
            self.panels.image(trainer, self.key("delta_loss_per_block"), image, trainer.global_step)

    def _show_layout(self, trainer: "pl.Trainer") -> None:
        base = re.escape(f"{self.prefix}/{self.source}")
        charts = {f"delta {stat} per block": [f"{base}/.*/delta_{re.escape(stat)}$"] for stat in self.probe.stats}
        charts["intact model"] = [f"{base}/baseline/.*"]
        self.panels.layout(trainer, {f"{self.prefix}/{self.source}: block lesions": charts})
