"""Read the convolution and linear weights of a saved model one tensor at a time, whatever the file's format.

Formats are told apart by content (the first bytes), not by extension:

- ``lightning`` and ``state_dict``: a zip archive (``torch.save``), read with
  ``torch.load(weights_only=True, mmap=True)``: tensors stay mapped from the file. A legacy pickle
  (``_use_new_zipfile_serialization=False``) cannot be mapped and is loaded whole.
- ``torchscript``: a zip archive holding ``constants.pkl``, loaded whole with ``torch.jit.load``.
- ``safetensors``: an 8-byte header length, then ``{``; read with ``safetensors.safe_open``, one tensor at a time.
- ``safetensors_shards``: a ``*.safetensors.index.json`` weight map (or the directory holding it, or a directory of
  ``*.safetensors`` files), each shard read as above.
- ``onnx``: a protobuf starting with ``ir_version`` (or any file named ``*.onnx``), parsed with
  ``onnx.load(load_external_data=False)``: the ``.onnx`` file is held whole, external data is read one tensor at a
  time.

What each reader can be made to do by a hostile file: the restricted unpickler of ``torch.load(weights_only=True)``
rebuilds only tensors, containers and primitive values and refuses any other global (``os.system``, a class) before
calling it; safetensors is a JSON header and raw bytes, bounds-checked by its reader; ONNX is a protobuf whose graph
is read, never run, and whose external data ``onnx`` reads only from inside the model's folder. None of them runs
code. A TorchScript archive holds code: ``torch.jit.load`` compiles it and runs the ``__setstate__`` methods of the
scripted classes it holds (TorchScript, which reaches torch operators but not Python modules), so scan TorchScript
only from sources you trust. Any file can make a scan slow or large (huge declared shapes) and report wrong numbers.
"""

import contextlib
import importlib
import json
import pickle
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

__all__ = ["Checkpoint", "CheckpointFormat", "SavedWeight", "looks_like_embedding"]

CheckpointFormat = Literal["lightning", "state_dict", "torchscript", "safetensors", "safetensors_shards", "onnx"]

SavedWeight = tuple[str, Tensor, int | None, bool, bool]
"""``(layer name, weight, groups, transposed, kind known from the file)``.

``weight`` has its filters along dimension 0 (``(out, in / groups, *k)``, ``(out, in)``), or is a ConvTranspose weight
``(in, out / groups, *k)`` when ``transposed``. ``groups`` is ``None`` where the file does not record it (state dicts,
safetensors), and then the layer's kind can only be guessed from the weight's shape.
"""

_WHAT_WAS_TRIED = (
    "tried a torch.save zip archive or pickle (Lightning checkpoint, state_dict, TorchScript), a safetensors file, "
    "a safetensors index (JSON with a `weight_map`) and an ONNX model"
)
_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOL_OPCODE = b"\x80"  # how every pickle of protocol >= 2, including a legacy torch.save, starts
_ONNX_IR_VERSION_TAG = b"\x08"  # protobuf field 1 (ModelProto.ir_version), a varint: serialised first
_SAFETENSORS_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
_ONNX_CONV_OPS = frozenset({"Conv", "ConvTranspose"})
_ONNX_MATRIX_OPS = frozenset({"Gemm", "MatMul"})
# module names of embedding tables across common code bases (torch, Hugging Face, nanoGPT, LLaMA)
_EMBEDDING_NAMES = frozenset({"wte", "wpe", "shared", "lookup", "tok_embeddings", "word_embeddings"})


