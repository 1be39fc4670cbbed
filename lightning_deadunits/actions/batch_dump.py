"""Write the offending batch of a loss spike to disk: atomically, within a budget, in a format safe to load."""

import contextlib
import errno
import logging
import os
import random
import re
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_deadunits._compat import numpy_generator_fingerprint, python_generator_fingerprint
from lightning_deadunits._validation import check_int
from lightning_deadunits.dumps import DUMP_FORMAT, DUMP_VERSION, encode, stored_bytes, verify_checksum, with_checksum
from lightning_deadunits.errors import DeadUnitsWarning

__all__ = ["BatchDumper", "rng_states"]

log = logging.getLogger("lightning_deadunits")

_MAX_TAG = 100
_MAX_SUFFIX = 1000
# errno values of os.link on a file system without hard links (FAT, some network and FUSE mounts)
_NO_HARD_LINKS = frozenset({errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK})


class _CachedState:
    """A generator's state (``take()``), taken again only when its fingerprint shows it has drawn since.

    numpy's state is a tuple holding a 624-word array (35-130 us to build), Python's a tuple of 625 ints (~10 us):
    a per-batch capture pays that on every step although most training loops never draw from either; comparing
    raw copies of their C states costs well under 1 us. Without a fingerprint the state is taken every time.
    """

    def __init__(self, fingerprint: Callable[[], Any], take: Callable[[], Any]) -> None:
        self.read = fingerprint
        self.take = take
        self.fingerprint: Any = None
        self.state: Any = None

    def __call__(self) -> Any:
        fingerprint = self.read()
        if fingerprint is None or fingerprint != self.fingerprint:
            self.fingerprint, self.state = fingerprint, self.take()
        return self.state


_numpy_state = _CachedState(numpy_generator_fingerprint, lambda: np.random.get_state())
_python_state = _CachedState(python_generator_fingerprint, lambda: random.getstate())


def rng_states() -> dict[str, Any]:
    """The states of the torch (CPU and every initialised CUDA device), numpy and Python generators.

    Host-side copies only (CUDA generator states live on the host), so this never waits for the device. Cheap
    enough to call on every batch (~3 us): numpy's and Python's states, the costly ones, are taken again only when
    their generator has drawn since the previous call (numpy's cached Gaussian consumed alone, with no other draw,
    is not seen). Restore with ``torch.set_rng_state``, ``torch.cuda.set_rng_state_all``, ``np.random.set_state`` and
    ``random.setstate`` (after :func:`~lightning_deadunits.load_dump`, which rebuilds them).
    """
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state(),
        "python": _python_state(),
    }
    if torch.cuda.is_initialized():  # type: ignore[no-untyped-call]  # never initialise CUDA just for this
        states["torch.cuda"] = torch.cuda.get_rng_state_all()
    return states


