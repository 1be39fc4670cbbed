"""What the gradient-norm monitor measures: per-layer and global gradient L2 norms, and rows whose gradient is 0.

Read in ``on_before_optimizer_step``: after AMP unscaling and gradient accumulation (and, under DDP, after the
all-reduce, so every rank reads the same numbers), before clipping. Everything stays on the device; the
monitor moves one stacked tensor to the host when it logs.
"""

import itertools
import operator
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn

from lightning_deadunits._compat import foreach_norms
from lightning_deadunits.functional.kernels import weight_filter_norms
from lightning_deadunits.probes.kernel_norms import DEFAULT_KERNEL_TYPES
from lightning_deadunits.probes.selection import ModuleSelector

__all__ = ["GradNormProbe"]

_NEVER = -1


class GradNormProbe:
    """Reads gradient norms of the watched layers (convolutions and ``nn.Linear`` by default) and of the model.

    Per layer: the L2 norm of its weight and bias gradients together, and per output filter (conv) or row (linear)
    whether its weight gradient is exactly 0. A row whose gradient stayed 0 on each of the last ``window``
    samples is *gradient-dead*: nothing downstream asks it to change (a dead ReLU unit, a unit behind a zero gamma),
    found without activation hooks. Layers without gradients (frozen) are not reported.

    The sums of a logging period are kept on the device: :meth:`sample` adds one step, :meth:`summary` returns the
    period's mean norms and the gradient-dead masks and starts a new period.

    Args:
        include: module-name globs to watch (empty: all).
        exclude: module-name globs to skip.
        layer_types: layer classes to watch.

    Example:
        >>> model = nn.Linear(3, 2)
        >>> model(torch.ones(1, 3)).sum().backward()
        >>> probe = GradNormProbe()
        >>> probe.attach(nn.Sequential(model))
        >>> probe.sample()
        >>> norms, total, dead = probe.summary(window=5)
        >>> round(float(norms["0"]), 4), dead["0"].tolist()
        (2.8284, [False, False])
    """

    def __init__(
        self,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        layer_types: Sequence[type] = DEFAULT_KERNEL_TYPES,
    ) -> None:
        self._selector = ModuleSelector(layer_types, include, exclude)
        self.layers: dict[str, nn.Module] = {}
        self.parameters: list[Tensor] = []
        self.samples = 0
        self._period = 0
        self._squares: dict[str, Tensor] = {}
        self._total_squares: Tensor | None = None
        self._last_nonzero: dict[str, Tensor] = {}
        self._layout_for: tuple[bool, ...] | None = None
        self._layout: tuple[list[str], list[int]] = ([], [])
        self._device_layout: tuple[Tensor, Tensor, int] | None = None  # the indices, a 0 and their device index

    def attach(self, model: nn.Module) -> None:
        """Find the watched layers (with a weight) and every parameter of ``model``."""
        self.layers = {
            name: module
            for name, module in self._selector.select(model)
            if isinstance(getattr(module, "weight", None), Tensor)
        }
        self.parameters = list(model.parameters())
        self._layout_for = None

    def sample(self) -> None:
        """Add the current gradients to the period (device operations only)."""
        squares = self._squares_now()
        if squares is None:
            return
        total, layer_squares, names = squares
        self._total_squares = total if self._total_squares is None else self._total_squares + total
        for name, square in zip(names, layer_squares.unbind(), strict=True):
            self._squares[name] = self._squares[name] + square if name in self._squares else square
        for name in names:
            module = self.layers[name]
            weight: Tensor = module.weight  # type: ignore[assignment]
            assert weight.grad is not None
            grad = weight.grad.detach()
            groups, transposed = getattr(module, "groups", 1), getattr(module, "transposed", False)
            nonzero = weight_filter_norms(grad, groups, transposed)[0] > 0
            last = self._last_nonzero.get(name)
            if last is None or last.shape != nonzero.shape:
                last = torch.full(nonzero.shape, _NEVER, dtype=torch.long, device=nonzero.device)
            last = last.to(nonzero.device)
            self._last_nonzero[name] = torch.where(nonzero, torch.full_like(last, self.samples), last)
        self.samples += 1
        self._period += 1

    def summary(self, window: int) -> tuple[dict[str, Tensor], Tensor | None, dict[str, Tensor]]:
        """The period's mean per-layer norms, mean global norm and gradient-dead masks (device tensors); resets the
        period. Until ``window`` samples have been seen, a row is dead if its gradient was 0 on every sample so far.
        """  # noqa: D205
        if not self._period:
            return {}, None, {}
        period = float(self._period)
        norms = {name: (squares / period).sqrt() for name, squares in self._squares.items()}
        total = None if self._total_squares is None else (self._total_squares / period).sqrt()
        oldest = max(0, self.samples - window)
        dead = {name: last < oldest for name, last in self._last_nonzero.items() if name in norms}
        self._squares, self._total_squares, self._period = {}, None, 0
        return norms, total, dead

    def step_norms(self) -> tuple[Tensor, list[str]] | None:
        """This step's global gradient norm and per-layer norms, stacked in one device tensor (no host sync).

        Returns:
            ``(norms, layers)``: ``norms[0]`` is the global norm, ``norms[1 + i]`` the norm of ``layers[i]`` (weight
            and bias gradients together), in float32; ``None`` when no parameter has a gradient. Does not touch the
            period.
        """
        squares = self._squares_now()
        if squares is None:
            return None
        total, layer_squares, names = squares
        return torch.cat([total.reshape(1), layer_squares]).sqrt(), names

    def _squares_now(self) -> tuple[Tensor, Tensor, list[str]] | None:
        """The squared global norm, the squared norms of the layers whose weight has a gradient (one tensor, in
        float32 whatever the gradients' dtype) and those layers' names; ``None`` when no parameter has a gradient.

        One batched norm over every gradient, whose squares the layers then gather: a
        handful of device operations whatever the model's size, and no host sync.
        """  # noqa: D205
        found = self._present()
        if found is None:
            return None
        grads, (names, pairs) = found
        layout = self._device_layout
        if layout is None or layout[2] != grads[0].get_device():
            # Built again only when the layout or the device changes: the indices reach the device then.
            device = grads[0].device
            index = torch.tensor(pairs, dtype=torch.long, device=device)
            zero = torch.zeros((), dtype=torch.float32, device=device)
            layout = self._device_layout = index, zero, index.get_device()
        index, zero, _ = layout
        with torch.no_grad():
            # One more entry, 0: what a layer without a bias gradient adds.
            squares = torch.stack([*foreach_norms(grads), zero]).square_()
            # A gather, not a scatter: deterministic on every device; each layer sums its (weight, bias) pair.
            layer_squares = squares.index_select(0, index).view(-1, 2).sum(1)
            return squares.sum(), layer_squares, names

    def _present(self) -> tuple[list[Tensor], tuple[list[str], list[int]]] | None:
        """The gradients present now and the watched layers' layout among them (see :meth:`_plan`), or
        ``None``; the layout is built again only when the set of parameters with gradients changes.
        """  # noqa: D205
        # Read again each step: Lightning's `zero_grad` sets gradients to None, so every step brings new tensors.
        every_grad = [param.grad for param in self.parameters]
        present = tuple(map(operator.is_not, every_grad, itertools.repeat(None)))
        if self._layout_for != present:
            self._layout_for, self._layout, self._device_layout = present, self._plan(present), None
        if False not in present:  # usually every parameter has a gradient
            return cast("list[Tensor]", every_grad), self._layout
        grads = [grad for grad in every_grad if grad is not None]
        return (grads, self._layout) if grads else None

    def _plan(self, present: tuple[bool, ...]) -> tuple[list[str], list[int]]:
        """The watched layers with a weight gradient, and where their weight and bias gradients sit among the
        present ones, as flat (weight, bias) position pairs; a layer without a bias gradient points after them.
        """  # noqa: D205
        present_params = [param for param, has_grad in zip(self.parameters, present, strict=True) if has_grad]
        position = {id(param): k for k, param in enumerate(present_params)}
        names: list[str] = []
        pairs: list[int] = []
        for name, module in self.layers.items():
            if id(module.weight) not in position:
                continue
            names.append(name)
            pairs += [position[id(module.weight)], position.get(id(getattr(module, "bias", None)), len(position))]
        return names, pairs

    def state_dict(self) -> dict[str, Any]:
        """The sample count and each row's last sample with a nonzero gradient (the gradient-dead window)."""
        return {"samples": self.samples, "last_nonzero": {n: t.cpu() for n, t in self._last_nonzero.items()}}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; missing keys keep their defaults."""
        self.samples = int(state_dict.get("samples", 0))
        self._last_nonzero = {n: t.clone() for n, t in state_dict.get("last_nonzero", {}).items()}