class Checkpoint:
    """A saved model, recognised by its content and opened to read its layer weights one at a time.

    A Lightning checkpoint's ``state_dict`` (not its optimizer states), a ``torch.save``-d state_dict or any
    nesting of dicts and lists of them (keys joined with dots), a TorchScript file, a safetensors file, sharded
    safetensors (an index file or the directory holding it), or an ONNX model. In state dicts and safetensors every
    floating tensor of 2 or more dimensions whose key ends in ``.weight`` is a layer weight (2-D linear, 3-D and more
    convolutions; groups unknown). TorchScript modules and ONNX operators tell the groups: ONNX initializers feeding
    ``Conv`` and ``ConvTranspose`` (``group``), ``Gemm`` (``transA``/``transB``) and ``MatMul`` (a ``(in, out)``
    right operand has its filters along the last axis) are read; biases and other 1-D tensors never are.

    Args:
        path: a file, or a directory of safetensors shards.

    Raises:
        ValueError: if ``path`` does not exist, is none of the formats above, or is damaged (the message names the
            file and what was tried).

    Example:
        >>> checkpoint = Checkpoint("model.safetensors")  # doctest: +SKIP
        >>> checkpoint.format, [name for name, *_ in checkpoint.weights()]  # doctest: +SKIP
        ('safetensors', ['stem', 'head'])
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._saved: Any = None
        self._shards: list[tuple[Path, list[str] | None]] = []
        self._onnx_model: Any = None
        self.format: CheckpointFormat = self._open()

    @property
    def nbytes(self) -> int:
        """Size of the files that hold the weights (shards, ONNX external data), in bytes, for progress reports."""
        if self._shards:
            files = [shard for shard, _ in self._shards]
        elif self._onnx_model is not None:
            files = [self.path, *_onnx_external_files(self.path, self._onnx_model)]
        else:
            files = [self.path]
        return sum(file.stat().st_size for file in files)

    def weights(self) -> Iterator[SavedWeight]:
        """Yield every convolution and linear weight, one at a time and in file order, as a :data:`SavedWeight`.

        Raises:
            ValueError: if a tensor cannot be read, or an ONNX operator's ``group`` does not fit its weight.
        """
        if self.format == "torchscript":
            yield from _scripted_weights(self.path)
        elif self.format == "onnx":
            yield from _onnx_weights(self.path, self._onnx_model)
        elif self._shards:
            for shard, names in self._shards:
                yield from _safetensors_weights(shard, names)
        else:
            for key, tensor in _tensors(self._saved, ""):
                if _is_layer_weight(key, tensor.is_floating_point(), tensor.dim()):
                    yield _layer_name(key), tensor, None, False, False

    def _open(self) -> CheckpointFormat:
        """Recognise the format and open the file (torch archives memory-mapped, ONNX protobufs parsed)."""
        if self.path.is_dir():
            self._shards = _shards_in_directory(self.path)
            return "safetensors_shards"
        if not self.path.is_file():
            raise ValueError(f"{self.path}: no such file or directory.")
        with self.path.open("rb") as file:
            head = file.read(9)
        if head.startswith(_ZIP_MAGIC) and _is_torchscript(self.path):
            return "torchscript"
        if head.startswith((_ZIP_MAGIC, _PICKLE_PROTOCOL_OPCODE)):
            self._saved = _load_weights_only(self.path, mmap=head.startswith(_ZIP_MAGIC))
            if isinstance(self._saved, Mapping) and isinstance(self._saved.get("state_dict"), Mapping):
                self._saved = self._saved["state_dict"]  # the model, not the optimizer states
                return "lightning"
            return "state_dict"
        if _is_safetensors(head, self.path.stat().st_size):
            self._shards = [(self.path, None)]
            return "safetensors"
        if head.lstrip()[:1] == b"{":
            self._shards = _shards_in_index(self.path)
            return "safetensors_shards"
        # Protobuf has no magic number: exporters write ir_version first, and a `.onnx` name is taken at its word.
        if head.startswith(_ONNX_IR_VERSION_TAG) or self.path.suffix == ".onnx":
            self._onnx_model = _load_onnx(self.path)
            return "onnx"
        raise ValueError(f"{self.path}: not a recognised model file ({_WHAT_WAS_TRIED}; it starts with {head!r}).")


@contextlib.contextmanager
def _reading(path: Path, what: str) -> Iterator[None]:
    """Turn a reader library's own exception (of whatever type) into a ValueError naming the file and format."""
    try:
        yield
    except Exception as error:
        raise ValueError(f"{path}: not a readable {what} file ({type(error).__name__}: {error}).") from error


def _is_layer_weight(key: str, is_floating: bool, dims: int) -> bool:
    return key.rpartition(".")[2] == "weight" and is_floating and dims >= 2


def _layer_name(key: str) -> str:
    return key.removesuffix(".weight")


