"""The spike-dump file format: a ``torch.save`` of tensors and plain Python values only, and its loader.

A dump is loadable with ``torch.load(path, weights_only=True)``, which never runs code from the file. Values
that file format cannot hold are stored as tagged plain dicts (``{"__deadunits__": kind, ...}``) and rebuilt by
:func:`load_dump`:

==============================  ====================================================================
saved value                     stored as, and rebuilt as
==============================  ====================================================================
tensor (any device, Parameter)  a detached CPU copy; a plain tensor
None, bool, int, float, str,    themselves (exactly these types: a subclass, such as an enum member, is
complex                         ``unsaved``)
bytes                           ``bytes``: a uint8 tensor; bytes
list, tuple, dict               themselves, items converted (dict subclasses become ``dict``; keys other
                                than None, bool, int, float, complex and str become their ``repr``)
namedtuple                      ``namedtuple``: a namedtuple of a new class with the same name and fields
dataclass instance              ``dataclass``: an instance of a new dataclass with the same name and fields
numpy array / numpy scalar      ``ndarray``: a numpy array; scalars become Python values (converted again)
set, frozenset                  ``set``: a set (a list if its items are not hashable after conversion)
anything else                   ``unsaved``: ``{"__deadunits__": "unsaved", "type": ..., "shape": ...,
                                "repr": ...}`` (``shape`` a list, or ``None`` for values without one; ``repr``
                                cut to 200 characters): numpy arrays of strings, dates or records, objects,
                                functions, and any value whose conversion raised
==============================  ====================================================================

Encoding never raises: a value it cannot store (or that raises while being read) becomes an ``unsaved``
placeholder, so a dump cannot stop training. :func:`stored_bytes` estimates a dump's size without copying
anything, so a size cap can be checked before the host copy.

A dump also holds a ``checksum`` (CRC-32 of every value in it, :func:`with_checksum`): :func:`load_dump` rejects
a file changed after it was written, even where the change leaves it loadable (flipped bytes of tensor data).

Classes are never imported from the names in a file: rebuilt namedtuples and dataclasses are new classes that
only share the name and fields, so ``batch.images`` and ``batch[0]`` keep working.
"""

import collections
import dataclasses
import keyword
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DUMP_FORMAT",
    "DUMP_VERSION",
    "TAG_KEY",
    "LoadedDump",
    "decode",
    "encode",
    "load_dump",
    "stored_bytes",
    "verify_checksum",
    "with_checksum",
]

DUMP_FORMAT = "lightning_deadunits.dump"
DUMP_VERSION = 1

TAG_KEY = "__deadunits__"
"""The key of the tagged plain dicts that stand for values the file format cannot hold (see the table)."""
_CHECKSUM = "checksum"
_DOCUMENT_KEYS = ("format", "version", "metadata", "batch", _CHECKSUM)
# Stored as themselves. Not bytes: the safe loader cannot read an empty bytes object back (pickled as `bytes()`).
_PRIMITIVES = (type(None), bool, int, float, complex, str)
_SCALARS = (*_PRIMITIVES, bytes)
_MAX_REPR = 200
_MAX_DEPTH = 64


class LoadedDump(NamedTuple):
    """A dump read back by :func:`load_dump`; unpacks as ``batch, metadata = load_dump(path)``.

    Args:
        batch: the batch as the module received it, on CPU.
        metadata: everything else: ``loss``, ``baseline``, ``spread``, ``ratio``, ``spike_score``, ``threshold``,
            ``reason``, ``global_step``, ``epoch``, ``batch_idx``, ``rank``, ``world_size``, ``skipped_update``,
            ``per_sample_loss`` (tensor or ``None``), ``sample_ids`` (or ``None``), ``recent_steps`` and
            ``recent_losses`` (the last window of losses, flagged ones included), ``rng_states`` (``torch``,
            ``torch.cuda``, ``numpy``, ``python``: their states before the training step), ``unsaved`` (types
            that could not be stored) and, once a dead-unit monitor checked after the spike,
            ``dead_after_spike``.
    """

    batch: Any
    metadata: dict[str, Any]


def encode(value: Any, unsaved: list[str] | None = None) -> Any:
    """Convert ``value`` into tensors and plain Python values that ``torch.load(weights_only=True)`` accepts.

    Args:
        value: any nested structure of tensors, numbers, strings, sequences, mappings, namedtuples, dataclasses.
        unsaved: if given, the type names of values that could not be stored are appended to it.

    Example:
        >>> from collections import namedtuple
        >>> encode(namedtuple("Pair", "x y")(torch.ones(1), "a"))["values"]
        [tensor([1.]), 'a']
    """
    return _encode(value, [] if unsaved is None else unsaved, 0)


