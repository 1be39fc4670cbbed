"""``deadunits scan PATH``: count dead kernels per layer in a saved model, without training.

Reads Lightning checkpoints, ``torch.save``-d state_dicts, TorchScript, safetensors (sharded too) and ONNX, one
tensor at a time (see :mod:`lightning_deadunits.checkpoints`).
"""

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from lightning_deadunits._validation import check_float
from lightning_deadunits.checkpoints import Checkpoint, CheckpointFormat, looks_like_embedding
from lightning_deadunits.cli._table import print_table
from lightning_deadunits.functional.kernels import (
    LayerKind,
    blockwise_filter_l1,
    dead_kernel_masks,
    weight_kind,
)

__all__ = [
    "EmbeddingScan",
    "LayerScan",
    "add_threshold_arguments",
    "print_json_report",
    "print_table",
    "register",
    "run",
    "scan_checkpoint",
    "scan_file",
]

_SHAPE_NOTE = (
    "Kinds marked * come from weight shapes alone: a state_dict or safetensors file does not record `groups`, so "
    "`depthwise` means a weight of shape (out, 1, *k) (an ordinary convolution on one input channel looks the same), "
    "grouped and transposed convolutions show as `conv` (a ConvTranspose is counted per input channel). TorchScript "
    "and ONNX files give exact kinds."
)
_LOADING_NOTE = (
    "What is loaded how: Lightning .ckpt files and torch.save-d state_dicts with torch.load(weights_only=True, "
    "mmap=True) (legacy non-zip files without mmap); safetensors with safetensors.safe_open, one tensor at a time; "
    "ONNX with onnx.load(load_external_data=False), external data one tensor at a time from the model's folder; "
    "TorchScript with torch.jit.load. A malicious pickle cannot run code: the weights_only unpickler rebuilds only "
    "tensors, containers and plain values and refuses any other global (os.system, a class) before calling it. "
    "safetensors and ONNX files are data (a JSON header and bytes; a protobuf graph that is read, never run). "
    "A TorchScript file carries code: torch.jit.load compiles it and runs its scripted classes' __setstate__ "
    "(TorchScript, which reaches torch operators but not Python modules), so scan TorchScript only from sources you "
    "trust. Any file can make a scan slow or large and report wrong numbers."
)
# Files smaller than this are scanned before a progress bar would be worth drawing.
_PROGRESS_MIN_BYTES = 100 * 2**20


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
        kind_from_shape: whether ``kind`` was guessed from the weight's shape (state_dicts, safetensors) rather than
            read from the module or operator (TorchScript, ONNX).
    """

    name: str
    kind: LayerKind
    filters: int
    dead_abs: int
    dead_rel: int
    dead: int
    norm_median: float
    kind_from_shape: bool


@dataclass(frozen=True)
class EmbeddingScan:
    """Dead-token counts of one saved embedding table (see
    :func:`~lightning_deadunits.checkpoints.looks_like_embedding`): kept apart from the filter totals, since its
    rows are tokens, not filters (padding and rare tokens are small by design).

    Attributes:
        name: the table's name (its weight's key without ``.weight``).
        tokens: rows.
        dead: rows with L1 below the absolute threshold (the relative rule would flag rare tokens).
        norm_median: the table's median per-row L1.
    """  # noqa: D205

    name: str
    tokens: int
    dead: int
    norm_median: float


def scan_file(
    path: str | Path,
    abs_threshold: float = 1e-6,
    rel_threshold: float = 0.1,
    embeddings: list[EmbeddingScan] | None = None,
) -> tuple[CheckpointFormat, list[LayerScan]]:
    """Count dead kernels in every convolution and linear weight saved in ``path``.

    Args:
        path: a file in any format :class:`~lightning_deadunits.checkpoints.Checkpoint` reads, or a directory of
            safetensors shards.
        abs_threshold: absolute L1 threshold (>= 0), as in :class:`~lightning_deadunits.KernelNormMonitor`.
        rel_threshold: fraction of the layer's median L1, in [0, 1].
        embeddings: where to append an :class:`EmbeddingScan` per embedding table (never among the layers).

    Returns:
        The file's format and one :class:`LayerScan` per layer, in file order.

    Raises:
        ValueError: on an out-of-range threshold, or a file that is missing, of no known format, damaged, refused
            by ``torch.load(weights_only=True)``, or holding no convolution or linear weight.

    Example:
        >>> file_format, layers = scan_file("model.safetensors")  # doctest: +SKIP
        >>> sum(layer.dead for layer in layers)  # doctest: +SKIP
        12
    """
    file_format, scans = scan_checkpoint(path, abs_threshold, rel_threshold, embeddings)
    return file_format, [layer for layer, _ in scans]


def scan_checkpoint(
    path: str | Path,
    abs_threshold: float = 1e-6,
    rel_threshold: float = 0.1,
    embeddings: list[EmbeddingScan] | None = None,
) -> tuple[CheckpointFormat, Iterator[tuple[LayerScan, Tensor]]]:
    """Open ``path`` and scan its layers lazily, one weight at a time, each with its per-filter dead mask.

    Each weight is reduced to its per-filter L1 norms block by block
    (:func:`~lightning_deadunits.functional.kernels.blockwise_filter_l1`) and dropped before the next is read, so
    memory does not grow with the file. On a terminal, files of 100 MiB and more show a progress bar on stderr
    (with ``rich``); nothing is drawn on a pipe.

    Args:
        path: the file, or a directory of safetensors shards.
        abs_threshold: absolute L1 threshold (>= 0).
        rel_threshold: fraction of the layer's median L1, in [0, 1].
        embeddings: where to append an :class:`EmbeddingScan` per embedding table met while iterating; embedding
            tables are never yielded as layers.

    Returns:
        The file's format, and an iterator of ``(LayerScan, dead)`` per layer in file order, where ``dead`` is a
        boolean tensor with one entry per filter (dead by either rule).

    Raises:
        ValueError: as :func:`scan_file`; a tensor that cannot be read, or a file without layer weights, raises
            while iterating.

    Example:
        >>> file_format, scans = scan_checkpoint("model.onnx")  # doctest: +SKIP
        >>> [(layer.name, dead.nonzero().flatten().tolist()) for layer, dead in scans]  # doctest: +SKIP
        [('stem', [0, 3]), ('head', [])]
    """
    abs_threshold = check_float("abs_threshold", abs_threshold, minimum=0.0)
    rel_threshold = check_float("rel_threshold", rel_threshold, minimum=0.0, maximum=1.0)
    checkpoint = Checkpoint(path)
    return checkpoint.format, _scanned_layers(checkpoint, abs_threshold, rel_threshold, embeddings)


def register(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add the ``scan`` command to the ``deadunits`` parser."""
    parser = commands.add_parser(
        "scan",
        help="count dead kernels per layer in a saved model",
        description=(
            "Count dead kernels (filters whose L1 norm is below an absolute threshold, or below a fraction of their "
            "layer's median) per convolution and linear layer of a Lightning checkpoint, a torch.save-d state_dict, "
            "a TorchScript file, a safetensors file, sharded safetensors (an index file or its directory) or an "
            "ONNX model, recognised by content. Tensors are read and reduced one at a time, so memory stays near "
            f"the largest tensor whatever the file's size. {_LOADING_NOTE} {_SHAPE_NOTE}"
        ),
    )
    parser.add_argument(
        "path", type=Path, help="a .ckpt, state_dict, TorchScript, .safetensors, safetensors index or directory, .onnx"
    )
    add_threshold_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(run=run)


