import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pool_sparsity_example_shows_more_zeros_after_max_pooling(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "pool_sparsity.py"), "--fast", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # two shared cores: threads would only contend
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    max_pool, avg_pool = summary["max"], summary["avg"]
    assert max_pool["zero_frac"] > 0.2
    assert max_pool["zero_frac"] > 3 * avg_pool["zero_frac"]
    assert max_pool["dead"] > avg_pool["dead"]
    assert max_pool["max_abs"] > avg_pool["max_abs"]
    assert "| max |" in (tmp_path / "report.md").read_text()
    for pool in ("max", "avg"):
        assert list((tmp_path / pool).glob("events.out.tfevents.*"))
