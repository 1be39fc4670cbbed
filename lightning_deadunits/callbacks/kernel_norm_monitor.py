"""Watches per-filter kernel norms and counts collapsed ("zero") kernels per layer during training."""

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from typing_extensions import override

from lightning_deadunits import schedules
from lightning_deadunits._strategies import reject_sharded_strategy
from lightning_deadunits._validation import check_bool, check_float, check_int, check_strings, check_types
from lightning_deadunits.actions.alarm_handler import AlarmAction
from lightning_deadunits.callbacks.monitor import MonitorCallback
from lightning_deadunits.metrics.kernel_deaths import KernelDeathTracker
from lightning_deadunits.panels.kernel_panels import KERNEL_LAYOUT, KernelPanels
from lightning_deadunits.probes.kernel_norms import DEFAULT_KERNEL_TYPES, KernelNormProbe, LayerKernels
from lightning_deadunits.probes.selection import ModuleSelector, warn_nothing_selected
from lightning_deadunits.readings import keep_totals
from lightning_deadunits.schedules import StepGate
from lightning_deadunits.triggers.rule import Rule

__all__ = ["KernelNormMonitor"]

_EMBEDDING = "embedding"
# readings whose rows are not the output units of a module of that name: no recycler may act on them
_NOT_UNITS = ("batchnorm", "attention", "recurrent", _EMBEDDING)
_TOKEN_STATS = ("filters", "dead", "dead_frac", "newly_dead", "revived")


def _tokens(stat: str) -> str:
    return "tokens" if stat == "filters" else stat


