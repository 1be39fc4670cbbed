"""Pure tensor math on activations: per-channel sufficient statistics of one tensor, and what follows from them.

Channels are dim 1 of conv-shaped ``(N, C, *spatial)`` tensors (and of ``(N, F)`` linear outputs, where dim 1 is
also the last), and the last dim of ``(N, *, F)`` linear outputs: the caller says which with ``channel_dim``
(``1`` or ``-1``). A 1-D tensor is one sample: each element is a channel.

:func:`channel_stats` reads each value once in a fused kernel that ``torch.compile`` generates (Triton on GPU, C++
on CPU) for tensors on the devices of :data:`COMPILE_DEVICES` (CUDA by default), once the process has measured
:data:`COMPILE_AFTER_CALLS` tensors, so that short runs never wait for a compiler; until then, on other devices,
and wherever compiling is unavailable or fails, the exact eager passes run instead.
"""

import contextlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_deadunits._compat import distinct_symbolic_sizes
from lightning_deadunits.errors import DeadUnitsWarning

__all__ = [
    "COMPILE_AFTER_CALLS",
    "COMPILE_DEVICES",
    "NEAR_ZERO_ROW",
    "TOTALS_ROWS",
    "ChannelStats",
    "channel_stats",
    "dormant_channels",
    "moments",
    "reduction_dims",
]

TOTALS_ROWS = ("sum", "sum_sq", "sum_abs", "near_zero")
"""The rows of :attr:`ChannelStats.totals`, in order; the last only when an ``eps`` was given."""

NEAR_ZERO_ROW = TOTALS_ROWS.index("near_zero")

# From about this many positions per channel and sample, reducing them first is faster than reducing the batch first.
_LONG_INNER = 64

COMPILE_AFTER_CALLS: int | None = 64
"""Tensors measured eagerly in a process before the fused kernel is compiled (seconds to tens of seconds on CPU,
once): a sampled step of a 20-layer model measures 20. ``None`` never compiles; ``0`` compiles at the first call."""

COMPILE_DEVICES: tuple[str, ...] = ("cuda",)
"""Device types whose activations get the fused kernel. Not the CPU by default: compiling stalls the run for seconds
to tens of seconds and keeps ~70 MB, against a gain of about 2x on the sampled steps only; add ``"cpu"`` to opt in
(e.g. statistics at every step of a long CPU run)."""

# Kernel variants (device, dtype, size-1 dims that dynamic shapes specialise) compiled at most: beyond, eager.
_MAX_VARIANTS = 8
# The fused kernel sums 0/1 values in float32, exact up to 2**24 per channel; larger tensors take the eager path.
_EXACT_FLOAT32_COUNT = 2**24


@dataclass(frozen=True)
class ChannelStats:
    """Per-channel sufficient statistics of one tensor, on the input's device.

    The additive statistics are rows of one float64 tensor, so that accumulating them over batches is one
    addition; ``sum``, ``sum_sq``, ``sum_abs`` and ``near_zero`` read its rows.

    Attributes:
        count: values per channel (a host int: the tensor's size over its channel count).
        totals: ``(3, C)`` float64 rows ``sum``, ``sum_sq`` and ``sum_abs``, and a fourth row ``near_zero`` (the
            values with ``|x| <= eps``, exact integers) when an ``eps`` was given.
        min: the smallest value per channel (float32).
        max: the largest value per channel (float32).
    """

    count: int
    totals: Tensor
    min: Tensor
    max: Tensor

    @property
    def sum(self) -> Tensor:
        """Sum of the values per channel."""
        return self.totals[0]

    @property
    def sum_sq(self) -> Tensor:
        """Sum of the squared values per channel."""
        return self.totals[1]

    @property
    def sum_abs(self) -> Tensor:
        """Sum of the absolute values per channel."""
        return self.totals[2]

    @property
    def near_zero(self) -> Tensor | None:
        """Values with ``|x| <= eps`` per channel (int64), or ``None`` when no ``eps`` was given."""
        return self.totals[NEAR_ZERO_ROW].long() if len(self.totals) > NEAR_ZERO_ROW else None


