"""Every private Lightning or torch internal this package relies on, in one place, each with a test of its own.

When Lightning or torch renames one of these, the test for it fails here rather than a monitor deep in a run.
"""

import ctypes
import random
import struct
import sys
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.logger import _add_prefix
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.loops.fetchers import _DataLoaderIterDataFetcher
from torch import Tensor
from torch.utils.tensorboard import SummaryWriter

__all__: list[str] = []


def grad_scaler(trainer: "pl.Trainer") -> Any:
    """The fp16 AMP ``GradScaler`` of the trainer's precision plugin, or ``None``."""
    return getattr(trainer.precision_plugin, "scaler", None)


def loss_scale(trainer: "pl.Trainer") -> Tensor | None:
    """The scaler's current scale as a device tensor (``GradScaler._scale``, read without a host sync), or ``None``."""
    scale = getattr(grad_scaler(trainer), "_scale", None)
    return scale if isinstance(scale, Tensor) else None


def log_every_n_steps(trainer: "pl.Trainer") -> int:
    """The trainer's ``log_every_n_steps`` (set on it by Lightning's logger connector, not a declared attribute)."""
    return int(getattr(trainer, "log_every_n_steps", 50))


def logger_tags(logger: TensorBoardLogger, metrics: Mapping[str, float]) -> dict[str, float]:
    """``metrics`` under the tags the logger's own ``log_metrics`` would write them (its ``prefix`` applied)."""
    return dict(_add_prefix(dict(metrics), logger._prefix, logger.LOGGER_JOIN_CHAR))  # type: ignore[arg-type]


def tensorboard_file_writer(writer: SummaryWriter) -> Any:
    """The ``FileWriter`` behind a ``SummaryWriter`` (a logger's ``experiment``), for summaries built here.

    Many scalars go as one event, and images are encoded here (see ``TensorBoardPanels``).
    """
    return writer._get_file_writer()  # type: ignore[no-untyped-call]


def step_progress(trainer: "pl.Trainer") -> dict[str, Any]:
    """The loop counters behind ``trainer.global_step`` and the logging step, as plain values.

    The optimizer-step progress (automatic and manual optimization), the scheduler progress and the epoch loop's
    ``_batches_that_stepped``; the batch and epoch progress are left out: they count positions in the data.
    """
    epoch_loop = trainer.fit_loop.epoch_loop
    return {
        "optimizer": epoch_loop.automatic_optimization.optim_progress.state_dict(),
        "manual_step": epoch_loop.manual_optimization.optim_step_progress.state_dict(),
        "scheduler": epoch_loop.scheduler_progress.state_dict(),
        "batches_that_stepped": epoch_loop._batches_that_stepped,
    }


def load_step_progress(trainer: "pl.Trainer", state: Mapping[str, Any]) -> None:
    """Set the counters :func:`step_progress` read back to ``state``."""
    epoch_loop = trainer.fit_loop.epoch_loop
    epoch_loop.automatic_optimization.optim_progress.load_state_dict(state["optimizer"])
    epoch_loop.manual_optimization.optim_step_progress.load_state_dict(state["manual_step"])
    epoch_loop.scheduler_progress.load_state_dict(state["scheduler"])
    epoch_loop._batches_that_stepped = int(state["batches_that_stepped"])


def drop_next_train_batch(trainer: "pl.Trainer") -> bool:
    """Take the next batch out of the fit loop's data fetcher unused, counting it as a processed batch.

    Returns ``False`` (and takes nothing) when the epoch's data is exhausted or the module reads the iterator
    itself (``training_step(dataloader_iter)``).
    """
    fetcher = trainer.fit_loop._data_fetcher
    if fetcher is None or fetcher.done or isinstance(fetcher, _DataLoaderIterDataFetcher):
        return False
    try:
        next(fetcher)
    except StopIteration:
        return False
    batch_progress = trainer.fit_loop.epoch_loop.batch_progress
    batch_progress.increment_by(1, is_last_batch=fetcher.done)
    return True