class KernelNormMonitor(MonitorCallback):
    r"""Counts dead ("zero") kernels per layer: by an absolute and a relative L1 threshold, and by BatchNorm gamma.

    Every convolution (1-3-D, transposed, grouped, depthwise) and ``nn.Linear`` layer is watched unless filtered
    out. For each output filter (conv) or output row (linear) the L1 and L2 norms are computed in float32 on the
    weights' device. A filter is *dead*

    - **absolutely** when ``L1 < abs_threshold`` (never tested with ``== 0``: float32 subnormals such as 1e-40
      are common in trained weights);
    - **relatively** when ``L1 < rel_threshold * median(L1 of its layer)``: a collapsed filter is often far from
      exactly 0 while far below its neighbours;
    - **by BatchNorm** when the BatchNorm fed by the layer's output has ``|gamma| < bn_threshold`` for that
      channel. The pairing is found from data flow in the first training forward (the BatchNorm's input must
      be the layer's output tensor itself), not from module names. A layer with no BatchNorm after it has no
      ``dead_bn`` key; a BatchNorm fed by something else is reported under its own name.

    The monitor checks at fit start (the initial weights), every ``every_n_steps`` optimizer steps and at
    train end; on other steps it does nothing (no host sync). It keeps, per filter, the step since which it has
    been dead and counts revivals, so ``newly_dead`` gives the growth between checks. ``history`` keeps the totals
    (``dead_abs``, ``dead_rel``, ``dead``) of the last 1000 checks.

    Logged keys (``<p>`` is ``prefix``, ``<layer>`` the module name):

    =======================================  ==========================================================
    ``<p>/kernels/<layer>/dead_abs``         filters with L1 below ``abs_threshold``
    ``<p>/kernels/<layer>/dead_rel``         filters with L1 below ``rel_threshold`` x layer median
    ``<p>/kernels/<layer>/dead_bn``          channels whose paired BatchNorm gamma is ~0 (paired layers only)
    ``<p>/kernels/<layer>/dead``             filters dead by any rule
    ``<p>/kernels/<layer>/dead_frac``        ``dead`` / filters
    ``<p>/kernels/<layer>/norm_median``      median per-filter L1
    ``<p>/kernels/<layer>/newly_dead``       filters dead now and alive at the previous check
    ``<p>/kernels/<layer>/revived``          filters alive now and dead at the previous check
    ``<p>/kernels/total/<stat>``             the sums of the above over layers (``dead_abs``, ``dead_rel``,
                                             ``dead_bn``, ``dead``, ``newly_dead``, ``revived``, ``filters``),
                                             embeddings excepted
    ``<p>/kernels/total_embedding/<stat>``   the same sums over ``nn.Embedding`` tables: ``tokens``, ``dead``
                                             (dead tokens), ``dead_frac``, ``newly_dead``, ``revived``
    =======================================  ==========================================================

    **Attention, recurrent and embedding layers.** ``nn.MultiheadAttention``'s packed query/key/value rows are
    read per projection and head, as layers named ``<module>.in_proj.<q|k|v>.head<h>`` (its ``out_proj`` is an
    ``nn.Linear``, watched as such; separate q/k/v ``nn.Linear`` layers are watched as they are); LSTM, GRU and RNN
    weights per layer, direction and gate, as ``<module>.l<k>[_reverse].gate_<g>`` (LSTM gates ``i, f, g, o``, GRU
    ``r, z, n``; a row holds the unit's input and hidden-state weights). ``nn.Embedding`` rows are tokens: a row is
    dead when its L1 is below ``abs_threshold`` (the relative rule would flag rare tokens; the ``padding_idx`` row
    never counts), logged per table under the table's name and summed apart, under ``<p>/kernels/total_embedding/``,
    never into the filter totals.

    With a TensorBoard logger it also writes a custom-scalars layout (totals, and one panel per layer kind),
    per-layer histograms of filter L1 norms (``<p>/kernels/<layer>/l1``), a bar chart of dead filters against
    layer index (``<p>/kernels/dead_per_layer``, depthwise layers in red) and heat maps of ``|w|`` for the
    ``heatmap_layers`` layers with the most dead filters (``<p>/kernels/heatmap/<layer>``; ordinary convs summed
    over input channels, one tile per filter, one grey scale per layer so collapsed filters show black).

    Args:
        every_n_steps: check every this many optimizer steps (>= 1).
        abs_threshold: absolute L1 threshold (>= 0).
        rel_threshold: fraction of the layer's median L1, in [0, 1].
        bn_threshold: BatchNorm ``|gamma|`` threshold (>= 0).
        include: module-name globs to watch (default: all).
        exclude: module-name globs to skip.
        layer_types: layer classes to watch (default: all convolutions and ``nn.Linear``).
        log_histograms: write per-layer norm histograms (TensorBoard only).
        log_images: write the per-layer bar chart and heat maps (TensorBoard only).
        heatmap_layers: how many layers get heat maps (0: none).
        images_every_n_checks: draw the images at every this many checks, the first (fit start) included, and
            once at train end, of the last check (>= 1). Each figure takes 20-70 ms to draw and
            encode, against a few ms for a check's histograms and scalars. Unlike the activation band charts (a trend
            over logs), the bar chart and heat maps are complete at any check, so the first is worth drawing.
        alarms: :class:`~lightning_deadunits.triggers.Rule` objects over the logged keys.
        on_alarm: actions for fired alarms (``"log"``, ``"warn"``, ``"stop"``, ``"raise"`` or callables).
        prefix: first part of every logged key.

    Raises:
        ValueError: on an out-of-range number, an unknown action, or (at setup) a sharded strategy.
        TypeError: on a wrongly typed argument.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[KernelNormMonitor(every_n_steps=50)])  # doctest: +SKIP
    """

    source = "kernels"
    unit = "kernels"
    state_key_fields = (
        "every_n_steps",
        "abs_threshold",
        "rel_threshold",
        "bn_threshold",
        "include",
        "exclude",
        "prefix",
    )

    def __init__(
        self,
        every_n_steps: int = 50,
        abs_threshold: float = 1e-6,
        rel_threshold: float = 0.1,
        bn_threshold: float = 1e-3,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        layer_types: Sequence[type] = DEFAULT_KERNEL_TYPES,
        log_histograms: bool = True,
        log_images: bool = True,
        heatmap_layers: int = 3,
        images_every_n_checks: int = 10,
        alarms: Sequence[Rule] = (),
        on_alarm: Sequence[AlarmAction] = ("log",),
        prefix: str = "deadunits",
    ) -> None:
        super().__init__(prefix=prefix, alarms=alarms, on_alarm=on_alarm)
        self.every_n_steps = check_int("every_n_steps", every_n_steps, minimum=1)
        self.abs_threshold = check_float("abs_threshold", abs_threshold, minimum=0.0)
        self.rel_threshold = check_float("rel_threshold", rel_threshold, minimum=0.0, maximum=1.0)
        self.bn_threshold = check_float("bn_threshold", bn_threshold, minimum=0.0)
        self.include = check_strings("include", include)
        self.exclude = check_strings("exclude", exclude)
        self.layer_types = check_types("layer_types", layer_types)
        self.log_histograms = check_bool("log_histograms", log_histograms)
        self.log_images = check_bool("log_images", log_images)
        self.heatmap_layers = check_int("heatmap_layers", heatmap_layers, minimum=0)
        self.images_every_n_checks = check_int("images_every_n_checks", images_every_n_checks, minimum=1)
        self.probe = KernelNormProbe(self.include, self.exclude, self.layer_types)
        self.tracker = KernelDeathTracker()
        self.checks = StepGate(schedules.every_n_steps(self.every_n_steps))
        rules = {
            "dead_abs": f"abs: L1 < {self.abs_threshold:g}",
            "dead_rel": f"rel: L1 < {self.rel_threshold:g} x layer median",
            "dead_bn": f"BatchNorm: |gamma| < {self.bn_threshold:g}",
        }
        title = f"{self.prefix}/{self.source}"
        self.drawing = KernelPanels(self.key, title, rules, self.log_histograms, self.log_images, self.heatmap_layers)
        self.checks_done = 0
        # the last check's readings while its images are not drawn: drawn at train end if it is the last check
        self._undrawn: tuple[list[LayerKernels], list[dict[str, float]], int] | None = None
        self.history: list[dict[str, float]] = []
        self._initial: tuple[int, list[LayerKernels]] | None = None

    @property
    def last_check_step(self) -> int | None:
        """The global step of the latest check, or ``None`` before the first."""
        return self.checks.last_step

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            return
        advice = "Use DDP, or drop `KernelNormMonitor` (in `DeadUnits`: `kernels=False`)."
        reject_sharded_strategy(trainer, type(self).__name__, advice=advice)
        self.probe.attach(pl_module)
        if not self.probe.layers and not self.probe.batchnorms:
            selector = ModuleSelector(self.layer_types, self.include, self.exclude)
            warn_nothing_selected(type(self).__name__, "layer", pl_module, selector)

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if (self.probe.layers or self.probe.batchnorms) and self.last_check_step is None:
            self._initial = (trainer.global_step, self._read())
            if not self.probe.pairing_pending:
                self._publish_initial(trainer)

    @override
    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        if self.probe.pairing_pending:
            self.probe.start_pairing()

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.probe.finish_pairing()
        if self._initial is not None:
            self._publish_initial(trainer)
        if self.last_check_step is not None and self.checks.due(trainer.global_step):
            self.check(trainer, trainer.global_step)

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._initial is not None:
            self._publish_initial(trainer)
        if self.last_check_step is not None and trainer.global_step != self.last_check_step:
            self.check(trainer, trainer.global_step, final=True)
        elif self._undrawn is not None:  # training ended on a check that drew no images: the run's last state
            self.drawing.write_images(self.panels, trainer, self.probe.layers, *self._undrawn)
        self._undrawn = None

    @override
    def release(self) -> None:
        self.probe.finish_pairing()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **self.base_state(),
            "tracker": self.tracker.state_dict(),
            "probe": self.probe.state_dict(),
            "last_check_step": self.last_check_step,
            "history": list(self.history),
            "checks_done": self.checks_done,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.load_base_state(state_dict)
        self.tracker.load_state_dict(state_dict.get("tracker", {}))
        self.probe.load_state_dict(state_dict.get("probe", {}))
        self.checks.mark(state_dict.get("last_check_step"))  # type: ignore[arg-type]
        self.history = list(state_dict.get("history", []))
        self.checks_done = int(state_dict.get("checks_done", 0))

    def check(self, trainer: "pl.Trainer", step: int, final: bool = False) -> dict[str, float]:
        """Measure now, log the readings at ``step`` and run the alarms; return the scalar readings.

        Images are drawn at every ``images_every_n_checks``-th check, and when ``final``.
        """
        self.reattach(trainer.lightning_module, self.probe.layers, self.probe.attach)
        return self._process(trainer, self._read(), step, final)

    def _read(self) -> list[LayerKernels]:
        return self.probe.read(self.abs_threshold, self.rel_threshold, self.bn_threshold)

    def _publish_initial(self, trainer: "pl.Trainer") -> None:
        """Publish the fit-start reading, once the first forward has told which BatchNorm follows which layer."""
        assert self._initial is not None
        step, readings = self._initial
        self._initial = None
        self._process(trainer, self.probe.attribute(readings), step)

    def _process(
        self, trainer: "pl.Trainer", layers: list[LayerKernels], step: int, final: bool = False
    ) -> dict[str, float]:
        self.checks.mark(step)
        images = final or self.checks_done % self.images_every_n_checks == 0
        self.checks_done += 1
        if not layers:
            return {}
        embeddings = [layer for layer in layers if layer.kind == _EMBEDDING]
        layers = [layer for layer in layers if layer.kind != _EMBEDDING] + embeddings
        counts, totals = self.tracker.count(layers[: len(layers) - len(embeddings)], step)
        token_counts, token_totals = self.tracker.count(embeddings, step)
        counts += token_counts
        scalars = {
            self.key(layer.name, stat): value
            for layer, layer_counts in zip(layers, counts, strict=True)
            for stat, value in layer_counts.items()
            if stat != "filters"
        }
        scalars.update({self.key("total", stat): value for stat, value in totals.items()})
        scalars.update(
            {
                self.key("total_embedding", _tokens(stat)): value
                for stat, value in token_totals.items()
                if stat in _TOKEN_STATS
            }
        )
        keep_totals(self.history, step, {stat: totals[stat] for stat in ("dead_abs", "dead_rel", "dead")})
        dead_counts = {layer.name: layer_counts["dead"] for layer, layer_counts in zip(layers, counts, strict=True)}
        dead_masks = {layer.name: layer.dead for layer in layers if layer.kind not in _NOT_UNITS}
        self.publish(trainer, self.reading(step, scalars, dead_counts=dead_counts, dead_masks=dead_masks))
        groups: dict[str, list[str]] = {}
        for layer in layers:
            groups.setdefault(layer.kind, []).append(layer.name)
        self.show_layout(trainer, KERNEL_LAYOUT, groups)
        self.drawing.write(self.panels, trainer, self.probe.layers, layers, counts, step, images)
        self._undrawn = None if images else (layers, counts, step)
        return scalars
