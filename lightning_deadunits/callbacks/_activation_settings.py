"""The validated constructor arguments of :class:`~lightning_deadunits.ActivationMonitor` and what follows from them."""

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_deadunits._compat import log_every_n_steps
from lightning_deadunits._validation import (
    check_bool,
    check_callable,
    check_choice,
    check_eps,
    check_float,
    check_int,
    check_optional_float,
    check_strings,
    check_types,
    set_validated,
)
from lightning_deadunits.probes.activations import (
    DEFAULT_ACTIVATION_TYPES,
    POOLING_TYPES,
    PRE_ACTIVATION_TYPES,
    ChannelDim,
    Watch,
)
from lightning_deadunits.triggers.rule import Rule
from lightning_deadunits.triggers.threshold import ThresholdRule

__all__ = ["ActivationSettings"]

_WATCH_MODES: tuple[Watch, ...] = ("activations", "pre_activations")
_CHANNEL_DIMS: tuple[ChannelDim, ...] = ("auto", 1, -1)


@dataclass(frozen=True)
class ActivationSettings:
    """The monitor's arguments, checked (see ``ActivationMonitor`` for their meaning), with the defaults that
    depend on others resolved: ``layer_types`` (by ``watch``, with the pooling layers when ``pooling``) and
    ``pre_activation_fn`` (``torch.relu``); string lists become tuples. The fields are typed as they are after
    the checks: build it with :meth:`of` from the monitor's arguments, as given.

    Raises:
        ValueError: on an out-of-range number or an unknown ``watch`` or ``channel_dim``.
        TypeError: on a wrongly typed argument.

    Example:
        >>> arguments = (10, None, 10, None, 0.025, (), (), None, "pre_activations", None, False, "auto", True, False)
        >>> settings = ActivationSettings(*arguments, True, True, 100, 4, 10, None, None, None)
        >>> settings.every_n_steps, settings.pre_activation_fn is torch.relu, torch.nn.Linear in settings.layer_types
        (10, True, True)
    """  # noqa: D205

    every_n_steps: int
    log_every_n_samples: int | None
    window: int
    eps: float | dict[type, float | None] | None
    dormant_tau: float
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    layer_types: tuple[type, ...]
    watch: Watch
    pre_activation_fn: Callable[[Tensor], Tensor]
    pooling: bool
    channel_dim: ChannelDim
    functional: bool
    on_validation: bool
    log_histograms: bool
    log_images: bool
    band_history: int
    band_layers: int
    images_every_n_logs: int
    dead_frac_above: float | None
    max_abs_above: float | None
    std_below: float | None

    @classmethod
    def of(cls, arguments: Mapping[str, Any]) -> "ActivationSettings":
        """The settings from a mapping that holds (at least) every field: the monitor passes its ``locals()``."""
        return cls(**{field.name: arguments[field.name] for field in fields(cls)})

    def __post_init__(self) -> None:
        set_validated(
            self,
            every_n_steps=check_int("every_n_steps", self.every_n_steps, minimum=1),
            log_every_n_samples=(
                None
                if self.log_every_n_samples is None
                else check_int("log_every_n_samples", self.log_every_n_samples, minimum=1)
            ),
            window=check_int("window", self.window, minimum=1),
            eps=check_eps(self.eps),
            dormant_tau=check_float("dormant_tau", self.dormant_tau, minimum=0.0, maximum=1.0),
            include=check_strings("include", self.include),
            exclude=check_strings("exclude", self.exclude),
            watch=check_choice("watch", self.watch, _WATCH_MODES),
            pre_activation_fn=(
                torch.relu
                if self.pre_activation_fn is None
                else check_callable("pre_activation_fn", self.pre_activation_fn)
            ),
            pooling=check_bool("pooling", self.pooling),
        )
        default_types = DEFAULT_ACTIVATION_TYPES if self.watch == "activations" else PRE_ACTIVATION_TYPES
        layer_types = default_types if self.layer_types is None else check_types("layer_types", self.layer_types)
        set_validated(
            self,
            layer_types=(*layer_types, *POOLING_TYPES) if self.pooling else layer_types,
            channel_dim=check_choice("channel_dim", self.channel_dim, _CHANNEL_DIMS),
            on_validation=check_bool("on_validation", self.on_validation),
            log_histograms=check_bool("log_histograms", self.log_histograms),
            log_images=check_bool("log_images", self.log_images),
            band_history=check_int("band_history", self.band_history, minimum=1),
            images_every_n_logs=check_int("images_every_n_logs", self.images_every_n_logs, minimum=1),
            band_layers=check_int("band_layers", self.band_layers, minimum=0),
            dead_frac_above=check_optional_float("dead_frac_above", self.dead_frac_above, 0.0, 1.0),
            max_abs_above=check_optional_float("max_abs_above", self.max_abs_above, minimum=0.0),
            std_below=check_optional_float("std_below", self.std_below, minimum=0.0),
            functional=check_bool("functional", self.functional),
        )

    def samples_per_log(self, trainer: "pl.Trainer") -> int:
        """Samples per log: ``log_every_n_samples``, or as many as span the trainer's ``log_every_n_steps`` (>= 1)."""
        return self.log_every_n_samples or max(1, log_every_n_steps(trainer) // self.every_n_steps)

    def rules(self, base: str) -> list[Rule]:
        """The alarm rules of ``dead_frac_above``, ``max_abs_above`` and ``std_below`` over the keys under ``base``."""
        rules: list[Rule] = []
        if self.dead_frac_above is not None:
            rules.append(ThresholdRule(f"{base}/*/dead_frac", above=self.dead_frac_above, name="dead_activations"))
        if self.max_abs_above is not None:
            rules.append(ThresholdRule(f"{base}/*/max_abs", above=self.max_abs_above, name="activation_explosion"))
        if self.std_below is not None:
            rules.append(ThresholdRule(f"{base}/*/std", below=self.std_below, name="activation_collapse"))
        return rules
