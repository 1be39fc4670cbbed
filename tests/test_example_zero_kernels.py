import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_zero_kernels_demo_runs_and_writes_report_and_logs(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "zero_kernels.py"), "--fast", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = (tmp_path / "report.md").read_text()
    assert "| model.features.4 | depthwise | 32 |" in report
    assert "**total**" in report
    assert list((tmp_path / "adam").glob("events.out.tfevents.*"))
    assert list((tmp_path / "sgd").glob("events.out.tfevents.*"))
    out = result.stdout
    assert out.index("[1/2] training with adam") < out.index("[1/2] adam done") < out.index("[2/2] training with sgd")
    assert "| model.features.4 | depthwise | 32 |" in out  # the tables are still printed
    html = tmp_path / "report.html"
    assert "data:image/png;base64," in html.read_text(encoding="utf-8")
    assert f"tensorboard --logdir {tmp_path}" in out and f"python -m webbrowser {html.resolve()}" in out
