"""Learning-rate warmup factors: pure functions of the optimizer step, no state, no Lightning."""

import math
from typing import Literal

__all__ = ["WarmupShape", "ramp", "rewarm_factor", "warmup_factor"]

WarmupShape = Literal["linear", "quadratic", "exponential"]

WARMUP_SHAPES: tuple[WarmupShape, ...] = ("linear", "quadratic", "exponential")

# Ma & Yarats's untuned exponential warmup 1 - exp(-(1 - beta2) t) pairs with an untuned linear warmup of
# 2 / (1 - beta2) steps, i.e. its time constant is half the warmup length.
_EXPONENTIAL_RATE = 2.0


def ramp(progress: float, shape: WarmupShape = "linear") -> float:
    r"""The warmup curve: 0 at ``progress = 0``, 1 at ``progress >= 1``, increasing in between.

    =================  ==========================================================================
    ``"linear"``       :math:`p`
    ``"quadratic"``    :math:`p^2` (slower start: the seed notes' ``base * (step/1000)**2``)
    ``"exponential"``  :math:`(1 - e^{-2p}) / (1 - e^{-2})`: Ma & Yarats (2021, "On the adequacy of untuned
                       warmup for adaptive optimization"), whose untuned exponential warmup is
                       :math:`1 - e^{-(1-\beta_2) t}` and whose untuned linear warmup lasts
                       :math:`2/(1-\beta_2)` steps; with that length as ``warmup_steps`` their curve is
                       :math:`1 - e^{-2p}`, rescaled here so that it reaches exactly 1 at the end of the
                       warmup instead of 86.5% (so warmup ends, and a scheduler's LR is untouched, after
                       ``warmup_steps``). Fast start, slow finish; ``warmup_steps = 2 / (1 - beta2)`` is their
                       rule of thumb (2,000 for Adam's default ``beta2 = 0.999``).
    =================  ==========================================================================

    Args:
        progress: the fraction of the ramp done; clipped to [0, 1].
        shape: ``"linear"``, ``"quadratic"`` or ``"exponential"``.

    Raises:
        ValueError: if ``shape`` is not one of the three.

    Example:
        >>> ramp(0.5, "quadratic")
        0.25
    """
    p = min(max(progress, 0.0), 1.0)
    if shape == "linear":
        return p
    if shape == "quadratic":
        return p * p
    if shape == "exponential":
        return -math.expm1(-_EXPONENTIAL_RATE * p) / -math.expm1(-_EXPONENTIAL_RATE)
    raise ValueError(f"`shape` must be one of {', '.join(map(repr, WARMUP_SHAPES))}, got {shape!r}.")


def warmup_factor(step: int, warmup_steps: int, shape: WarmupShape = "linear") -> float:
    """The initial-warmup LR factor of optimizer step ``step`` (0-based: the steps already taken).

    ``ramp(step / warmup_steps, shape)`` for ``step < warmup_steps``, and 1 from then on (and always 1 when
    ``warmup_steps`` is 0). So with ``"linear"`` the first step runs at LR 0, as ``lr = base * step / N`` does.

    Example:
        >>> [warmup_factor(step, 4) for step in range(6)]
        [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    """
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    return ramp(step / warmup_steps, shape)


def rewarm_factor(
    step: int, start: int | None, floor: float, rewarm_steps: int, shape: WarmupShape = "linear"
) -> float:
    """The re-warmup LR factor of step ``step`` for a re-warmup that began at step ``start``.

    ``floor + (1 - floor) * ramp((step - start) / rewarm_steps, shape)`` for ``start <= step < start +
    rewarm_steps``, and 1 outside that window or when ``start`` is ``None`` (no re-warmup yet): the factor
    drops to ``floor`` at ``start`` and ramps back to 1 over ``rewarm_steps`` steps.

    Example:
        >>> [rewarm_factor(step, 10, 0.5, 4) for step in range(9, 15)]
        [1.0, 0.5, 0.625, 0.75, 0.875, 1.0]
    """
    if start is None or rewarm_steps <= 0 or step < start or step - start >= rewarm_steps:
        return 1.0
    return floor + (1.0 - floor) * ramp((step - start) / rewarm_steps, shape)
