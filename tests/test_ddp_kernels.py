from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger

from lightning_deadunits import KernelNormMonitor, ThresholdRule
from tests.helpers.ddp import DDP_OPTIONS, RecordOnEachRank, read_ranks
from tests.helpers.kernel_models import AllKinds, LitWrapper


def _monitor_record(trainer: pl.Trainer) -> dict[str, object]:
    monitor = next(cb for cb in trainer.callbacks if isinstance(cb, KernelNormMonitor))  # type: ignore[attr-defined]
    return {
        "history": monitor.history,
        "dead_counts": monitor.dead_counts,
        "alarms": [alarm.to_dict() for alarm in monitor.alarm_log],
        "stop_step": trainer.global_step,
    }


def test_kernel_counts_and_alarms_agree_across_ranks_and_with_one_process(tmp_path: Path) -> None:
    def run(directory: Path, **options: object) -> None:
        pl.seed_everything(0)
        model = AllKinds()
        monitor = KernelNormMonitor(
            every_n_steps=2,
            rel_threshold=0.5,
            alarms=[ThresholdRule("*/total/dead", above=0, patience=2)],
            on_alarm=["stop"],
        )
        trainer = pl.Trainer(
            max_steps=6,
            callbacks=[monitor, RecordOnEachRank(directory, _monitor_record)],
            logger=CSVLogger(directory, name="", version=""),
            **options,  # type: ignore[arg-type]
        )
        trainer.fit(LitWrapper(model, lr=0.3, batches=16))

    run(tmp_path / "ddp", **DDP_OPTIONS)
    rank0, rank1 = read_ranks(tmp_path / "ddp")
    assert rank0 == rank1
    assert rank0["alarms"] and rank0["stop_step"] == rank0["alarms"][0]["step"]
    single = {key: value for key, value in DDP_OPTIONS.items() if key not in ("devices", "strategy")}
    run(tmp_path / "single", devices=1, **single)
    # Weights are replicated, so each rank's counts equal a one-process run on the same initial weights only
    # at the initial check (later steps see different data); the initial check must match exactly.
    (alone,) = read_ranks(tmp_path / "single", world_size=1)
    assert alone["history"][0] == rank0["history"][0]
    assert (tmp_path / "ddp" / "metrics.csv").exists()
