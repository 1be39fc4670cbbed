"""Before a DDP reduction of concatenated states: check that every rank holds the same entries, of the same sizes.

A reduction that concatenates per-entry states (per call site, per layer) into one tensor per collective only
lines up when every rank concatenates the same entries in the same order with the same sizes. A branch taken on
one rank only, an empty batch or inputs of another size break that, and the ranks then enter collectives of
different sizes or different counts: a hang, or silently mixed numbers. :func:`agree_on_layout` gathers one
fingerprint per rank first and raises the same :class:`LayoutMismatchError` on every rank when they differ.
"""

import hashlib
import json
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["LayoutMismatchError", "agree_on_layout"]

_LISTED_DIFFERENCES = 5


class LayoutMismatchError(RuntimeError):
    """Raised on every rank when the ranks would reduce states of different entries or sizes."""


def agree_on_layout(
    what: str,
    names: Sequence[str],
    sizes: Sequence[Sequence[int]],
    group: dist.ProcessGroup | None = None,
) -> None:
    """Check that every rank of ``group`` holds the same ``names`` with the same ``sizes``, in the same order.

    One all-gather of an 8-byte fingerprint per rank; only when they differ, a second gather of every rank's
    layout, to say what differs. Every rank reaches the same verdict, so either all go on or all raise the same
    error. Outside an initialised process group of two or more ranks it does nothing. Call it where every rank
    calls it (the same step), before the reduction it protects.

    Args:
        what: the reduction being protected, for the message (e.g. ``"ActivationStats.sync"``).
        names: this rank's entries in the order they are reduced (may be empty: a rank that measured nothing).
        sizes: each entry's shape (or any tuple of sizes that fixes how much it adds to each collective).
        group: the process group (``None``: the default group).

    Raises:
        ValueError: if ``names`` and ``sizes`` differ in length.
        LayoutMismatchError: on every rank, if any two ranks' layouts differ; it lists the differing entries.

    Example:
        >>> agree_on_layout("ActivationStats.sync", ["relu#0"], [(4, 16)])  # no process group: nothing to check
    """
    if len(names) != len(sizes):
        raise ValueError(f"`names` and `sizes` must have the same length, got {len(names)} and {len(sizes)}.")
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) < 2:
        return
    layout = [(str(name), tuple(int(size) for size in shape)) for name, shape in zip(names, sizes, strict=True)]
    digest = hashlib.blake2b(json.dumps(layout).encode(), digest_size=8).digest()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
    mine = torch.tensor([int.from_bytes(digest, "little", signed=True)], dtype=torch.int64, device=device)
    fingerprints = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(fingerprints, mine, group=group)
    if all(torch.equal(fingerprint, mine) for fingerprint in fingerprints):
        return
    layouts: list[Any] = [None] * len(fingerprints)
    dist.all_gather_object(layouts, layout, group=group)
    raise LayoutMismatchError(_describe(what, layouts))


def _describe(what: str, layouts: list[list[tuple[str, tuple[int, ...]]]]) -> str:
    """The same message on every rank: how many entries each holds and the first entries that differ."""
    by_rank = [dict(layout) for layout in layouts]
    names = sorted({name for entries in by_rank for name in entries})
    differing = [name for name in names if len({entries.get(name) for entries in by_rank}) > 1]
    lines = [
        f"`{name}`: " + ", ".join(f"rank {rank} {entries.get(name, 'missing')}" for rank, entries in enumerate(by_rank))
        for name in differing[:_LISTED_DIFFERENCES]
    ]
    if not differing:  # same entries and sizes, in another order
        lines = [f"rank {rank} order: {[name for name, _ in layout]}" for rank, layout in enumerate(layouts)]
    more = f"; and {len(differing) - _LISTED_DIFFERENCES} more" if len(differing) > _LISTED_DIFFERENCES else ""
    counts = ", ".join(f"rank {rank}: {len(layout)}" for rank, layout in enumerate(layouts))
    return (
        f"{what}: the ranks hold different entries or sizes ({counts} entries), so their reductions would not line "
        f"up and training would hang or mix numbers. Differences: {'; '.join(lines)}{more}. Every rank must measure "
        "the same modules with the same shapes at the same steps: a module called on some ranks only "
        "(a data-dependent branch, an empty batch) cannot be reduced."
    )
