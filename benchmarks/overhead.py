"""Overhead of the monitors against a bare Trainer, measured side by side in one process.

Every configuration trains the same model on the same data for the same number of optimizer steps. Runs are
interleaved (each repetition runs every configuration once, in a shuffled order) and each configuration's time per
step is divided by the bare run's time per step *of the same repetition*; the table reports the median ratio.
The timed window starts after ``--warmup`` steps (so one-off costs such as the fit-start kernel check, data
loader start-up and allocator warm-up are excluded from every configuration alike) and ends at the last step.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` over the timed window; on CPU, the growth of the
process's peak RSS is meaningless in one process, so each configuration is also run once in a fresh subprocess
and its peak RSS reported against the bare subprocess (``--no-memory`` skips this).

Usage:
    python benchmarks/overhead.py                 # both models, CPU (or CUDA when available), writes results/
    python benchmarks/overhead.py --smoke         # seconds: tiny model, 1 repetition (CI runs this)
    python benchmarks/overhead.py --scaling       # overhead against model width and sampling interval
"""

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_deadunits as du
from lightning_deadunits.demo import MobileNetLike, digits_dataset

RESULTS = Path(__file__).resolve().parent / "results"


class ResidualCNN(nn.Module):
    """A wider ResNet-style CNN: stem, ``stages`` of two residual blocks each, global pooling, linear head."""

    def __init__(self, width: int = 64, stages: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        blocks: list[nn.Module] = []
        for _ in range(stages * 2):
            blocks.append(
                nn.Sequential(
                    nn.Conv2d(width, width, 3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                    nn.ReLU(),
                    nn.Conv2d(width, width, 3, padding=1, bias=False),
                    nn.BatchNorm2d(width),
                )
            )
        self.blocks = nn.ModuleList(blocks)
        self.relu = nn.ReLU()
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = self.relu(x + block(x))
        return self.head(x.mean(dim=(2, 3)))  # type: ignore[no-any-return]


class BenchModule(pl.LightningModule):
    def __init__(self, model: nn.Module, data: TensorDataset, batch_size: int) -> None:
        super().__init__()
        self.model = model
        self.data = data
        self.batch_size = batch_size

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        images, labels = batch
        per_sample = F.cross_entropy(self.model(images), labels, reduction="none")
        return {"loss": per_sample.mean(), "per_sample_loss": per_sample.detach()}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=True, drop_last=True)


class StepTimer(pl.Callback):
    """Wall time from the start of step ``warmup`` to the end of the last step, synchronising CUDA at both ends."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start: float | None = None
        self.end = 0.0
        self.steps = 0

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.warmup and self.start is None:
            _sync()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self.start is not None:
            _sync()
            self.end = time.perf_counter()
            self.steps = trainer.global_step - self.warmup

    @property
    def per_step(self) -> float:
        assert self.start is not None and self.steps > 0
        return (self.end - self.start) / self.steps


class ParameterHistograms(pl.Callback):
    """What users write by hand: every parameter's histogram through the TensorBoard logger every N steps."""

    def __init__(self, every_n_steps: int) -> None:
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    for name, parameter in pl_module.named_parameters():
                        logger.experiment.add_histogram(name, parameter.detach(), trainer.global_step)


@dataclass
class Config:
    name: str
    callbacks: Callable[[], list[pl.Callback]] = list
    trainer: dict[str, Any] = field(default_factory=dict)
    tensorboard: bool = False


def configs(histogram_every: int) -> list[Config]:
    return [
        Config("bare"),
        Config("KernelNormMonitor()", lambda: [du.KernelNormMonitor()], tensorboard=True),
        Config("ActivationMonitor()", lambda: [du.ActivationMonitor()], tensorboard=True),
        Config("ActivationMonitor(every_n_steps=1)", lambda: [du.ActivationMonitor(every_n_steps=1)], tensorboard=True),
        Config("LossSpikeMonitor()", lambda: [du.LossSpikeMonitor()], tensorboard=True),
        Config("DeadUnits()", lambda: [du.DeadUnits()], tensorboard=True),
        Config("detect_anomaly=True", trainer={"detect_anomaly": True}),
        Config(
            f"param histograms every {histogram_every}",
            lambda: [ParameterHistograms(histogram_every)],
            tensorboard=True,
        ),
    ]


def build_model(kind: str, width: int) -> tuple[nn.Module, TensorDataset, int]:
    if kind == "mobilenet":
        return MobileNetLike(), digits_dataset(32, "all"), 32
    if kind == "resnet":
        generator = torch.Generator().manual_seed(0)
        data = TensorDataset(
            torch.randn(2048, 3, 32, 32, generator=generator), torch.randint(0, 10, (2048,), generator=generator)
        )
        return ResidualCNN(width=width), data, 64
    if kind == "tiny":
        data = digits_dataset(16, "all")
        return MobileNetLike(widths=(8, 8, 16)), data, 32
    raise ValueError(f"unknown model {kind!r}")


def run_once(
    config: Config, model_kind: str, width: int, steps: int, warmup: int, device: str, log_dir: Path
) -> dict[str, float]:
    pl.seed_everything(0, verbose=False)
    model, data, batch_size = build_model(model_kind, width)
    timer = StepTimer(warmup)
    logger = TensorBoardLogger(
        log_dir, name=config.name.replace(" ", "_").replace("(", "").replace(")", "").replace("=", "-")
    )
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator=device,
        devices=1,
        callbacks=[*config.callbacks(), timer],
        logger=logger if config.tensorboard else False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        **config.trainer,
    )
    trainer.fit(BenchModule(model, data, batch_size))
    peak = float(torch.cuda.max_memory_allocated()) if device == "cuda" else float("nan")
    return {"per_step": timer.per_step, "peak_memory": peak}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_rss_subprocess(config_index: int, args: argparse.Namespace) -> float:
    """Peak RSS (bytes) of a fresh process that runs one configuration."""
    command = [
        sys.executable,
        __file__,
        "--child",
        str(config_index),
        "--model",
        args.child_model,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--width",
        str(args.width),
        "--device",
        args.device,
        "--histogram-every",
        str(args.histogram_every),
    ]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return float(json.loads(output)["peak_rss"])


