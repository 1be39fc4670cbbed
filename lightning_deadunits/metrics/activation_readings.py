"""The activation monitor's scalars: per-site readings and totals weighted by what was actually counted."""

from collections.abc import Callable, Mapping

from lightning_deadunits.metrics.activation_stats import SiteSummary

__all__ = ["activation_scalars"]


def activation_scalars(
    summaries: Mapping[str, SiteSummary], dormant_tau: float, key: Callable[..., str]
) -> dict[str, float]:
    """Per-site readings under ``key(site, stat)`` and totals under ``key("total", stat)``.

    Totals: ``zero_frac`` over every counted value, ``dead`` and ``dead_frac`` over sites with zero counting,
    ``dormant``, ``dormant_frac`` and ``channels`` over all sites. Nothing (not zero totals) when nothing was measured.

    Example:
        >>> activation_scalars({}, 0.025, lambda *parts: "/".join(parts))
        {}
    """
    scalars: dict[str, float] = {}
    if not summaries:
        return scalars
    channels = counted_channels = near_zero = counted_values = dead = dormant = 0.0
    for name, summary in summaries.items():
        layer = summary.readings(dormant_tau)
        scalars.update({key(name, stat): value for stat, value in layer.items()})
        channels += summary.channels
        dormant += layer["dormant"]
        if summary.near_zero is not None:
            counted_channels += summary.channels
            counted_values += summary.count * summary.channels
            near_zero += float(summary.near_zero.sum())
            dead += layer["dead"]
    totals = {
        "zero_frac": near_zero / counted_values if counted_values else 0.0,
        "dead": dead,
        "dead_frac": dead / counted_channels if counted_channels else 0.0,
        "dormant": dormant,
        "dormant_frac": dormant / channels if channels else 0.0,
        "channels": channels,
    }
    scalars.update({key("total", stat): value for stat, value in totals.items()})
    return scalars
