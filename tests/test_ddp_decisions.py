"""One two-rank DDP run in which every kind of decision happens, each taken by both ranks at the same step."""

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
from lightning.pytorch import strategies
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_deadunits import (
    ActivationMonitor,
    DeadUnits,
    KernelNormMonitor,
    LossSpikeMonitor,
    LRWarmup,
    ThresholdRule,
)
from lightning_deadunits._strategies import SHARDED_STRATEGIES
from tests.helpers.alarm_helpers import LRRecorder
from tests.helpers.ddp import DDP_OPTIONS, RecordOnEachRank, read_ranks
from tests.helpers.memory_logger import MemoryLogger
from tests.helpers.odd_models import GatedRelu, OddTask, PerRankTask, SmallConvNet, rank_features

SPIKE = 6  # the batch (and step) whose loss spikes on rank 1 only
STOP = 10  # the kernel alarm's patience runs out at the sixth check, every 2 steps from step 0
LR = 0.01


class RankLosses(pl.Callback):
    """Each rank's own loss per step (what `training_step` returned)."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int) -> None:
        self.losses[i] = float(outputs["loss"])


def _record(trainer: pl.Trainer) -> dict[str, Any]:
    callbacks = trainer.callbacks  # type: ignore[attr-defined]
    bundle = next(cb for cb in callbacks if isinstance(cb, DeadUnits))
    kernels, activations, loss, warmup = bundle.parts
    assert isinstance(loss, LossSpikeMonitor) and isinstance(kernels, KernelNormMonitor)
    memory = next(logger for logger in trainer.loggers if isinstance(logger, MemoryLogger))
    return {
        "metrics": {key: series for key, series in memory.metrics.items() if key.startswith("deadunits/")},
        "losses": next(cb for cb in callbacks if isinstance(cb, RankLosses)).losses,
        "alarms": [[(a.key, a.step) for a in part.alarm_log] for part in (kernels, activations, loss)],  # type: ignore[attr-defined]
        "spike_steps": loss.spike_steps,
        "events": [{key: event[key] for key in ("local", "dump", "rank", "reason")} for event in loss.events],
        "skipped": loss.skipped_updates,
        "rewarm_starts": warmup.rewarm_starts,  # type: ignore[attr-defined]
        "lrs": next(cb for cb in callbacks if isinstance(cb, LRRecorder)).lrs_by_step(),
        "stop": (kernels.stop_step, trainer.global_step),
        "weights": [p.detach().double().sum().item() for p in trainer.lightning_module.parameters()],
        "panel_writers": len(kernels.panels.writers(trainer)),
    }


@pytest.mark.slow
def test_every_decision_is_taken_by_all_ranks_at_the_same_step(tmp_path: Path) -> None:
    bundle = DeadUnits(
        kernels=KernelNormMonitor(
            every_n_steps=2,
            alarms=[ThresholdRule("deadunits/kernels/total/dead", above=0, patience=6)],
            on_alarm=["stop"],
        ),
        activations=ActivationMonitor(
            every_n_steps=1,
            log_every_n_samples=1,
            window=3,
            dead_frac_above=0.3,
            on_validation=True,
            alarms=[ThresholdRule("deadunits/activations/model.relu/dead", above=1.5, name="rank_local_dead")],
        ),
        loss=LossSpikeMonitor(
            window=5, warmup=4, ratio=10, skip_update=True, log_every_n_steps=1, dump_dir=tmp_path / "dumps"
        ),
        lr_warmup=LRWarmup(warmup_steps=0, rewarm_floor=0.5, rewarm_steps=2, log_every_n_steps=1),
    )
    task = PerRankTask(
        GatedRelu(), [rank_features(rank, 20, spike_batches=[SPIKE] if rank else []) for rank in (0, 1)], lr=LR
    )
    trainer = pl.Trainer(
        max_steps=20,
        callbacks=[bundle, RankLosses(), LRRecorder(), RecordOnEachRank(tmp_path / "ranks", _record)],
        logger=[MemoryLogger(), TensorBoardLogger(tmp_path, name="tb", version="")],
        use_distributed_sampler=False,
        val_check_interval=5,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        **DDP_OPTIONS,
    )
    trainer.fit(task)

    rank0, rank1 = read_ranks(tmp_path / "ranks")
    for key in ("metrics", "alarms", "spike_steps", "skipped", "rewarm_starts", "lrs", "stop", "weights"):
        assert rank0[key] == rank1[key], key
    kernel_alarms, activation_alarms, loss_alarms = rank0["alarms"]
    # stop: the kernel alarm ends both ranks at its step
    assert kernel_alarms == [["deadunits/kernels/total/dead", STOP]] and rank0["stop"] == [STOP, STOP]
    # spike seen by rank 1 alone: both ranks count it, skip its update and re-warm from the next step
    assert rank0["spike_steps"] == [SPIKE] and loss_alarms == [["deadunits/loss/spike", SPIKE]]
    assert rank0["skipped"] == 1 and rank0["rewarm_starts"] == [SPIKE + 1]
    lrs = {int(step): lr[0] for step, lr in rank0["lrs"].items()}
    assert lrs[SPIKE] == LR and lrs[SPIKE + 1] == pytest.approx(LR / 2) and lrs[SPIKE + 2] == pytest.approx(0.75 * LR)
    # dumps per rank: only the rank whose loss spiked writes one
    dump = tmp_path / "dumps" / f"deadunits-step{SPIKE:08d}-rank1-batch{SPIKE:05d}.pt"
    assert rank1["events"] == [{"local": True, "dump": str(dump), "rank": 1, "reason": "ratio and z-score"}]
    assert rank0["events"] == [{"local": False, "dump": None, "rank": 0, "reason": "spike on another rank"}]
    assert list((tmp_path / "dumps").iterdir()) == [dump]
    # activation alarms follow the global statistics: channel 0 is dead everywhere, channel 1 only on rank 0
    metrics = rank0["metrics"]
    assert set(metrics["deadunits/activations/model.relu/dead"].values()) == {1.0}
    train_alarms = [(key, step) for key, step in activation_alarms if "/val/" not in key]
    assert {key for key, _ in train_alarms} == {
        "deadunits/activations/model.relu/dead_frac",
        "deadunits/activations/total/dead_frac",
    }
    assert sorted({step for _, step in train_alarms}) == list(range(STOP))
    # validation passes (rank 0's first two batches on both ranks) are reduced too: channels 0 and 1 never fire
    assert metrics["deadunits/activations/val/model.relu/dead"] == {"5": 2.0, "10": 2.0}
    assert sorted(step for key, step in activation_alarms if key == "deadunits/activations/val/total/dead_frac") == [
        5,
        10,
    ]
    # the logged loss is the loss of the global batch: the mean over the ranks' equal-sized batches
    for step, value in metrics["deadunits/loss/value"].items():
        assert value == pytest.approx((rank0["losses"][step] + rank1["losses"][step]) / 2, rel=1e-6)
    assert rank1["losses"][str(SPIKE)] > 100 * rank0["losses"][str(SPIKE)]
    # panels: rank 0 writes them, rank 1 not even asks for a writer
    assert (rank0["panel_writers"], rank1["panel_writers"]) == (1, 0)
    assert len(list((tmp_path / "tb").rglob("events.out.tfevents.*"))) == 1


def _set_up(callback: Callback, strategy_name: str, tmp_path: Path) -> None:
    # An instance without __init__: setup looks only at its class, and DeepSpeed's constructor needs the package.
    strategy = object.__new__(getattr(strategies, strategy_name))
    trainer = SimpleNamespace(
        strategy=strategy, log_dir=str(tmp_path), default_root_dir=str(tmp_path), log_every_n_steps=50
    )
    callback.setup(trainer, OddTask(SmallConvNet(), []), "fit")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("make", "rejected", "message"),
    [
        (
            KernelNormMonitor,
            SHARDED_STRATEGIES,
            r"`KernelNormMonitor` reads whole weight tensors .* does not support sharded strategies .*; got strategy "
            r"{}. Use DDP, or drop `KernelNormMonitor` \(in `DeadUnits`: `kernels=False`\)",
        ),
        (
            ActivationMonitor,
            ("ModelParallelStrategy",),
            r"`ActivationMonitor` sums each rank's activations .* tensor parallelism splits and does not support "
            r"sharded strategies \(ModelParallelStrategy\); got strategy {}",
        ),
        (
            lambda: LossSpikeMonitor(skip_update=True),
            SHARDED_STRATEGIES,
            r"`LossSpikeMonitor\(skip_update=True\)` skips a step by clearing the `param.grad` .*; got strategy {}. "
            r"Use DDP, or `skip_update=False`",
        ),
        (LossSpikeMonitor, (), ""),
        (
            LRWarmup,
            ("DeepSpeedStrategy",),
            r"`LRWarmup` scales the LR through torch optimizer step hooks.*got strategy {}",
        ),
    ],
)
def test_sharded_strategies_are_supported_or_rejected_clearly_at_setup(
    tmp_path: Path, make: Callable[[], Callback], rejected: tuple[str, ...], message: str
) -> None:
    for name in SHARDED_STRATEGIES:
        if name in rejected:
            with pytest.raises(ValueError, match=message.format(name)):
                _set_up(make(), name, tmp_path)
        else:
            _set_up(make(), name, tmp_path)


def test_dead_units_under_fsdp_runs_without_its_kernel_monitor(tmp_path: Path) -> None:
    for bundle, fails in (
        (DeadUnits(lr_warmup=LRWarmup()), True),
        (DeadUnits(kernels=False, lr_warmup=LRWarmup()), False),
    ):
        for part in bundle.parts:
            if fails and isinstance(part, KernelNormMonitor):
                with pytest.raises(ValueError, match=r"in `DeadUnits`: `kernels=False`"):
                    _set_up(part, "FSDPStrategy", tmp_path)
            else:
                _set_up(part, "FSDPStrategy", tmp_path)
