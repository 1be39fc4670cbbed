"""Every private Lightning or torch internal this package relies on, in one place, each with a test of its own.

When Lightning or torch renames one of these, the test for it fails here rather than a monitor deep in a run.
"""

import ctypes
from collections.abc import Mapping
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
    """A raw copy (~1 us) of the MT19937 state behind ``np.random``'s global generator, or ``None`` if unreadable.

    Equal fingerprints mean the generator has not drawn in between (a cached Gaussian consumed alone aside), so
    a state taken at the first is still valid at the second.
    """
    try:
        import numpy as np

        generator = np.random.mtrand._rand._bit_generator
        if type(generator).__name__ != "MT19937":
            return None
        return ctypes.string_at(generator.ctypes.state_address, _MT19937_STATE_BYTES)
    except (AttributeError, ImportError, TypeError, ValueError):
        return None


def foreach_norms(tensors: list[Tensor]) -> tuple[Tensor, ...]:
    """The float32 2-norm of each tensor, in one batched device call (``torch._foreach_norm``) and no host sync."""
    return tuple(torch._foreach_norm(tensors, 2, dtype=torch.float32))


def torch_functions_undispatched() -> AbstractContextManager[Any]:
    """A context in which torch calls skip every ``TorchFunctionMode`` (``torch._C.DisableTorchFunction``)."""
    return torch._C.DisableTorchFunction()  # type: ignore[no-any-return]
