import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import uses_external_data
from safetensors.torch import save_file

from lightning_deadunits.checkpoints import Checkpoint
from lightning_deadunits.cli import main
from lightning_deadunits.cli import scan as scan_module
from lightning_deadunits.cli.scan import scan_file
from tests.helpers.saved_models import dead_indices, onnx_model, planted_state_dict, save_shards

PLANTED = {"stem": [1, 6], "blocks.0": [0, 15]}
EXPECTED_FROM_SHAPES = [
    ("stem", "conv", 8, [1, 6], True),
    ("blocks.0", "linear", 16, [0, 15], True),
    ("head", "linear", 5, [], True),
]


def _weights(*shape: int) -> np.ndarray:
    return np.random.default_rng(0).normal(size=shape).astype(np.float32)


def _planted_onnx_layers() -> list[tuple[str, str, np.ndarray, dict[str, Any], int]]:
    grouped = _weights(6, 2, 3, 3)
    grouped[[1, 4]] = 0
    depthwise = _weights(4, 1, 3, 3)
    depthwise[2] = 0
    one_input_channel = _weights(4, 1, 3, 3)
    one_input_channel[3] = 0
    transpose = _weights(4, 3, 2, 2)  # (in 4, out 6 / groups 2): output 4 is group 1's second output
    transpose[2:4, 1] = 0
    gemm_rows = _weights(5, 6)  # transB=1: (out, in), as torch's Linear
    gemm_rows[2] = 0
    gemm_columns = _weights(6, 5)  # transB=0: (in, out)
    gemm_columns[:, 3] = 0
    gemm_columns[0] = 0  # an input row: no filter dies of it
    matmul_right = _weights(6, 4)  # x @ W: (in, out)
    matmul_right[:, 1] = 0
    matmul_left = _weights(3, 6)  # W @ x: (out, in)
    matmul_left[0] = 0
    gemm_left_transposed = _weights(6, 3)  # transA=1 on the left operand: (in, out)
    gemm_left_transposed[:, 2] = 0
    return [
        ("Conv", "grouped.weight", grouped, {"group": 2}, 1),
        ("Conv", "dw.weight", depthwise, {"group": 4}, 1),
        ("Conv", "stem.weight", one_input_channel, {}, 1),
        ("ConvTranspose", "up.weight", transpose, {"group": 2}, 1),
        ("Gemm", "fc_t1.weight", gemm_rows, {"transB": 1}, 1),
        ("Gemm", "fc_t0.weight", gemm_columns, {"transB": 0}, 1),
        ("MatMul", "proj", matmul_right, {}, 1),
        ("MatMul", "mix", matmul_left, {}, 0),
        ("Gemm", "fc_a.weight", gemm_left_transposed, {"transA": 1}, 0),
    ]


EXPECTED_ONNX = [
    ("grouped", "grouped", 6, [1, 4], False),
    ("dw", "depthwise", 4, [2], False),
    ("stem", "conv", 4, [3], False),  # groups known: a state_dict would call this shape depthwise
    ("up", "transpose", 6, [4], False),
    ("fc_t1", "linear", 5, [2], False),
    ("fc_t0", "linear", 5, [3], False),
    ("matmul6", "linear", 4, [1], False),  # not `*.weight`: named after its node
    ("matmul7", "linear", 3, [0], False),
    ("fc_a", "linear", 3, [2], False),
]


