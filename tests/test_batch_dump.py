import errno
import os
import random
from collections import OrderedDict, namedtuple
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lightning_deadunits.actions.batch_dump import BatchDumper, rng_states
from lightning_deadunits.dumps import DUMP_FORMAT, decode, encode, load_dump
from lightning_deadunits.errors import DeadUnitsWarning

Pair = namedtuple("Pair", "images labels")


@dataclass
class Sample:
    text: str
    mask: torch.Tensor


def _nested_batch() -> dict[str, Any]:
    return {
        "pair": Pair(torch.randn(2, 3), torch.tensor([1, 0])),
        "sample": Sample("hello", torch.tensor([True, False])),
        "seq": [1, 2.5, "three", None, (torch.ones(1, dtype=torch.bfloat16), b"raw")],
        "ordered": OrderedDict(b=1, a=2),
        "array": np.arange(4, dtype=np.int32),
        "scalar": np.float32(0.5),
        "tags": {"x"},
        7: "int key",
    }


def test_encode_decode_round_trips_nested_batches_through_the_safe_loader(tmp_path: Path) -> None:
    batch = _nested_batch()
    torch.save(encode(batch), tmp_path / "b.pt")
    restored = decode(torch.load(tmp_path / "b.pt", weights_only=True))
    assert restored["pair"].images.equal(batch["pair"].images) and restored["pair"].labels.equal(batch["pair"].labels)
    assert type(restored["pair"]).__name__ == "Pair" and restored["pair"][1].equal(batch["pair"][1])
    assert restored["sample"].text == "hello" and restored["sample"].mask.equal(batch["sample"].mask)
    assert restored["seq"][:4] == [1, 2.5, "three", None]
    assert restored["seq"][4][0].dtype == torch.bfloat16 and restored["seq"][4][1] == b"raw"
    assert restored["ordered"] == {"b": 1, "a": 2} and list(restored["ordered"]) == ["b", "a"]
    assert isinstance(restored["array"], np.ndarray) and restored["array"].tolist() == [0, 1, 2, 3]
    assert restored["array"].dtype == np.int32
    assert restored["scalar"] == 0.5 and restored["tags"] == {"x"} and restored[7] == "int key"


def test_encode_copies_tensors_to_plain_detached_cpu_tensors() -> None:
    weight = torch.nn.Parameter(torch.ones(3))
    view = torch.arange(100.0)[:2]
    encoded = encode([weight, view])
    assert type(encoded[0]) is torch.Tensor and not encoded[0].requires_grad
    assert encoded[1].untyped_storage().nbytes() == 2 * 4  # not the whole base tensor
    encoded[0].add_(1)
    assert weight.detach().eq(1).all()


def test_encode_replaces_unsavable_values_by_their_repr() -> None:
    unsaved: list[str] = []
    encoded = encode({"fn": len, "ok": 1}, unsaved)
    assert unsaved == ["builtins.builtin_function_or_method"]
    assert encoded["fn"] == {
        "__deadunits__": "unsaved",
        "type": unsaved[0],
        "shape": None,
        "repr": "<built-in function len>",
    }
    assert decode(encoded)["fn"]["repr"] == "<built-in function len>"


def test_decode_never_imports_classes_named_in_a_file() -> None:
    tagged = {"__deadunits__": "namedtuple", "type": "os.system", "fields": ["class", "ok"], "values": [1, 2]}
    restored = decode(tagged)
    assert type(restored).__name__ == "os_system" and tuple(restored) == (1, 2)
    assert restored._fields == ("_0", "ok")


def test_dumper_writes_a_file_the_safe_loader_reads(tmp_path: Path) -> None:
    dumper = BatchDumper(tmp_path / "dumps")
    path = dumper.write("step00000003-rank0", {"batch": Pair(torch.ones(2), torch.tensor([3]))}, {"loss": 9.5})
    assert path == tmp_path / "dumps" / "step00000003-rank0.pt"
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == DUMP_FORMAT and raw["metadata"] == {"loss": 9.5, "unsaved": []}
    batch, metadata = load_dump(path)
    assert batch.images.equal(torch.ones(2)) and metadata["loss"] == 9.5
    assert [p.name for p in (tmp_path / "dumps").iterdir()] == ["step00000003-rank0.pt"]  # no temporary left
    assert dumper.count == 1 and dumper.bytes_written == 2 * 4 + 8  # tensor data, estimated before encoding
    assert dumper.last_skip_reason is None


