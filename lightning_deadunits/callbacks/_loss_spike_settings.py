"""The validated constructor arguments of :class:`~lightning_deadunits.LossSpikeMonitor` beyond its detector's."""

import os
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl

from lightning_deadunits._strategies import reject_sharded_strategy
from lightning_deadunits._validation import check_bool, check_int, set_validated

__all__ = ["LossSpikeSettings"]


@dataclass(frozen=True)
class LossSpikeSettings:
    """The monitor's own arguments, checked (see ``LossSpikeMonitor``; the detection thresholds are
    :class:`~lightning_deadunits.triggers.SpikeDetector`'s); ``dump_dir`` becomes a ``Path``.

    Raises:
        ValueError: on an out-of-range number.
        TypeError: on a wrongly typed argument.

    Example:
        >>> LossSpikeSettings(True, False, "dumps", 20, 2**30, None).dump_dir
        PosixPath('dumps')
    """  # noqa: D205

    grad_signal: bool
    skip_update: bool
    dump_dir: str | os.PathLike[str] | None
    max_dumps: int
    max_bytes: int
    log_every_n_steps: int | None

    def __post_init__(self) -> None:
        check_bool("grad_signal", self.grad_signal)
        check_bool("skip_update", self.skip_update)
        if self.dump_dir is not None and not isinstance(self.dump_dir, (str, os.PathLike)):
            raise TypeError(f"`dump_dir` must be a path or None, got {self.dump_dir!r}.")
        set_validated(
            self,
            dump_dir=None if self.dump_dir is None else Path(self.dump_dir),
            max_dumps=check_int("max_dumps", self.max_dumps, minimum=0),
            max_bytes=check_int("max_bytes", self.max_bytes, minimum=0),
            log_every_n_steps=(
                None if self.log_every_n_steps is None else check_int("log_every_n_steps", self.log_every_n_steps, 1)
            ),
        )

    def check_trainer(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """The checks that need the trainer (at setup): ``skip_update`` needs automatic optimization, no sharding.

        Raises:
            ValueError: for ``skip_update`` under a sharded strategy or with manual optimization.
        """
        if not self.skip_update:
            return
        reject_sharded_strategy(
            trainer,
            "LossSpikeMonitor(skip_update=True)",
            reason="skips a step by clearing the `param.grad` the optimizer reads, which sharded strategies "
            "keep in their own buffers or shards",
            advice="Use DDP, or `skip_update=False` (spikes are still detected, dumped and alarmed).",
        )
        if not pl_module.automatic_optimization:
            raise ValueError(
                "`skip_update=True` needs automatic optimization: with manual optimization the loss is known only "
                "after `training_step` has stepped the optimizer. Use `skip_update=False`, or skip in your own "
                "`training_step` from the alarm (`on_alarm=[callable]`)."
            )
