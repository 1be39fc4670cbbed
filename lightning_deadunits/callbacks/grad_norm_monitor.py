"""Watches gradient norms per layer and overall, and the rows whose gradient stays exactly zero."""

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch.optim import Optimizer
from typing_extensions import override

from lightning_deadunits import schedules
from lightning_deadunits._strategies import reject_sharded_strategy
from lightning_deadunits._validation import check_int, check_strings, check_types
from lightning_deadunits.actions.alarm_handler import AlarmAction
from lightning_deadunits.callbacks.monitor import MonitorCallback
from lightning_deadunits.panels.layout import LayoutSpec
from lightning_deadunits.probes.grad_norms import GradNormProbe
from lightning_deadunits.probes.kernel_norms import DEFAULT_KERNEL_TYPES
from lightning_deadunits.triggers.rule import Rule

__all__ = ["GradNormMonitor"]

GRAD_LAYOUT = LayoutSpec(
    totals={"global gradient norm": "norm", "gradient-dead rows": "zero_rows"},
    per_layer={"gradient norm per layer": "norm", "gradient-dead rows per layer": "zero_rows"},
)


class GradNormMonitor(MonitorCallback):
    r"""Per-layer and global gradient L2 norms, and per-layer "gradient-dead" rows, on sampled optimizer steps.

    Read in ``on_before_optimizer_step`` of the optimizer steps where ``trainer.global_step % every_n_steps == 0``:
    after AMP unscaling and gradient accumulation, before gradient clipping. Under DDP the gradients are already
    all-reduced, so every rank reads the same numbers with no communication. Nothing is computed on other steps,
    and nothing leaves the device until a log: every ``log_every_n_samples`` samples the period's norms (the
    root mean square over its samples) and counts go to the host in one transfer.

    A filter (conv) or row (linear) is **gradient-dead** when its weight gradient was exactly 0 on each of the last
    ``window`` samples (all samples so far until there are ``window``): a cheap dead-unit signal that needs no
    activation hooks (a unit behind a dead ReLU or a zero BatchNorm gamma gets no gradient). Its masks are pushed in
    the reading, so :class:`~lightning_deadunits.DeadUnitRecycler` can act on them. Frozen layers are not reported.

    Logged keys (``<p>`` is ``prefix``, ``<layer>`` the module name):

    ===================================  ==================================================================
    ``<p>/grads/<layer>/norm``           L2 norm of the layer's weight and bias gradients
    ``<p>/grads/<layer>/zero_rows``      gradient-dead filters or rows
    ``<p>/grads/total/norm``             L2 norm of every parameter's gradient (what norm clipping sees)
    ``<p>/grads/total/zero_rows``        the sum over layers
    ===================================  ==================================================================

    Args:
        every_n_steps: sample every this many optimizer steps (>= 1).
        log_every_n_samples: log (one host transfer) every this many samples (>= 1).
        window: samples a row's gradient must stay 0 to count as gradient-dead (>= 1).
        include: module-name globs to watch (default: all).
        exclude: module-name globs to skip.
        layer_types: layer classes to watch (default: all convolutions and ``nn.Linear``).
        alarms: :class:`~lightning_deadunits.triggers.Rule` objects over the logged keys.
        on_alarm: actions for fired alarms.
        prefix: first part of every logged key.

    Raises:
        ValueError: on an out-of-range number, an unknown action, or (at setup) a sharded strategy.
        TypeError: on a wrongly typed argument.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[GradNormMonitor(every_n_steps=10)])  # doctest: +SKIP
    """

    source = "grads"
    state_key_fields = ("every_n_steps", "window", "include", "prefix")

    def __init__(
        self,
        every_n_steps: int = 50,
        log_every_n_samples: int = 1,
        window: int = 10,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        layer_types: Sequence[type] = DEFAULT_KERNEL_TYPES,
        alarms: Sequence[Rule] = (),
        on_alarm: Sequence[AlarmAction] = ("log",),
        prefix: str = "deadunits",
    ) -> None:
        super().__init__(prefix=prefix, alarms=alarms, on_alarm=on_alarm)
        self.every_n_steps = check_int("every_n_steps", every_n_steps, minimum=1)
        self.log_every_n_samples = check_int("log_every_n_samples", log_every_n_samples, minimum=1)
        self.window = check_int("window", window, minimum=1)
        self.include = check_strings("include", include)
        self.exclude = check_strings("exclude", exclude)
        self.layer_types = check_types("layer_types", layer_types)
        self.probe = GradNormProbe(self.include, self.exclude, self.layer_types)
        self.samples = schedules.StepGate(schedules.every_n_steps(self.every_n_steps))
        self.samples_in_period = 0

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit":
            reject_sharded_strategy(trainer, type(self).__name__, reason="reads whole gradient tensors")
            self.probe.attach(pl_module)

    @override
    def on_before_optimizer_step(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: Optimizer
    ) -> None:
        step = trainer.global_step
        if not self.samples.due(step):
            return
        self.probe.sample()
        self.samples_in_period += 1
        if self.samples_in_period >= self.log_every_n_samples:
            self.log_period(trainer, step)

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self.samples_in_period and self.samples.last_step is not None:
            self.log_period(trainer, self.samples.last_step)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **self.base_state(),
            **self.samples.state_dict(),
            "probe": self.probe.state_dict(),
            "samples_in_period": self.samples_in_period,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.load_base_state(state_dict)
        self.samples.load_state_dict(state_dict)
        self.probe.load_state_dict(state_dict.get("probe", {}))
        self.samples_in_period = int(state_dict.get("samples_in_period", 0))

    def log_period(self, trainer: "pl.Trainer", step: int) -> dict[str, float]:
        """Log the period's norms and gradient-dead rows at ``step`` (one host transfer); return the scalars."""
        self.samples_in_period = 0
        norms, total, dead = self.probe.summary(self.window)
        if total is None:
            return {}
        names = list(norms)
        device = total.device
        counts = [dead[name].sum().to(device).float() for name in names]
        host = torch.stack([total, *(norms[n].to(device) for n in names), *counts]).cpu().tolist()
        layer_norms, zero_rows = host[1 : 1 + len(names)], host[1 + len(names) :]
        scalars = {self.key("total", "norm"): host[0], self.key("total", "zero_rows"): float(sum(zero_rows))}
        for name, norm, rows in zip(names, layer_norms, zero_rows, strict=True):
            scalars[self.key(name, "norm")] = norm
            scalars[self.key(name, "zero_rows")] = rows
        dead_counts = dict(zip(names, zero_rows, strict=True))
        self.publish(trainer, self.reading(step, scalars, dead_counts=dead_counts, dead_masks=dead))
        self.show_layout(trainer, GRAD_LAYOUT, {"": names})
        return scalars