def test_dumper_leaves_no_partial_file_when_saving_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crash(obj: Any, file: Any) -> None:
        file.write(b"half a dump")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    dumper = BatchDumper(tmp_path)
    with pytest.warns(DeadUnitsWarning, match="Could not write spike dump .*No space left on device"):
        assert dumper.write("step1", {"batch": torch.ones(1)}, {}) is None
    assert list(tmp_path.iterdir()) == [] and dumper.count == 0


def test_dumper_keeps_the_old_file_when_rewriting_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dumper = BatchDumper(tmp_path)
    path = dumper.write("step1", {"batch": torch.ones(1)}, {"loss": 1.0})
    assert path is not None

    def crash(obj: Any, file: Any) -> None:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.warns(DeadUnitsWarning, match="Read-only file system"):
        assert not dumper.annotate(path, {"dead_after_spike": {"k": 1}})
    assert load_dump(path).metadata["loss"] == 1.0


def test_dumper_warns_when_the_directory_cannot_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    dumper = BatchDumper(blocker / "dumps")
    with pytest.warns(DeadUnitsWarning, match="Could not write spike dump"):
        assert dumper.write("step1", {"batch": torch.ones(1)}, {}) is None


def test_dumper_warns_once_per_dump_about_unsavable_values_and_still_writes(tmp_path: Path) -> None:
    dumper = BatchDumper(tmp_path)
    with pytest.warns(DeadUnitsWarning, match=r"could not store values of type \['builtins.function'\]") as record:
        path = dumper.write("step1", {"batch": [lambda: 1, lambda: 2, torch.ones(1)]}, {})
    assert len(record) == 1 and path is not None
    batch, metadata = load_dump(path)
    assert batch[2].equal(torch.ones(1)) and batch[0]["__deadunits__"] == "unsaved"
    assert metadata["unsaved"] == ["builtins.function"]


def test_dumper_stops_at_max_dumps_and_max_bytes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    by_count = BatchDumper(tmp_path / "count", max_dumps=2)
    paths = [by_count.write(f"d{i}", {"batch": torch.ones(1)}, {}) for i in range(4)]
    assert [p is not None for p in paths] == [True, True, False, False]
    assert "max_dumps=2" in caplog.text and caplog.text.count("no more spike dumps") == 1
    by_size = BatchDumper(tmp_path / "size", max_bytes=100)
    assert by_size.write("small", {"batch": torch.ones(20)}, {}) is not None  # 80 bytes
    assert by_size.write("big", {"batch": torch.ones(20)}, {}) is None  # would make 160
    assert by_size.write("tiny", {"batch": torch.ones(5)}, {}) is not None  # 100 fits exactly
    assert sorted(p.name for p in (tmp_path / "size").iterdir()) == ["small.pt", "tiny.pt"]
    assert BatchDumper(tmp_path / "none", max_dumps=0).write("x", {"batch": 1}, {}) is None


def test_dumper_annotate_merges_metadata(tmp_path: Path) -> None:
    dumper = BatchDumper(tmp_path)
    path = dumper.write("step1", {"batch": torch.ones(1)}, {"loss": 2.0})
    assert path is not None and dumper.annotate(path, {"dead_after_spike": {"deadunits/kernels": {"died": {}}}})
    metadata = load_dump(path).metadata
    assert metadata["loss"] == 2.0 and "deadunits/kernels" in metadata["dead_after_spike"]


