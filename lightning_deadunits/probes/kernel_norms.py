"""What the kernel-norm monitor measures: per-filter norms of layers, heads, gates and BatchNorms; per-token norms.

Packed attention and recurrent weights are read per head and per gate; embeddings per token row.
"""

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from lightning_deadunits.functional.kernels import (
    LayerKind,
    attention_head_blocks,
    dead_kernel_masks,
    kernel_norms,
    layer_kind,
    median,
    recurrent_gate_blocks,
    weight_filter_norms,
)
from lightning_deadunits.metrics.activation_stats import CallSite
from lightning_deadunits.probes.module_kinds import (
    ATTENTION_TYPES,
    BATCHNORM_TYPES,
    DEFAULT_KERNEL_TYPES,
    EMBEDDING_TYPES,
    RECURRENT_TYPES,
    unit_count,
)
from lightning_deadunits.probes.selection import ModuleSelector
from lightning_deadunits.probes.tracing import ForwardTracer

# DEFAULT_KERNEL_TYPES lives in module_kinds; it stays importable from here, where the monitor imports it
__all__ = ["DEFAULT_KERNEL_TYPES", "KernelNormProbe", "LayerKernels"]


@dataclass
class LayerKernels:
    """One layer's reading, all tensors on the weights' device.

    Attributes:
        name: the module name.
        kind: ``conv``, ``depthwise``, ``grouped``, ``transpose``, ``linear``, ``batchnorm``, ``attention`` (one
            projection of one head), ``recurrent`` (one gate) or ``embedding`` (one row per token).
        l1: per-filter L1 norms (float32).
        l2: per-filter L2 norms (float32).
        norm_median: the median of ``l1``.
        dead_abs: ``l1 < abs_threshold``.
        dead_rel: ``l1 < rel_threshold * median``.
        dead_bn: ``|gamma| < bn_threshold`` of the BatchNorm fed by this layer, or ``None`` when none is paired.
    """

    name: str
    kind: str
    l1: Tensor
    l2: Tensor
    norm_median: Tensor
    dead_abs: Tensor
    dead_rel: Tensor
    dead_bn: Tensor | None

    @property
    def dead(self) -> Tensor:
        """Filters dead by any rule."""
        dead = self.dead_abs | self.dead_rel
        return dead if self.dead_bn is None else dead | self.dead_bn


