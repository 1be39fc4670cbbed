"""The loss-spike monitor's scalars: the loss, its baseline and spike score (averaged over ranks), and the counts."""

import math
from collections.abc import Callable

import lightning.pytorch as pl
import torch

from lightning_deadunits.triggers.loss_spike import SpikeVerdict

__all__ = ["spike_scalars"]


def spike_scalars(
    trainer: "pl.Trainer", device: torch.device, verdict: SpikeVerdict, spikes: int, key: Callable[..., str]
) -> dict[str, float]:
    """``key("value")``, ``key("baseline")`` and ``key("spike_score")`` averaged over ranks (one all-reduce under
    DDP, on ``device``), ``key("spikes")`` and, within an episode, ``key("episode_length")``.

    The baseline and score are left out while the detector's window is empty.

    Example:
        >>> verdict = SpikeVerdict(3, 2.5, 2.0, 0.1, 1.25, 5.0, 2.6, False, False, "")
        >>> spike_scalars(pl.Trainer(logger=False), torch.device("cpu"), verdict, 1, lambda name: name)
        {'value': 2.5, 'spikes': 1.0, 'baseline': 2.0, 'spike_score': 5.0}
    """  # noqa: D205
    values = [verdict.loss, *(math.nan if v is None else v for v in (verdict.baseline, verdict.score))]
    if trainer.world_size > 1:
        mean = trainer.strategy.reduce(torch.tensor(values, dtype=torch.float64, device=device), reduce_op="mean")
        values = mean.cpu().tolist()
    loss, baseline, score = values
    scalars = {key("value"): loss, key("spikes"): float(spikes)}
    if verdict.episode is not None:
        scalars[key("episode_length")] = float(verdict.episode["length"])
    if verdict.baseline is not None:
        scalars[key("baseline")] = baseline
        scalars[key("spike_score")] = score
    return scalars