class BatchDumper:
    """Saves one record (a batch and its metadata) per file, for the rank that calls it; never replaces a file.

    Every file is written to a unique temporary name in the target directory, flushed to disk and then linked to
    its final name (``os.link``, which fails rather than replace an existing file), so a crash never leaves a
    half-written dump under a final name and no dump ever overwrites another. The final name is
    ``<tag>-<name>.pt`` (``<name>.pt`` without a tag); when that file exists (another monitor, an earlier run),
    ``-1``, ``-2``, ... is appended to the stem. On a file system without hard links the file is renamed to the
    first free name instead. Files hold only tensors and plain Python values (see
    :mod:`lightning_deadunits.dumps`), so ``torch.load(path, weights_only=True)`` and
    :func:`~lightning_deadunits.load_dump` read them without running code from the file.

    Failures never stop training: an unwritable directory, a full disk or an object ``torch.save`` rejects
    gives a :class:`~lightning_deadunits.errors.DeadUnitsWarning` and no file; values that cannot be stored (an
    open file, a numpy array of strings, a custom class) are replaced by placeholders (type, shape, cut
    ``repr``) with one warning per dump. The size of a dump is estimated (:func:`~lightning_deadunits.dumps.
    stored_bytes`) before anything is copied: once ``max_dumps`` files have been written, or when a dump would
    take the total past ``max_bytes``, it is skipped (logged once). After every :meth:`write`,
    :attr:`last_skip_reason` says why nothing was written, or is ``None``.

    Runs on every rank: each rank dumps its own batch (callers put the rank in ``name``).

    Args:
        directory: where the files go (created on the first dump).
        max_dumps: the most files this dumper writes (0: none).
        max_bytes: the most bytes (estimated from tensor, array and string sizes) all its files may take.
        tag: who writes (e.g. a monitor's state key), the first part of every file name, so that two
            writers sharing a directory are told apart; characters other than letters, digits, ``.``, ``_``
            and ``-`` become ``_`` and it is cut to 100 characters. Empty: no tag.

    Raises:
        ValueError: if ``max_dumps`` or ``max_bytes`` is negative.
        TypeError: if ``tag`` is not a string.

    Example:
        >>> dumper = BatchDumper("logs/deadunits/dumps", max_dumps=5, tag="deadunits")
        >>> dumper.write("step00000012-rank0", {"batch": torch.ones(2)}, {"loss": 9.5})  # doctest: +SKIP
        PosixPath('logs/deadunits/dumps/deadunits-step00000012-rank0.pt')
    """

    def __init__(self, directory: str | Path, max_dumps: int = 20, max_bytes: int = 2**30, tag: str = "") -> None:
        self.directory = Path(directory)
        self.max_dumps = check_int("max_dumps", max_dumps, minimum=0)
        self.max_bytes = check_int("max_bytes", max_bytes, minimum=0)
        if not isinstance(tag, str):
            raise TypeError(f"`tag` must be a string, got {tag!r}.")
        self.tag = tag
        self.count = 0
        self.bytes_written = 0
        self.last_skip_reason: str | None = None
        self._cap_logged = False

    def write(self, name: str, record: Mapping[str, Any], metadata: Mapping[str, Any]) -> Path | None:
        """Save ``record`` (its values encoded) and ``metadata`` (JSON-like values) to ``<directory>/<tag>-<name>.pt``.

        Returns:
            The file's path (with a ``-<n>`` suffix if the name was taken), or ``None`` if nothing was written;
            then :attr:`last_skip_reason` says why: ``"`max_dumps=N` dumps written"``, ``"`max_bytes=N` would be
            exceeded (W written, S more)"`` or ``"could not write: <error>"``.
        """
        self.last_skip_reason = None
        if self.count >= self.max_dumps:
            self._skip(f"`max_dumps={self.max_dumps}` dumps written", cap=True)
            return None
        size = stored_bytes(record)  # before any copy: a batch that cannot fit is never copied to the host
        if self.bytes_written + size > self.max_bytes:
            reason = f"`max_bytes={self.max_bytes}` would be exceeded ({self.bytes_written} written, {size} more)"
            self._skip(reason, cap=True)
            return None
        stem = self._stem(name)
        try:
            unsaved: list[str] = []
            payload = {key: encode(value, unsaved) for key, value in record.items()}
            document = {
                "format": DUMP_FORMAT,
                "version": DUMP_VERSION,
                "metadata": {**metadata, "unsaved": sorted(set(unsaved))},
                **payload,
            }
            temporary = self._write_temporary(document, self.directory, stem)
            try:
                path = self._publish(temporary, stem)
            finally:
                with contextlib.suppress(OSError):
                    temporary.unlink(missing_ok=True)
        except Exception as error:  # OSError (read-only, full disk) or a pickling error: warn, keep training
            message = f"Could not write spike dump {self.directory / stem}.pt: {error}"
            warnings.warn(message, DeadUnitsWarning, stacklevel=2)
            self._skip(f"could not write: {error}", cap=False)
            return None
        if unsaved:
            warnings.warn(
                f"Spike dump {path}: could not store values of type {sorted(set(unsaved))}; a placeholder with "
                "their type, shape and repr is saved instead.",
                DeadUnitsWarning,
                stacklevel=2,
            )
        self.count += 1
        self.bytes_written += size
        return path

    def annotate(self, path: str | Path, metadata: Mapping[str, Any]) -> bool:
        """Merge ``metadata`` into this dumper's existing dump at ``path``, replacing it atomically.

        Returns:
            ``True`` on success, ``False`` (with a warning) if the file could not be read or rewritten.
        """
        path = Path(path)
        try:
            document = torch.load(path, map_location="cpu", weights_only=True)
            verify_checksum(document, path)  # a damaged dump must not get a fresh, matching checksum
            document["metadata"] = {**document.get("metadata", {}), **metadata}
            temporary = self._write_temporary(document, path.parent, path.stem)
            try:
                os.replace(temporary, path)
            finally:
                with contextlib.suppress(OSError):
                    temporary.unlink(missing_ok=True)
        except Exception as error:  # a dump deleted or damaged by someone else, a full disk: warn, keep training
            warnings.warn(f"Could not update spike dump {path}: {error}", DeadUnitsWarning, stacklevel=2)
            return False
        return True

    def state_dict(self) -> dict[str, Any]:
        """How many files and bytes have been written, so the caps hold across a resume."""
        return {"count": self.count, "bytes_written": self.bytes_written}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; missing keys keep their defaults."""
        self.count = int(state_dict.get("count", 0))
        self.bytes_written = int(state_dict.get("bytes_written", 0))

    def _stem(self, name: str) -> str:
        tag = re.sub(r"[^A-Za-z0-9._-]", "_", self.tag)[:_MAX_TAG]
        return f"{tag}-{name}" if tag else name

    @staticmethod
    def _write_temporary(document: Mapping[str, Any], directory: Path, stem: str) -> Path:
        """Save ``document`` to a new hidden file in ``directory``, next to the final one (renames and links work)."""
        directory.mkdir(parents=True, exist_ok=True)
        descriptor, name = tempfile.mkstemp(prefix=f".{stem}.", suffix=".tmp", dir=directory)
        temporary = Path(name)
        try:
            with os.fdopen(descriptor, "wb") as file:
                torch.save(with_checksum(document), file)
                file.flush()
                os.fsync(file.fileno())
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        return temporary

    def _publish(self, temporary: Path, stem: str) -> Path:
        """Give ``temporary`` the first free name of ``<stem>.pt``, ``<stem>-1.pt``, ...; never replace a file."""
        for suffix in range(_MAX_SUFFIX):
            path = self.directory / (f"{stem}.pt" if suffix == 0 else f"{stem}-{suffix}.pt")
            try:
                os.link(temporary, path)  # fails if path exists, atomically
            except FileExistsError:
                continue
            except OSError as error:
                if error.errno not in _NO_HARD_LINKS:
                    raise
                if path.exists():  # no hard links here: check, then rename (one writer per name in practice)
                    continue
                os.rename(temporary, path)
            return path
        raise FileExistsError(f"{stem}.pt and {_MAX_SUFFIX - 1} numbered variants of it exist already")

    def _skip(self, reason: str, cap: bool) -> None:
        """Record why :meth:`write` wrote nothing; log the first time a cap stops a dump."""
        self.last_skip_reason = reason
        if cap and not self._cap_logged:
            self._cap_logged = True
            log.warning("deadunits: no more spike dumps in %s: %s.", self.directory, reason)
