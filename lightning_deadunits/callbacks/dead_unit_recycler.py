"""Recycles the dead units that other monitors report: fresh incoming weights, zero outgoing weights (ReDo)."""

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_deadunits._strategies import reject_sharded_strategy
from lightning_deadunits.actions.alarm_handler import AlarmAction
from lightning_deadunits.actions.recycle import (
    RECYCLABLE_TYPES,
    cap_units,
    consumer_refusal,
    flagged_units,
    mixing_refusal,
    recyclable,
    recycle_seed,
    recycle_units,
)
from lightning_deadunits.callbacks._recycler_settings import RecyclerSettings
from lightning_deadunits.callbacks.monitor import MonitorCallback
from lightning_deadunits.probes.selection import ModuleSelector
from lightning_deadunits.probes.unit_flow import UnitFlowTracer
from lightning_deadunits.readings import Reading, keep_totals
from lightning_deadunits.triggers.rule import Rule

__all__ = ["DeadUnitRecycler"]

log = logging.getLogger("lightning_deadunits")


class DeadUnitRecycler(MonitorCallback):
    r"""Re-initialises dead or dormant units reported by the other monitors (ReDo, Sokar et al. 2023).

    It listens to the readings every monitor of the trainer pushes (or those whose ``source`` is in ``sources``)
    that carry ``dead_masks`` (``{name: bool mask over units}``), and acts on them at the start of the next batch,
    once every callback has ended the batch: so the order of ``callbacks=[...]`` does not matter. A name is either a
    convolution or linear layer (:class:`~lightning_deadunits.KernelNormMonitor`: dead filters) or an activation
    call site (``ActivationMonitor``: ``features.3``, ``layer1.0.relu#0``), which is mapped to the layer whose
    output reaches it through elementwise, normalisation and pooling modules only
    (:class:`~lightning_deadunits.probes.unit_flow.UnitFlowTracer`, traced in the first training forward). A site fed
    by a functional operation (``x + residual``, ``F.relu``) maps to nothing and is noted once in the
    ``lightning_deadunits`` log. Masks of one layer from several monitors are or-ed.

    When a monitor has a new check and at least ``every_n_steps`` optimizer steps have passed since the last
    recycling that recycled anything, up to ``ceil(max_fraction * units)`` flagged units per layer (at least one, so
    small layers are recycled too; chosen at random among the flagged) are recycled with
    :func:`~lightning_deadunits.actions.recycle.recycle_units`: incoming weights and bias redrawn from the layer's
    own initialisation, outgoing weights zeroed in the layers that read them (found from data flow), per-unit
    BatchNorm entries reset, and the optimizer state of exactly those entries zeroed. A layer whose units pass
    through a normalisation spanning several units (``nn.LayerNorm`` over them, ``nn.GroupNorm`` with more than one
    channel per group) is never recycled: fresh weights would change that layer's statistics and so every other
    unit; the refusal is noted once, saying so. A layer whose readers are not
    found (read through a functional op, or the logits) is not recycled unless ``require_consumer=False`` (then its
    outgoing weights are left as they are); either case is noted once. At the next check that reports on a layer,
    the recycled units that are not flagged again count as ``still_alive``.

    Zeroing the outgoing weights keeps the network's function exactly for units whose output is 0 (dead ReLU units).
    A dead *kernel* still emits a constant (its bias, or its BatchNorm's beta through the activation): that constant
    is lost, which BatchNorm layers downstream absorb at once in training mode but which shifts eval-mode outputs
    until their running statistics catch up (tens of steps at momentum 0.1), so avoid recycling just before
    validation or the end of training.

    Under DDP every rank recycles the same units with the same values: the masks are or-ed across ranks (one
    all-reduce per check) and the fresh weights are drawn on the CPU from a seed of (``seed``, global step, layer
    index). Sharded strategies are rejected at setup. ``history`` keeps the totals of the last 1000 recyclings.

    Logged keys (``<p>`` is ``prefix``, ``<layer>`` the module name):

    =========================================  ======================================================
    ``<p>/recycle/<layer>/flagged``            units flagged dead at this check (recycling steps)
    ``<p>/recycle/<layer>/recycled``           units recycled now (at most ``max_fraction`` of the layer)
    ``<p>/recycle/<layer>/still_alive``        units recycled last time and not flagged at this check
    ``<p>/recycle/total/flagged``              the sum over layers
    ``<p>/recycle/total/recycled``             the sum over layers
    ``<p>/recycle/total/recycled_cumulative``  units recycled since the start of training
    ``<p>/recycle/total/still_alive``          the sum over layers
    ``<p>/recycle/total/still_alive_frac``     ``still_alive`` / units recycled last time in those layers
    =========================================  ======================================================

    Args:
        every_n_steps: recycle at most once per this many optimizer steps (>= 1).
        max_fraction: at most this fraction of a layer's units per recycling, in (0, 1].
        sources: ``source`` names of the monitors to listen to (e.g. ``["kernels"]``; empty: all).
        include: module-name globs of the layers that may be recycled (default: all).
        exclude: module-name globs of layers never recycled.
        require_consumer: recycle only layers whose outgoing weights were found (others would change the
            network's function at once: e.g. a last convolution read through ``x.mean((2, 3))``, or logits).
        seed: base seed of the fresh weights (>= 0).
        alarms: :class:`~lightning_deadunits.triggers.Rule` objects over the logged keys.
        on_alarm: actions for fired alarms (``"log"``, ``"warn"``, ``"stop"``, ``"raise"`` or callables).
        prefix: first part of every logged key.

    Raises:
        ValueError: on an out-of-range number, an unknown action, or (at setup) a sharded strategy.
        TypeError: on a wrongly typed argument.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from lightning_deadunits import KernelNormMonitor
        >>> callbacks = [KernelNormMonitor(every_n_steps=100), DeadUnitRecycler(every_n_steps=100)]
        >>> trainer = Trainer(callbacks=callbacks)  # doctest: +SKIP
    """

    source = "recycle"
    state_key_fields = ("every_n_steps", "max_fraction", "sources", "require_consumer", "include", "exclude")

    def __init__(
        self,
        every_n_steps: int = 100,
        max_fraction: float = 0.1,
        sources: Sequence[str] = (),
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        require_consumer: bool = True,
        seed: int = 0,
        alarms: Sequence[Rule] = (),
        on_alarm: Sequence[AlarmAction] = ("log",),
        prefix: str = "deadunits",
    ) -> None:
        super().__init__(prefix=prefix, alarms=alarms, on_alarm=on_alarm)
        self.settings = RecyclerSettings(every_n_steps, max_fraction, sources, include, exclude, require_consumer, seed)
        self.tracer = UnitFlowTracer()
        self.layers: dict[str, nn.Module] = {}
        self.last_recycle_step: int | None = None
        self.recycled_total = 0
        self.history: list[dict[str, float]] = []
        self._modules: dict[str, nn.Module] = {}
        self._layer_index: dict[str, int] = {}
        self._heard: list[Reading] = []
        self._pending: dict[str, tuple[Tensor, int]] = {}
        self._notes: set[str] = set()

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        reject_sharded_strategy(trainer, type(self).__name__)
        self._modules = dict(pl_module.named_modules())
        every_layer = [name for name, module in self._modules.items() if isinstance(module, RECYCLABLE_TYPES)]
        self._layer_index = {name: index for index, name in enumerate(every_layer)}
        selector = ModuleSelector(RECYCLABLE_TYPES, self.settings.include, self.settings.exclude)
        self.layers = {name: module for name, module in selector.select(pl_module) if recyclable(module)}

    def on_deadunits_reading(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", reading: Reading) -> None:
        """Keep readings with dead masks from the monitors listened to, to act on at the next batch start."""
        if (
            reading.dead_masks
            and reading.source != self.source
            and (not self.settings.sources or reading.source in self.settings.sources)
        ):
            self._heard.append(reading)

    @override
    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        if self.tracer.traced and self._heard:
            flagged, notes = flagged_units(self._heard, self.layers, self.tracer.sites)
            self._heard = []
            for note in notes:
                self._note(trainer, note)
            if flagged:
                self._process(trainer, flagged, trainer.global_step)
        if self.tracer.pending and self.layers:
            self.tracer.start(pl_module, self.layers)

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.tracer.finish()

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._heard = []

    @override
    def release(self) -> None:
        self.tracer.finish()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **self.base_state(),
            "tracer": self.tracer.state_dict(),
            "last_recycle_step": self.last_recycle_step,
            "recycled_total": self.recycled_total,
            "history": list(self.history),
            "pending": {name: (units.cpu(), count) for name, (units, count) in self._pending.items()},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.load_base_state(state_dict)
        self.tracer.load_state_dict(state_dict.get("tracer", {}))
        self.last_recycle_step = state_dict.get("last_recycle_step")
        self.recycled_total = int(state_dict.get("recycled_total", 0))
        self.history = list(state_dict.get("history", []))
        self._pending = {
            name: (units.clone(), int(count)) for name, (units, count) in state_dict.get("pending", {}).items()
        }

    def _process(self, trainer: "pl.Trainer", flagged: Mapping[str, Tensor], step: int) -> None:
        names = sorted(flagged, key=self._layer_index.__getitem__)
        masks = dict(zip(names, self._agree(trainer, [flagged[name] for name in names]), strict=True))
        judged = [name for name in names if name in self._pending]
        counts = [masks[name].sum() for name in names]
        survivors = [(self._pending[name][0].to(masks[name].device) & ~masks[name]).sum() for name in judged]
        host = torch.stack([count.to(counts[0].device) for count in counts + survivors]).cpu().tolist()
        flagged_counts = dict(zip(names, host[: len(names)], strict=True))
        still_alive = dict(zip(judged, host[len(names) :], strict=True))
        totals: dict[str, float] = {}
        readings: dict[str, float] = {}
        if judged:
            recycled_before = sum(self._pending[name][1] for name in judged)
            for name in judged:
                readings[self.key(name, "still_alive")] = still_alive[name]
                del self._pending[name]
            totals["still_alive"] = sum(still_alive.values())
            totals["still_alive_frac"] = totals["still_alive"] / recycled_before
        if self.last_recycle_step is None or step - self.last_recycle_step >= self.settings.every_n_steps:
            readings.update(self._recycle(trainer, masks, flagged_counts, step))
            totals["flagged"] = sum(flagged_counts.values())
            totals["recycled"] = sum(readings[self.key(name, "recycled")] for name in masks)
            totals["recycled_cumulative"] = float(self.recycled_total)
        if totals:
            readings.update({self.key("total", stat): value for stat, value in totals.items()})
            keep_totals(self.history, step, totals)
            self.publish(trainer, self.reading(step, readings))

    def _recycle(
        self, trainer: "pl.Trainer", masks: Mapping[str, Tensor], flagged: Mapping[str, float], step: int
    ) -> dict[str, float]:
        readings: dict[str, float] = {}
        for name, mask in masks.items():
            consumers = [self._modules[consumer] for consumer in self.tracer.consumers.get(name, [])]
            recycled = min(int(flagged[name]), math.ceil(self.settings.max_fraction * mask.numel()))
            if recycled and not consumers:
                if self.settings.require_consumer:
                    recycled = 0
                self._note(trainer, consumer_refusal(name, self.settings.require_consumer))
            mixers = self.tracer.mixers.get(name, [])
            if recycled and mixers:
                recycled = 0
                self._note(trainer, mixing_refusal(name, [(mixer, self._modules[mixer]) for mixer in mixers]))
            readings[self.key(name, "flagged")] = flagged[name]
            readings[self.key(name, "recycled")] = float(recycled)
            if recycled == 0:
                continue
            seed = recycle_seed(self.settings.seed, step, self._layer_index[name])
            chosen = cap_units(mask, recycled, seed)
            norms = [self._modules[norm] for norm in self.tracer.norms.get(name, [])]
            recycle_units(self.layers[name], chosen, seed, consumers, norms, trainer.optimizers)
            self._pending[name] = (chosen, recycled)
            self.recycled_total += recycled
            self.last_recycle_step = step
        return readings

    @staticmethod
    def _agree(trainer: "pl.Trainer", masks: list[Tensor]) -> list[Tensor]:
        """Or the masks across ranks, so that every rank recycles the same units (one all-reduce)."""
        if trainer.world_size <= 1:
            return masks
        device = masks[0].device
        union = trainer.strategy.reduce(torch.cat([mask.to(device).float() for mask in masks]), reduce_op="max")
        return list((union > 0).split([mask.numel() for mask in masks]))

    def _note(self, trainer: "pl.Trainer", note: str) -> None:
        if note not in self._notes:
            self._notes.add(note)
            if trainer.global_rank == 0:
                log.info("`DeadUnitRecycler` %s.", note)
