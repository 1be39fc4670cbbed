import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_spike_dump_example_catches_the_dirty_batch_and_ranks_its_samples_first(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "spike_dump.py"), "--fast", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "Dirty batch injected at step 36; spikes flagged at steps [36]." in out
    assert "Update of step 36 skipped: True" in out
    assert f"Spike dump {tmp_path / 'deadunits' / 'dumps' / 'step00000036-rank0-batch00036.pt'}" in out
    assert "Samples by per-sample loss (highest first):" in out
    assert "Corrupted samples ranked first: yes" in out
    assert list(tmp_path.glob("events.out.tfevents.*"))