def _is_safetensors(head: bytes, size: int) -> bool:
    """An 8-byte little-endian header length that fits in the file, then the header's JSON ``{``."""
    return len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files holding ``<name>/constants.pkl`` (as ``torch.load`` itself checks)."""
    with _reading(path, "zip"), zipfile.ZipFile(path) as archive:
        return any(name.split("/", 1)[-1] == "constants.pkl" for name in archive.namelist())


def _load_weights_only(path: Path, mmap: bool) -> Any:
    try:
        with warnings.catch_warnings():
            # Raised for plain pickles of protocol > 2, which the restricted unpickler then refuses anyway.
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        message = str(error)
        _, marker, after = message.partition("WeightsUnpickler error:")
        # The unpickler's own first sentence ("Unsupported global: GLOBAL os.system was not an allowed global ...").
        reason = " ".join((marker + after).split()).split(". ")[0] if marker else message.splitlines()[0]
        raise ValueError(
            f"{path}: `torch.load(weights_only=True)` refused it ({reason}). It holds Python objects besides "
            "tensors; save `model.state_dict()` with `torch.save` and scan that file."
        ) from error
    except Exception as error:  # torch reports a damaged archive as RuntimeError, EOFError, ...
        raise ValueError(
            f"{path}: not a readable PyTorch checkpoint or state_dict ({type(error).__name__}: {error})."
        ) from error


def _tensors(saved: Any, prefix: str) -> Iterator[tuple[str, Tensor]]:
    if isinstance(saved, Tensor):
        yield prefix, saved
    elif isinstance(saved, Mapping):
        for key, value in saved.items():
            yield from _tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(saved, (list, tuple)):
        for index, value in enumerate(saved):
            yield from _tensors(value, f"{prefix}.{index}" if prefix else str(index))


def _scripted_weights(path: Path) -> Iterator[SavedWeight]:
    """Weights of the convolutions (which keep ``groups`` and ``transposed``) and linear layers of a script module."""
    # A damaged archive fails in many ways inside the TorchScript loader.
    with _reading(path, "TorchScript"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
    for name, submodule in module.named_modules():
        weight = getattr(submodule, "weight", None)
        if not isinstance(weight, Tensor) or not weight.is_floating_point() or weight.dim() < 2:
            continue
        if hasattr(submodule, "groups") and hasattr(submodule, "transposed"):
            yield name, weight, int(submodule.groups), bool(submodule.transposed), True
        elif weight.dim() == 2 and getattr(submodule, "original_name", "").endswith("Linear"):
            yield name, weight, 1, False, True


def _shards_in_directory(directory: Path) -> list[tuple[Path, list[str] | None]]:
    """The shards of the directory's one ``*.safetensors.index.json``, or else all its ``*.safetensors`` files."""
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return _shards_in_index(indexes[0])
    if indexes:
        names = ", ".join(index.name for index in indexes)
        raise ValueError(f"{directory}: holds several safetensors indexes ({names}); pass the one to scan.")
    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        raise ValueError(
            f"{directory}: a directory, but it holds no `*.safetensors.index.json` and no `*.safetensors` file."
        )
    return [(shard, None) for shard in shards]


def _shards_in_index(index: Path) -> list[tuple[Path, list[str] | None]]:
    """``(shard file, its tensor names)`` from an index's ``weight_map``, shards in order of first appearance."""
    with _reading(index, "JSON"):
        content = json.loads(index.read_text(encoding="utf-8"))
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
        raise ValueError(
            f"{index}: a JSON file, but not a safetensors index (`weight_map` must map tensor names to shard files)."
        )
    names_by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        names_by_shard.setdefault(shard, []).append(name)
    missing = [shard for shard in names_by_shard if not (index.parent / shard).is_file()]
    if missing:
        raise ValueError(f"{index}: shards listed in `weight_map` are missing: {', '.join(missing)}.")
    return [(index.parent / shard, names) for shard, names in names_by_shard.items()]


def _safetensors_weights(path: Path, names: list[str] | None) -> Iterator[SavedWeight]:
    """Layer weights of one safetensors file (only ``names`` when given), each read on its own."""
    safetensors = _require("safetensors", path)
    with _reading(path, "safetensors"):
        reader: Any = safetensors.safe_open(path, framework="pt")
        keys: list[str] = reader.keys()
    if names is not None and (absent := sorted(set(names) - set(keys))):
        raise ValueError(f"{path}: tensors the index places in this shard are missing: {', '.join(absent[:5])}.")
    for key in keys if names is None else names:
        with _reading(path, "safetensors"):
            header = reader.get_slice(key)
            is_weight = _is_layer_weight(key, header.get_dtype() in _SAFETENSORS_FLOAT_DTYPES, len(header.get_shape()))
            tensor = reader.get_tensor(key) if is_weight else None
        if tensor is not None:
            yield _layer_name(key), tensor, None, False, False
            del tensor  # before the next is read (older safetensors releases copy each): one at a time, not two


def _load_onnx(path: Path) -> Any:
    onnx = _require("onnx", path)
    with _reading(path, "ONNX"):
        return onnx.load(str(path), load_external_data=False)


def _onnx_external_files(path: Path, model: Any) -> set[Path]:
    external_data = _require("onnx", path).external_data_helper
    locations = {
        external_data.ExternalDataInfo(tensor).location
        for tensor in model.graph.initializer
        if external_data.uses_external_data(tensor)
    }
    return {path.parent / location for location in locations if (path.parent / location).is_file()}


