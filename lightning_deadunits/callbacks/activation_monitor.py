"""Watches activations on sampled steps: zero fractions, ranges and spread per layer, dead and dormant channels."""

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import lightning.pytorch as pl
from torch import Tensor
from typing_extensions import override

from lightning_deadunits import schedules
from lightning_deadunits._strategies import reject_sharded_strategy
from lightning_deadunits.actions.alarm_handler import AlarmAction
from lightning_deadunits.callbacks._activation_settings import ActivationSettings
from lightning_deadunits.callbacks.monitor import MonitorCallback
from lightning_deadunits.metrics.activation_readings import activation_scalars
from lightning_deadunits.metrics.activation_stats import ActivationStats, SiteSummary
from lightning_deadunits.panels.activation_panels import ActivationPanels
from lightning_deadunits.probes.activations import ActivationProbe, ChannelDim, Watch, find_token_mask
from lightning_deadunits.probes.selection import ModuleSelector, warn_nothing_selected
from lightning_deadunits.readings import keep_totals
from lightning_deadunits.triggers.rule import Rule

__all__ = ["ActivationMonitor"]

_VALIDATION = "val"


class ActivationMonitor(MonitorCallback):
    r"""Measures what activation layers output, per layer and per channel, on sampled training steps (and,
    optionally, over each validation pass), and counts dead and dormant channels.

    **Where.** Forward hooks on activation modules (ReLU, ReLU6, LeakyReLU, PReLU, RReLU, ELU, CELU, SELU, GELU,
    SiLU, Mish, Hardswish, Softplus, Sigmoid, Tanh, Hardsigmoid, Hardtanh, or ``layer_types``), and on pooling
    layers with ``pooling=True``; and, with ``functional=True`` (the default), the same activations applied as
    functions in ``forward`` (``F.relu``, ``F.gelu``, ``F.silu``, ``torch.sigmoid``, ``x.relu()``...: what
    ``nn.TransformerEncoderLayer`` and SwiGLU MLPs ``F.silu(gate(x)) * up(x)`` do), seen through a
    ``TorchFunctionMode`` active only inside the model's forwards on sampled steps and named
    ``<enclosing module>:<function>#<k>`` (``enc.layers.0:relu#0``: the ``k``-th call of that function in one
    forward of the enclosing module; ``:relu#0`` in the root module's own forward). A model whose first measured
    training forward calls no such function is watched through its module hooks alone on later training steps
    (the mode dispatches every torch call of a forward through Python: about 15% of a small CNN's step); validation
    passes always use the mode. While the mode is active,
    ``nn.TransformerEncoderLayer``'s fused inference path (``torch._transformer_encoder_layer_fwd``, taken in eval
    mode without grad) is off, so validation passes are measured inside the layers too. Alternatively,
    ``watch="pre_activations"`` watches
    convolution, linear and BatchNorm outputs instead and measures ``pre_activation_fn(output)`` (``torch.relu``);
    a conv/linear feeding a BatchNorm directly is dropped in favour of the BatchNorm, and a layer not followed by
    the activation (e.g. the classifier head) should be left out with ``exclude``. ``include``/``exclude`` are
    globs over module names.

    **Call sites.** A module called several times per forward of its parent (one ``relu`` reused two or three
    times in a torchvision ResNet block) is measured per call, as ``<module>#0``, ``<module>#1``...; a module called
    once keeps its plain name (a module first seen called more often is named per call from then on). In-place
    activations are measured after the in-place operation.

    **Channels** are dim 1 of conv-shaped ``(N, C, *spatial)`` outputs and the last dim of ``(N, *, F)`` outputs
    of linear layers (for ``(N, F)`` both are the same). With ``channel_dim="auto"``, an activation whose input is
    the output of ``nn.Linear``, ``nn.LayerNorm`` or ``nn.Embedding`` (seen in the first measured forward) uses the
    last dim; ``channel_dim=1`` or ``-1`` fixes it. That input is followed through shape-keeping operations
    (``act(fc(x) * 0.5)``), so sequences of any length keep one layout per site, every position counted.

    **Padding.** A batch that is a mapping with a ``"token_mask"`` entry, or a LightningModule method
    ``deadunits_token_mask(batch)`` returning one, gives a boolean mask (``True`` for real tokens, ``(N, T)`` for
    ``(N, T, F)`` activations): channels-last sites count the real positions only (one host sync per site on
    measured batches).

    **Statistics.** A value is *near zero* when ``|x| <= eps``. Default ``eps``: exactly 0 for ReLU, ReLU6 and
    pooling (and pre-activations through ``torch.relu``); ``1e-6`` for LeakyReLU, PReLU, ELU, GELU, SiLU,
    Hardswish and other unbounded types, whose dead outputs are tiny but not zero (a collapsed PReLU gives ~1e-7);
    bounded activations (Sigmoid, Tanh, Hardsigmoid, Hardtanh) die by saturating, not by reaching 0, so they get no
    zero counting (no ``zero_frac``/``dead`` keys) unless ``eps`` names them. Per channel the monitor sums values,
    squares, ``|x|``, near-zero counts and counts (float32 per batch, float64 across batches, bf16/fp16 autocast
    included) and keeps minima and maxima, over the samples of one log period. A channel is

    - **dead** when no value had ``|x| > eps``, on any sample or position, during the last ``window`` samples
      (all samples so far until ``window`` have been seen): this spans log periods, unlike ``zero_frac``;
    - **dormant** (Sokar et al., 2023) when its mean ``|x|`` over the log period, divided by the mean of that over
      the layer's channels, is ``<= dormant_tau``.

    **When.** A *sample* is one sampled optimizer step: the batches where ``trainer.global_step % every_n_steps ==
    0`` (all micro-batches of that step under gradient accumulation). Hooks are attached at that batch's start
    and removed at its end (and at teardown and on exceptions); no other step pays anything. Sampling is not
    logging: every sample is accumulated on the device, and every ``log_every_n_samples`` samples (by default, as
    many as span the trainer's ``log_every_n_steps``, at least one: ``every_n_steps=1`` accumulates every step and
    logs every 50 steps) the statistics are reduced across DDP ranks (sums, minima, maxima), moved to the host in
    one transfer, logged at the global step of the latest sample, and checked by the alarm rules; histograms go
    with each log, band charts with every ``images_every_n_logs``-th. With
    ``on_validation=True`` every validation pass (not the sanity check) is measured whole and logged under
    ``<p>/activations/val/...`` at the current global step, its ``dead`` meaning "never active in the pass".

    Logged keys (``<p>`` is ``prefix``, ``<layer>`` the call-site name):

    ==========================================  ==============================================================
    ``<p>/activations/<layer>/zero_frac``       fraction of values with ``|x| <= eps`` in the log period
    ``<p>/activations/<layer>/dead``            channels dead over the window
    ``<p>/activations/<layer>/dead_frac``       ``dead`` / channels
    ``<p>/activations/<layer>/dormant``         dormant channels (``dormant_tau``)
    ``<p>/activations/<layer>/dormant_frac``    ``dormant`` / channels
    ``<p>/activations/<layer>/mean``            mean value
    ``<p>/activations/<layer>/std``             standard deviation of the values (population)
    ``<p>/activations/<layer>/min``, ``max``    smallest and largest value
    ``<p>/activations/<layer>/max_abs``         largest ``|x|`` (explosions)
    ``<p>/activations/total/<stat>``            ``zero_frac`` (over every counted value), ``dead``,
                                                ``dead_frac`` (over layers with zero counting), ``dormant``,
                                                ``dormant_frac``, ``channels``
    ``<p>/activations/val/...``                 the same per validation pass (``on_validation=True``)
    ==========================================  ==============================================================

    With a TensorBoard logger it also writes a custom-scalars layout (totals; zero fraction, dead, dormant, max
    ``|x|`` and std per layer), histograms of the per-channel zero fraction (``<p>/activations/<layer>/
    channel_zero_frac``) and the per-channel band chart: every channel's min-max range at each of the last
    ``band_history`` logs (``<p>/activations/<layer>/channel_range``), which shows ranges collapsing towards 0 or
    exploding.

    After each training log, ``readings`` holds the logged scalars, ``dead_counts`` maps call sites to dead
    channels, ``dead_counts_step`` is the step, and ``dead_masks`` maps call sites to boolean device tensors of the
    window-dead channels; after each measured validation pass, ``validation_readings`` holds its scalars. A log
    period in which nothing was measured (only empty batches) logs nothing. ``history`` keeps the totals (``dead``,
    ``dormant``) of the last 1000 logs.

    Args:
        every_n_steps: sample every this many optimizer steps (>= 1); the default keeps the overhead low.
        log_every_n_samples: log (one host transfer) every this many samples (>= 1), or ``None``: every
            ``max(1, trainer.log_every_n_steps // every_n_steps)`` samples.
        window: samples over which a channel must stay quiet to count as dead (>= 1).
        eps: near-zero tolerance: a number (>= 0) for every module, or ``{module type: number or None}`` overriding
            the defaults along each module's MRO (``None``: no zero counting), or ``None`` for the defaults.
        dormant_tau: dormancy threshold on the normalised mean ``|x|``, in [0, 1].
        include: module-name globs to watch (default: all).
        exclude: module-name globs to skip.
        layer_types: module classes to watch; default: the activations above, or conv/linear/BatchNorm with
            ``watch="pre_activations"``. Add your own with ``(*DEFAULT_ACTIVATION_TYPES, MyAct)``.
        watch: ``"activations"`` or ``"pre_activations"``.
        pre_activation_fn: the activation the model applies to pre-activations (pre-activation mode only;
            ``None``: ``torch.relu``).
        pooling: also watch pooling layers (max, average, adaptive, LP).
        channel_dim: ``"auto"``, ``1`` or ``-1``.
        functional: also watch activation functions called in ``forward`` (``F.relu``, ``F.gelu``, ``F.silu``...;
            activation mode only).
        on_validation: also measure each validation pass.
        log_histograms: write per-channel zero-fraction histograms (TensorBoard only).
        log_images: write the per-channel band charts (TensorBoard only).
        band_history: logs kept for the band chart (>= 1).
        band_layers: how many call sites get a band chart at an image log (>= 0): those with the most dead channels,
            then the highest zero fraction.
        images_every_n_logs: draw the band charts at every this many training logs (>= 1): the ``n``-th, ``2n``-th...
            (each chart takes ~50 ms to draw and encode, a log's histograms and scalars under 10 ms), and once when
            training ends. Not at the first log (unless 1): a band chart is a trend over logs, and one log gives it
            one column and says nothing. At the end the kept ranges are drawn as of the last log (at the log made
            then, when training ends within a log period), so a short run still gets band charts.
        dead_frac_above: alarm when a ``dead_frac`` (a layer's or the total, validation ones included) exceeds
            this, in [0, 1].
        max_abs_above: alarm when a layer's ``max_abs`` exceeds this (explosion), >= 0.
        std_below: alarm when a layer's ``std`` falls below this (collapse), >= 0.
        alarms: more :class:`~lightning_deadunits.triggers.Rule` objects over the logged keys.
        on_alarm: actions for fired alarms (``"log"``, ``"warn"``, ``"stop"``, ``"raise"`` or callables).
        prefix: first part of every logged key.

    Raises:
        ValueError: on an out-of-range number or an unknown ``watch``, ``channel_dim`` or action, or (at setup)
            under ``ModelParallelStrategy``, whose tensor parallelism splits activations across ranks.
        TypeError: on a wrongly typed argument.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> monitor = ActivationMonitor(every_n_steps=50, window=10, dead_frac_above=0.5)
        >>> trainer = Trainer(callbacks=[monitor])  # doctest: +SKIP
    """  # noqa: D205

    source = "activations"
    state_key_fields = ("every_n_steps", "window", "watch", "include", "exclude", "prefix")

    def __init__(
        self,
        every_n_steps: int = 50,
        log_every_n_samples: int | None = None,
        window: int = 10,
        eps: float | Mapping[type, float | None] | None = None,
        dormant_tau: float = 0.025,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        layer_types: Sequence[type] | None = None,
        watch: Watch = "activations",
        pre_activation_fn: Callable[[Tensor], Tensor] | None = None,
        pooling: bool = False,
        channel_dim: ChannelDim = "auto",
        functional: bool = True,
        on_validation: bool = False,
        log_histograms: bool = True,
        log_images: bool = True,
        band_history: int = 100,
        band_layers: int = 4,
        images_every_n_logs: int = 10,
        dead_frac_above: float | None = None,
        max_abs_above: float | None = None,
        std_below: float | None = None,
        alarms: Sequence[Rule] = (),
        on_alarm: Sequence[AlarmAction] = ("log",),
        prefix: str = "deadunits",
    ) -> None:
        super().__init__(prefix=prefix, alarms=alarms, on_alarm=on_alarm)
        # every argument but `alarms`, `on_alarm` and `prefix` is a field of the settings, by the same name
        self.settings = settings = ActivationSettings.of(locals())
        self.alarms.extend(settings.rules(f"{self.prefix}/{self.source}"))
        self.probe = ActivationProbe(
            settings.layer_types,
            settings.include,
            settings.exclude,
            eps=settings.eps,
            watch=settings.watch,
            pre_activation_fn=settings.pre_activation_fn if settings.watch == "pre_activations" else None,
            channel_dim=settings.channel_dim,
            functional=settings.functional,
        )
        self.stats = ActivationStats()
        self.sampled = schedules.every_n_steps(settings.every_n_steps)
        panel_options = (settings.log_histograms, settings.log_images, settings.band_history, settings.band_layers)
        self.drawing = ActivationPanels(self.key, *panel_options, show_layout=self.show_layout)
        self.readings: dict[str, float] = {}
        self.validation_readings: dict[str, float] = {}
        self.history: list[dict[str, float]] = []
        self.last_log_step: int | None = None
        self.logs_done = 0
        self._drew_images = False
        self._sample_step: int | None = None
        self._last_sample_step: int | None = None
        self._samples_in_period = 0
        self._validation_stats: ActivationStats | None = None
        self._warned_empty = False

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit" and not (stage == "validate" and self.settings.on_validation):
            return
        reject_sharded_strategy(
            trainer,
            type(self).__name__,
            reason="sums each rank's activations as those of its own samples, which tensor parallelism splits",
            strategies=("ModelParallelStrategy",),
            advice="Use DDP or FSDP, or drop `ActivationMonitor` (in `DeadUnits`: `activations=False`).",
        )
        self.probe.attach(pl_module)
        self._warned_empty = False
        if not self.probe.watching:
            self._warn_nothing_watched(pl_module)

    def _warn_nothing_watched(self, pl_module: "pl.LightningModule") -> None:
        self._warned_empty = True
        functions = ", nor an activation function called in a forward" if self.probe.functional else ""
        advice = (
            " Models that apply their activation in a way neither hooks nor torch functions can see need "
            'watch="pre_activations".'
        )
        selector = ModuleSelector(self.settings.layer_types, self.settings.include, self.settings.exclude)
        warn_nothing_selected(type(self).__name__, "module", pl_module, selector, functions, advice)

    @property
    def channel_ranges(self) -> dict[str, list[tuple[int, Tensor, Tensor]]]:
        """Per call site, ``(step, per-channel min, per-channel max)`` of the last ``band_history`` training logs."""
        return self.drawing.channel_ranges

    @override
    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if not self.probe.watching or not self.sampled(step):
            return
        if self._sample_step != step:
            if self._sample_step is not None:
                self._end_sample(trainer)
            self._sample_step = step
            self.stats.begin_sample()
            self.reattach(pl_module, self.probe.modules, self.probe.attach)
        self.probe.start(self.stats)
        self.probe.token_mask = find_token_mask(pl_module, batch)

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._sample_step is None:
            return
        self.probe.stop()
        if self.probe.found_nothing and not self._warned_empty:
            self._warn_nothing_watched(pl_module)
        if trainer.global_step != self._sample_step:
            self._end_sample(trainer)

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.probe.stop()
        if self._sample_step is not None:
            self._end_sample(trainer)
        if self._samples_in_period and self._last_sample_step is not None:
            self.log_training(trainer, self._last_sample_step, final=True)
        elif self.last_log_step is not None and not self._drew_images:
            self.drawing.draw_bands(self.panels, trainer, self.last_log_step)

    @override
    def on_validation_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.probe.stop()
        if not self.settings.on_validation or trainer.sanity_checking or not self.probe.watching:
            return
        self._validation_stats = ActivationStats()
        self._validation_stats.begin_sample()
        self.probe.start(self._validation_stats, validation=True)

    @override
    def on_validation_batch_start(
        self,
        trainer: "pl.Trainer",
        pl_module: "pl.LightningModule",
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._validation_stats is not None:
            self.probe.token_mask = find_token_mask(pl_module, batch)

    @override
    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._validation_stats is None:
            return
        self.probe.stop()
        stats, self._validation_stats = self._validation_stats, None
        summaries = self._summarise(stats, window=1)
        scalars = self.validation_readings = activation_scalars(
            summaries, self.settings.dormant_tau, partial(self.key, _VALIDATION)
        )
        self.drawing.write(self.panels, trainer, summaries, trainer.global_step, (_VALIDATION,))
        self.publish(trainer, self.reading(trainer.global_step, scalars))

    @override
    def release(self) -> None:
        self.probe.stop()
        self._validation_stats = None

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **self.base_state(),
            **self.drawing.state_dict(),
            "stats": self.stats.state_dict(),
            "probe": self.probe.state_dict(),
            "history": list(self.history),
            "samples_in_period": self._samples_in_period,
            "last_sample_step": self._last_sample_step,
            "last_log_step": self.last_log_step,
            "logs_done": self.logs_done,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.load_base_state(state_dict)
        self.drawing.load_state_dict(state_dict)
        self.stats.load_state_dict(state_dict.get("stats", {}))
        self.probe.load_state_dict(state_dict.get("probe", {}))
        self.history = list(state_dict.get("history", []))
        self._samples_in_period = int(state_dict.get("samples_in_period", 0))
        self._last_sample_step = state_dict.get("last_sample_step")
        self.last_log_step = state_dict.get("last_log_step")
        self.logs_done = int(state_dict.get("logs_done", 0))

    def log_training(self, trainer: "pl.Trainer", step: int, final: bool = False) -> dict[str, float]:
        """Reduce, log and check the training statistics of the current period at ``step``; return the readings.

        Every rank must call it at the same step (the sampling schedule guarantees it). Band charts are drawn at
        the ``images_every_n_logs``-th log, every ``images_every_n_logs`` logs after it, and when ``final``.
        """
        self._samples_in_period = 0
        self.last_log_step = step
        summaries = self._summarise(self.stats, self.settings.window)
        dead_masks = {
            self.probe.site_name(site): mask for site, mask in self.stats.dead_masks(self.settings.window).items()
        }
        self.stats.reset_period()
        scalars = self.readings = activation_scalars(summaries, self.settings.dormant_tau, self.key)
        if not scalars:
            return scalars
        keep_totals(self.history, step, {stat: scalars[self.key("total", stat)] for stat in ("dead", "dormant")})
        self.drawing.remember(summaries, step)
        self.logs_done += 1
        self._drew_images = final or self.logs_done % self.settings.images_every_n_logs == 0
        self.drawing.write(self.panels, trainer, summaries, step, images=self._drew_images)
        dead_counts = {name: float(s.dead.sum()) for name, s in summaries.items() if s.dead is not None}
        self.publish(trainer, self.reading(step, scalars, dead_counts=dead_counts, dead_masks=dead_masks))
        return scalars

    def _end_sample(self, trainer: "pl.Trainer") -> None:
        self._last_sample_step, self._sample_step = self._sample_step, None
        self._samples_in_period += 1
        if self._samples_in_period >= self.settings.samples_per_log(trainer) and self._last_sample_step is not None:
            self.log_training(trainer, self._last_sample_step)

    def _summarise(self, stats: ActivationStats, window: int) -> dict[str, SiteSummary]:
        """Reduce ``stats`` across ranks and read them on the host, by call-site name."""
        stats.sync()
        return {self.probe.site_name(site): summary for site, summary in stats.summarise(window).items()}
