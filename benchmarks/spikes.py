"""Precision and recall of spike rules on real training traces with spikes injected at known steps.

Each scenario trains a real model (a small CNN on the digits with SGD and momentum, or the character-level
transformer LM of ``examples/char_lm.py`` on the standard library's sources with AdamW) in a plain PyTorch loop
and records every step's loss and global gradient norm (before any clipping). Every rule then reads the same
traces: this project's :class:`~lightning_deadunits.triggers.SpikeDetector` (its defaults, loss and gradient
norm) and the published rules reimplemented below. Spikes are injected at known steps: corrupted batches (inputs
scaled by 25 and wrong labels for a quarter of the CNN's batch; shuffled characters for the LM), a learning-rate
blow-up (one step at 100x; the spike is the next batch's loss), and corrupted batches inside the first 50 steps
(random characters for the LM). Both models train with gradient clipping at norm 1 (as large models do), so a
corrupted batch does not end the run; the recorded norm is the one before clipping.

An *alarm* is the first flagged step of a run of flagged steps (for this project: an episode's start). An
injected spike is *caught* when an alarm falls on its step, *late* when the first alarm comes 1-5 steps after it,
*missed* otherwise. Alarms outside the 10 steps from an injection are false alarms, counted per 1,000 such steps.

The report closes with the detector's per-step host work: ``SpikeDetector.update`` timed over 10,000 steps of a
slowly falling noisy loss (and gradient norm), the best of 5 repeats, split into the warm-up steps (the baseline
follows a trend there) and the rest.

Usage:
    python benchmarks/spikes.py           # every scenario, 3 seeds, writes results/spikes-cpu.{md,json}
    python benchmarks/spikes.py --smoke   # seconds: short runs, 1 seed (CI runs this)
"""

import argparse
import json
import math
import random
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_deadunits.triggers.loss_spike import SpikeDetector

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))  # the shared models live there
from char_lm import CharLMModule, char_windows, stdlib_text
from digits_demo import digits_dataset

RESULTS = Path(__file__).resolve().parent / "results"
LATE_STEPS = 5
AFTERSHOCK_STEPS = 10

Trace = tuple[list[float], list[float]]
"""A run's losses and global gradient norms, one per step."""


@dataclass(frozen=True)
class Scenario:
    """A model, a length, and what is injected where.

    ``corrupt``: corrupted batches (``corruption``: ``"shuffle"`` the LM's characters, or replace them by
    ``"random"`` ones; the CNN's are always scaled with wrong labels); ``lr_blowup``: steps whose update uses 100x
    the learning rate; ``pretrain``: clean steps trained before the recorded ones (a converged model that a fresh
    detector first sees, as when fine-tuning or resuming without the detector's state).
    """

    name: str
    model: str
    steps: int
    corrupt: tuple[int, ...] = ()
    lr_blowup: tuple[int, ...] = ()
    corruption: str = "shuffle"
    pretrain: int = 0

    @property
    def truth(self) -> list[int]:
        """The steps an alarm should fall on: corrupted batches, and the batch after a blown-up update."""
        return sorted([*self.corrupt, *(step + 1 for step in self.lr_blowup)])


def scenarios(smoke: bool) -> list[Scenario]:
    """The scenarios: clean, corrupted, LR blow-up and early spikes (shorter runs in the smoke mode)."""
    if smoke:
        return [Scenario("cnn corrupted", "cnn", 80, corrupt=(60,)), Scenario("lm clean", "lm", 20)]
    return [
        Scenario("cnn clean (converged)", "cnn", 400),
        Scenario("cnn corrupted batches", "cnn", 400, corrupt=(150, 250, 350)),
        Scenario("cnn learning-rate blow-up", "cnn", 400, lr_blowup=(300,)),
        Scenario("cnn spikes in the first 50 steps", "cnn", 200, corrupt=(12, 30, 45)),
        Scenario("cnn converged start (fresh detector)", "cnn", 400, corrupt=(30, 150, 300), pretrain=400),
        Scenario("lm clean", "lm", 300),
        Scenario("lm shuffled-token batches", "lm", 300, corrupt=(150, 250)),
        # early on the LM predicts character frequencies, which shuffling keeps: random characters break them
        Scenario("lm spikes in the first 50 steps", "lm", 150, corrupt=(15, 40), corruption="random"),
    ]