def _onnx_weights(path: Path, model: Any) -> Iterator[SavedWeight]:
    """Initializers feeding Conv/ConvTranspose (filters and groups from the operator), Gemm and MatMul, once each."""
    helper = _require("onnx", path).helper
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    seen: set[str] = set()
    for node in model.graph.node:
        attributes = {attribute.name: helper.get_attribute_value(attribute) for attribute in node.attribute}
        for position, weight_name in enumerate(node.input[:2]):
            initializer = initializers.get(weight_name)
            if initializer is None or weight_name in seen or not _feeds_filters(node.op_type, position):
                continue
            weight = _onnx_tensor(path, initializer)
            if weight is None or (node.op_type in _ONNX_MATRIX_OPS and weight.dim() != 2):
                continue  # integer (quantized) weights, and batched MatMul operands, hold no filters of their own
            seen.add(weight_name)
            name = _layer_name(weight_name) if weight_name.endswith(".weight") else node.name or weight_name
            if node.op_type in _ONNX_CONV_OPS:
                groups = int(attributes.get("group", 1))
                if groups < 1 or weight.dim() < 3 or weight.shape[0] % groups:
                    raise ValueError(
                        f"{path}: {node.op_type} node `{node.name}` has `group` {groups}, which must be >= 1 and "
                        f"divide the first dimension of its weight `{weight_name}` of shape {tuple(weight.shape)}."
                    )
                yield name, weight, groups, node.op_type == "ConvTranspose", True
            else:
                # MatMul: A (M, K) @ B (K, N) has its outputs along A's rows and B's columns; Gemm's transA/transB
                # transpose its operands first.
                transposed_operand = bool(attributes.get("transA" if position == 0 else "transB", 0))
                outputs_along_columns = (position == 1) != transposed_operand
                yield name, weight.T if outputs_along_columns else weight, 1, False, True
            del weight  # before the next initializer is read: one in memory at a time, not two


def _feeds_filters(op_type: str, position: int) -> bool:
    """Whether input ``position`` of the operator holds weights: Conv's W (input 1), either Gemm/MatMul operand."""
    return (op_type in _ONNX_CONV_OPS and position == 1) or op_type in _ONNX_MATRIX_OPS


def _onnx_tensor(path: Path, initializer: Any) -> Tensor | None:
    """The initializer as a tensor (external data read from the model's folder), or ``None`` when not floating."""
    onnx = _require("onnx", path)
    torch_dtypes = {
        onnx.TensorProto.FLOAT: torch.float32,
        onnx.TensorProto.DOUBLE: torch.float64,
        onnx.TensorProto.FLOAT16: torch.float16,
        onnx.TensorProto.BFLOAT16: torch.bfloat16,
        onnx.TensorProto.FLOAT8E4M3FN: torch.float8_e4m3fn,
        onnx.TensorProto.FLOAT8E5M2: torch.float8_e5m2,
    }
    dtype = torch_dtypes.get(initializer.data_type)
    if dtype is None:
        return None
    external = onnx.external_data_helper.uses_external_data(initializer)
    with _reading(path, "ONNX"):
        array = onnx.numpy_helper.to_array(initializer, base_dir=str(path.parent))
    if external:  # older onnx releases leave the bytes read in the model: drop them, as newer ones do
        initializer.ClearField("raw_data")
    if array.dtype.itemsize != dtype.itemsize:  # an onnx release that widens bfloat16 / float8 to float32
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    # Bits through integers of the same width, since numpy has no bfloat16 or float8 of its own.
    bits = array.view(np.dtype(f"i{array.dtype.itemsize}"))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")  # read, never written
        return torch.from_numpy(bits).view(dtype)


def _require(module: str, path: Path) -> Any:
    """Import the reader of an optional format, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ValueError(
            f"{path}: reading this file needs the `{module}` package: pip install 'lightning-deadunits[formats]'."
        ) from error


def looks_like_embedding(name: str, shape: tuple[int, ...]) -> bool:
    """Whether the saved 2-D weight of layer ``name`` is an embedding table (one row per token), not a linear layer.

    A state_dict does not record module types, so this goes by name: the last part of ``name`` starts with
    ``emb`` or contains ``embed`` (``embed``, ``embedding``, ``embed_tokens``, ``position_embeddings``), or is one
    of ``wte``, ``wpe``, ``shared``, ``lookup``, ``tok_embeddings``, ``word_embeddings``; and by shape: 2-D.

    Example:
        >>> looks_like_embedding("model.embed_tokens", (32000, 4096)), looks_like_embedding("transformer.wte", (50, 8))
        (True, True)
        >>> looks_like_embedding("model.layers.0.mlp.up_proj", (11008, 4096))
        False
    """
    last = name.rpartition(".")[2].lower()
    named = last.startswith("emb") or "embed" in last or last in _EMBEDDING_NAMES
    return named and len(shape) == 2