def test_dumper_state_dict_round_trip_keeps_the_caps(tmp_path: Path) -> None:
    dumper = BatchDumper(tmp_path, max_dumps=2)
    dumper.write("a", {"batch": torch.ones(3)}, {})
    restored = BatchDumper(tmp_path, max_dumps=2)
    restored.load_state_dict(dumper.state_dict())
    assert restored.state_dict() == dumper.state_dict() == {"count": 1, "bytes_written": 12}
    restored.write("b", {"batch": 1}, {})
    assert restored.write("c", {"batch": 1}, {}) is None


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_dumps": -1}, "`max_dumps` must be an int >= 0, got -1"),
        ({"max_bytes": 1.5}, "`max_bytes` must be an int"),
    ],
)
def test_dumper_rejects_bad_arguments(tmp_path: Path, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BatchDumper(tmp_path, **kwargs)


def test_rng_states_saved_in_a_dump_restore_the_generators(tmp_path: Path) -> None:
    states = rng_states()
    expected = (torch.rand(2), np.random.rand(2), random.random())
    path = BatchDumper(tmp_path).write("rng", {"rng_states": states}, {})
    assert path is not None
    restored = load_dump(path).metadata["rng_states"]
    torch.set_rng_state(restored["torch"])
    np.random.set_state(restored["numpy"])
    random.setstate(restored["python"])
    assert torch.rand(2).equal(expected[0]) and np.random.rand(2).tolist() == expected[1].tolist()
    assert random.random() == expected[2]


def test_load_dump_rejects_missing_foreign_and_unsafe_files(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        load_dump(tmp_path / "missing.pt")
    torch.save({"state_dict": {}}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="is not a lightning-deadunits dump"):
        load_dump(tmp_path / "checkpoint.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(ValueError, match="is not a readable lightning-deadunits dump"):
        load_dump(tmp_path / "text.pt")
    torch.save({"format": DUMP_FORMAT, "batch": Sample("x", torch.ones(1))}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="is not a readable lightning-deadunits dump"):
        load_dump(tmp_path / "pickled.pt")


class _UnreadableMapping(dict[str, Any]):
    def items(self) -> Any:
        raise RuntimeError("lazy column failed")


def test_dumper_keeps_values_torch_cannot_hold_as_described_placeholders_and_warns_once(tmp_path: Path) -> None:
    batch = {
        "x": torch.ones(2),
        "names": np.array(["cat", "dog", "eel"]),
        "when": np.array(["2020-01-01", "2021-06-30"], dtype="datetime64[D]"),
        "day": np.datetime64("2020-01-01"),
        "swapped": np.arange(3, dtype=">f4"),
        "lazy": _UnreadableMapping(a=1),
    }
    dumper = BatchDumper(tmp_path)
    with pytest.warns(DeadUnitsWarning, match="could not store values of type") as record:
        path = dumper.write("step1", {"batch": batch}, {"loss": 3.0})
    assert len(record) == 1 and path is not None
    restored, metadata = load_dump(path)
    assert restored["x"].equal(torch.ones(2)) and metadata["loss"] == 3.0
    assert restored["names"] == {
        "__deadunits__": "unsaved",
        "type": "numpy.ndarray[<U3]",
        "shape": [3],
        "repr": "array(['cat', 'dog', 'eel'], dtype='<U3')",
    }
    assert (restored["when"]["type"], restored["when"]["shape"]) == ("numpy.ndarray[datetime64[D]]", [2])
    assert (restored["day"]["type"], restored["day"]["shape"]) == ("numpy.datetime64", [])
    assert restored["swapped"]["type"] == "numpy.ndarray[>f4]"
    assert restored["lazy"]["type"] == "tests.test_batch_dump._UnreadableMapping"
    assert metadata["unsaved"] == sorted(
        [
            "numpy.datetime64",
            "numpy.ndarray[<U3]",
            "numpy.ndarray[>f4]",
            "numpy.ndarray[datetime64[D]]",
            "tests.test_batch_dump._UnreadableMapping",
        ]
    )


def test_placeholder_repr_is_cut_short() -> None:
    encoded = encode(np.array(["x" * 50] * 100))
    assert encoded["shape"] == [100] and len(encoded["repr"]) == 200


def test_dumper_skips_a_dump_over_max_bytes_before_copying_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_copy(value: Any, unsaved: list[str] | None = None) -> Any:
        raise AssertionError("a dump that cannot fit was encoded (copied to the host)")

    monkeypatch.setattr("lightning_deadunits.actions.batch_dump.encode", no_copy)
    dumper = BatchDumper(tmp_path, max_bytes=1000)
    assert dumper.write("big", {"batch": {"x": torch.ones(300), "ids": ["a"] * 10}}, {}) is None
    assert dumper.last_skip_reason == "`max_bytes=1000` would be exceeded (0 written, 1210 more)"
    assert list(tmp_path.iterdir()) == [] and dumper.bytes_written == 0


def test_dumper_says_why_it_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dumper = BatchDumper(tmp_path, max_dumps=1)
    assert dumper.write("a", {"batch": 1}, {}) is not None and dumper.last_skip_reason is None
    assert dumper.write("b", {"batch": 1}, {}) is None
    assert dumper.last_skip_reason == "`max_dumps=1` dumps written"

    def full(obj: Any, file: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    failing = BatchDumper(tmp_path / "full")
    with pytest.warns(DeadUnitsWarning, match="No space left on device"):
        assert failing.write("c", {"batch": 1}, {}) is None
    assert failing.last_skip_reason == "could not write: [Errno 28] No space left on device"


def test_dumpers_sharing_a_directory_never_overwrite_each_other(tmp_path: Path) -> None:
    first = BatchDumper(tmp_path, tag="LossSpikeMonitor{'prefix': 'a/b'}")
    second = BatchDumper(tmp_path, tag="val")
    untagged = BatchDumper(tmp_path)
    paths = [
        dumper.write("step1-rank0", {"batch": torch.tensor([float(i)])}, {})
        for i, dumper in enumerate([first, second, untagged, untagged, second])
    ]
    assert [p.name for p in paths if p is not None] == [
        "LossSpikeMonitor__prefix____a_b__-step1-rank0.pt",
        "val-step1-rank0.pt",
        "step1-rank0.pt",
        "step1-rank0-1.pt",
        "val-step1-rank0-1.pt",
    ]
    assert [load_dump(p).batch.item() for p in paths if p is not None] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths if p is not None)


def test_dumper_never_overwrites_on_a_file_system_without_hard_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(source: Any, target: Any) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    dumper = BatchDumper(tmp_path)
    paths = [dumper.write("step1", {"batch": torch.tensor([float(i)])}, {}) for i in range(2)]
    assert [p.name for p in paths if p is not None] == ["step1.pt", "step1-1.pt"]
    assert [load_dump(p).batch.item() for p in paths if p is not None] == [0.0, 1.0]


def test_dumper_rejects_a_tag_that_is_not_a_string(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="`tag` must be a string, got 3"):
        BatchDumper(tmp_path, tag=3)  # type: ignore[arg-type]


def test_dumper_annotate_refuses_a_damaged_dump_instead_of_resealing_it(tmp_path: Path) -> None:
    dumper = BatchDumper(tmp_path)
    path = dumper.write("step1", {"batch": torch.arange(8, dtype=torch.float32)}, {"loss": 2.0})
    assert path is not None
    data = bytearray(path.read_bytes())
    data[data.find(torch.arange(8, dtype=torch.float32)[5:7].numpy().tobytes())] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.warns(DeadUnitsWarning, match="Could not update spike dump .* is a corrupt lightning-deadunits dump"):
        assert not dumper.annotate(path, {"dead_after_spike": {}})
    with pytest.raises(ValueError, match="its contents do not match the checksum"):
        load_dump(path)


def test_dumper_annotates_a_dump_outside_its_current_directory_in_place(tmp_path: Path) -> None:
    dumper = BatchDumper(tmp_path / "before")
    path = dumper.write("step1", {"batch": torch.ones(1)}, {"loss": 2.0})
    assert path is not None
    dumper.directory = tmp_path / "after"  # e.g. set from the trainer's log dir in setup
    assert dumper.annotate(path, {"dead_after_spike": {"k": 1}})
    assert load_dump(path).metadata["dead_after_spike"] == {"k": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["before"]


def test_rng_states_reuse_numpys_state_until_it_draws_and_stay_exact() -> None:
    first = rng_states()
    assert rng_states()["numpy"] is first["numpy"]  # nothing drew: the costly state is not built again
    np.random.rand(3)
    moved = rng_states()
    assert moved["numpy"] is not first["numpy"]
    expected = np.random.rand(4)
    np.random.set_state(moved["numpy"])
    assert np.random.rand(4).tolist() == expected.tolist()
    np.random.set_state(first["numpy"])  # a state set from outside is seen too
    assert rng_states()["numpy"][2] == first["numpy"][2]
    assert rng_states()["numpy"][1].tolist() == first["numpy"][1].tolist()


def test_rng_states_reuse_pythons_state_until_it_draws_and_stay_exact() -> None:
    first = rng_states()
    assert rng_states()["python"] is first["python"]  # nothing drew: the 625 ints are not built again
    random.random()
    moved = rng_states()
    assert moved["python"] is not first["python"] and moved["python"] == random.getstate()
    expected = [random.random() for _ in range(3)]
    random.setstate(moved["python"])
    assert [random.random() for _ in range(3)] == expected
    random.setstate(first["python"])  # a state set from outside is seen too
    assert rng_states()["python"] == first["python"]
