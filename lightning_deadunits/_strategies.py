"""Which Lightning strategies a callback cannot work under, and the setup error that says so."""

from collections.abc import Sequence

import lightning.pytorch as pl

__all__ = ["SHARDED_STRATEGIES", "reject_sharded_strategy"]

SHARDED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")
"""Lightning's strategies that shard parameters, gradients or (tensor parallelism) activations across ranks."""


def reject_sharded_strategy(
    trainer: "pl.Trainer",
    who: str,
    reason: str = "reads whole weight tensors (per-filter norms of a shard are not the filter's)",
    strategies: Sequence[str] = SHARDED_STRATEGIES,
    advice: str | None = None,
) -> None:
    """Raise at setup when the trainer's strategy is (a subclass of) one of ``strategies``, saying why.

    Args:
        trainer: the trainer being set up.
        who: the callback (or option) as the message names it.
        reason: what it does that those strategies break.
        strategies: class names from ``lightning.pytorch.strategies``.
        advice: what to do instead; default: use DDP or drop ``who``.

    Raises:
        ValueError: for those strategies (by default FSDP, DeepSpeed and ModelParallel).
    """
    from lightning.pytorch import strategies as lightning_strategies

    classes = tuple(getattr(lightning_strategies, name) for name in strategies)
    if isinstance(trainer.strategy, classes):
        raise ValueError(
            f"`{who}` {reason} and does not support sharded strategies ({', '.join(strategies)}); got strategy "
            f"{type(trainer.strategy).__name__}. {advice or f'Use DDP, or drop `{who}`.'}"
        )
