"""Write the offending batch of a loss spike to disk: atomically, within a budget, in a format safe to load."""

import contextlib
import logging
import os
import random
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_deadunits._validation import check_int
from lightning_deadunits.dumps import DUMP_FORMAT, DUMP_VERSION, encode
from lightning_deadunits.errors import DeadUnitsWarning

__all__ = ["BatchDumper", "rng_states"]

log = logging.getLogger("lightning_deadunits")


def rng_states() -> dict[str, Any]:
    """The states of the torch (CPU and every initialised CUDA device), numpy and Python generators.

    Host-side copies only (CUDA generator states live on the host), so this never waits for the device.
    Restore with ``torch.set_rng_state``, ``torch.cuda.set_rng_state_all``, ``np.random.set_state`` and
    ``random.setstate`` (after :func:`~lightning_deadunits.load_dump`, which rebuilds them).
    """
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_initialized():  # type: ignore[no-untyped-call]  # never initialise CUDA just for this
        states["torch.cuda"] = torch.cuda.get_rng_state_all()
    return states


class BatchDumper:
    """Saves one record (a batch and its metadata) per file, for the rank that calls it.

    Every file is written to a temporary name in the target directory, flushed to disk and renamed over the
    final name (``os.replace``), so a crash never leaves a half-written dump under the final name. Files hold
    only tensors and plain Python values (see :mod:`lightning_deadunits.dumps`), so
    ``torch.load(path, weights_only=True)`` and :func:`~lightning_deadunits.load_dump` read them without
    running code from the file.

    Failures never stop training: an unwritable directory, a full disk or an object ``torch.save`` rejects
    gives a :class:`~lightning_deadunits.errors.DeadUnitsWarning` and no file; values that cannot be stored
    (an open file, a custom class) are replaced by their ``repr`` with one warning per dump. Once ``max_dumps``
    files or ``max_bytes`` bytes have been written, further dumps are dropped (logged once).

    Runs on every rank: each rank dumps its own batch (callers put the rank in ``name``).

    Args:
        directory: where the files go (created on the first dump).
        max_dumps: the most files this dumper writes (0: none).
        max_bytes: the most bytes (by tensor sizes, checked before writing) all its files may take.

    Raises:
        ValueError: if ``max_dumps`` or ``max_bytes`` is negative.

    Example:
        >>> dumper = BatchDumper("logs/deadunits/dumps", max_dumps=5)
        >>> dumper.write("step00000012-rank0", {"batch": torch.ones(2)}, {"loss": 9.5})  # doctest: +SKIP
    """

    def __init__(self, directory: str | Path, max_dumps: int = 20, max_bytes: int = 2**30) -> None:
        self.directory = Path(directory)
        self.max_dumps = check_int("max_dumps", max_dumps, minimum=0)
        self.max_bytes = check_int("max_bytes", max_bytes, minimum=0)
        self.count = 0
        self.bytes_written = 0
        self._cap_logged = False

    def write(self, name: str, record: Mapping[str, Any], metadata: Mapping[str, Any]) -> Path | None:
        """Save ``record`` (its values encoded) and ``metadata`` (JSON-like values) to ``<directory>/<name>.pt``.

        Returns:
            The file's path, or ``None`` if nothing was written (cap reached or failure, see the class).
        """
        if self.count >= self.max_dumps:
            self._log_cap(f"`max_dumps={self.max_dumps}` dumps written")
            return None
        unsaved: list[str] = []
        payload = {key: encode(value, unsaved) for key, value in record.items()}
        size = _tensor_bytes(payload)
        if self.bytes_written + size > self.max_bytes:
            self._log_cap(f"`max_bytes={self.max_bytes}` would be exceeded ({self.bytes_written} written, {size} more)")
            return None
        if unsaved:
            warnings.warn(
                f"Spike dump {name}: could not store values of type {sorted(set(unsaved))}; their repr is saved "
                "instead.",
                DeadUnitsWarning,
                stacklevel=2,
            )
        path = self.directory / f"{name}.pt"
        document = {
            "format": DUMP_FORMAT,
            "version": DUMP_VERSION,
            "metadata": {**metadata, "unsaved": sorted(set(unsaved))},
            **payload,
        }
        if not self._save(document, path):
            return None
        self.count += 1
        self.bytes_written += size
        return path

    def annotate(self, path: str | Path, metadata: Mapping[str, Any]) -> bool:
        """Merge ``metadata`` into an existing dump's metadata, rewriting it atomically; ``False`` on failure."""
        try:
            document = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # a dump deleted or damaged by someone else: warn, keep training
            warnings.warn(f"Could not update spike dump {path}: {error}", DeadUnitsWarning, stacklevel=2)
            return False
        document["metadata"] = {**document.get("metadata", {}), **metadata}
        return self._save(document, Path(path))

    def state_dict(self) -> dict[str, Any]:
        """How many files and bytes have been written, so the caps hold across a resume."""
        return {"count": self.count, "bytes_written": self.bytes_written}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; missing keys keep their defaults."""
        self.count = int(state_dict.get("count", 0))
        self.bytes_written = int(state_dict.get("bytes_written", 0))

    def _save(self, document: Mapping[str, Any], path: Path) -> bool:
        # Same directory as the target, so os.replace is a rename on one file system; the pid keeps two
        # processes writing one name (a restarted run) apart.
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(temporary, "wb") as file:
                torch.save(dict(document), file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
            return True
        except Exception as error:  # OSError (read-only, full disk) or a pickling error: warn, keep training
            warnings.warn(f"Could not write spike dump {path}: {error}", DeadUnitsWarning, stacklevel=3)
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
            return False

    def _log_cap(self, reason: str) -> None:
        if not self._cap_logged:
            self._cap_logged = True
            log.warning("deadunits: no more spike dumps in %s: %s.", self.directory, reason)


def _tensor_bytes(value: Any) -> int:
    """Bytes of all tensors in an encoded structure: what dominates a dump's size."""
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, Mapping):
        return sum(_tensor_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(item) for item in value)
    return 0
