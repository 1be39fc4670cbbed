"""Every example runs as a script, in a mode short enough for the suite, and shows what its docstring claims.

The scripts run in a subprocess against this checkout (``PYTHONPATH``), so where an example keeps its helpers
(``lightning_deadunits.demo`` or a module beside it in ``examples/``) does not matter; results are read from
what each prints and writes.
"""

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Example:
    """One script, the arguments of its short mode, and the check of its claim on ``(output dir, stdout)``."""

    script: str
    arguments: tuple[str, ...]
    fast: bool
    check: Callable[[Path, str], None]


def _pool_sparsity(out: Path, stdout: str) -> None:
    # claim: the max-pooled feature ends with far more exact zeros and channels dead on every validation image
    summary = json.loads((out / "summary.json").read_text())
    max_pool, avg_pool = summary["max"], summary["avg"]
    assert max_pool["zero_frac"] > 0.2
    assert max_pool["zero_frac"] > 3 * avg_pool["zero_frac"]
    assert max_pool["dead"] > avg_pool["dead"]
    assert max_pool["max_abs"] > avg_pool["max_abs"]
    assert "| max |" in (out / "report.md").read_text()
    for pool in ("max", "avg"):
        assert list((out / pool).glob("events.out.tfevents.*"))


def _spike_dump(out: Path, stdout: str) -> None:
    # claim: the dirty batch is flagged at its step, its update skipped, its dump ranks the corrupted samples first
    assert "Dirty batch injected at step 36; spikes flagged at steps [36]." in stdout
    assert "Update of step 36 skipped: True" in stdout
    shown = re.search(r"^Spike dump (\S+)$", stdout, re.MULTILINE)
    assert shown is not None, stdout[-3000:]
    dump = Path(shown.group(1))
    assert dump.parent == out / "deadunits" / "dumps" and dump.name.endswith("step00000036-rank0-batch00036.pt")
    assert dump.is_file()
    assert "Samples by per-sample loss (highest first):" in stdout
    assert "Corrupted samples ranked first: yes" in stdout
    assert list(out.glob("events.out.tfevents.*"))


def _recycle(out: Path, stdout: str) -> None:
    # claim: the recycler re-initialises dead kernels, and its run ends with fewer dead kernels than the plain one
    assert "without recycler" in stdout and "with recycler" in stdout
    summary = json.loads((out / "summary.json").read_text())
    plain, recycled = summary["without recycler"], summary["with recycler"]
    assert plain["filters"] == recycled["filters"] == 938
    assert plain["recycled"] == 0 and plain["dead_kernels"] > 0
    assert recycled["recycled"] > 0 and recycled["recycled"] == sum(e["recycled"] for e in recycled["recycle_events"])
    assert recycled["dead_kernels"] < plain["dead_kernels"]
    assert list((out / "with_recycler").glob("events.out.tfevents.*"))
    assert list((out / "without_recycler").glob("events.out.tfevents.*"))


def _zero_kernels(out: Path, stdout: str) -> None:
    # claim: Adam with coupled L2 decay collapses filters, SGD leaves none (after one epoch not yet mostly depthwise
    # ones: that needs the full run)
    report = (out / "report.md").read_text()
    totals = re.search(r"^\| \*\*total\*\* \| \| \| \*\*(\d+)\*\* \| \*\*(\d+)\*\* \|$", report, re.MULTILINE)
    assert totals is not None, report
    adam, sgd = int(totals.group(1)), int(totals.group(2))
    assert adam > sgd == 0
    assert "| model.features.4 | depthwise | 32 |" in report
    assert list((out / "adam").glob("events.out.tfevents.*"))
    assert list((out / "sgd").glob("events.out.tfevents.*"))


def _spike_rewind(out: Path, stdout: str) -> None:
    # claim: the run with Rewind ends (bit for bit in the fast mode) where its clean twin does; the one without it,
    # far worse
    summary = json.loads((out / "summary.json").read_text())
    rewound, twin, plain = summary["with Rewind"], summary["clean twin"], summary["without Rewind"]
    assert summary["rewinds"] == 1
    assert abs(rewound["loss"] - twin["loss"]) <= 0.02 * twin["loss"]
    assert plain["loss"] > 2 * twin["loss"] and plain["accuracy"] < twin["accuracy"] - 0.3
    assert "with Rewind: final loss" in stdout


def _transformer_lm(out: Path, stdout: str) -> None:
    # claim: FFN neurons die at the high LR and not in the stable twin (seen through the layers' functional F.relu,
    # one site per layer with dim_feedforward channels); the corrupted batch is flagged, skipped, dumped, and its
    # corrupted windows rank first
    summary = json.loads((out / "summary.json").read_text())
    sites = [f"model.encoder.layers.{i}:relu#0" for i in range(2)]
    high, stable = summary["high_lr"]["ffn_dead"], summary["stable"]["ffn_dead"]
    assert sorted(high) == sorted(stable) == sites
    assert sum(high.values()) >= 10 and sum(stable.values()) == 0
    assert summary["spike_steps"] == [summary["dirty_step"]] and summary["corrupted_ranked_first"]
    assert Path(summary["dump"]).is_file()
    assert "Update skipped: True" in stdout and "Corrupted windows ranked first: yes" in stdout
    for run in ("high_lr", "stable"):
        assert list((out / run).glob("events.out.tfevents.*"))


EXAMPLES = {
    "pool_sparsity": Example("pool_sparsity.py", (), fast=True, check=_pool_sparsity),
    "spike_dump": Example("spike_dump.py", (), fast=True, check=_spike_dump),
    "transformer_lm": Example("transformer_lm.py", (), fast=True, check=_transformer_lm),
    "recycle_dead_units": Example("recycle_dead_units.py", (), fast=True, check=_recycle),
    "spike_rewind": Example("spike_rewind.py", (), fast=True, check=_spike_rewind),
    # its fast mode (5 batches) is too short for a filter to collapse; one full epoch is the shortest run that shows it
    "zero_kernels": Example("zero_kernels.py", ("--epochs", "1"), fast=False, check=_zero_kernels),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXAMPLES))
def test_example_shows_what_it_claims(tmp_path: Path, name: str) -> None:
    example = EXAMPLES[name]
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / example.script), *example.arguments, "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "DEADUNITS_FAST": "1" if example.fast else "0",
            "OMP_NUM_THREADS": "1",  # two shared cores: threads would only contend
        },
    )
    assert result.returncode == 0, result.stderr[-3000:]
    example.check(tmp_path, result.stdout)
