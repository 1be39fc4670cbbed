"""Read back what a run wrote to its TensorBoard event files."""

from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def load_events(log_dir: Path | str) -> EventAccumulator:
    """All scalars, histograms, images and tensors (text) of the single run under ``log_dir``."""
    files = sorted(Path(log_dir).rglob("events.out.tfevents.*"))
    assert files, f"no event file under {log_dir}"
    accumulator = EventAccumulator(
        str(files[0].parent), size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0}
    )
    accumulator.Reload()
    return accumulator


def scalar_series(events: EventAccumulator, tag: str) -> dict[int, float]:
    return {event.step: event.value for event in events.Scalars(tag)}
