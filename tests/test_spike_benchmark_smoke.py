import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "spikes.py"


def _load_benchmark() -> object:
    spec = importlib.util.spec_from_file_location("spikes", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_spike_benchmark_smoke_run_scores_every_rule_and_this_project_catches_the_injection(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--out", str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "spikes-cpu-smoke.json").read_text())
    rules = list(_load_benchmark().RULES)  # type: ignore[attr-defined]
    assert [row["rule"] for row in report["rows"]] == rules * 2
    ours = {row["scenario"]: row for row in report["rows"] if row["rule"] == rules[0]}
    assert ours["cnn corrupted"]["caught"] == 1 and ours["cnn corrupted"]["false"] == 0
    assert ours["lm clean"]["false"] == 0
    assert "| scenario | rule | caught | late | missed |" in (tmp_path / "spikes-cpu-smoke.md").read_text()
    # the detector's per-step cost is reported (measured, not asserted: timings belong to the benchmark)
    assert {"loss, every step", "loss and gradient norm, every step"} <= set(report["step_cost_us"])
    assert "Per-step host work of `SpikeDetector.update`" in (tmp_path / "spikes-cpu-smoke.md").read_text()


def test_published_rules_flag_what_their_definitions_say() -> None:
    bench = _load_benchmark()
    calm = [1.0] * 150
    assert bench.lightning_spike_detection([*calm, 3.5], []) == [False] * 150 + [True]  # type: ignore[attr-defined]
    assert bench.lightning_spike_detection([*calm, 2.9], []) == [False] * 151  # type: ignore[attr-defined]
    foundry = bench.llm_foundry_kill_loss_spike([*calm, 3.0, 3.0, 3.0, 3.0], [])  # type: ignore[attr-defined]
    assert foundry[-4:] == [False, False, False, True]
    noisy = [1.0 + 0.1 * (i % 2) for i in range(150)]
    assert bench.olmo_levanter(noisy, [*noisy[:-1], 5.0])[-1]  # type: ignore[attr-defined]
    assert not bench.olmo_levanter(noisy, noisy)[-1]  # type: ignore[attr-defined]
    assert bench.zclip(noisy, [*noisy, 3.0])[-1] is True  # type: ignore[attr-defined]
