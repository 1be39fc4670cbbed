"""Per-call-site activation statistics over the sampled batches of a log period, exact under a DDP reduction.

Holds sums, sums of squares, sums of ``|x|``, near-zero counts and value counts (float64), per-channel minima and
maxima (float32), and, per channel, the last *sample* in which the channel was active (some ``|x| > eps``), which
gives the channels dead over a window of samples. A sample is one group of batches measured together (one sampled
training step, or one validation pass).
"""

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_deadunits.functional.activations import (
    NEAR_ZERO_ROW,
    TOTALS_ROWS,
    ChannelStats,
    dormant_channels,
    moments,
)
from lightning_deadunits.metrics._sync import agree_on_layout

__all__ = ["ActivationStats", "CallSite", "SiteSummary"]

CallSite = tuple[str, int]
"""A module name and the index of the call within one forward of the module's parent."""

_NEVER = -1


@dataclass
class SiteSummary:
    """One call site's statistics over a log period, on the host (CPU float64 tensors, one entry per channel).

    Attributes:
        count: values seen per channel.
        near_zero: values with ``|x| <= eps`` per channel, or ``None`` when the site has no ``eps``.
        sum: sum of the values per channel.
        sum_sq: sum of the squared values per channel.
        sum_abs: sum of ``|x|`` per channel.
        min: smallest value per channel.
        max: largest value per channel.
        dead: channels dead over the window (bool), or ``None`` when the site has no ``eps``.
    """

    count: float
    near_zero: Tensor | None
    sum: Tensor
    sum_sq: Tensor
    sum_abs: Tensor
    min: Tensor
    max: Tensor
    dead: Tensor | None

    @property
    def channels(self) -> int:
        """How many channels the site has."""
        return self.sum.numel()

    @property
    def channel_zero_frac(self) -> Tensor | None:
        """Per-channel fraction of values with ``|x| <= eps``."""
        return None if self.near_zero is None else self.near_zero / self.count

    def readings(self, dormant_tau: float) -> dict[str, float]:
        """The layer-level scalars: ``zero_frac``, ``dead``, ``dead_frac`` (sites with ``eps`` only), ``dormant``,
        ``dormant_frac``, ``mean``, ``std``, ``min``, ``max`` and ``max_abs`` over every channel, sample and position.
        """  # noqa: D205
        values = self.count * self.channels
        readings: dict[str, float] = {}
        if self.near_zero is not None:
            readings["zero_frac"] = float(self.near_zero.sum()) / values
        if self.dead is not None:
            dead = float(self.dead.sum())
            readings.update(dead=dead, dead_frac=dead / self.channels)
        dormant = float(dormant_channels(self.sum_abs / self.count, dormant_tau).sum())
        mean, std = moments(self.sum.sum(), self.sum_sq.sum(), values)
        low, high = float(self.min.min()), float(self.max.max())
        readings.update(
            dormant=dormant,
            dormant_frac=dormant / self.channels,
            mean=float(mean),
            std=float(std),
            min=low,
            max=high,
            max_abs=max(abs(low), abs(high)),
        )
        return readings


@dataclass
class _SiteState:
    """Device tensors of one call site: float64 count and totals, float32 extremes, int64 last-active samples.

    ``totals`` has the rows of :class:`~lightning_deadunits.functional.ChannelStats`: ``sum``, ``sum_sq``,
    ``sum_abs`` and, for a site with an ``eps``, ``near_zero``.
    """

    count: Tensor
    totals: Tensor
    min: Tensor
    max: Tensor
    last_active: Tensor | None

    @classmethod
    def empty(cls, channels: int, device: torch.device, counts_zeros: bool) -> "_SiteState":
        return cls(
            count=torch.zeros((), dtype=torch.float64, device=device),
            totals=torch.zeros(
                len(TOTALS_ROWS) if counts_zeros else NEAR_ZERO_ROW, channels, dtype=torch.float64, device=device
            ),
            min=torch.full((channels,), float("inf"), device=device),
            max=torch.full((channels,), float("-inf"), device=device),
            last_active=torch.full((channels,), _NEVER, dtype=torch.long, device=device) if counts_zeros else None,
        )

    @property
    def additive(self) -> list[Tensor]:
        """The states reduced by sum across ranks, ``count`` first."""
        return [self.count.reshape(1), self.totals.flatten()]

    def set_additive(self, values: list[Tensor]) -> None:
        count, totals = values
        self.count = count.reshape(())
        self.totals = totals.reshape(self.totals.shape)

    def to(self, device: torch.device) -> None:
        for field, value in vars(self).items():
            if isinstance(value, Tensor) and value.device != device:
                setattr(self, field, value.to(device))

    def reset_period(self) -> None:
        for tensor in self.additive:
            tensor.zero_()
        self.min.fill_(float("inf"))
        self.max.fill_(float("-inf"))


