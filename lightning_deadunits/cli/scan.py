"""``deadunits scan PATH``: count dead kernels per layer in a checkpoint, a state_dict or a TorchScript file."""

import argparse
import json
import pickle
import sys
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_deadunits._validation import check_float
from lightning_deadunits.cli._table import print_table
from lightning_deadunits.functional.kernels import LayerKind, dead_kernel_masks, weight_filter_norms, weight_kind

__all__ = ["LayerScan", "print_table", "register", "run", "scan_file"]

FileFormat = Literal["lightning", "state_dict", "torchscript"]

_SHAPE_NOTE = (
    "Kinds marked * come from weight shapes alone: a state_dict does not record `groups`, so `depthwise` means a "
    "weight of shape (out, 1, *k) (an ordinary convolution on one input channel looks the same), grouped and "
    "transposed convolutions show as `conv` (a ConvTranspose is counted per input channel). A TorchScript file "
    "gives exact kinds."
)


@dataclass(frozen=True)
class LayerScan:
    """Dead-kernel counts of one saved layer.

    Attributes:
        name: the layer's name (its weight's key without ``.weight``).
        kind: ``conv``, ``depthwise``, ``grouped``, ``transpose`` or ``linear``.
        filters: output filters (conv) or units (linear).
        dead_abs: filters with L1 below the absolute threshold.
        dead_rel: filters with L1 below the relative threshold times the layer's median L1.
        dead: filters dead by either rule.
        norm_median: the layer's median per-filter L1.
        kind_from_shape: whether ``kind`` was guessed from the weight's shape (state_dicts) rather than read from
            the module (TorchScript).
    """

    name: str
    kind: LayerKind
    filters: int
    dead_abs: int
    dead_rel: int
    dead: int
    norm_median: float
    kind_from_shape: bool


def scan_file(
    path: str | Path, abs_threshold: float = 1e-6, rel_threshold: float = 0.1
) -> tuple[FileFormat, list[LayerScan]]:
    """Count dead kernels in every convolution and linear weight saved in ``path``.

    Reads a Lightning ``.ckpt`` (its ``state_dict`` only), a ``torch.save``-d state_dict or any nesting of dicts
    and lists of them (e.g. ``{"model": ..., "ema": ...}``; keys are joined with dots), all with
    ``torch.load(weights_only=True)``, or a TorchScript file (``torch.jit.load``). In a state_dict every floating
    tensor of 2 or more dimensions whose key ends in ``.weight`` is read: 2-D as linear (embeddings included),
    3-D and more as convolutions, by shape (see :func:`~lightning_deadunits.functional.weight_kind`). 1-D tensors
    (biases, BatchNorm parameters and statistics) are skipped, so BatchNorm gammas near 0 are not counted here.

    Args:
        path: the file.
        abs_threshold: absolute L1 threshold (>= 0), as in :class:`~lightning_deadunits.KernelNormMonitor`.
        rel_threshold: fraction of the layer's median L1, in [0, 1].

    Returns:
        The file's format and one :class:`LayerScan` per layer, in file order.

    Raises:
        ValueError: on an out-of-range threshold, or a file that is missing, unreadable with
            ``weights_only=True``, or holds no convolution or linear weight.

    Example:
        >>> file_format, layers = scan_file("model.ckpt")  # doctest: +SKIP
        >>> sum(layer.dead for layer in layers)  # doctest: +SKIP
        12
    """
    abs_threshold = check_float("abs_threshold", abs_threshold, minimum=0.0)
    rel_threshold = check_float("rel_threshold", rel_threshold, minimum=0.0, maximum=1.0)
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file.")
    file_format: FileFormat
    if _is_torchscript(path):
        file_format, weights = "torchscript", list(_scripted_weights(path))
    else:
        saved = _load_weights_only(path)
        file_format = (
            "lightning" if isinstance(saved, Mapping) and isinstance(saved.get("state_dict"), Mapping) else "state_dict"
        )
        weights = list(_state_dict_weights(saved))
    if not weights:
        raise ValueError(f"{path}: found no convolution or linear weight (no key ending in `.weight` with >= 2 dims).")
    return file_format, [_scan_weight(*weight, abs_threshold, rel_threshold) for weight in weights]


