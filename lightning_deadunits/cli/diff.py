"""``deadunits diff OLD NEW``: which filters died and which revived between two saved models."""

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from torch import Tensor

from lightning_deadunits.checkpoints import CheckpointFormat
from lightning_deadunits.cli.scan import add_threshold_arguments, print_json_report, print_table, scan_checkpoint

__all__ = ["LayerDiff", "diff_files", "register", "run"]

# Filter indices listed per layer in the table (the JSON lists them all).
_TABLE_INDICES = 12


@dataclass(frozen=True)
class LayerDiff:
    """Dead filters of one layer in two saved models, and which of them changed.

    Attributes:
        name: the layer's name.
        present: ``both``, or ``old`` / ``new`` for a layer found in one file only.
        filters_old: the layer's filters in the old file (``None`` when absent there).
        filters_new: the same in the new file.
        dead_old: filters dead (by either rule) in the old file (``None`` when absent there).
        dead_new: the same in the new file.
        newly_dead: filters dead in the new file and alive in the old one (``None`` unless the layer is in both files
            with the same number of filters).
        revived: filters dead in the old file and alive in the new one (``None`` as for ``newly_dead``).
        newly_dead_filters: their indices, ascending.
        revived_filters: their indices, ascending.
    """

    name: str
    present: Literal["both", "old", "new"]
    filters_old: int | None
    filters_new: int | None
    dead_old: int | None
    dead_new: int | None
    newly_dead: int | None
    revived: int | None
    newly_dead_filters: tuple[int, ...]
    revived_filters: tuple[int, ...]


def diff_files(
    old: str | Path, new: str | Path, abs_threshold: float = 1e-6, rel_threshold: float = 0.1
) -> tuple[CheckpointFormat, CheckpointFormat, list[LayerDiff]]:
    """Compare the dead filters of every layer in two saved models, of the same format or not.

    Layers are matched by name (e.g. a Lightning checkpoint's ``model.conv`` and the same key in its exported
    safetensors). Each file is scanned one tensor at a time, as by ``deadunits scan``; only one boolean per filter
    is kept.

    Args:
        old: the earlier file (any format ``deadunits scan`` reads, or a directory of safetensors shards).
        new: the later file.
        abs_threshold: absolute L1 threshold (>= 0).
        rel_threshold: fraction of the layer's median L1, in [0, 1].

    Returns:
        The two files' formats, and one :class:`LayerDiff` per layer: the old file's layers in its order, then
        those found only in the new file.

    Raises:
        ValueError: as :func:`~lightning_deadunits.cli.scan.scan_file`, for either file.

    Example:
        >>> _, _, layers = diff_files("epoch=3.ckpt", "epoch=9.ckpt")  # doctest: +SKIP
        >>> [(layer.name, layer.newly_dead_filters, layer.revived_filters) for layer in layers]  # doctest: +SKIP
        [('model.conv', (1, 5), ()), ('model.head', (), (0,))]
    """
    old_format, old_dead = _dead_masks(old, abs_threshold, rel_threshold)
    new_format, new_dead = _dead_masks(new, abs_threshold, rel_threshold)
    names = [*old_dead, *(name for name in new_dead if name not in old_dead)]
    return old_format, new_format, [_layer_diff(name, old_dead.get(name), new_dead.get(name)) for name in names]


