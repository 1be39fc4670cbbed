import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_recycle_example_runs_both_trainings_and_writes_summary_and_logs(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "recycle_dead_units.py"), "--fast", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "without recycler" in result.stdout and "with recycler" in result.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["without recycler"]["recycled"] == 0
    for run in summary.values():
        assert run["filters"] == 938 and 0 <= run["dead_kernels"] <= run["filters"]
        assert 0.0 <= run["val_acc"] <= 1.0
        assert run["recycled"] == sum(event["recycled"] for event in run["recycle_events"])
    assert list((tmp_path / "with_recycler").glob("events.out.tfevents.*"))
    assert list((tmp_path / "without_recycler").glob("events.out.tfevents.*"))