def register(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add the ``scan`` command to the ``deadunits`` parser."""
    parser = commands.add_parser(
        "scan",
        help="count dead kernels per layer in a saved model",
        description=(
            "Count dead kernels (filters whose L1 norm is below an absolute threshold, or below a fraction of their "
            "layer's median) per convolution and linear layer of a Lightning checkpoint, a torch.save-d state_dict "
            f"or a TorchScript file. Files are read with torch.load(weights_only=True). {_SHAPE_NOTE}"
        ),
    )
    parser.add_argument("path", type=Path, help="a Lightning .ckpt, a torch.save-d state_dict or a TorchScript file")
    parser.add_argument("--abs-threshold", type=float, default=1e-6, help="dead when L1 < this (default 1e-6)")
    parser.add_argument(
        "--rel-threshold", type=float, default=0.1, help="dead when L1 < this x the layer's median L1 (default 0.1)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Scan ``args.path`` and print the table or JSON; return 0, or 2 when the file or a threshold is bad."""
    try:
        file_format, layers = scan_file(args.path, args.abs_threshold, args.rel_threshold)
    except ValueError as error:
        print(f"deadunits scan: error: {error}", file=sys.stderr)
        return 2
    total = {
        stat: sum(getattr(layer, stat) for layer in layers) for stat in ("filters", "dead_abs", "dead_rel", "dead")
    }
    if args.json:
        report = {
            "path": str(args.path),
            "format": file_format,
            "abs_threshold": args.abs_threshold,
            "rel_threshold": args.rel_threshold,
            "layers": [asdict(layer) for layer in layers],
            "total": total,
        }
        print(json.dumps(report, indent=2))
        return 0
    rows = [
        [
            layer.name,
            layer.kind + ("*" if layer.kind_from_shape else ""),
            str(layer.filters),
            str(layer.dead_abs),
            str(layer.dead_rel),
            str(layer.dead),
            f"{layer.norm_median:.4g}",
        ]
        for layer in layers
    ]
    rows.append(["total", "", *(str(total[stat]) for stat in ("filters", "dead_abs", "dead_rel", "dead")), ""])
    print_table(
        f"{args.path} ({file_format}): dead when L1 < {args.abs_threshold:g} or L1 < {args.rel_threshold:g} x median",
        ["layer", "kind", "filters", "dead (abs)", "dead (rel)", "dead", "median L1"],
        rows,
        footer=_SHAPE_NOTE if any(layer.kind_from_shape for layer in layers) else None,
    )
    return 0


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files holding ``<name>/constants.pkl`` (as ``torch.load`` itself checks)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/", 1)[-1] == "constants.pkl" for name in archive.namelist())


def _load_weights_only(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        lines = str(error).splitlines()
        reason = next((line for line in lines if "WeightsUnpickler error" in line), lines[0] if lines else "")
        raise ValueError(
            f"{path}: `torch.load(weights_only=True)` refused it ({reason.strip()}). It holds Python objects besides "
            "tensors; save `model.state_dict()` with `torch.save` and scan that file."
        ) from error
    except Exception as error:  # torch reports a non-PyTorch file as RuntimeError, EOFError, ...
        raise ValueError(
            f"{path}: not a PyTorch checkpoint, state_dict or TorchScript file ({type(error).__name__}: {error})."
        ) from error


def _state_dict_weights(saved: Any) -> Iterator[tuple[str, Tensor, int | None, bool]]:
    """``(layer name, weight, groups, transposed)`` of every conv/linear-like weight; groups unknown (``None``)."""
    if isinstance(saved, Mapping) and isinstance(saved.get("state_dict"), Mapping):
        saved = saved["state_dict"]  # a Lightning checkpoint: the model, not the optimizer states
    for key, tensor in _tensors(saved, ""):
        name, _, last = key.rpartition(".")
        if last == "weight" and tensor.is_floating_point() and tensor.dim() >= 2:
            yield name, tensor, None, False


def _tensors(saved: Any, prefix: str) -> Iterator[tuple[str, Tensor]]:
    if isinstance(saved, Tensor):
        yield prefix, saved
    elif isinstance(saved, Mapping):
        for key, value in saved.items():
            yield from _tensors(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(saved, (list, tuple)):
        for index, value in enumerate(saved):
            yield from _tensors(value, f"{prefix}.{index}" if prefix else str(index))


def _scripted_weights(path: Path) -> Iterator[tuple[str, Tensor, int | None, bool]]:
    """Weights of the convolutions (which keep ``groups`` and ``transposed``) and linear layers of a script module."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(str(path), map_location="cpu")  # type: ignore[no-untyped-call]
    except Exception as error:  # a damaged archive fails in many ways inside the TorchScript loader
        raise ValueError(f"{path}: not a readable TorchScript file ({type(error).__name__}: {error}).") from error
    for name, submodule in module.named_modules():
        weight = getattr(submodule, "weight", None)
        if not isinstance(weight, Tensor) or not weight.is_floating_point() or weight.dim() < 2:
            continue
        if hasattr(submodule, "groups") and hasattr(submodule, "transposed"):
            yield name, weight, int(submodule.groups), bool(submodule.transposed)
        elif weight.dim() == 2 and getattr(submodule, "original_name", "").endswith("Linear"):
            yield name, weight, 1, False


def _scan_weight(
    name: str, weight: Tensor, groups: int | None, transposed: bool, abs_threshold: float, rel_threshold: float
) -> LayerScan:
    l1, _ = weight_filter_norms(weight, groups or 1, transposed)
    dead_abs, dead_rel, layer_median = dead_kernel_masks(l1, abs_threshold, rel_threshold)
    return LayerScan(
        name=name,
        kind=weight_kind(weight.shape, groups, transposed),
        filters=l1.numel(),
        dead_abs=int(dead_abs.sum()),
        dead_rel=int(dead_rel.sum()),
        dead=int((dead_abs | dead_rel).sum()),
        norm_median=float(layer_median),
        kind_from_shape=groups is None,
    )
