import json
import math
import pickle
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_deadunits import KernelNormMonitor
from lightning_deadunits.cli import main
from lightning_deadunits.cli.scan import print_table, scan_file
from lightning_deadunits.functional import weight_filter_norms, weight_kind
from lightning_deadunits.functional.kernels import blockwise_filter_l1
from tests.helpers.tb_helpers import PLANTED_DEAD, fit_planted


class Planted(nn.Module):
    """Dead filters planted in every kind of layer; the stem has one input channel, so its shape looks depthwise."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3)
        self.dw = nn.Conv2d(8, 8, 3, groups=8)
        self.up = nn.ConvTranspose2d(8, 6, 2, groups=2)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 5)
        with torch.no_grad():
            self.stem.weight[:3] = 0  # dead by both rules
            self.dw.weight[5] *= 1e-3  # relatively dead only
            self.up.weight[4:8, 1] = 0  # output channel 4 (group 1, its second output)
            self.bn.weight.zero_()  # 1-D: not scanned
            self.head.weight[0] = 1e-8  # absolutely dead

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.up(self.dw(self.stem(x))))
        return self.head(x.mean(dim=(2, 3)))  # type: ignore[no-any-return]


def _scan_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    assert main(["scan", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def _rows(report: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [
        (layer["name"], layer["kind"], layer["filters"], layer["dead_abs"], layer["dead_rel"], layer["kind_from_shape"])
        for layer in report["layers"]
    ]


def test_scan_state_dict_counts_planted_dead_filters_with_kinds_from_shapes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.save(Planted().state_dict(), tmp_path / "model.pt")
    report = _scan_json(capsys, str(tmp_path / "model.pt"))
    assert report["format"] == "state_dict"
    assert _rows(report) == [
        ("stem", "depthwise", 8, 3, 3, True),  # really a conv on one input channel: shapes cannot tell
        ("dw", "depthwise", 8, 0, 1, True),
        ("up", "conv", 8, 0, 0, True),  # a ConvTranspose read per input channel: its dead output is spread out
        ("head", "linear", 5, 1, 1, True),
    ]
    assert report["total"] == {"filters": 29, "dead_abs": 4, "dead_rel": 5, "dead": 5}
    assert set(report["layers"][0]) == {
        "name",
        "kind",
        "filters",
        "dead_abs",
        "dead_rel",
        "dead",
        "norm_median",
        "kind_from_shape",
    }


def test_scan_torchscript_reads_exact_kinds_from_modules(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(Planted()), str(tmp_path / "model.ts"))
    report = _scan_json(capsys, str(tmp_path / "model.ts"))
    assert report["format"] == "torchscript"
    assert _rows(report) == [
        ("stem", "conv", 8, 3, 3, False),
        ("dw", "depthwise", 8, 0, 1, False),
        ("up", "transpose", 6, 1, 1, False),
        ("head", "linear", 5, 1, 1, False),
    ]


def test_scan_lightning_checkpoint_reads_its_state_dict_with_weights_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trainer = fit_planted(tmp_path, False, [KernelNormMonitor(every_n_steps=1)], max_steps=1)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    report = _scan_json(capsys, str(tmp_path / "last.ckpt"), "--rel-threshold", "0")
    assert report["format"] == "lightning"
    assert _rows(report) == [
        ("model.conv", "conv", 4, PLANTED_DEAD, 0, True),
        ("model.head", "linear", 2, 0, 0, True),
    ]
    assert report["rel_threshold"] == 0.0


def test_scan_nested_dicts_and_lists_prefix_layer_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = Planted().state_dict()
    torch.save({"model": state, "ema": [state], "epoch": 3}, tmp_path / "nested.pt")
    report = _scan_json(capsys, str(tmp_path / "nested.pt"))
    names = [layer["name"] for layer in report["layers"]]
    assert names == [f"{owner}.{layer}" for owner in ("model", "ema.0") for layer in ("stem", "dw", "up", "head")]
    assert report["total"]["dead_abs"] == 8


def test_scan_abs_threshold_moves_the_absolute_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save(Planted().state_dict(), tmp_path / "model.pt")
    report = _scan_json(capsys, str(tmp_path / "model.pt"), "--abs-threshold", "0", "--rel-threshold", "0")
    assert report["total"] == {"filters": 29, "dead_abs": 0, "dead_rel": 0, "dead": 0}


def test_scan_table_marks_shape_kinds_and_explains_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save(Planted().state_dict(), tmp_path / "model.pt")
    assert main(["scan", str(tmp_path / "model.pt")]) == 0
    out = capsys.readouterr().out
    assert "depthwise*" in out and "linear*" in out
    assert "Kinds marked * come from weight shapes alone" in out
    assert "total" in out and "29" in out


def test_scan_table_falls_back_to_plain_text_without_rich(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "rich.console", None)
    print_table("title", ["layer", "kind", "dead"], [["a.long.name", "conv", "3"], ["b", "", "12"]], footer="note")
    assert capsys.readouterr().out.splitlines() == [
        "title",
        "layer        kind  dead",
        "a.long.name  conv     3",
        "b                    12",
        "note",
    ]


def _pickled_object(path: Path) -> None:
    torch.save({"state": Planted()}, path)


def _damaged_archive(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("model/data.pkl", b"not a pickle")


def _torchscript_with_garbage(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("model/constants.pkl", b"not a pickle")
        archive.writestr("model/data.pkl", b"not a pickle")


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (None, "no such file or directory"),
        (
            lambda path: path.write_text("hello"),
            r"not a recognised model file \(tried a torch.save zip archive or pickle",
        ),
        (lambda path: path.write_bytes(b"PK\x03\x04 not really a zip"), r"not a readable zip file \(BadZipFile: "),
        (_damaged_archive, r"not a readable PyTorch checkpoint or state_dict \("),
        (_pickled_object, r"refused it \(WeightsUnpickler error: Unsupported global.*save `model.state_dict\(\)`"),
        (lambda path: torch.save({"epoch": 3, "bias": torch.zeros(3)}, path), "found no convolution or linear weight"),
        (_torchscript_with_garbage, "not a readable TorchScript file"),
    ],
)
def test_scan_unreadable_files_exit_2_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], write: Any, message: str
) -> None:
    path = tmp_path / "input.pt"
    if write is not None:
        write(path)
    assert main(["scan", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"deadunits scan: error: {path}: ")
    assert captured.err.count("\n") == 1
    with pytest.raises(ValueError, match=message):
        scan_file(path)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--abs-threshold", "-1", r"`abs_threshold` must be a finite number in \[0.0, inf\], got -1.0"),
        ("--abs-threshold", "nan", r"`abs_threshold` must be a finite number in \[0.0, inf\], got nan"),
        ("--rel-threshold", "1.5", r"`rel_threshold` must be a finite number in \[0.0, 1.0\], got 1.5"),
    ],
)
def test_scan_bad_thresholds_exit_2_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str, message: str
) -> None:
    torch.save(Planted().state_dict(), tmp_path / "model.pt")
    assert main(["scan", str(tmp_path / "model.pt"), flag, value]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("deadunits scan: error: `") and captured.out == ""
    with pytest.raises(ValueError, match=message):
        scan_file(tmp_path / "model.pt", **{flag[2:].replace("-", "_"): float(value)})


@pytest.mark.parametrize(
    ("shape", "groups", "transposed", "kind"),
    [
        ((10, 64), None, False, "linear"),
        ((32, 1, 3, 3), None, False, "depthwise"),
        ((1, 1, 3, 3), None, False, "conv"),
        ((32, 1, 3, 3), 1, False, "conv"),
        ((32, 1, 3), 16, False, "depthwise"),
        ((8, 4, 3, 3), None, False, "conv"),
        ((8, 4, 3, 3), 4, False, "grouped"),
        ((8, 3, 2, 2), 2, True, "transpose"),
    ],
)
def test_weight_kind_from_shapes_and_known_groups(
    shape: tuple[int, ...], groups: int | None, transposed: bool, kind: str
) -> None:
    assert weight_kind(shape, groups, transposed) == kind


def _hand_norms(weight: torch.Tensor, groups: int, transposed: bool) -> tuple[list[float], list[float]]:
    """Per output filter, sum |w| and sqrt(sum w^2) over the weights feeding it, by plain loops over numpy values."""
    values = weight.detach().numpy()
    if transposed:  # (in, out / groups, *k): output g * out_per_group + j reads input channels of group g only
        in_per_group, out_per_group = values.shape[0] // groups, values.shape[1]
        filters = [
            [float(v) for i in range(in_per_group) for v in values[g * in_per_group + i, j].ravel()]
            for g in range(groups)
            for j in range(out_per_group)
        ]
    else:
        filters = [[float(v) for v in values[o].ravel()] for o in range(values.shape[0])]
    return [sum(abs(v) for v in f) for f in filters], [math.sqrt(sum(v * v for v in f)) for f in filters]


def _planted(shape: tuple[int, ...]) -> torch.Tensor:
    """Distinct small integers (exact float32 sums), some negative, so every filter's norms differ."""
    count = math.prod(shape)
    return (torch.arange(count, dtype=torch.float32) - count // 3).reshape(shape)


@pytest.mark.parametrize(
    ("shape", "groups", "transposed"),
    [((6, 4, 3, 3), 1, False), ((8, 3, 2, 2), 2, True), ((4, 4, 3), 1, True), ((5, 3), 1, False)],
)
def test_weight_filter_norms_equal_hand_computed_sums(shape: tuple[int, ...], groups: int, transposed: bool) -> None:
    weight = _planted(shape)
    hand_l1, hand_l2 = _hand_norms(weight, groups, transposed)
    l1, l2 = weight_filter_norms(weight, groups, transposed)
    assert l1.tolist() == hand_l1
    assert l2.tolist() == pytest.approx(hand_l2, rel=1e-6)
    for block_elements in (1, 7, 1 << 20):
        assert blockwise_filter_l1(weight, groups, transposed, block_elements).tolist() == hand_l1


def test_blockwise_filter_l1_reads_half_precision_and_transposed_views() -> None:
    weight = _planted((6, 4))
    hand_l1, _ = _hand_norms(weight, 1, False)
    assert blockwise_filter_l1(weight.to(torch.bfloat16), block_elements=5).tolist() == hand_l1
    assert blockwise_filter_l1(weight.T.contiguous().T, block_elements=5).tolist() == hand_l1


def test_scan_refuses_a_pickle_that_would_run_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    class CreatesAFile:
        def __init__(self, target: Path) -> None:
            self.target = target

        def __reduce__(self) -> tuple[Any, tuple[str, str]]:
            return open, (str(self.target), "w")

    pickle.loads(pickle.dumps(CreatesAFile(tmp_path / "proof")))
    assert (tmp_path / "proof").exists()  # the payload is live: unpickling it creates its file
    target = tmp_path / "pwned"
    with (tmp_path / "legacy.pkl").open("wb") as file:
        pickle.dump({"state_dict": CreatesAFile(target)}, file, protocol=2)  # as a legacy torch.save
    with (tmp_path / "plain.pkl").open("wb") as file:
        pickle.dump({"state_dict": CreatesAFile(target)}, file)
    torch.save({"model.weight": torch.ones(2, 2), "hook": CreatesAFile(target)}, tmp_path / "archive.pt")
    for name, reason in [
        ("legacy.pkl", "Unsupported global: GLOBAL io.open was not an allowed global by default)"),
        ("plain.pkl", "Unsupported operand"),
        ("archive.pt", "Unsupported global: GLOBAL io.open was not an allowed global by default)"),
    ]:
        assert main(["scan", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert f"refused it (WeightsUnpickler error: {reason}" in err and err.count("\n") == 1
    assert not target.exists()


def test_scan_help_says_how_each_format_is_loaded_and_what_a_malicious_file_can_do(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["scan", "--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    for phrase in (
        "torch.load(weights_only=True, mmap=True)",
        "safetensors.safe_open, one tensor at a time",
        "onnx.load(load_external_data=False)",
        "TorchScript with torch.jit.load",
        "A malicious pickle cannot run code",
        "scan TorchScript only from sources you trust",
    ):
        assert phrase in help_text


def test_weight_functions_reject_one_dimensional_weights() -> None:
    with pytest.raises(
        ValueError, match=r"`weight` must have at least 2 dimensions \(out, in, ...\), got shape \(5,\)"
    ):
        weight_filter_norms(torch.ones(5))
    with pytest.raises(ValueError, match=r"`shape` must have at least 2 dimensions \(out, in, ...\), got \(5,\)"):
        weight_kind((5,))
