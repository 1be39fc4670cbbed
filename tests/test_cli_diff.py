import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
from safetensors.torch import save_file

from lightning_deadunits.cli import main
from lightning_deadunits.cli.diff import diff_files
from tests.helpers.saved_models import onnx_model, planted_state_dict


def _old_and_new() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Between old and new: stem filter 1 revives and 5 dies (3 stays dead), head filter 0 dies, blocks.0 is
    unchanged, `gone` exists only in old, `extra` only in new, `wide` grows from 4 to 6 filters."""
    old = planted_state_dict({"stem": [1, 3], "blocks.0": [7]})
    new = planted_state_dict({"stem": [3, 5], "blocks.0": [7], "head": [0]})
    old["gone.weight"] = torch.zeros(2, 3)
    new["extra.weight"] = torch.ones(3, 3)
    old["wide.weight"], new["wide.weight"] = torch.ones(4, 2), torch.zeros(6, 2)
    return old, new


def _diff_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert main(["diff", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def test_diff_reports_exactly_the_newly_dead_and_revived_filters_per_layer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old, new = _old_and_new()
    torch.save(old, tmp_path / "old.pt")
    torch.save(new, tmp_path / "new.pt")
    report = _diff_json(capsys, str(tmp_path / "old.pt"), str(tmp_path / "new.pt"), "--rel-threshold", "0")
    rows = [
        (
            layer["name"],
            layer["present"],
            layer["dead_old"],
            layer["dead_new"],
            layer["newly_dead"],
            layer["revived"],
            layer["newly_dead_filters"],
            layer["revived_filters"],
        )
        for layer in report["layers"]
    ]
    assert rows == [
        ("stem", "both", 2, 2, 1, 1, [5], [1]),
        ("blocks.0", "both", 1, 1, 0, 0, [], []),
        ("head", "both", 0, 1, 1, 0, [0], []),
        ("gone", "old", 2, None, None, None, [], []),
        ("wide", "both", 0, 6, None, None, [], []),  # 4 -> 6 filters: not compared filter by filter
        ("extra", "new", None, 0, None, None, [], []),
    ]
    assert report["total"] == {"dead_old": 5, "dead_new": 10, "newly_dead": 2, "revived": 1}
    assert report["old"] == {"path": str(tmp_path / "old.pt"), "format": "state_dict"}
    assert set(report["layers"][0]) >= {"name", "dead_old", "dead_new", "newly_dead", "revived"}


def _save_lightning(path: Path, state: dict[str, torch.Tensor]) -> None:
    torch.save({"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3}, path)


def _save_safetensors(path: Path, state: dict[str, torch.Tensor]) -> None:
    save_file({f"model.{k}": v for k, v in state.items()}, path)


def _save_onnx(path: Path, state: dict[str, torch.Tensor]) -> None:
    layers = [
        (
            "Conv" if weight.dim() > 2 else "Gemm",
            f"model.{key}",
            weight.numpy(),
            {} if weight.dim() > 2 else {"transB": 1},
            1,
        )
        for key, weight in state.items()
        if key.endswith(".weight") and weight.dim() >= 2
    ]
    onnx.save(onnx_model(layers), path)


@pytest.mark.parametrize(("save_new", "new_format"), [(_save_safetensors, "safetensors"), (_save_onnx, "onnx")])
def test_diff_compares_a_lightning_checkpoint_with_an_exported_file(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    save_new: Callable[[Path, dict[str, torch.Tensor]], None],
    new_format: str,
) -> None:
    old, new = _old_and_new()
    _save_lightning(tmp_path / "last.ckpt", old)
    save_new(tmp_path / "exported", new)
    report = _diff_json(capsys, str(tmp_path / "last.ckpt"), str(tmp_path / "exported"), "--rel-threshold", "0")
    assert (report["old"]["format"], report["new"]["format"]) == ("lightning", new_format)
    changes = {layer["name"]: (layer["newly_dead_filters"], layer["revived_filters"]) for layer in report["layers"]}
    assert changes["model.stem"] == ([5], [1])
    assert changes["model.head"] == ([0], [])
    assert report["total"]["newly_dead"] == 2 and report["total"]["revived"] == 1


def test_diff_table_names_the_changed_filters_and_one_sided_layers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "rich.console", None)  # plain text: cells are never folded
    old, new = _old_and_new()
    torch.save(old, tmp_path / "old.pt")
    save_file(new, tmp_path / "new.safetensors")
    assert main(["diff", str(tmp_path / "old.pt"), str(tmp_path / "new.safetensors"), "--rel-threshold", "0"]) == 0
    out = capsys.readouterr().out
    for phrase in ("died 5; revived 1", "died 0", "only in OLD", "only in NEW", "4 -> 6", "filter count changed"):
        assert phrase in out


def test_diff_lists_many_changed_filters_in_full_in_json_and_shortened_in_the_table(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "rich.console", None)
    torch.save({"fc.weight": torch.ones(40, 3)}, tmp_path / "old.pt")
    torch.save({"fc.weight": torch.zeros(40, 3)}, tmp_path / "new.pt")
    assert diff_files(tmp_path / "old.pt", tmp_path / "new.pt")[2][0].newly_dead_filters == tuple(range(40))
    assert main(["diff", str(tmp_path / "old.pt"), str(tmp_path / "new.pt")]) == 0
    assert "died 0,1,2,3,4,5,6,7,8,9,10,11,... (+28)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["missing.pt", "new.pt"], "missing.pt: no such file or directory"),
        (["old.pt", "garbage.bin"], "garbage.bin: not a recognised model file"),
        (
            ["old.pt", "new.pt", "--rel-threshold", "2"],
            r"`rel_threshold` must be a finite number in [0.0, 1.0], got 2.0",
        ),
        (
            ["old.pt", "new.pt", "--abs-threshold", "-1"],
            r"`abs_threshold` must be a finite number in [0.0, inf], got -1.0",
        ),
    ],
)
def test_diff_bad_input_exits_2_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, argv: list[str], message: str
) -> None:
    torch.save(planted_state_dict({}), tmp_path / "old.pt")
    torch.save(planted_state_dict({}), tmp_path / "new.pt")
    (tmp_path / "garbage.bin").write_bytes(b"garbage")
    monkeypatch.chdir(tmp_path)
    assert main(["diff", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("deadunits diff: error: ") and message in captured.err
    assert captured.err.count("\n") == 1