def reduction_dims(ndim: int, channel_dim: int) -> tuple[int, tuple[int, ...]]:
    """Return ``(channel dim, dims to reduce over)`` for a tensor of ``ndim`` dims; ``channel_dim`` is 1 or -1.

    Raises:
        ValueError: for a 0-d tensor or a ``channel_dim`` other than 1 and -1.

    Example:
        >>> reduction_dims(4, 1), reduction_dims(3, -1), reduction_dims(1, 1)
        ((1, (0, 2, 3)), (2, (0, 1)), (0, ()))
    """
    if channel_dim not in (1, -1):
        raise ValueError(f"`channel_dim` must be 1 or -1, got {channel_dim!r}.")
    if ndim < 1:
        raise ValueError(f"an activation needs at least one dim to hold its channels, got a {ndim}-d tensor.")
    dim = 0 if ndim == 1 else channel_dim % ndim
    return dim, tuple(d for d in range(ndim) if d != dim)


def channel_stats(x: Tensor, channel_dim: int = 1, eps: float | None = 0.0, nonnegative: bool = False) -> ChannelStats:
    """Per-channel count, near-zero count, sum, sum of squares, sum of ``|x|``, min and max of ``x``.

    Reduces in float32 whatever ``x``'s dtype (bf16/fp16 under autocast included), on ``x``'s device, without
    autograd and without a host sync. ``near_zero`` counts ``|x| <= eps``, so ``eps=0`` counts exact zeros (and
    ``-0.0``); ``eps=None`` skips the count. NaN propagates into ``sum``, ``min`` and ``max``; a channel holding a
    NaN counts no near-zero value in ``x`` (it is active).

    Once :data:`COMPILE_AFTER_CALLS` tensors have been measured in the process, one fused compiled kernel reads
    each value once and produces every statistic (float32 sums with cascade summation, then float64); it is
    compiled once per device, input dtype and size-1 layout, with dynamic shapes, and never for more than 8
    variants. Before that, or if compiling is unavailable or fails (one
    :class:`~lightning_deadunits.DeadUnitsWarning`, then eager for the rest of the process), the eager path
    computes the same numbers in float passes that write at most one temporary as large as ``x``: values reduced
    over the contiguous dims after the channel first (sums of squares there as a 2-norm), counted as the sign of
    ``|x|`` thresholded at ``eps``, partial sums combined in float64.

    Args:
        x: an activation tensor with at least one element.
        channel_dim: ``1`` (conv-shaped and ``(N, F)`` tensors) or ``-1`` (``(N, *, F)`` linear outputs).
        eps: the near-zero tolerance (>= 0), or ``None``.
        nonnegative: the caller knows ``x >= 0`` (a ReLU's output), so the eager path takes ``|x|`` as ``x`` (the
            fused pass computes it at no cost).

    Raises:
        ValueError: for an empty or 0-d tensor, or a bad ``channel_dim``.

    Example:
        >>> stats = channel_stats(torch.tensor([[0.0, 2.0], [0.0, -1.0]]))
        >>> stats.count, stats.near_zero.tolist(), stats.sum.tolist(), stats.max.tolist()
        (2, [2, 0], [0.0, 1.0], [0.0, 2.0])
    """
    dim, _ = reduction_dims(x.dim(), channel_dim)
    if x.numel() == 0:
        raise ValueError(f"an activation needs at least one element, got shape {tuple(x.shape)}.")
    channels = x.shape[dim]
    count = x.numel() // channels
    with torch.no_grad():
        grid = _channel_grid(x.detach(), dim)
        compiles = grid.device.type in COMPILE_DEVICES and count < _EXACT_FLOAT32_COUNT
        fused = _FUSED.stats(grid, eps) if compiles else None
        return fused if fused is not None else _eager_stats(grid.float(), count, eps, nonnegative)


