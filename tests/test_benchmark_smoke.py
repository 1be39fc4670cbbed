import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "overhead.py"


def _run(*args: str) -> None:
    command = [sys.executable, str(SCRIPT), "--smoke", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_overhead_benchmark_smoke_run_writes_a_finite_row_per_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The entry point imports its sibling modules by their bare names, as a script run from its folder does.
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("overhead", SCRIPT)
    assert spec is not None and spec.loader is not None
    overhead = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(overhead)
    _run("--out", str(tmp_path))

    report = json.loads((tmp_path / "overhead-cpu-smoke.json").read_text())
    expected = [config.name for config in overhead.configs(histogram_every=50)]
    assert [row["config"] for row in report["rows"]] == expected
    for row in report["rows"]:
        for key in ("ms_per_step", "time_ratio", "time_ratio_min", "time_ratio_max", "cpu_ratio"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["config"], key)
    bare = report["rows"][0]
    assert bare["time_ratio"] == bare["time_ratio_min"] == bare["cpu_ratio"] == 1.0
    assert {verdict["target"] for verdict in report["targets"]} >= {
        "`DeadUnits()` wall-time overhead <= 3% (CPU)",
        "NaN/spike protection >= 20x cheaper than `detect_anomaly=True`",
    }
    table = (tmp_path / "overhead-cpu-smoke.md").read_text()
    assert all(f"| tiny | {name} |" in table for name in expected)
    assert not (tmp_path / "tmp").exists()  # the runs' TensorBoard logs are removed


def test_scaling_benchmark_smoke_run_writes_a_finite_row_per_point(tmp_path: Path) -> None:
    _run("--scaling", "--out", str(tmp_path))

    rows = json.loads((tmp_path / "scaling-cpu-smoke.json").read_text())["rows"]
    assert [(row["sweep"], row["value"]) for row in rows] == [("width", 4), ("width", 4), ("every_n_steps", 2)]
    for row in rows:
        assert all(math.isfinite(row[key]) for key in ("extra_ms_per_step", "time_ratio", "bare_ms_per_step"))
        assert row["parameters"] > 0 and row["activation_values"] > 0
    assert not (tmp_path / "tmp").exists()