def distinct_symbolic_sizes() -> AbstractContextManager[Any]:
    """A context in which ``torch.compile`` gives equal sizes of an input separate symbols.

    Without it ("duck sizing"), a kernel compiled for a ``(32, 32, 256)`` tensor guards on its first two sizes
    being equal, and recompiles for ``(32, 64, 256)``. Costs ~70 us: enter it only where a compilation is expected.
    """
    from torch.fx.experimental import _config

    return _config.patch(use_duck_shape=False)  # type: ignore[attr-defined,no-any-return]


# numpy's legacy global generator (`np.random.*`) is an MT19937 whose C state begins with 624 uint32 words and a
# position: those bytes change whenever it draws.
_MT19937_STATE_BYTES = 624 * 4 + 4


def numpy_generator_fingerprint() -> bytes | None:
    """A raw copy (~0.2 us) of the MT19937 state behind ``np.random``'s global generator, or ``None`` if unreadable.

    Equal fingerprints mean the generator has not drawn in between (a cached Gaussian consumed alone aside), so
    a state taken at the first is still valid at the second. The generator and its state's address are looked up
    once (again only if numpy's global generator is replaced): each call copies the bytes.
    """
    try:
        import numpy as np

        return _NUMPY_STATE.read(np.random.mtrand._rand._bit_generator)
    except (AttributeError, ImportError, TypeError, ValueError):
        return None


def foreach_norms(tensors: list[Tensor]) -> tuple[Tensor, ...]:
    """The float32 2-norm of each tensor, in one batched device call (``torch._foreach_norm``) and no host sync."""
    return tuple(torch._foreach_norm(tensors, 2, dtype=torch.float32))


def torch_functions_undispatched() -> AbstractContextManager[Any]:
    """A context in which torch calls skip every ``TorchFunctionMode`` (``torch._C.DisableTorchFunction``)."""
    return torch._C.DisableTorchFunction()  # type: ignore[no-any-return]


class _StateBytes:
    """The raw C state of one generator object, read through a view of its memory made once per object."""

    def __init__(self, size: int, address: Callable[[Any], int | None]) -> None:
        self.size = size
        self.address = address  # where the object's state begins, or None where it cannot be read
        self.owner: Any = None
        self.view: Any = None

    def read(self, owner: Any) -> bytes | None:
        if owner is not self.owner:
            where = self.address(owner)
            self.view = None if where is None else (ctypes.c_char * self.size).from_address(where)
            self.owner = owner  # kept: the view points into it
        return None if self.view is None else self.view.raw  # a copy


def _numpy_state_address(generator: Any) -> int | None:
    return int(generator.ctypes.state_address) if type(generator).__name__ == "MT19937" else None


_NUMPY_STATE = _StateBytes(_MT19937_STATE_BYTES, _numpy_state_address)

# CPython's `_random.Random` object is its header, then `int index; uint32_t state[624]` (Modules/_randommodule.c).
_PYTHON_STATE_BYTES = 4 + 624 * 4


def _python_state_address(generator: Any) -> int | None:
    """Where ``generator``'s C state begins, checked against ``getstate()``; ``None`` where the layout differs."""
    internal = generator.getstate()[1]  # the 624 words, then the index
    if sys.implementation.name != "cpython" or len(internal) != 625:  # elsewhere `id` is no address
        return None
    expected = struct.pack(f"=i{len(internal) - 1}I", internal[-1], *internal[:-1])
    where = id(generator) + object.__basicsize__  # just after the object header
    return where if ctypes.string_at(where, _PYTHON_STATE_BYTES) == expected else None


_PYTHON_STATE = _StateBytes(_PYTHON_STATE_BYTES, _python_state_address)


def python_generator_fingerprint() -> tuple[bytes, Any] | None:
    """A raw copy (~0.2 us) of the state of the ``random`` module's generator, with its cached Gaussian; ``None``
    where its memory layout is not CPython's.

    Equal fingerprints mean the generator has not drawn in between, so a ``random.getstate()`` taken at the
    first (625 Python ints built, ~10 us) is still valid at the second.
    """  # noqa: D205
    try:
        generator: Any = random._inst  # type: ignore[attr-defined]
        raw = _PYTHON_STATE.read(generator)
        return None if raw is None else (raw, generator.gauss_next)
    except (AttributeError, NotImplementedError, TypeError, ValueError):  # a generator replaced by one without state
        return None
