import argparse
import json
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_deadunits.actions.batch_dump import BatchDumper, rng_states
from lightning_deadunits.cli import main
from lightning_deadunits.cli.dump import show, summarize
from lightning_deadunits.errors import DeadUnitsWarning

Batch = namedtuple("Batch", "images labels")

DEATHS = {"deadunits/kernels": {"unit": "kernels", "before_step": 10, "after_step": 15, "died": {"conv": 3.0}}}


def _write_dump(directory: Path, per_sample: bool = True) -> Path:
    images = torch.zeros(4, 1, 2, 2)
    images[2] = 50.0
    record = {
        "batch": Batch(images, torch.tensor([3, 1, 4, 1])),
        "per_sample_loss": torch.tensor([0.1, 0.3, 9.0, float("nan")]) if per_sample else None,
        "sample_ids": torch.tensor([100, 101, 102, 103]) if per_sample else None,
        "recent_steps": torch.arange(3),
        "recent_losses": torch.tensor([0.5, 0.4, 2.35], dtype=torch.float64),
        "rng_states": rng_states(),
    }
    metadata = {"loss": 2.35, "baseline": 0.45, "global_step": 12, "reason": "ratio and z-score", "rank": 0}
    path = BatchDumper(directory).write("step00000012-rank0-batch00012", record, metadata)
    assert path is not None
    BatchDumper(directory).annotate(path, {"dead_after_spike": DEATHS})
    return path


def _args(path: Path, as_json: bool = False, top: int = 10) -> argparse.Namespace:
    return argparse.Namespace(path=path, json=as_json, top=top)


def test_dump_show_prints_metadata_tensors_labels_and_the_ranking(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write_dump(tmp_path)
    assert show(_args(path, top=3)) == 0
    out = capsys.readouterr().out
    assert f"Spike dump {path}" in out
    assert "  loss: 2.35\n" in out and "  global_step: 12\n" in out and "reason: ratio and z-score" in out
    assert "died after the spike (deadunits/kernels, checks at steps 10 and 15): 3 kernels of conv" in out
    assert "recent losses: 3, min 0.4, median 0.5, max 2.35, non-finite 0" in out
    assert "batch.images  float32  4x1x2x2  0    50   12.5" in out
    assert "Labels (batch.labels): 3 1 4 1" in out
    ranking = out.split("Samples by per-sample loss (highest first):\n")[1].splitlines()
    assert ranking[0].split() == ["rank", "index", "sample_id", "loss", "label"]
    assert [line.split() for line in ranking[1:]] == [
        ["1", "3", "103", "nan", "1"],  # a non-finite sample is the most suspicious
        ["2", "2", "102", "9", "4"],
        ["3", "1", "101", "0.3", "1"],
    ]


def test_dump_show_json_is_one_parsable_object(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write_dump(tmp_path)
    assert main(["dump", "show", str(path), "--json", "--top", "2"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["fields"]["loss"] == 2.35 and summary["fields"]["unsaved"] == []
    assert summary["dead_after_spike"] == DEATHS
    assert summary["labels"] == {"path": "batch.labels", "values": [3, 1, 4, 1]}
    assert summary["ranking"] == [
        {"rank": 1, "index": 3, "loss": "nan", "sample_id": 103, "label": 1},
        {"rank": 2, "index": 2, "loss": 9.0, "sample_id": 102, "label": 4},
    ]
    images = next(item for item in summary["tensors"] if item["path"] == "batch.images")
    assert images == {
        "path": "batch.images",
        "dtype": "float32",
        "shape": [4, 1, 2, 2],
        "nonfinite": 0,
        "min": 0.0,
        "max": 50.0,
        "mean": 12.5,
        "std": pytest.approx(float(torch.tensor([0.0] * 12 + [50.0] * 4).double().std())),
    }


def test_dump_show_without_per_sample_losses_has_no_ranking(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert show(_args(_write_dump(tmp_path, per_sample=False))) == 0
    out = capsys.readouterr().out
    assert "Labels (batch.labels)" in out and "Samples by per-sample loss" not in out


def test_summarize_finds_labels_in_mappings_and_skips_sample_ids() -> None:
    ids = torch.tensor([7, 8])
    batch = {"x": torch.ones(2, 3), "ids": ids, "targets": torch.tensor([0, 1])}
    assert summarize(batch, {"sample_ids": ids})["labels"] == {"path": "batch['targets']", "values": [0, 1]}
    assert summarize((torch.ones(2), ids), {"sample_ids": ids})["labels"] is None
    assert summarize([torch.ones(2), torch.tensor([1, 0])], {})["labels"]["path"] == "batch[1]"


@pytest.mark.parametrize("content", [None, b"not a dump", "foreign"])
def test_dump_show_exits_2_with_a_message_on_unreadable_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | str | None
) -> None:
    path = tmp_path / "x.pt"
    if content == "foreign":
        torch.save({"weights": torch.ones(1)}, path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    assert main(["dump", "show", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(f"deadunits dump show: cannot read {path}: ")


def test_dump_without_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["dump"])
    assert exit_info.value.code == 2 and "show" in capsys.readouterr().err


def test_dump_show_lists_the_values_kept_as_placeholders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    batch = {"x": torch.ones(2), "names": np.array(["cat", "dog"]), "meta": {"when": np.datetime64("2024-01-02")}}
    with pytest.warns(DeadUnitsWarning, match="could not store values of type"):
        path = BatchDumper(tmp_path).write("step1", {"batch": batch}, {"loss": 1.0})
    assert path is not None
    assert main(["dump", "show", str(path)]) == 0
    out = capsys.readouterr().out
    assert "Not stored (type, shape and repr kept):" in out
    assert "batch['names']         numpy.ndarray[<U3]  2       array(['cat', 'dog'], dtype='<U3')" in out
    assert "batch['meta']['when']  numpy.datetime64    scalar  np.datetime64('2024-01-02')" in out
    assert "batch['x']  float32  2" in out
    assert main(["dump", "show", "--json", str(path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["placeholders"][0] == {
        "path": "batch['names']",
        "type": "numpy.ndarray[<U3]",
        "shape": [2],
        "repr": "array(['cat', 'dog'], dtype='<U3')",
    }
    assert summary["fields"]["unsaved"] == ["numpy.datetime64", "numpy.ndarray[<U3]"]