def _channel_grid(x: Tensor, dim: int) -> Tensor:
    """``x`` as an ``(outer, C, inner)`` grid, channels of ``dim`` in the middle: a view wherever the layout allows.

    A tensor whose channels are innermost in memory (the ``channels_last`` formats of conv activations) becomes
    ``(positions, C, 1)``: reshaping it as ``(N, C, positions)`` would copy it.
    """
    channels = x.shape[dim]
    if not x.is_contiguous():
        moved = x.movedim(dim, -1)
        if moved.is_contiguous():
            return moved.view(-1, channels, 1)
    outer = math.prod(x.shape[:dim])
    return x.reshape(outer, channels, x.numel() // channels // outer)


def _eager_stats(grid: Tensor, count: int, eps: float | None, nonnegative: bool) -> ChannelStats:
    """:func:`channel_stats` of a float32 ``(outer, C, inner)`` grid in separate float passes (no compiler).

    Writing a temporary as large as the grid costs several reads of it, so the passes write at most one (``|x|``
    or the near-zero indicator, computed in place in it), and none for ``x >= 0`` without ``eps`` over contiguous
    rows.
    """
    # The contiguous inner dim first when it is long, else the outer dim first (whole rows combined
    # elementwise): whichever vectorises. The partial results are small; their second step is one reduction.
    rows = grid.shape[2] >= _LONG_INNER
    first, then = (2, 0) if rows else (0, 1)
    total = grid.sum(first)
    # One buffer at most (`out=None` allocates it): a fresh one per pass would also cost page faults.
    scratch: Tensor | None = None
    if rows:  # along contiguous rows the 2-norm reads each value once and writes nothing
        squares = torch.linalg.vector_norm(grid, 2, dim=2).square_()
    else:  # across rows it does not vectorise
        scratch = grid.square()
        squares = scratch.sum(0)
    magnitude = grid  # |x|
    if not nonnegative:
        magnitude = scratch = torch.abs(grid, out=scratch)
    partials = [total, squares, total if nonnegative else magnitude.sum(first)]
    if eps is not None:
        # The indicator of |x| > eps: |x| where above eps, else 0 (NaN too), then its sign.
        if not nonnegative:  # in place: `magnitude` is the buffer
            indicator = (F.threshold(magnitude, eps, 0.0, inplace=True) if eps else magnitude).sign_()
        elif eps:
            source = grid if scratch is None else scratch.copy_(grid)
            indicator = F.threshold(source, eps, 0.0, inplace=scratch is not None).sign_()
        else:
            indicator = torch.sign(grid, out=scratch)
        partials.append(indicator.sum(first))
    # float64 from here: exact counts, and precise sums over many positions.
    totals = torch.stack(partials).sum(then + 1, dtype=torch.float64)
    high = grid.amax(first).amax(then)
    if eps is not None:
        # 0/1 per value, so the active count is exact. A NaN's indicator is 0 (thresholded, or its sign on the
        # CPU), so a channel holding a NaN (whose max is NaN) is set apart: it counts as active.
        totals[NEAR_ZERO_ROW].neg_().add_(count).masked_fill_(high.isnan(), 0.0)
    return ChannelStats(count=count, totals=totals, min=grid.amin(first).amin(then), max=high)


def _fused_rows(grid: Tensor, eps: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One read of a ``(outer, C, inner)`` or ``(outer, C)`` grid: every statistic of :func:`channel_stats`.

    Float64 rows sum, sum_sq, sum_abs and near-zero count (float32 partial sums), float32 min and max; a channel
    holding a NaN (whose max is NaN) counts no near-zero value, as on the eager path.
    """
    values = grid.float()
    magnitude = values.abs()
    dims = (0, 2) if grid.dim() == 3 else (0,)
    high = values.amax(dims)
    near_zero = (magnitude <= eps).sum(dims, dtype=torch.float32).masked_fill(high.isnan(), 0.0)
    rows = torch.stack([values.sum(dims), values.square().sum(dims), magnitude.sum(dims), near_zero])
    return rows.double(), values.amin(dims), high


class _FusedKernel:
    """The compiled :func:`_fused_rows`, its variants, and the decision to stop compiling (process-wide)."""

    def __init__(self) -> None:
        self.calls = 0
        self.kernel: Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]] | None = None
        self.failed = False
        self.variants: set[tuple[str, torch.dtype, bool, bool]] = set()
        self.thresholds: dict[tuple[torch.device, float], Tensor] = {}

    def stats(self, grid: Tensor, eps: float | None) -> ChannelStats | None:
        """The fused statistics of ``grid``, or ``None`` where the eager path must run."""
        self.calls += 1
        variant = (grid.device.type, grid.dtype, grid.shape[0] == 1, grid.shape[2] == 1)
        if not self._ready(variant):
            return None
        threshold = self.thresholds.get((grid.device, eps or 0.0))
        if threshold is None:
            # A tensor, not a float: a float argument would be a guard, and each eps a recompilation.
            threshold = self.thresholds[(grid.device, eps or 0.0)] = torch.tensor(eps or 0.0, device=grid.device)
        # `.data`: not a view, whose base's shape and strides `torch.compile` would guard on (a recompilation per
        # activation rank); distinct sizes only where a variant is new, since dynamo compiles nowhere else.
        first_call = distinct_symbolic_sizes() if variant not in self.variants else contextlib.nullcontext()
        try:
            assert self.kernel is not None
            with first_call:
                # Channels last (sequences, linear outputs) as a matrix: reduced over its rows, it vectorises
                # across channels, which a trailing size-1 dim would prevent.
                rows, low, high = self.kernel((grid[:, :, 0] if grid.shape[2] == 1 else grid).data, threshold)
        except Exception as error:  # the plugin must never fail a run for a compiler's sake
            self._give_up(error)
            return None
        self.variants.add(variant)
        totals = rows if eps is not None else rows[:NEAR_ZERO_ROW]
        return ChannelStats(count=grid.numel() // grid.shape[1], totals=totals, min=low, max=high)

    def _ready(self, variant: tuple[str, torch.dtype, bool, bool]) -> bool:
        after = COMPILE_AFTER_CALLS
        if self.failed or after is None or self.calls <= after or torch.compiler.is_compiling():
            return False
        if variant[0] not in COMPILE_DEVICES:
            return False
        if variant not in self.variants and len(self.variants) >= _MAX_VARIANTS:
            return False
        if self.kernel is None:
            self.kernel = torch.compile(_fused_rows, dynamic=True)
        return True

    def _give_up(self, error: Exception) -> None:
        self.failed = True
        warnings.warn(
            f"lightning-deadunits could not compile its fused activation statistics ({type(error).__name__}: "
            f"{error}); it computes them eagerly from now on (same numbers, several passes per activation).",
            DeadUnitsWarning,
            stacklevel=4,
        )


_FUSED = _FusedKernel()


def moments(total: Tensor, total_sq: Tensor, count: Tensor | float) -> tuple[Tensor, Tensor]:
    """Mean and population standard deviation from a sum, a sum of squares and a count (elementwise).

    Example:
        >>> mean, std = moments(torch.tensor(6.0), torch.tensor(14.0), 3)
        >>> float(mean), round(float(std), 4)
        (2.0, 0.8165)
    """
    mean = total / count
    variance = (total_sq / count - mean.square()).clamp(min=0)
    return mean, variance.sqrt()


def dormant_channels(mean_abs: Tensor, tau: float) -> Tensor:
    """Dormant channels as Sokar et al. (2023) define them: ``mean|x|_c / mean over channels of mean|x| <= tau``.

    Written without a division, so a layer whose channels are all exactly zero is all dormant; a NaN channel is
    not dormant.

    Args:
        mean_abs: each channel's mean ``|x|`` over the samples and positions seen.
        tau: the dormancy threshold (Sokar et al. use 0 to 0.1).

    Example:
        >>> dormant_channels(torch.tensor([1.0, 1.0, 0.01, 2.0]), tau=0.025).tolist()
        [False, False, True, False]
    """
    return mean_abs <= tau * mean_abs.mean()
