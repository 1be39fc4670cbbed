"""``deadunits dump show PATH [--json] [--top N]``: what a spike dump holds, and which samples drove the loss."""

import argparse
import json
import math
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TypeGuard

import torch
from torch import Tensor

from lightning_deadunits.dumps import TAG_KEY, load_dump

__all__ = ["register", "show", "summarize"]

# Keys of a mapping batch that hold the labels, in order of preference.
_LABEL_KEYS = ("labels", "label", "targets", "target", "y")
# Metadata entries shown elsewhere in the summary (tensors, RNG states) rather than as plain fields.
_NOT_FIELDS = ("per_sample_loss", "sample_ids", "recent_steps", "recent_losses", "rng_states", "dead_after_spike")


def register(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add the ``dump`` command (with its ``show`` subcommand) to the ``deadunits`` parser."""
    parser = commands.add_parser("dump", help="inspect loss-spike dumps", description="Inspect loss-spike dumps.")
    actions = parser.add_subparsers(dest="dump_command", required=True)
    show_parser = actions.add_parser(
        "show",
        help="print a dump's metadata, tensors, labels and samples ranked by loss",
        description="Print a spike dump's metadata, tensor shapes and statistics, labels, and the samples ranked "
        "by per-sample loss (when the module returned them). Exit code 2 if the file cannot be read.",
    )
    show_parser.add_argument("path", type=Path, help="a .pt file written by LossSpikeMonitor")
    show_parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    show_parser.add_argument("--top", type=int, default=10, help="how many ranked samples to list (default 10)")
    show_parser.set_defaults(run=show)


def show(args: argparse.Namespace) -> int:
    """Print the dump at ``args.path`` (as JSON with ``args.json``); return 0, or 2 if it cannot be read."""
    try:
        batch, metadata = load_dump(args.path)
    except (OSError, ValueError) as error:
        print(f"deadunits dump show: cannot read {args.path}: {error}", file=sys.stderr)
        return 2
    summary = summarize(batch, metadata, top=max(args.top, 0))
    print(json.dumps(_jsonable(summary), indent=2) if args.json else _render(args.path, summary))
    return 0


def summarize(batch: Any, metadata: Mapping[str, Any], top: int = 10) -> dict[str, Any]:
    """The dump as plain data: ``fields`` (scalar metadata), ``dead_after_spike``, ``recent_losses`` (count, min,
    median, max), ``tensors`` (path, dtype, shape and statistics of every tensor in the batch), ``placeholders``
    (path, type, shape and cut ``repr`` of every value that could not be stored), ``labels`` (path and values, if
    found) and ``ranking`` (the ``top`` samples by per-sample loss, if present).
    """  # noqa: D205
    fields = {key: value for key, value in metadata.items() if key not in _NOT_FIELDS}
    leaves = list(_leaves(batch, "batch"))
    tensors = [_tensor_stats(path, tensor) for path, tensor in leaves if isinstance(tensor, Tensor)]
    placeholders = [
        {"path": path, "type": value["type"], "shape": value.get("shape"), "repr": value["repr"]}
        for path, value in leaves
        if _is_placeholder(value)
    ]
    ids = metadata.get("sample_ids")
    labels = _find_labels(batch, ids if isinstance(ids, Tensor) else None)
    summary: dict[str, Any] = {
        "fields": fields,
        "dead_after_spike": metadata.get("dead_after_spike", {}),
        "recent_losses": _recent(metadata.get("recent_losses")),
        "tensors": tensors,
        "placeholders": placeholders,
        "labels": None if labels is None else {"path": labels[0], "values": labels[1].tolist()},
        "ranking": _ranking(metadata, labels, top),
    }
    return summary


def _leaves(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    """Every leaf of a decoded batch with its access path (``batch[0]``, ``batch['x']``, ``batch.images``);
    a placeholder of an unstored value is one leaf.
    """  # noqa: D205
    if isinstance(value, Mapping) and not _is_placeholder(value):
        for key, item in value.items():
            yield from _leaves(item, f"{path}[{key!r}]")
    elif isinstance(value, tuple) and hasattr(value, "_fields"):
        for name, item in zip(value._fields, value, strict=True):
            yield from _leaves(item, f"{path}.{name}")
    elif hasattr(value, "__dataclass_fields__"):
        for name in value.__dataclass_fields__:
            yield from _leaves(getattr(value, name), f"{path}.{name}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _leaves(item, f"{path}[{index}]")
    else:
        yield path, value


def _is_placeholder(value: Any) -> TypeGuard[Mapping[str, Any]]:
    """Whether ``value`` is what :func:`~lightning_deadunits.dumps.decode` gives for a value it could not store."""
    return isinstance(value, Mapping) and value.get(TAG_KEY) == "unsaved"


def _tensor_stats(path: str, tensor: Tensor) -> dict[str, Any]:
    stats: dict[str, Any] = {
        "path": path,
        "dtype": str(tensor.dtype).removeprefix("torch."),
        "shape": list(tensor.shape),
    }
    if tensor.numel() == 0 or tensor.is_complex():
        return stats
    values = tensor.detach().double()
    finite = values[torch.isfinite(values)]
    stats["nonfinite"] = int(values.numel() - finite.numel())
    if finite.numel():
        stats.update(
            min=float(finite.min()),
            max=float(finite.max()),
            mean=float(finite.mean()),
            std=float(finite.std()) if finite.numel() > 1 else 0.0,
        )
    return stats


def _find_labels(batch: Any, sample_ids: Tensor | None) -> tuple[str, Tensor] | None:
    """The batch's labels: a ``labels``/``targets``/``y`` entry of a mapping, or in an ``(inputs, labels, ...)``
    sequence the first 1-D integer tensor after the inputs that is not the sample ids; ``None`` if none.
    """  # noqa: D205
    if isinstance(batch, Mapping):
        candidates = [(f"batch[{key!r}]", batch.get(key)) for key in _LABEL_KEYS]
    elif isinstance(batch, (list, tuple)):
        names = getattr(batch, "_fields", None)
        candidates = [(f"batch.{names[i]}" if names else f"batch[{i}]", batch[i]) for i in range(1, len(batch))]
    else:
        return None
    for path, value in candidates:
        if _is_label_tensor(value) and not (sample_ids is not None and torch.equal(value, sample_ids)):
            return path, value
    return None


def _is_label_tensor(value: Any) -> TypeGuard[Tensor]:
    return isinstance(value, Tensor) and value.dim() == 1 and not value.is_floating_point() and not value.is_complex()


def _ranking(metadata: Mapping[str, Any], labels: tuple[str, Tensor] | None, top: int) -> list[dict[str, Any]]:
    losses = metadata.get("per_sample_loss")
    if not isinstance(losses, Tensor) or losses.numel() == 0:
        return []
    values = losses.detach().double().flatten()
    # NaN sorts first: a non-finite sample is the most suspicious one.
    order = sorted(range(values.numel()), key=lambda i: (not math.isnan(values[i]), -values[i]))[:top]
    ids = metadata.get("sample_ids")
    id_list = (
        ids.flatten().tolist() if isinstance(ids, Tensor) else list(ids) if isinstance(ids, (list, tuple)) else None
    )
    label_list = labels[1].tolist() if labels is not None and labels[1].numel() == values.numel() else None
    rows = []
    for rank, index in enumerate(order, start=1):
        row: dict[str, Any] = {"rank": rank, "index": index, "loss": float(values[index])}
        if id_list is not None and index < len(id_list):
            row["sample_id"] = id_list[index]
        if label_list is not None:
            row["label"] = label_list[index]
        rows.append(row)
    return rows


def _recent(losses: Any) -> dict[str, Any] | None:
    if not isinstance(losses, Tensor) or losses.numel() == 0:
        return None
    finite = losses[torch.isfinite(losses)].double()
    summary: dict[str, Any] = {"count": losses.numel(), "nonfinite": int(losses.numel() - finite.numel())}
    if finite.numel():
        summary.update(min=float(finite.min()), median=float(finite.median()), max=float(finite.max()))
    return summary


def _render(path: Path, summary: Mapping[str, Any]) -> str:
    fields = summary["fields"]
    lines = [f"Spike dump {path}"]
    lines += [f"  {key}: {_format(value)}" for key, value in fields.items()]
    for key, deaths in summary["dead_after_spike"].items():
        died = ", ".join(f"{count:.0f} {deaths['unit']} of {layer}" for layer, count in deaths["died"].items())
        lines.append(
            f"  died after the spike ({key}, checks at steps {deaths['before_step']} and {deaths['after_step']}): "
            f"{died or 'none'}"
        )
    recent = summary["recent_losses"]
    if recent is not None:
        spread = f", min {_format(recent['min'])}, median {_format(recent['median'])}" if "min" in recent else ""
        high = f", max {_format(recent['max'])}" if "max" in recent else ""
        lines.append(f"  recent losses: {recent['count']}{spread}{high}, non-finite {recent['nonfinite']}")
    lines += ["", "Batch tensors:"]
    header = ("path", "dtype", "shape", "min", "max", "mean", "std", "non-finite")
    table = [header] + [
        (
            item["path"],
            item["dtype"],
            _shape(item["shape"]),
            *(_format(item.get(stat, "-")) for stat in ("min", "max", "mean", "std", "nonfinite")),
        )
        for item in summary["tensors"]
    ]
    lines += _columns(table) if summary["tensors"] else ["  (none)"]
    if summary["placeholders"]:
        lines += ["", "Not stored (type, shape and repr kept):"]
        rows = [("path", "type", "shape", "repr")] + [
            (item["path"], item["type"], "-" if item["shape"] is None else _shape(item["shape"]), item["repr"])
            for item in summary["placeholders"]
        ]
        lines += _columns(rows)
    labels = summary["labels"]
    if labels is not None:
        lines += ["", f"Labels ({labels['path']}): {' '.join(str(value) for value in labels['values'])}"]
    ranking = summary["ranking"]
    if ranking:
        lines += ["", "Samples by per-sample loss (highest first):"]
        columns = ["rank", "index", *(["sample_id"] if "sample_id" in ranking[0] else []), "loss"]
        columns += ["label"] if "label" in ranking[0] else []
        lines += _columns([tuple(columns)] + [tuple(_format(row[column]) for column in columns) for row in ranking])
    return "\n".join(lines)


def _shape(shape: list[int]) -> str:
    return "x".join(str(size) for size in shape) or "scalar"


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _jsonable(value: Any) -> Any:
    """Plain JSON: non-finite floats as strings (``"nan"``, ``"inf"``), tensors as lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return repr(value)