def decode(value: Any) -> Any:
    """Rebuild what :func:`encode` stored (see the module's table).

    Example:
        >>> from collections import namedtuple
        >>> decode(encode(namedtuple("Pair", "x y")(1, "a")))
        Pair(x=1, y='a')
    """
    if isinstance(value, list):
        return [decode(item) for item in value]
    if isinstance(value, tuple):
        return tuple(decode(item) for item in value)
    if not isinstance(value, dict):
        return value
    kind = value.get(TAG_KEY)
    if kind == "namedtuple":
        cls = collections.namedtuple(_identifier(value["type"]), value["fields"], rename=True)  # type: ignore[misc]
        return cls(*(decode(item) for item in value["values"]))
    if kind == "dataclass":
        fields = {_identifier(name): decode(item) for name, item in value["fields"].items()}
        return dataclasses.make_dataclass(_identifier(value["type"]), list(fields))(**fields)
    if kind == "ndarray":
        return value["data"].numpy()
    if kind == "bytes":
        return value["data"].numpy().tobytes()
    if kind == "set":
        items = [decode(item) for item in value["items"]]
        try:
            return set(items)
        except TypeError:
            return items
    if kind == "unsaved":
        return value
    return {key: decode(item) for key, item in value.items()}


def load_dump(path: str | Path) -> LoadedDump:
    """Read a spike dump written by :class:`~lightning_deadunits.LossSpikeMonitor` without unpickling code.

    Args:
        path: the ``.pt`` file.

    Returns:
        The batch and its metadata (see :class:`LoadedDump`).

    Raises:
        OSError: if the file cannot be read.
        ValueError: if it is not a lightning-deadunits dump, is truncated or corrupt (its checksum does not match),
            or holds anything but tensors and plain values.

    Example:
        >>> batch, metadata = load_dump("logs/deadunits/dumps/deadunits-step00001800-rank0.pt")  # doctest: +SKIP
        >>> metadata["loss"], metadata["baseline"]  # doctest: +SKIP
    """
    try:
        record = torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except Exception as error:  # corrupt file, foreign pickle: torch raises many kinds
        raise ValueError(f"{path} is not a readable lightning-deadunits dump: {error}") from error
    if not isinstance(record, dict) or record.get("format") != DUMP_FORMAT:
        raise ValueError(f"{path} is not a lightning-deadunits dump (no `format: {DUMP_FORMAT}` record).")
    verify_checksum(record, path)
    metadata = dict(record.get("metadata", {}))
    for key, item in record.items():
        if key not in _DOCUMENT_KEYS:
            metadata[key] = decode(item)
    return LoadedDump(decode(record.get("batch")), metadata)


def stored_bytes(value: Any) -> int:
    """Estimate the bytes :func:`encode` would store for ``value``, without copying anything.

    Counts what dominates a dump: the data of tensors (only the viewed elements, on any device, with no device
    sync) and numpy arrays, and the length of strings and bytes, through the same containers :func:`encode`
    walks; everything else counts 0. A value that raises while being read counts 0 (it would be a placeholder).

    Example:
        >>> stored_bytes({"x": torch.ones(2, 3), "ids": ["a", "bc"], "step": 7})
        27
    """
    return _stored_bytes(value, 0)


def with_checksum(document: Mapping[str, Any]) -> dict[str, Any]:
    """``document`` (encoded values) with its ``checksum`` entry set: a CRC-32 of every key and value but that one.

    Covers tensor dtypes, shapes and bytes, and the ``repr`` of every other value, in order.

    Example:
        >>> with_checksum({"format": DUMP_FORMAT, "batch": torch.zeros(2)})["checksum"]
        327748018
        >>> with_checksum({"format": DUMP_FORMAT, "batch": torch.tensor([0.0, -0.0])})["checksum"]  # one bit differs
        4264659602
    """
    body = {key: value for key, value in document.items() if key != _CHECKSUM}
    return {**body, _CHECKSUM: _crc(body, 0)}


def verify_checksum(record: Mapping[str, Any], path: str | Path) -> None:
    """Check a raw dump ``record`` (as ``torch.load`` returns it) against its ``checksum`` entry.

    Dumps written before checksums existed have none and pass.

    Args:
        record: the loaded, not yet decoded, document.
        path: the file it came from, for the message.

    Raises:
        ValueError: if the contents do not match the checksum.
    """
    expected = record.get(_CHECKSUM)
    if expected is not None and with_checksum(record)[_CHECKSUM] != expected:
        raise ValueError(
            f"{path} is a corrupt lightning-deadunits dump: its contents do not match the checksum written with "
            "them (the file was changed or damaged after it was written)."
        )


def _crc(value: Any, crc: int) -> int:
    if isinstance(value, Tensor):
        return zlib.crc32(_raw_bytes(value), zlib.crc32(f"{value.dtype}{tuple(value.shape)}".encode(), crc))
    if isinstance(value, Mapping):
        for key, item in value.items():
            crc = _crc(item, zlib.crc32(repr(key).encode(), crc))
        return crc
    if isinstance(value, (list, tuple)):
        crc = zlib.crc32(f"{type(value).__name__}{len(value)}".encode(), crc)
        for item in value:
            crc = _crc(item, crc)
        return crc
    return zlib.crc32(repr(value).encode(), crc)