class DigitsCNN(nn.Module):
    """Two convolutions and a linear head on the 8 x 8 digits."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.head = nn.Linear(32 * 4 * 4, 10)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images).flatten(1))  # type: ignore[no-any-return]


def record_trace(scenario: Scenario, seed: int) -> Trace:
    """Train the scenario's model with its injections; return every step's loss and gradient norm."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    if scenario.model == "cnn":
        images, labels = digits_dataset(8, "train").tensors
        model: nn.Module = DigitsCNN()
        optimizer: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        batch_size = 32
    else:
        data = char_windows(stdlib_text(200_000), seq_len=64)
        module = CharLMModule(data, lr=3e-3, batch_size=16, width=32, layers=2, heads=4, ffn=64)
        model, optimizer, batch_size = module, module.configure_optimizers(), 16
        codes = torch.cat([data.tensors[0], data.tensors[1][:, -1:]], dim=1)  # windows of seq_len + 1
    losses, norms = [], []
    base_lr = optimizer.param_groups[0]["lr"]
    for step in range(-scenario.pretrain, scenario.steps):  # negative steps: pretraining, not recorded
        size = len(labels) if scenario.model == "cnn" else len(codes)
        rows = torch.randint(0, size, (batch_size,), generator=generator)
        if scenario.model == "cnn":
            batch_images, batch_labels = images[rows].clone(), labels[rows].clone()
            if step in scenario.corrupt:  # a quarter of the batch scaled by 25 with wrong labels
                batch_images[: batch_size // 4] *= 25.0
                batch_labels[: batch_size // 4] = (batch_labels[: batch_size // 4] + 5) % 10
            loss = F.cross_entropy(model(batch_images), batch_labels)
        else:
            windows = codes[rows].clone()
            if step in scenario.corrupt and scenario.corruption == "shuffle":  # every window's characters shuffled
                windows = windows[:, torch.randperm(windows.shape[1], generator=generator)]
            elif step in scenario.corrupt:
                windows = torch.randint(0, 128, windows.shape, generator=generator)
            logits = model(windows[:, :-1])
            loss = F.cross_entropy(logits.transpose(1, 2), windows[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        for group in optimizer.param_groups:
            group["lr"] = base_lr * (100.0 if step in scenario.lr_blowup else 1.0)
        norm = float(nn.utils.clip_grad_norm_(model.parameters(), 1.0))  # the norm before clipping
        if step >= 0:
            losses.append(float(loss.detach()))
            norms.append(norm)
        optimizer.step()
    return losses, norms


def this_project(losses: list[float], norms: list[float]) -> list[bool]:
    """``SpikeDetector()`` at its defaults on the loss and the gradient norm: True at each episode start."""
    detector = SpikeDetector()
    verdicts = [detector.update(loss, step, norm) for step, (loss, norm) in enumerate(zip(losses, norms, strict=True))]
    return [verdict.episode_start for verdict in verdicts]


def lightning_spike_detection(losses: list[float], norms: list[float]) -> list[bool]:
    """Lightning's ``SpikeDetection``: a loss above (1 + rtol = 3) x the running mean of the last 10 losses."""
    window: deque[float] = deque(maxlen=10)
    flags = []
    for loss in losses:
        flagged = not math.isfinite(loss) or (bool(window) and loss > 3.0 * statistics.fmean(window))
        flags.append(flagged)
        if not flagged:
            window.append(loss)
    return flags


def llm_foundry_kill_loss_spike(losses: list[float], norms: list[float]) -> list[bool]:
    """llm-foundry's ``KillLossSpike``: 4 losses in a row above 2x the mean of a full window of 100."""
    window: deque[float] = deque(maxlen=100)
    flags, streak = [], 0
    for loss in losses:
        over = len(window) == window.maxlen and loss > 2.0 * statistics.fmean(window)
        streak = streak + 1 if over else 0
        flags.append(streak >= 4)
        window.append(loss)
    return flags


def olmo_levanter(losses: list[float], norms: list[float]) -> list[bool]:
    """OLMo-core's and Levanter's step skipping: loss or gradient norm above mean + 6 sd of the last 128 (>= 20)."""
    windows: tuple[deque[float], deque[float]] = (deque(maxlen=128), deque(maxlen=128))
    flags = []
    for values in zip(losses, norms, strict=True):
        flagged = any(
            len(window) >= 20 and value > statistics.fmean(window) + 6 * statistics.pstdev(window)
            for window, value in zip(windows, values, strict=True)
        )
        flags.append(flagged)
        for window, value in zip(windows, values, strict=True):
            window.append(value)
    return flags


def zclip(losses: list[float], norms: list[float]) -> list[bool]:
    """ZClip's z-score: EMA mean and variance of the gradient norm (alpha 0.97), z > 2.5, after 25 warm-up steps."""
    alpha, flags = 0.97, []
    mean = variance = 0.0
    for step, norm in enumerate(norms):
        if step < 25:
            flags.append(False)
            mean, variance = (norm, 0.0) if step == 0 else (mean, variance)
            if step == 24:
                mean, variance = statistics.fmean(norms[:25]), statistics.pvariance(norms[:25])
            continue
        std = math.sqrt(variance) or 1e-12
        z = (norm - mean) / std
        flags.append(z > 2.5)
        value = mean + 2.5 * std if z > 2.5 else norm  # ZClip updates its statistics with the clipped norm
        mean = alpha * mean + (1 - alpha) * value
        variance = alpha * variance + (1 - alpha) * (value - mean) ** 2
    return flags


RULES: dict[str, Callable[[list[float], list[float]], list[bool]]] = {
    "this project (SpikeDetector defaults)": this_project,
    "Lightning SpikeDetection (window 10, rtol 2)": lightning_spike_detection,
    "llm-foundry KillLossSpike (2x mean, patience 4)": llm_foundry_kill_loss_spike,
    "OLMo-core / Levanter (mean + 6 sd over 128)": olmo_levanter,
    "ZClip z-score (alpha 0.97, z 2.5)": zclip,
}


def score(scenario: Scenario, flags: list[bool]) -> dict[str, float]:
    """Caught, late and missed injections, and false alarms per 1,000 clean steps, of one run."""
    alarms = [step for step, flag in enumerate(flags) if flag and (step == 0 or not flags[step - 1])]
    caught = late = missed = 0
    for truth in scenario.truth:
        first = next((step for step in alarms if step >= truth), None)
        if first == truth:
            caught += 1
        elif first is not None and first - truth <= LATE_STEPS:
            late += 1
        else:
            missed += 1
    zones = {truth + offset for truth in scenario.truth for offset in range(AFTERSHOCK_STEPS + 1)}
    false = sum(step not in zones for step in alarms)
    clean_steps = scenario.steps - len(zones & set(range(scenario.steps)))
    return {"caught": caught, "late": late, "missed": missed, "false": false, "clean_steps": clean_steps}


def step_cost(steps: int, repeats: int) -> dict[str, float]:
    """Microseconds of ``SpikeDetector.update`` per step (best of ``repeats``): warm-up, after it, and overall."""
    noise = random.Random(0)
    losses = [2.0 * 0.9995**step + 0.05 * noise.random() for step in range(steps)]
    norms = [1.0 + 0.2 * noise.random() for _ in range(steps)]
    warmup = SpikeDetector().warmup
    best: dict[str, float] = {}
    for _ in range(repeats):
        for signals in ("loss", "loss and gradient norm"):
            detector = SpikeDetector()
            grads: list[float | None] = list(norms) if signals != "loss" else [None] * steps
            marks = [time.perf_counter()]
            for step in range(steps):
                detector.update(losses[step], step, grads[step])
                if step == warmup - 1:
                    marks.append(time.perf_counter())
            marks.append(time.perf_counter())
            costs = {
                "warm-up": (marks[1] - marks[0]) / warmup,
                "after warm-up": (marks[2] - marks[1]) / (steps - warmup),
                "every step": (marks[2] - marks[0]) / steps,
            }
            for phase, seconds in costs.items():
                key = f"{signals}, {phase}"
                best[key] = min(best.get(key, math.inf), 1e6 * seconds)
    return best


def run(smoke: bool, seeds: int) -> dict[str, Any]:
    """Record every scenario's traces and score every rule on them."""
    rows = []
    for scenario in scenarios(smoke):
        started = time.perf_counter()
        traces = [record_trace(scenario, seed) for seed in range(seeds)]
        for rule, detect in RULES.items():
            totals = {"caught": 0, "late": 0, "missed": 0, "false": 0, "clean_steps": 0}
            for trace in traces:
                for key, value in score(scenario, detect(*trace)).items():
                    totals[key] += value
            per_1000 = 1000 * totals["false"] / max(1, totals["clean_steps"])
            rows.append({"scenario": scenario.name, "rule": rule, **totals, "false_per_1000": per_1000})
        print(f"{scenario.name}: {seeds} seeds in {time.perf_counter() - started:.0f} s", flush=True)
    steps = 1_000 if smoke else 10_000
    repeats = 1 if smoke else 5
    cost = step_cost(steps, repeats)
    return {
        "seeds": seeds,
        "smoke": smoke,
        "torch": torch.__version__,
        "rows": rows,
        "step_cost_us": cost,
        "steps": steps,
        "repeats": repeats,
    }


def markdown(report: dict[str, Any]) -> str:
    """The precision/recall table."""
    lines = [
        f"Spike rules on recorded training traces, {report['seeds']} seed(s) per scenario (CPU, torch "
        f"{report['torch']}). Caught: an alarm at the injected step; late: within {LATE_STEPS} steps after; "
        f"false alarms: alarms more than {AFTERSHOCK_STEPS} steps from any injection, per 1,000 such steps.",
        "",
        "| scenario | rule | caught | late | missed | false alarms / 1,000 clean steps |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['scenario']} | {row['rule']} | {row['caught']} | {row['late']} | {row['missed']} "
            f"| {row['false_per_1000']:.1f} |"
        )
    cost = [
        "",
        f"Per-step host work of `SpikeDetector.update` ({report['steps']:,} steps of a slowly falling noisy loss, "
        f"best of {report['repeats']}; pure Python on the host, on steps where nothing is logged too):",
        "",
        "| signals and steps | microseconds per step |",
        "| --- | ---: |",
        *(f"| {key} | {value:.1f} |" for key, value in report["step_cost_us"].items()),
    ]
    return "\n".join([*lines, "", *closing_notes(report), *cost]) + "\n"


def closing_notes(report: dict[str, Any]) -> list[str]:
    """Where this project's rule misses, is late or alarms falsely, and every row a published rule wins."""
    ours_name = next(iter(RULES))
    notes = []
    for ours in (row for row in report["rows"] if row["rule"] == ours_name):
        if ours["missed"] or ours["late"] or ours["false"]:
            notes.append(
                f"- {ours['scenario']}: this project's rule misses {ours['missed']}, is late on {ours['late']} and "
                f"raises {ours['false']} false alarm(s)."
            )
        for other in report["rows"]:
            wins = other["caught"] > ours["caught"] or (
                other["caught"] == ours["caught"] and other["false_per_1000"] < ours["false_per_1000"]
            )
            if other["scenario"] == ours["scenario"] and other["rule"] != ours_name and wins:
                notes.append(f"- {ours['scenario']}: {other['rule']} wins this row.")
    return ["Notes:", "", *(notes or ["- this project's rule is at least as good as every other rule in every row."])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="seconds: short runs, one seed")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per scenario (default 3)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the results go")
    args = parser.parse_args()
    torch.set_num_threads(1)
    report = run(args.smoke, 1 if args.smoke else args.seeds)
    name = "spikes-cpu-smoke" if args.smoke else "spikes-cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / f"{name}.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
