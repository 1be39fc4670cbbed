"""Sentences and the Markdown table of loss-spike events: rendered from the event data, never parsed back."""

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["deaths_message", "deaths_summary", "gradient_summary", "spike_events_table", "spike_message"]

_MAX_TABLE_ROWS = 50


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def gradient_summary(event: Mapping[str, Any]) -> str:
    """``"layer4.1.conv2 gradient 40x its baseline, fc gradient 3.1x its baseline"`` (layers above 2x), or ``""``."""
    return ", ".join(
        f"{row['layer']} gradient {row['ratio']:.3g}x its baseline"
        for row in event.get("layers") or []
        if row["ratio"] > 2
    )


def spike_message(event: Mapping[str, Any]) -> str:
    """The alarm message of a spike event."""
    where = f"step {event['step']} (epoch {event['epoch']}, batch {event['batch_idx']}, rank {event['rank']})"
    if not event["local"]:
        text = f"loss spike on another rank at step {event['step']}; this rank's loss {_number(event['loss'])}"
    elif event["reason"] == "non-finite":
        text = f"non-finite loss {event['loss']} at {where}"
    elif "loss" not in event.get("signal", "loss"):
        text = (
            f"gradient-norm spike at {where}: norm {_number(event['grad_norm'])} against the baseline "
            f"{_number(event['grad_baseline'])} (robust z {_number(event['grad_score'])}); "
            f"loss {_number(event['loss'])}"
        )
    else:
        text = (
            f"loss spike at {where}: loss {_number(event['loss'])} is {event['ratio']:.3g}x the baseline "
            f"{_number(event['baseline'])} (robust z {event['spike_score']:.3g})"
        )
    gradients = gradient_summary(event)
    if gradients:
        text += f"; {gradients}"
    if event.get("episode_length", 1) > 1:
        text += f" (batch {event['episode_length']} of the episode that started at step {event['episode_start']})"
    if event["skipped_update"]:
        text += "; its update is skipped"
    if event["dump"] is not None:
        text += f"; batch dumped to {event['dump']}"
    return text


def deaths_summary(event: Mapping[str, Any]) -> str:
    """``"37 kernels of layer4.1, 2 kernels of layer3"`` (most first), ``"no kernels"``, or ``""`` if unknown."""
    parts = []
    for deaths in event["dead_after_spike"].values():
        died = sorted(deaths["died"].items(), key=lambda item: -item[1])
        parts += [f"{count:.0f} {deaths['unit']} of {layer}" for layer, count in died] or [f"no {deaths['unit']}"]
    return ", ".join(parts)


def deaths_message(event: Mapping[str, Any]) -> str:
    """``"spike at step 1800: 37 kernels of layer4.1 died (... checks at steps 1700 and 1900)"``."""
    checks = "; ".join(
        f"{key} checks at steps {deaths['before_step']} and {deaths['after_step']}"
        for key, deaths in event["dead_after_spike"].items()
    )
    return f"spike at step {event['step']}: {deaths_summary(event)} died ({checks})"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def spike_events_table(events: Sequence[Mapping[str, Any]]) -> str:
    """The last 50 events as a Markdown table (``|`` in cells escaped)."""
    rows = [
        "| step | episode | epoch | batch | rank | loss | baseline | z | gradients | dump | died |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for event in events[-_MAX_TABLE_ROWS:]:
        awaiting = " (awaiting a check)" if event["dead_pending"] else ""
        rows.append(
            f"| {event['step']} | {event.get('episode_start', event['step'])} | {event['epoch']} "
            f"| {event['batch_idx']} | {event['rank']} "
            f"| {_number(event['loss'])} | {_number(event['baseline'])} | {_number(event['spike_score'])} "
            f"| {_cell(gradient_summary(event) or '-')} | {_cell(event['dump'] or '-')} "
            f"| {_cell(deaths_summary(event) or '-')}{awaiting} |"
        )
    return "\n".join(rows)