def _split(flat: Tensor, sizes: list[int]) -> list[Tensor]:
    """Cut a 1-D tensor into consecutive pieces of the given sizes (views)."""
    pieces, start = [], 0
    for size in sizes:
        pieces.append(flat[start : start + size])
        start += size
    return pieces


class ActivationStats:
    """Accumulates per-channel activation statistics of every call site over the samples of one log period, and
    the last sample in which each channel was active over the whole run.

    Every update is device-side arithmetic (no host sync). :meth:`sync` reduces sums by sum, minima by min, maxima
    and last-active indices by max across DDP ranks, so what :meth:`summarise` returns equals a single process run
    over the global data; it must be called at a step every rank reaches, with the same call sites on every rank
    (checked first: a difference raises the same error on every rank instead of a hang).

    Example:
        >>> from lightning_deadunits.functional.activations import channel_stats
        >>> stats = ActivationStats()
        >>> stats.begin_sample()
        >>> stats.update(("relu", 0), channel_stats(torch.tensor([[0.0, 2.0], [0.0, 1.0]])))
        >>> summary = stats.summarise(window=1)[("relu", 0)]
        >>> summary.readings(dormant_tau=0.1)["zero_frac"], summary.dead.tolist()
        (0.5, [True, False])
    """  # noqa: D205

    def __init__(self) -> None:
        self.sites: dict[CallSite, _SiteState] = {}
        self.samples = 0

    def begin_sample(self) -> None:
        """Start the next sample: the window of dead channels counts samples."""
        self.samples += 1

    def update(self, site: CallSite, stats: ChannelStats) -> None:
        """Add one tensor's statistics to ``site``; a new site, or one whose channel count changed, starts afresh."""
        if self.samples == 0:
            self.samples = 1
        device = stats.totals.device
        state = self.sites.get(site)
        if state is None or state.totals.shape != stats.totals.shape:
            state = self.sites[site] = _SiteState.empty(
                stats.totals.shape[1], device, len(stats.totals) > NEAR_ZERO_ROW
            )
        if state.totals.device != device:
            state.to(device)
        state.count += stats.count
        state.totals += stats.totals
        torch.minimum(state.min, stats.min, out=state.min)
        torch.maximum(state.max, stats.max, out=state.max)
        if state.last_active is not None:
            state.last_active.masked_fill_(stats.totals[NEAR_ZERO_ROW] < stats.count, self.samples - 1)

    def sync(self) -> None:
        """Reduce every state across DDP ranks (sum, min, max); nothing happens outside a process group.

        Every rank must call it, also one that measured nothing: the ranks first agree that they hold the same
        call sites with the same channel counts (one small all-gather).

        Raises:
            LayoutMismatchError: on every rank, if the ranks hold different call sites or channel counts (a module
                called on some ranks only); reducing them would hang or mix numbers.
        """
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        sites = sorted(self.sites)
        shapes = [tuple(self.sites[site].totals.shape) for site in sites]
        agree_on_layout("ActivationStats.sync", [f"{name}#{call}" for name, call in sites], shapes)
        if not sites:
            return
        states = [self.sites[site] for site in sites]
        additive = [state.additive for state in states]
        flat_sums = torch.cat([t for tensors in additive for t in tensors])
        dist.all_reduce(flat_sums, op=dist.ReduceOp.SUM)
        pieces = iter(_split(flat_sums, [t.numel() for tensors in additive for t in tensors]))
        for state, tensors in zip(states, additive, strict=True):
            state.set_additive([next(pieces) for _ in tensors])
        flat_mins = torch.cat([state.min for state in states])
        dist.all_reduce(flat_mins, op=dist.ReduceOp.MIN)
        for state, low in zip(states, _split(flat_mins, [s.min.numel() for s in states]), strict=True):
            state.min = low
        maxima = [
            [state.max.double()] + ([] if state.last_active is None else [state.last_active.double()])
            for state in states
        ]
        flat_maxs = torch.cat([t for tensors in maxima for t in tensors])
        dist.all_reduce(flat_maxs, op=dist.ReduceOp.MAX)
        pieces = iter(_split(flat_maxs, [t.numel() for tensors in maxima for t in tensors]))
        for state, tensors in zip(states, maxima, strict=True):
            state.max = next(pieces).float()
            if len(tensors) == 2:
                state.last_active = next(pieces).long()

    def dead_masks(self, window: int) -> dict[CallSite, Tensor]:
        """Per site (with ``eps``), the channels not active in any of the last ``window`` samples, on the device.

        Until ``window`` samples have been seen, the window is every sample so far.
        """
        start = max(0, self.samples - window)
        return {site: state.last_active < start for site, state in self.sites.items() if state.last_active is not None}

    def summarise(self, window: int) -> dict[CallSite, SiteSummary]:
        """Every site seen in this period, on the host, with one device-to-host transfer in all.

        Call :meth:`sync` first under DDP.
        """
        sites = sorted(self.sites)
        dead = self.dead_masks(window)
        parts: list[list[Tensor]] = []
        for site in sites:
            state = self.sites[site]
            masks = [dead[site].double()] if site in dead else []
            parts.append([*state.additive, state.min.double(), state.max.double(), *masks])
        if not parts:
            return {}
        device = parts[0][0].device
        host = torch.cat([t.to(device) for tensors in parts for t in tensors]).cpu()
        pieces = iter(_split(host, [t.numel() for tensors in parts for t in tensors]))
        summaries = {}
        for site, tensors in zip(sites, parts, strict=True):
            count, totals, low, high, *mask = (next(pieces) for _ in tensors)
            if float(count) > 0:
                rows = totals.reshape(-1, len(low))
                summaries[site] = SiteSummary(
                    count=float(count),
                    near_zero=rows[NEAR_ZERO_ROW] if len(rows) > NEAR_ZERO_ROW else None,
                    sum=rows[0],
                    sum_sq=rows[1],
                    sum_abs=rows[2],
                    min=low,
                    max=high,
                    dead=mask[0].bool() if mask else None,
                )
        return summaries

    def reset_period(self) -> None:
        """Zero the period's sums and extremes; the last-active indices (the window) carry on."""
        for state in self.sites.values():
            state.reset_period()

    def drop(self, site: CallSite) -> None:
        """Forget ``site`` (e.g. a layer found not to be followed by an activation)."""
        self.sites.pop(site, None)

    def state_dict(self) -> dict[str, Any]:
        """CPU copies of every state, the window included."""
        sites = []
        for (name, call), state in self.sites.items():
            rows = dict(zip(TOTALS_ROWS, state.totals.to("cpu", copy=True), strict=False))
            extremes = {"count": state.count.cpu(), "min": state.min.cpu(), "max": state.max.cpu()}
            last_active = {} if state.last_active is None else {"last_active": state.last_active.cpu()}
            sites.append({"name": name, "call": call, **extremes, **rows, **last_active})
        return {"samples": self.samples, "sites": sites}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; the next :meth:`update` moves each site to the activations' device."""
        self.samples = int(state_dict.get("samples", 0))
        self.sites = {}
        for entry in state_dict.get("sites", []):
            rows = [entry[row] for row in TOTALS_ROWS if entry.get(row) is not None]
            self.sites[(entry["name"], int(entry["call"]))] = _SiteState(
                count=entry["count"].clone(),
                totals=torch.stack(rows).double(),
                min=entry["min"].clone(),
                max=entry["max"].clone(),
                last_active=None if entry.get("last_active") is None else entry["last_active"].clone(),
            )