class KernelNormProbe:
    """Finds the watched layers and their BatchNorms, and reads their per-filter norms on demand.

    BatchNorm pairing comes from data flow: during one forward (:meth:`start_pairing` ... :meth:`finish_pairing`)
    each BatchNorm whose input *is* the output tensor of a watched layer is paired with it. A BatchNorm fed by
    anything else (an activation, a sum, a layer that is not watched) stays unpaired and is reported under its own
    name; a layer with no BatchNorm after it has no ``dead_bn`` reading.

    Packed weights are read per block: ``nn.MultiheadAttention``'s query, key and value rows per head as
    ``<module>.in_proj.<q|k|v>.head<h>`` (kind ``attention``), ``nn.LSTM``/``nn.GRU``/``nn.RNN`` rows per layer,
    direction and gate as ``<module>.l<k>[_reverse].gate_<g>`` (kind ``recurrent``, each row ``[w_ih | w_hh]``), and
    ``nn.Embedding`` tables per token row (kind ``embedding``: a row is dead only by the absolute rule, since rare
    tokens are legitimately small, and the ``padding_idx`` row, zero by design, never is).

    Args:
        include: module-name globs to watch (empty: all).
        exclude: module-name globs to skip.
        layer_types: the layer classes to watch; convolutions (incl. transposed) and ``nn.Linear`` by default.

    Example:
        >>> probe = KernelNormProbe()
        >>> probe.attach(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)))
        >>> [layer for layer in probe.layers]
        ['0']
    """

    def __init__(
        self,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        layer_types: Sequence[type] = DEFAULT_KERNEL_TYPES,
    ) -> None:
        self._selector = ModuleSelector(layer_types, include, exclude)
        self._bn_selector = ModuleSelector(BATCHNORM_TYPES, include, exclude)
        self._packed_selector = ModuleSelector((*ATTENTION_TYPES, *RECURRENT_TYPES, *EMBEDDING_TYPES), include, exclude)
        self.packed: dict[str, nn.Module] = {}
        self.layers: dict[str, nn.Module] = {}
        self.kinds: dict[str, LayerKind] = {}
        self.batchnorms: dict[str, nn.Module] = {}
        self.bn_to_layer: dict[str, str] = {}
        self._tracer: ForwardTracer[str] = ForwardTracer(self._pair)
        self._paired = False

    def attach(self, model: nn.Module) -> None:
        """Find the watched layers (with a ``weight``) and affine BatchNorms of ``model``."""
        self.layers = {
            name: module
            for name, module in self._selector.select(model)
            if isinstance(module, DEFAULT_KERNEL_TYPES) and isinstance(getattr(module, "weight", None), Tensor)
        }
        self.kinds = {name: layer_kind(module) for name, module in self.layers.items()}
        self.batchnorms = {
            name: module for name, module in self._bn_selector.select(model) if getattr(module, "affine", False)
        }
        self.bn_to_layer = {bn: layer for bn, layer in self.bn_to_layer.items() if bn in self.batchnorms}
        self.packed = dict(self._packed_selector.select(model))
        self._tracer.attach(model, {**self.layers, **self.batchnorms})

    @property
    def pairing_pending(self) -> bool:
        """Whether there are BatchNorms whose producer has not been looked for yet."""
        return bool(self.batchnorms) and not self._tracer.hooks_attached and not self._paired

    def start_pairing(self) -> None:
        """Attach the hooks that record, during the next forward, which layer feeds which BatchNorm."""
        self._tracer.start()

    def finish_pairing(self) -> None:
        """Remove the pairing hooks and drop the references they held. Safe to call at any time."""
        if self._tracer.hooks_attached:
            self._paired = True
        self._tracer.stop()

    def _pair(self, site: CallSite, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> str | None:
        """Mark each layer's output with the layer; pair each BatchNorm with the layer whose output it reads."""
        name = site[0]
        if name in self.layers:
            return name
        layer = self._tracer.mark_of(inputs)
        if name not in self.bn_to_layer and layer is not None and unit_count(self.layers[layer]) == module.num_features:
            self.bn_to_layer[name] = layer
        return None

    @property
    def hooks_attached(self) -> int:
        """How many hooks this probe currently holds on the model."""
        return self._tracer.hooks_attached

    def read(self, abs_threshold: float, rel_threshold: float, bn_threshold: float) -> list[LayerKernels]:
        """Measure every watched layer now, with BatchNorm channels attributed by the pairing known so far."""
        readings = []
        for name, module in self.layers.items():
            l1, l2 = kernel_norms(module)
            dead_abs, dead_rel, layer_median = dead_kernel_masks(l1, abs_threshold, rel_threshold)
            readings.append(LayerKernels(name, self.kinds[name], l1, l2, layer_median, dead_abs, dead_rel, None))
        for name, bn in self.batchnorms.items():
            weight: Tensor = bn.weight  # type: ignore[assignment]
            gamma = weight.detach().float().abs()
            never = torch.zeros_like(gamma, dtype=torch.bool)
            readings.append(
                LayerKernels(name, "batchnorm", gamma, gamma, median(gamma), never, never, gamma < bn_threshold)
            )
        for name, module in self.packed.items():
            readings.extend(self._read_packed(name, module, abs_threshold, rel_threshold))
        return self.attribute(readings)

    @staticmethod
    def _read_packed(name: str, module: nn.Module, abs_threshold: float, rel_threshold: float) -> list[LayerKernels]:
        if isinstance(module, EMBEDDING_TYPES):
            weight: Tensor = module.weight  # type: ignore[assignment]
            l1, l2 = weight_filter_norms(weight)
            dead_abs = l1 < abs_threshold
            padding = getattr(module, "padding_idx", None)
            if padding is not None:
                dead_abs[padding] = False
            never = torch.zeros_like(dead_abs)
            return [LayerKernels(name, "embedding", l1, l2, median(l1), dead_abs, never, None)]
        kind, blocks = (
            ("attention", attention_head_blocks(module))  # type: ignore[arg-type]
            if isinstance(module, ATTENTION_TYPES)
            else ("recurrent", recurrent_gate_blocks(module))  # type: ignore[arg-type]
        )
        readings = []
        for block_name, rows in blocks.items():
            l1, l2 = weight_filter_norms(rows)
            dead_abs, dead_rel, block_median = dead_kernel_masks(l1, abs_threshold, rel_threshold)
            readings.append(LayerKernels(f"{name}.{block_name}", kind, l1, l2, block_median, dead_abs, dead_rel, None))
        return readings

    def attribute(self, readings: list[LayerKernels]) -> list[LayerKernels]:
        """Move the ``dead_bn`` mask of every paired BatchNorm reading onto the layer that feeds it.

        Readings taken before the pairing was known (the initial check) are attributed once it is.
        """
        paired_masks = {
            self.bn_to_layer[r.name]: r.dead_bn
            for r in readings
            if r.kind == "batchnorm" and r.name in self.bn_to_layer
        }
        attributed = []
        for reading in readings:
            if reading.kind == "batchnorm" and reading.name in self.bn_to_layer:
                continue
            if reading.name in paired_masks:
                reading = replace(reading, dead_bn=paired_masks[reading.name])
            attributed.append(reading)
        return attributed

    def state_dict(self) -> dict[str, Any]:
        """The pairing found so far."""
        return {"bn_to_layer": dict(self.bn_to_layer), "paired": self._paired}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the pairing, so a resumed run need not look for it again."""
        self.bn_to_layer = dict(state_dict.get("bn_to_layer", {}))
        self._paired = bool(state_dict.get("paired", False))