def benchmark(model_kind: str, args: argparse.Namespace, log_dir: Path) -> list[dict[str, Any]]:
    all_configs = configs(args.histogram_every)
    times: dict[str, list[float]] = {c.name: [] for c in all_configs}
    memory: dict[str, list[float]] = {c.name: [] for c in all_configs}
    order_rng = random.Random(0)
    for repetition in range(args.repeats):
        order = list(all_configs)
        order_rng.shuffle(order)
        for config in order:
            result = run_once(
                config, model_kind, args.width, args.steps, args.warmup, args.device, log_dir / f"rep{repetition}"
            )
            times[config.name].append(result["per_step"])
            memory[config.name].append(result["peak_memory"])
        print(f"[{model_kind}] repetition {repetition + 1}/{args.repeats} done", file=sys.stderr)
    rss: dict[str, float] = {}
    if args.memory and args.device == "cpu":
        args.child_model = model_kind
        rss = {c.name: peak_rss_subprocess(i, args) for i, c in enumerate(all_configs)}
    rows = []
    for config in all_configs:
        ratios = [t / b for t, b in zip(times[config.name], times["bare"], strict=True)]
        row: dict[str, Any] = {
            "model": model_kind,
            "config": config.name,
            "ms_per_step": 1000 * statistics.median(times[config.name]),
            "time_ratio": statistics.median(ratios),
            "time_ratio_min": min(ratios),
            "time_ratio_max": max(ratios),
        }
        if args.device == "cuda":
            row["memory_ratio"] = statistics.median(memory[config.name]) / statistics.median(memory["bare"])
        elif rss:
            row["memory_ratio"] = rss[config.name] / rss["bare"]
        rows.append(row)
    return rows