def _raw_bytes(tensor: Tensor) -> bytes | memoryview:
    """The bytes of a CPU tensor's elements (any dtype, bfloat16 included), or its ``repr`` for exotic layouts."""
    try:
        flat = tensor.detach().resolve_conj().resolve_neg().reshape(-1).contiguous()
        return flat.view(torch.uint8).numpy().data
    except Exception:  # sparse, quantized or other layouts: their repr still changes with their values
        return repr(tensor).encode()


def _encode(value: Any, unsaved: list[str], depth: int) -> Any:
    if depth > _MAX_DEPTH:
        return _unsaved(value, unsaved)
    try:
        return _encode_node(value, unsaved, depth)
    except Exception:  # a container that breaks while read, an array torch cannot hold: keep a placeholder
        return _unsaved(value, unsaved)


def _encode_node(value: Any, unsaved: list[str], depth: int) -> Any:
    if isinstance(value, Tensor):
        return value.detach().as_subclass(Tensor).to("cpu", copy=True)
    if isinstance(value, np.generic):  # before the primitives: np.float64 and np.str_ subclass float and str
        item = value.item()  # a Python number, str or bytes; a datetime or tuple for dates and records
        return _encode_node(item, unsaved, depth) if type(item) in _SCALARS else _unsaved(value, unsaved)
    if type(value) in _PRIMITIVES:  # exact types: a subclass (an enum member) would be pickled as its class
        return value
    if type(value) is bytes:
        return {TAG_KEY: "bytes", "data": torch.from_numpy(np.frombuffer(value, dtype=np.uint8).copy())}
    if isinstance(value, np.ndarray):
        # torch.from_numpy raises on strings, dates, records, objects and non-native byte order
        return {TAG_KEY: "ndarray", "data": torch.from_numpy(value.copy())}
    children = _children(value)
    if children is None:
        return _unsaved(value, unsaved)
    kind, items = children
    encoded = [(key, _encode(item, unsaved, depth + 1)) for key, item in items]
    if kind == "namedtuple":
        fields = [key for key, _ in encoded]
        return {TAG_KEY: kind, "type": type(value).__name__, "fields": fields, "values": [item for _, item in encoded]}
    if kind == "dataclass":
        return {TAG_KEY: kind, "type": type(value).__name__, "fields": dict(encoded)}
    if kind == "set":
        return {TAG_KEY: kind, "items": [item for _, item in encoded]}
    if kind == "mapping":
        return {_key(key): item for key, item in encoded}
    items_only = [item for _, item in encoded]
    return items_only if kind == "list" else tuple(items_only)


def _children(value: Any) -> tuple[str, list[tuple[Any, Any]]] | None:
    """The kind of container ``value`` is and its ``(key, item)`` pairs, or ``None`` if it is no container."""
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return "namedtuple", list(zip(value._fields, value, strict=True))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return "dataclass", [(field.name, getattr(value, field.name)) for field in dataclasses.fields(value)]
    if isinstance(value, (list, tuple)):
        return ("list" if isinstance(value, list) else "tuple"), list(enumerate(value))
    if isinstance(value, (set, frozenset)):
        return "set", list(enumerate(value))
    if isinstance(value, Mapping):
        return "mapping", list(value.items())
    return None


def _stored_bytes(value: Any, depth: int) -> int:
    if depth > _MAX_DEPTH:
        return 0
    try:
        if isinstance(value, Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, np.ndarray):
            return int(value.nbytes)
        if isinstance(value, (str, bytes)):
            return len(value)
        children = _children(value)
    except Exception:  # as in _encode: what cannot be read becomes a small placeholder
        return 0
    return 0 if children is None else sum(_stored_bytes(item, depth + 1) for _, item in children[1])


def _key(key: Any) -> Any:
    """Mapping keys stay as they are when ``weights_only`` can load them, else become their ``repr``."""
    return key if type(key) in _PRIMITIVES else repr(key)


def _unsaved(value: Any, unsaved: list[str]) -> dict[str, Any]:
    """The placeholder of a value that cannot be stored: its type, shape (if it has one) and a cut ``repr``."""
    type_name = f"{type(value).__module__}.{type(value).__qualname__}"
    if isinstance(value, np.ndarray):
        type_name += f"[{value.dtype}]"
    unsaved.append(type_name)
    try:
        text = repr(value)[:_MAX_REPR]
    except Exception:  # a broken __repr__ must not stop the dump
        text = "<repr failed>"
    try:
        shape = [int(size) for size in value.shape] if hasattr(value, "shape") else None
    except Exception:  # a `shape` that is not a sequence of sizes
        shape = None
    return {TAG_KEY: "unsaved", "type": type_name, "shape": shape, "repr": text}


def _identifier(name: str) -> str:
    """A valid class or field name close to ``name`` (a file may hold any string)."""
    cleaned = "".join(char if char.isalnum() or char == "_" else "_" for char in str(name)) or "Record"
    if cleaned[0].isdigit() or keyword.iskeyword(cleaned):
        cleaned = f"_{cleaned}"
    return cleaned