def register(commands: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    """Add the ``diff`` command to the ``deadunits`` parser."""
    parser = commands.add_parser(
        "diff",
        help="which filters died or revived between two saved models",
        description=(
            "Per convolution and linear layer, the filters dead in each of two saved models (any formats that "
            "`deadunits scan` reads, e.g. a Lightning checkpoint against its exported safetensors), which died and "
            "which revived between them. Layers are matched by name; layers in one file only are listed as such. "
            "Files are read as `deadunits scan --help` describes. Exit code 2 if a file cannot be read."
        ),
    )
    parser.add_argument("old", type=Path, help="the earlier saved model")
    parser.add_argument("new", type=Path, help="the later saved model")
    add_threshold_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Compare ``args.old`` and ``args.new`` and print the table or JSON; return 0, or 2 on bad input."""
    try:
        old_format, new_format, layers = diff_files(args.old, args.new, args.abs_threshold, args.rel_threshold)
    except ValueError as error:
        print(f"deadunits diff: error: {error}", file=sys.stderr)
        return 2
    stats = ("dead_old", "dead_new", "newly_dead", "revived")
    total = {stat: sum(getattr(layer, stat) or 0 for layer in layers) for stat in stats}
    if args.json:
        files = {
            "old": {"path": str(args.old), "format": old_format},
            "new": {"path": str(args.new), "format": new_format},
        }
        print_json_report(files, args, layers, total)
        return 0
    rows = [
        [
            layer.name,
            _pair(layer.filters_old, layer.filters_new),
            *("" if count is None else str(count) for count in (layer.dead_old, layer.dead_new)),
            *("" if count is None else str(count) for count in (layer.newly_dead, layer.revived)),
            _which(layer),
        ]
        for layer in layers
    ]
    rows.append(["total", "", *(str(total[stat]) for stat in stats), ""])
    print_table(
        f"{args.old} ({old_format}) -> {args.new} ({new_format}): dead when L1 < {args.abs_threshold:g} or "
        f"L1 < {args.rel_threshold:g} x median",
        ["layer", "filters", "dead (old)", "dead (new)", "newly dead", "revived", "which"],
        rows,
    )
    return 0


def _dead_masks(
    path: str | Path, abs_threshold: float, rel_threshold: float
) -> tuple[CheckpointFormat, dict[str, Tensor]]:
    file_format, scans = scan_checkpoint(path, abs_threshold, rel_threshold)
    return file_format, {layer.name: dead for layer, dead in scans}


def _layer_diff(name: str, old_dead: Tensor | None, new_dead: Tensor | None) -> LayerDiff:
    newly_dead: tuple[int, ...] | None = None
    revived: tuple[int, ...] | None = None
    if old_dead is not None and new_dead is not None and old_dead.shape == new_dead.shape:
        newly_dead = tuple((new_dead & ~old_dead).nonzero().flatten().tolist())
        revived = tuple((old_dead & ~new_dead).nonzero().flatten().tolist())
    return LayerDiff(
        name=name,
        present="both" if old_dead is not None and new_dead is not None else "old" if new_dead is None else "new",
        filters_old=None if old_dead is None else old_dead.numel(),
        filters_new=None if new_dead is None else new_dead.numel(),
        dead_old=None if old_dead is None else int(old_dead.sum()),
        dead_new=None if new_dead is None else int(new_dead.sum()),
        newly_dead=None if newly_dead is None else len(newly_dead),
        revived=None if revived is None else len(revived),
        newly_dead_filters=newly_dead or (),
        revived_filters=revived or (),
    )


def _pair(old: int | None, new: int | None) -> str:
    """``8``, or ``8 -> 16`` when the count changed, or the one count there is."""
    if old is None or new is None or old == new:
        return str(old if new is None else new)
    return f"{old} -> {new}"


def _which(layer: LayerDiff) -> str:
    if layer.present != "both":
        return f"only in {layer.present.upper()}"
    if layer.newly_dead is None:
        return "filter count changed: not compared"
    parts = [
        f"{verb} {_indices(indices)}"
        for verb, indices in (("died", layer.newly_dead_filters), ("revived", layer.revived_filters))
        if indices
    ]
    return "; ".join(parts)


def _indices(indices: tuple[int, ...]) -> str:
    shown = ",".join(str(index) for index in indices[:_TABLE_INDICES])
    return shown + (f",... (+{len(indices) - _TABLE_INDICES})" if len(indices) > _TABLE_INDICES else "")