def scaling(args: argparse.Namespace, log_dir: Path) -> list[dict[str, Any]]:
    """Overhead of DeadUnits() against model width, and of ActivationMonitor against its sampling interval."""
    rows = []
    for width in args.widths:
        pairs = [Config("bare"), Config("DeadUnits()", lambda: [du.DeadUnits()], tensorboard=True)]
        ratios = []
        for repetition in range(args.repeats):
            bare, monitored = (
                run_once(c, "resnet", width, args.steps, args.warmup, args.device, log_dir / f"w{width}r{repetition}")[
                    "per_step"
                ]
                for c in pairs
            )
            ratios.append(monitored / bare)
        rows.append(
            {"sweep": "width", "value": width, "config": "DeadUnits()", "time_ratio": statistics.median(ratios)}
        )
    for interval in args.intervals:
        pairs = [
            Config("bare"),
            Config("ActivationMonitor", lambda i=interval: [du.ActivationMonitor(every_n_steps=i)], tensorboard=True),
        ]
        ratios = []
        for repetition in range(args.repeats):
            bare, monitored = (
                run_once(
                    c, "resnet", args.width, args.steps, args.warmup, args.device, log_dir / f"i{interval}r{repetition}"
                )["per_step"]
                for c in pairs
            )
            ratios.append(monitored / bare)
        rows.append(
            {
                "sweep": "every_n_steps",
                "value": interval,
                "config": "ActivationMonitor",
                "time_ratio": statistics.median(ratios),
            }
        )
    return rows


def markdown(rows: list[dict[str, Any]], machine: str) -> str:
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {machine}.",
        "",
        "| model | configuration | ms/step | time ratio (min-max) | peak memory ratio |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for row in rows:
        memory = f"{row['memory_ratio']:.3f}" if "memory_ratio" in row else "n/a"
        lines.append(
            f"| {row['model']} | {row['config']} | {row['ms_per_step']:.1f} | {row['time_ratio']:.3f} "
            f"({row['time_ratio_min']:.3f}-{row['time_ratio_max']:.3f}) | {memory} |"
        )
    return "\n".join(lines) + "\n"


def machine_description(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} CPU cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mobilenet", "resnet"])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--histogram-every", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="seconds-long run for CI")
    parser.add_argument("--scaling", action="store_true")
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--intervals", type=int, nargs="+", default=[1, 5, 25, 100])
    parser.add_argument("--no-memory", dest="memory", action="store_false")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default="mobilenet", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        config = configs(args.histogram_every)[args.child]
        run_once(
            config,
            args.model,
            args.width,
            args.steps,
            args.warmup,
            args.device,
            Path(os.environ.get("TMPDIR", "/tmp")) / "deadunits-bench-child",
        )
        print(json.dumps({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
        return
    if args.smoke:
        args.models, args.steps, args.warmup, args.repeats, args.memory = ["tiny"], 6, 2, 1, False
        args.widths, args.intervals = [8], [1]
    log_dir = args.out / "tmp"
    machine = machine_description(args.device)
    if args.scaling:
        rows = scaling(args, log_dir)
        name = f"scaling-{args.device}"
        text = "\n".join(f"| {r['sweep']} | {r['value']} | {r['config']} | {r['time_ratio']:.3f} |" for r in rows)
        header = "| sweep | value | configuration | time ratio |\n| --- | ---: | --- | ---: |"
        text = f"Measured {time.strftime('%Y-%m-%d')} on {machine}.\n\n{header}\n{text}\n"
    else:
        rows = [row for model in args.models for row in benchmark(model, args, log_dir)]
        name = f"overhead-{args.device}"
        text = markdown(rows, machine)
    if args.smoke:
        name += "-smoke"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(
        json.dumps({"machine": machine, "args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2)
    )
    (args.out / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