def test_scan_safetensors_reports_exactly_the_planted_dead_filters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_file(planted_state_dict(PLANTED), tmp_path / "model.safetensors")
    assert dead_indices(tmp_path / "model.safetensors") == sorted(EXPECTED_FROM_SHAPES)  # safetensors sorts keys
    assert main(["scan", str(tmp_path / "model.safetensors"), "--json", "--rel-threshold", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "safetensors"
    assert report["total"] == {"filters": 29, "dead_abs": 4, "dead_rel": 0, "dead": 4}


def test_scan_recognises_formats_by_content_not_extension(tmp_path: Path) -> None:
    save_file(planted_state_dict(PLANTED), tmp_path / "weights.bin")
    onnx.save(onnx_model(_planted_onnx_layers()), tmp_path / "model.pt")
    torch.save(planted_state_dict(PLANTED), tmp_path / "model.onnx")
    assert Checkpoint(tmp_path / "weights.bin").format == "safetensors"
    assert Checkpoint(tmp_path / "model.pt").format == "onnx"
    assert Checkpoint(tmp_path / "model.onnx").format == "state_dict"


@pytest.mark.parametrize("target", ["model.safetensors.index.json", "."])
def test_scan_sharded_safetensors_from_the_index_or_its_directory(tmp_path: Path, target: str) -> None:
    save_shards(tmp_path / "shards", planted_state_dict(PLANTED))
    assert Checkpoint(tmp_path / "shards" / target).format == "safetensors_shards"
    assert dead_indices(tmp_path / "shards" / target) == EXPECTED_FROM_SHAPES


def test_scan_directory_of_shards_without_an_index_reads_every_file(tmp_path: Path) -> None:
    save_shards(tmp_path, planted_state_dict(PLANTED), index=False)
    names = [name for name, *_ in dead_indices(tmp_path)]
    assert names == ["stem", "blocks.0", "head"]


def test_scan_onnx_reads_groups_and_layouts_from_the_operators(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    onnx.save(onnx_model(_planted_onnx_layers()), tmp_path / "model.onnx")
    assert dead_indices(tmp_path / "model.onnx") == EXPECTED_ONNX
    assert main(["scan", str(tmp_path / "model.onnx"), "--json", "--rel-threshold", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "onnx"
    assert report["total"] == {"filters": 40, "dead_abs": 10, "dead_rel": 0, "dead": 10}
    assert not any(layer["kind_from_shape"] for layer in report["layers"])


def test_scan_takes_an_onnx_name_at_its_word_when_the_content_is_unrecognised(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"\x12\x07pytorch" + b"\xff" * 20)  # producer_name first, then garbage
    with pytest.raises(ValueError, match=r"model\.onnx: not a readable ONNX file \(DecodeError: "):
        Checkpoint(tmp_path / "model.onnx")
    (tmp_path / "model.bin").write_bytes(b"\x12\x07pytorch" + b"\xff" * 20)
    with pytest.raises(ValueError, match=r"model\.bin: not a recognised model file"):
        Checkpoint(tmp_path / "model.bin")


def test_scan_onnx_with_external_data_reads_it_from_the_model_folder(tmp_path: Path) -> None:
    model = onnx_model(_planted_onnx_layers())
    onnx.save_model(
        model, tmp_path / "model.onnx", save_as_external_data=True, location="weights.bin", size_threshold=0
    )
    saved = onnx.load(tmp_path / "model.onnx", load_external_data=False).graph.initializer
    assert all(uses_external_data(initializer) for initializer in saved)
    checkpoint = Checkpoint(tmp_path / "model.onnx")
    assert checkpoint.nbytes == sum((tmp_path / name).stat().st_size for name in ("model.onnx", "weights.bin"))
    assert dead_indices(tmp_path / "model.onnx") == EXPECTED_ONNX


def test_scan_onnx_reads_a_shared_weight_once_and_skips_integer_weights(tmp_path: Path) -> None:
    shared = _weights(4, 6)
    shared[2] = 0
    model = onnx_model(
        [
            ("Gemm", "tied.weight", shared, {"transB": 1}, 1),
            ("MatMul", "counts", np.ones((6, 3), dtype=np.int32), {}, 1),
        ]
    )
    model.graph.node.append(helper.make_node("Gemm", ["x0", "tied.weight"], ["y_again"], transB=1))
    onnx.save(model, tmp_path / "model.onnx")
    assert dead_indices(tmp_path / "model.onnx") == [("tied", "linear", 4, [2], False)]


def test_scan_reads_half_precision_weights_in_float32(tmp_path: Path) -> None:
    state = {name: tensor.to(torch.bfloat16) for name, tensor in planted_state_dict(PLANTED).items()}
    save_file(state, tmp_path / "bf16.safetensors")
    onnx.save(
        onnx_model([("Gemm", "fc.weight", _weights(5, 6).astype(np.float16), {"transB": 1}, 1)]),
        tmp_path / "fp16.onnx",
    )
    assert dead_indices(tmp_path / "bf16.safetensors") == sorted(EXPECTED_FROM_SHAPES)
    assert dead_indices(tmp_path / "fp16.onnx") == [("fc", "linear", 5, [], False)]


def _mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process mapped from ``path``."""
    return [
        (int(line.split()[0].split("-")[0], 16), int(line.split()[0].split("-")[1], 16))
        for line in Path("/proc/self/maps").read_text().splitlines()
        if line.endswith(str(path))
    ]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_scan_maps_zip_state_dicts_from_the_file_instead_of_loading_them(tmp_path: Path) -> None:
    torch.save(planted_state_dict(PLANTED), tmp_path / "model.pt")
    assert _mapped_ranges(tmp_path / "model.pt") == []
    weights = list(Checkpoint(tmp_path / "model.pt").weights())
    mapped = _mapped_ranges(tmp_path / "model.pt")
    for name, weight, *_ in weights:
        assert any(start <= weight.data_ptr() < end for start, end in mapped), name


def test_scan_progress_bar_only_on_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    save_file(planted_state_dict(PLANTED), tmp_path / "model.safetensors")
    monkeypatch.setattr(scan_module, "_PROGRESS_MIN_BYTES", 0)
    assert main(["scan", str(tmp_path / "model.safetensors"), "--json"]) == 0
    assert capsys.readouterr().err == ""  # a pipe
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["scan", str(tmp_path / "model.safetensors"), "--json"]) == 0
    captured = capsys.readouterr()
    assert "scanning model.safetensors" in captured.err
    assert json.loads(captured.out)["format"] == "safetensors"


def _bad_safetensors_header(path: Path) -> None:
    header = b'{"w": nope}'
    path.write_bytes(len(header).to_bytes(8, "little") + header)


def _truncated_safetensors(path: Path) -> None:
    save_file({"w.weight": torch.ones(64, 64)}, path)
    path.write_bytes(path.read_bytes()[:-100])


def _index_without_weight_map(path: Path) -> None:
    path.write_text(json.dumps({"metadata": {}}))


def _index_with_a_missing_shard(path: Path) -> None:
    save_shards(path.parent, planted_state_dict({}))
    (path.parent / "model-00002-of-00002.safetensors").unlink()
    shutil.move(path.parent / "model.safetensors.index.json", path)


def _index_naming_absent_tensors(path: Path) -> None:
    save_shards(path.parent, planted_state_dict({}))
    index = json.loads((path.parent / "model.safetensors.index.json").read_text())
    index["weight_map"]["ghost.weight"] = "model-00002-of-00002.safetensors"
    path.write_text(json.dumps(index))


def _directory_without_shards(path: Path) -> None:
    path.mkdir()


def _directory_with_two_indexes(path: Path) -> None:
    path.mkdir()
    for name in ("model.safetensors.index.json", "ema.safetensors.index.json"):
        (path / name).write_text("{}")


def _onnx_garbage(path: Path) -> None:
    path.write_bytes(b"\x08\x07" + b"\xff" * 40)


def _onnx_group_not_dividing_filters(path: Path) -> None:
    onnx.save(onnx_model([("Conv", "c.weight", _weights(6, 1, 3, 3), {"group": 4}, 1)]), path)


def _onnx_missing_external_data(path: Path) -> None:
    model = onnx_model([("Gemm", "fc.weight", _weights(5, 6), {"transB": 1}, 1)])
    onnx.save_model(model, path, save_as_external_data=True, location="weights.bin", size_threshold=0)
    (path.parent / "weights.bin").unlink()


def _onnx_without_layers(path: Path) -> None:
    relu = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph(
        [relu],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])],
        [numpy_helper.from_array(np.ones(3, dtype=np.float32), "unused")],
    )
    onnx.save(helper.make_model(graph), path)


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (_bad_safetensors_header, r"not a readable safetensors file \(SafetensorError: "),
        (_truncated_safetensors, r"not a readable safetensors file \(SafetensorError: "),
        (lambda path: path.write_text("{oops"), r"not a readable JSON file \(JSONDecodeError: "),
        (_index_without_weight_map, r"a JSON file, but not a safetensors index \(`weight_map` must map"),
        (_index_with_a_missing_shard, r"shards listed in `weight_map` are missing: model-00002-of-00002\.safetensors"),
        (_index_naming_absent_tensors, r"tensors the index places in this shard are missing: ghost\.weight"),
        (_directory_without_shards, r"holds no `\*\.safetensors\.index\.json` and no `\*\.safetensors` file"),
        (_directory_with_two_indexes, r"several safetensors indexes \(ema\.safetensors\.index\.json, model\.safe"),
        (_onnx_garbage, r"not a readable ONNX file \(DecodeError: "),
        (_onnx_group_not_dividing_filters, r"Conv node `conv0` has `group` 4, which must be >= 1 and divide .*\(6, 1"),
        (_onnx_missing_external_data, r"not a readable ONNX file \("),
        (_onnx_without_layers, r"found no convolution or linear weight .*ONNX: initializers feeding Conv"),
        (lambda path: path.write_bytes(b"GIF89a\x01\x00\x01\x00"), r"not a recognised model file \(tried a torch.save"),
    ],
)
def test_scan_malformed_files_of_each_format_exit_2_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], write: Callable[[Path], None], message: str
) -> None:
    path = tmp_path / "input"
    write(path)
    assert main(["scan", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"deadunits scan: error: {tmp_path}")  # the file, or the shard at fault
    assert captured.err.count("\n") == 1
    with pytest.raises(ValueError, match=message):
        scan_file(path)


@pytest.mark.parametrize(("module", "suffix"), [("safetensors", "safetensors"), ("onnx", "onnx")])
def test_scan_without_an_optional_reader_exits_2_naming_the_extra(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, module: str, suffix: str
) -> None:
    save_file(planted_state_dict(PLANTED), tmp_path / "model.safetensors")
    onnx.save(onnx_model(_planted_onnx_layers()), tmp_path / "model.onnx")
    monkeypatch.setitem(sys.modules, module, None)
    assert main(["scan", str(tmp_path / f"model.{suffix}")]) == 2
    assert f"needs the `{module}` package: pip install 'lightning-deadunits[formats]'" in capsys.readouterr().err


@pytest.mark.slow
def test_scan_memory_benchmark_smoke_run_stays_near_constant_memory(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "scan_memory.py"), "--size-mb", "16", "--tensors", "4"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(root)},
        check=True,
    )
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["format"] for row in rows] == ["state_dict", "safetensors"]
    for row in rows:
        assert row["layers"] == 4 and row["largest_tensor_mb"] == pytest.approx(4.0, abs=0.01)
        # Memory-mapped and reduced in place: far below the 16 MB a whole load would add (allocator noise aside).
        assert row["rss_anon_growth_mb"] < 8