def add_threshold_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--abs-threshold`` and ``--rel-threshold`` (shared by ``scan`` and ``diff``)."""
    parser.add_argument("--abs-threshold", type=float, default=1e-6, help="dead when L1 < this (default 1e-6)")
    parser.add_argument(
        "--rel-threshold", type=float, default=0.1, help="dead when L1 < this x the layer's median L1 (default 0.1)"
    )


def print_json_report(
    files: Mapping[str, Any],
    args: argparse.Namespace,
    layers: Sequence[Any],
    total: Mapping[str, int],
    sections: Mapping[str, Any] | None = None,
) -> None:
    """Print ``{**files, abs_threshold, rel_threshold, layers, total, **sections}`` as JSON (``scan --json``,
    ``diff --json``).

    Args:
        files: what was read (``path`` and ``format``, or one such mapping per file).
        args: the parsed command line, with ``abs_threshold`` and ``rel_threshold``.
        layers: one dataclass per layer.
        total: sums over the layers.
        sections: more top-level entries (``scan``: ``embeddings`` and ``embedding_total``).
    """  # noqa: D205
    report = {
        **files,
        "abs_threshold": args.abs_threshold,
        "rel_threshold": args.rel_threshold,
        "layers": [asdict(layer) for layer in layers],
        "total": total,
        **(sections or {}),
    }
    print(json.dumps(report, indent=2))


def run(args: argparse.Namespace) -> int:
    """Scan ``args.path`` and print the table or JSON; return 0, or 2 when the file or a threshold is bad."""
    embeddings: list[EmbeddingScan] = []
    try:
        file_format, layers = scan_file(args.path, args.abs_threshold, args.rel_threshold, embeddings)
    except ValueError as error:
        print(f"deadunits scan: error: {error}", file=sys.stderr)
        return 2
    total = {
        stat: sum(getattr(layer, stat) for layer in layers) for stat in ("filters", "dead_abs", "dead_rel", "dead")
    }
    embedding_total = {stat: sum(getattr(table, stat) for table in embeddings) for stat in ("tokens", "dead")}
    if args.json:
        sections = {"embeddings": [asdict(table) for table in embeddings], "embedding_total": embedding_total}
        print_json_report({"path": str(args.path), "format": file_format}, args, layers, total, sections)
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
    if embeddings:
        rows = [[table.name, str(table.tokens), str(table.dead), f"{table.norm_median:.4g}"] for table in embeddings]
        rows.append(["total", str(embedding_total["tokens"]), str(embedding_total["dead"]), ""])
        print_table(
            f"embeddings (not in the filter totals): dead tokens when row L1 < {args.abs_threshold:g}",
            ["table", "tokens", "dead", "median L1"],
            rows,
        )
    return 0


def _scanned_layers(
    checkpoint: Checkpoint, abs_threshold: float, rel_threshold: float, embeddings: list[EmbeddingScan] | None
) -> Iterator[tuple[LayerScan, Tensor]]:
    found = False
    with _progress(checkpoint) as advance:
        for name, weight, groups, transposed, kind_from_file in checkpoint.weights():
            l1 = blockwise_filter_l1(weight, groups or 1, transposed)
            dead_abs, dead_rel, layer_median = dead_kernel_masks(l1, abs_threshold, rel_threshold)
            if looks_like_embedding(name, tuple(weight.shape)):
                advance(weight.nbytes)
                del weight
                found = True
                if embeddings is not None:
                    embeddings.append(EmbeddingScan(name, l1.numel(), int(dead_abs.sum()), float(layer_median)))
                continue
            layer = LayerScan(
                name=name,
                kind=weight_kind(weight.shape, groups, transposed),
                filters=l1.numel(),
                dead_abs=int(dead_abs.sum()),
                dead_rel=int(dead_rel.sum()),
                dead=int((dead_abs | dead_rel).sum()),
                norm_median=float(layer_median),
                kind_from_shape=not kind_from_file,
            )
            advance(weight.nbytes)
            del weight  # before the reader reads the next one: one weight in memory at a time, not two
            found = True
            yield layer, dead_abs | dead_rel
    if not found:
        raise ValueError(
            f"{checkpoint.path}: found no convolution or linear weight (state_dicts and safetensors: floating tensors "
            "of >= 2 dims under keys ending in `.weight`; ONNX: initializers feeding Conv, ConvTranspose, Gemm or "
            "MatMul)."
        )


@contextlib.contextmanager
def _progress(checkpoint: Checkpoint) -> Iterator[Callable[[int], None]]:
    """A function advancing a progress bar by bytes read: drawn on stderr for large files on a terminal only."""
    if checkpoint.nbytes < _PROGRESS_MIN_BYTES or not sys.stderr.isatty():
        yield lambda _: None
        return
    try:
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
    except ImportError:  # rich is optional: no bar without it
        yield lambda _: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(f"scanning {checkpoint.path.name}", total=checkpoint.nbytes)
        yield lambda nbytes: progress.advance(task, nbytes)
