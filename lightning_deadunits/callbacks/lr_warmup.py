"""Learning-rate warmup, and re-warmup after an alarm such as a loss spike, on top of any LR scheduler."""

import bisect
import fnmatch
import logging
import warnings
from collections.abc import Sequence
from functools import cached_property, partial
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_only
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_deadunits import schedules
from lightning_deadunits._state import note_missing_keys
from lightning_deadunits._strategies import reject_sharded_strategy
from lightning_deadunits._validation import check_choice, check_float, check_int, check_prefix, check_strings
from lightning_deadunits.errors import DeadUnitsWarning
from lightning_deadunits.functional.warmup import WARMUP_SHAPES, WarmupShape, rewarm_factor, warmup_factor
from lightning_deadunits.panels.tensorboard import TensorBoardPanels
from lightning_deadunits.triggers.alarm import Alarm

__all__ = ["LRWarmup"]

log = logging.getLogger("lightning_deadunits")

_MAX_REWARMS = 1000


class LRWarmup(Callback):
    r"""Scales every optimizer's learning rate by a warmup factor, and re-warms after alarms (e.g. loss spikes).

    At optimizer step :math:`s` (``trainer.global_step`` when the optimizer steps, i.e. the steps already taken,
    counted like ``max_steps``: once per optimizer step, so gradient accumulation is respected) every param
    group of every optimizer runs with ``lr = scheduled_lr * factor(s)``, where ``scheduled_lr`` is the
    group's LR as the scheduler (or the optimizer's constructor) set it and

    .. math::

        \text{factor}(s) = \min\Big(\text{warmup}(s),\ \text{rewarm}(s)\Big),\quad
        \text{warmup}(s) = \begin{cases} \text{ramp}(s / N) & s < N \\ 1 & s \ge N \end{cases},\quad
        \text{rewarm}(s) = \begin{cases} f + (1 - f)\,\text{ramp}((s - r) / R) & r \le s < r + R \\
        1 & \text{otherwise} \end{cases}

    with :math:`N` = ``warmup_steps``, :math:`R` = ``rewarm_steps``, :math:`f` = ``rewarm_floor``, :math:`r`
    the step of the latest re-warmup and ``ramp`` the ``shape``: :math:`p` (``"linear"``), :math:`p^2`
    (``"quadratic"``) or Ma & Yarats's exponential warmup (``"exponential"``, see
    :func:`lightning_deadunits.functional.warmup.ramp`). So linear warmup is ``lr = base * s / N``, the first
    step running at LR 0. The ``min`` keeps a re-warmup during the initial warmup from raising the LR.

    A re-warmup starts when any monitor raises an alarm whose ``"<source>/<stat>"`` (e.g. ``"loss/spike"``, whatever
    the monitor's ``prefix``), full key or source matches one of the ``rewarm_on`` globs (by default the loss-spike
    alarm ``"loss/spike"``): :math:`r` becomes the current
    ``trainer.global_step``, so the factor drops to ``rewarm_floor`` on the next optimizer step (on this very
    step if the alarm is raised inside it, e.g. from ``on_before_optimizer_step``) and ramps back to 1 over
    ``rewarm_steps``. Monitors raise the same alarms on every rank, so all ranks re-warm together.

    **Schedulers are not disturbed.** The scaling happens in a ``torch.optim`` step pre-hook and is undone in the
    step post-hook, so between optimizer steps (where schedulers, ``ReduceLROnPlateau``, ``LearningRateMonitor``
    and checkpoints read ``param_group["lr"]``) every group holds the scheduler's own value: a chained
    scheduler such as ``ExponentialLR`` keeps deriving each LR from its unscaled predecessor, and the LR after
    the warmup is the one a run without ``LRWarmup`` would have. The hooks are attached at train start and
    removed, with the scheduled LRs restored, at teardown and on exception. The state (re-warmup steps) is saved
    in checkpoints, so a run resumed mid-warmup sees the same LR sequence as an uninterrupted one.

    Logged keys (``<p>`` is ``prefix``), every ``log_every_n_steps`` optimizer steps at the step's index:

    ==================================  ==================================================================
    ``<p>/lr/factor``                   the factor applied on that step
    ``<p>/lr/effective/<opt>/pg<j>``    the LR group ``j`` of optimizer ``<opt>`` ran with (``<opt>`` is the
                                        optimizer's class name, suffixed ``-<i>`` when several optimizers
                                        share it; ``pg<j>`` is the group's ``"name"`` entry when it has one)
    ==================================  ==================================================================

    Args:
        warmup_steps: optimizer steps of the initial warmup (0: none).
        shape: ``"linear"``, ``"quadratic"`` or ``"exponential"``; used by the warmup and the re-warmups.
        rewarm_on: globs over alarm keys or sources that start a re-warmup (empty: never re-warm).
        rewarm_floor: the factor a re-warmup starts from, in [0, 1].
        rewarm_steps: optimizer steps for a re-warmup to ramp back to 1 (0: never re-warm).
        log_every_n_steps: log every this many optimizer steps; ``None``: the trainer's ``log_every_n_steps``.
        prefix: first part of every logged key.

    Raises:
        ValueError: on an out-of-range number, an unknown shape or a malformed prefix, or (at setup) under
            DeepSpeed.
        TypeError: if ``rewarm_on`` is not a string or a list of strings.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> warmup = LRWarmup(warmup_steps=1000, shape="quadratic", rewarm_floor=0.1, rewarm_steps=200)
        >>> trainer = Trainer(callbacks=[LossSpikeMonitor(), warmup])  # doctest: +SKIP
    """

    def __init__(
        self,
        warmup_steps: int = 1000,
        shape: WarmupShape = "linear",
        rewarm_on: str | Sequence[str] = ("loss/spike",),
        rewarm_floor: float = 0.1,
        rewarm_steps: int = 200,
        log_every_n_steps: int | None = None,
        prefix: str = "deadunits",
    ) -> None:
        self.warmup_steps = check_int("warmup_steps", warmup_steps, minimum=0)
        self.shape: WarmupShape = check_choice("shape", shape, WARMUP_SHAPES)
        self.rewarm_on = check_strings("rewarm_on", rewarm_on)
        self.rewarm_floor = check_float("rewarm_floor", rewarm_floor, minimum=0.0, maximum=1.0)
        self.rewarm_steps = check_int("rewarm_steps", rewarm_steps, minimum=0)
        self.log_every_n_steps = (
            None if log_every_n_steps is None else check_int("log_every_n_steps", log_every_n_steps, 1)
        )
        self.prefix = check_prefix(prefix)
        self.rewarm_starts: list[int] = []
        self._optimizers: list[Optimizer] = []
        self._optimizer_names: list[str] = []
        self._handles: list[RemovableHandle] = []
        self._scheduled_lrs: dict[int, list[Any]] = {}
        self.panels = TensorBoardPanels()
        self._logged = schedules.every_n_steps(1)

    # Cached, as MonitorCallback's: Lightning reads it around every hook; the settings it names are never reassigned.
    @cached_property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(warmup_steps=self.warmup_steps, shape=self.shape, rewarm_on=self.rewarm_on)

    @property
    def rewarm_start(self) -> int | None:
        """The step the latest re-warmup started at, or ``None``."""
        return self.rewarm_starts[-1] if self.rewarm_starts else None

    def factor(self, step: int) -> float:
        """The LR factor of optimizer step ``step``, given the re-warmups started so far."""
        latest = bisect.bisect_right(self.rewarm_starts, step)
        start = self.rewarm_starts[latest - 1] if latest else None
        rewarm = rewarm_factor(step, start, self.rewarm_floor, self.rewarm_steps, self.shape)
        return min(warmup_factor(step, self.warmup_steps, self.shape), rewarm)

    def triggers_rewarm(self, alarm: Alarm) -> bool:
        """Whether ``alarm`` starts a re-warmup: its ``"<source>/<stat>"``, key or source matches ``rewarm_on``."""
        names = (alarm.route, alarm.key, alarm.source)
        return self.rewarm_steps > 0 and any(
            fnmatch.fnmatchcase(name, pattern) for pattern in self.rewarm_on for name in names
        )

    def on_deadunits_alarm(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", alarm: Alarm) -> None:
        """Start a re-warmup at the current step if ``alarm`` matches ``rewarm_on``."""
        if not self.triggers_rewarm(alarm):
            return
        step = trainer.global_step
        if self.rewarm_start != step:
            self.rewarm_starts.append(step)
            del self.rewarm_starts[:-_MAX_REWARMS]
            _log_rewarm(step, self.rewarm_floor, step + self.rewarm_steps, alarm)
        # An alarm raised inside an optimizer step (after the pre-hook scaled it) re-warms that step already.
        for index, scheduled in self._scheduled_lrs.items():
            _set_lrs(self._optimizers[index], scheduled, self.factor(step))

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit":
            reject_sharded_strategy(
                trainer,
                type(self).__name__,
                reason="scales the LR through torch optimizer step hooks, which DeepSpeed's optimizer wrappers lack,",
                strategies=("DeepSpeedStrategy",),
                advice="Use DeepSpeed's own warmup scheduler, or DDP or FSDP.",
            )

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # Not on_fit_start: optimizer and scheduler states are restored from a checkpoint after it.
        self._detach()
        self._logged = schedules.every_n_steps(self.log_every_n_steps or int(getattr(trainer, "log_every_n_steps", 50)))
        self._optimizers = []
        for optimizer in trainer.optimizers:
            if all("lr" in group for group in optimizer.param_groups):
                self._optimizers.append(optimizer)
            else:
                warnings.warn(
                    f"`LRWarmup` cannot scale {type(optimizer).__name__}: a param group has no 'lr' entry; "
                    "its learning rate is left alone.",
                    DeadUnitsWarning,
                    stacklevel=2,
                )
        self._optimizer_names = _unique_names(self._optimizers)
        for index, optimizer in enumerate(self._optimizers):
            self._handles.append(optimizer.register_step_pre_hook(partial(self._scale, trainer, index)))
            self._handles.append(optimizer.register_step_post_hook(partial(self._unscale, trainer, index)))

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._detach()

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._detach()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"rewarm_starts": list(self.rewarm_starts)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        note_missing_keys(self, state_dict)
        self.rewarm_starts = [int(step) for step in state_dict.get("rewarm_starts", [])]

    def _scale(self, trainer: "pl.Trainer", index: int, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        """Step pre-hook: remember the scheduled LRs and apply the factor."""
        scheduled = [group["lr"] for group in optimizer.param_groups]
        self._scheduled_lrs[index] = scheduled
        _set_lrs(optimizer, scheduled, self.factor(trainer.global_step))

    def _unscale(self, trainer: "pl.Trainer", index: int, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        """Step post-hook: log what the step ran with, then give the groups their scheduled LRs back."""
        scheduled = self._scheduled_lrs.pop(index, None)
        if scheduled is None:
            return
        step = trainer.global_step
        if trainer.loggers and self._logged(step):
            readings = {f"{self.prefix}/lr/factor": self.factor(step)}
            for j, group in enumerate(optimizer.param_groups):
                group_name = group.get("name", f"pg{j}")
                readings[f"{self.prefix}/lr/effective/{self._optimizer_names[index]}/{group_name}"] = float(group["lr"])
            self.panels.scalars(trainer, readings, step)
        _set_lrs(optimizer, scheduled, 1.0)

    def _detach(self) -> None:
        """Remove the hooks and restore the scheduled LRs of a step interrupted between the two hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for index, scheduled in self._scheduled_lrs.items():
            _set_lrs(self._optimizers[index], scheduled, 1.0)
        self._scheduled_lrs = {}


def _set_lrs(optimizer: Optimizer, scheduled: list[Any], factor: float) -> None:
    # The scheduled values themselves go back at factor 1, so no rounding from lr * f / f creeps in. A group
    # added inside a step (none of the pre-hook's) keeps its own LR rather than failing the run.
    for group, lr in zip(optimizer.param_groups, scheduled, strict=False):
        group["lr"] = lr if factor == 1.0 else lr * factor


def _unique_names(optimizers: Sequence[Optimizer]) -> list[str]:
    names = [type(optimizer).__name__ for optimizer in optimizers]
    return [f"{name}-{i}" if names.count(name) > 1 else name for i, name in enumerate(names)]


@rank_zero_only  # type: ignore[untyped-decorator,misc]
def _log_rewarm(step: int, floor: float, end: int, alarm: Alarm) -> None:
    log.info(
        "deadunits: re-warming the learning rate from factor %.3g at step %d back to 1 at step %d, after [%s] %s",
        floor,
        step,
        end,
        alarm.rule,
        alarm.message,
    )
