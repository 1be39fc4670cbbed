"""Residual-block lesions (Veit et al. 2016): how much loss and accuracy each block carries on held-out batches."""

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.classification import multiclass_accuracy

from lightning_deadunits._validation import check_callable, check_int, check_strings
from lightning_deadunits.probes.selection import ModuleSelector

__all__ = [
    "BlockLesionProbe",
    "LesionMetric",
    "LesionResult",
    "LesionStep",
    "default_lesion_step",
    "lesion_blocks",
    "reads_default_batch",
]

LesionStep = Callable[[nn.Module, Any], tuple[Tensor, Tensor | None, Tensor | None]]
"""``step(model, batch) -> (loss, logits, targets)``: the batch's mean loss, and what the metrics read (or None)."""

LesionMetric = Callable[[Tensor, Tensor], Tensor]

_DEFAULT_CLASS_WORDS = ("block", "bottleneck")


def reads_default_batch(batch: Any) -> bool:
    """Whether :func:`default_lesion_step` can read ``batch``: a tuple or list starting with two tensors."""
    return isinstance(batch, (tuple, list)) and len(batch) >= 2 and all(isinstance(b, Tensor) for b in batch[:2])


def default_lesion_step(model: nn.Module, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
    """The default protocol: ``batch`` is ``(x, y, ...)``, logits are ``model(x)``, the loss is cross-entropy.

    Raises:
        TypeError: if ``batch`` is not a tuple or list whose first two items are tensors.
    """
    if not reads_default_batch(batch):
        raise TypeError(
            "the default lesion protocol needs batches `(inputs, targets, ...)` of tensors, got "
            f"{type(batch).__name__}; define `lesion_loss(batch) -> (loss, logits, targets)` on the module instead."
        )
    logits = model(batch[0])
    return F.cross_entropy(logits, batch[1]), logits, batch[1]


def _accuracy(logits: Tensor, targets: Tensor) -> Tensor:
    """Multiclass accuracy over the class dimension 1; NaN when the shapes do not fit a classifier."""
    classifier_shapes = (
        logits.dim() >= 2
        and not targets.is_floating_point()
        and targets.shape == logits.shape[:1] + logits.shape[2:]
        and logits.shape[1] >= 2
    )
    if not classifier_shapes:
        return logits.new_full((), math.nan)
    return multiclass_accuracy(logits, targets, num_classes=logits.shape[1], average="micro", validate_args=False)


@dataclass
class LesionResult:
    """What lesioning each block did, with the batches' totals.

    Attributes:
        baseline: ``{"loss": ..., <metric>: ...}`` of the intact model (sample-weighted means).
        deltas: ``{block: {"loss": ..., <metric>: ...}}``: lesioned minus intact, for every lesioned block.
        skipped: ``{candidate: why}`` for candidates that were not lesioned (e.g. downsampling blocks).
    """

    baseline: dict[str, float]
    deltas: dict[str, dict[str, float]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A plain copy, for checkpoints."""
        return {"baseline": dict(self.baseline), "deltas": dict(self.deltas), "skipped": dict(self.skipped)}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> "LesionResult":
        """Inverse of :meth:`to_dict`."""
        return cls(dict(state.get("baseline", {})), dict(state.get("deltas", {})), dict(state.get("skipped", {})))


class BlockLesionProbe:
    r"""Lesions residual blocks one at a time: each block's output is replaced by its input, the batches rerun.

    **Candidates** are the modules whose name matches a ``blocks`` glob (exact names are globs too) and no
    ``exclude`` glob; with no ``blocks`` they are the modules whose class name contains ``Block`` or
    ``Bottleneck`` (case-insensitive: torchvision's ``BasicBlock`` and ``Bottleneck``, most hand-written
    ``ResBlock``\ s). ``*`` in a glob matches dots too, so ``layer?.?`` rather than ``layer*.*`` picks torchvision
    blocks without their convolutions. **Lesionable** are the candidates whose output had exactly their first
    input's shape in every batch of the intact pass; the others (downsampling blocks, blocks never called, blocks
    not taking and returning one tensor) are skipped with the reason in :attr:`skipped`.

    The protocol for each batch is ``step(model, batch) -> (loss, logits, targets)``: ``loss`` is the batch's mean
    loss, and each metric ``metric(logits, targets)`` gives the batch's mean value (both weighted by the batch
    size, ``len(targets)``, so the totals are exact sample means). The default metric, ``accuracy``
    (torchmetrics' multiclass accuracy over dimension 1), is counted only for batches whose logits and integer
    targets have classifier shapes; a metric returning NaN for a batch skips that batch.

    Every pass runs under ``torch.no_grad()`` with the model in eval mode (its training flag is restored), and
    every hook is removed before returning, whatever happens. The sums stay on the model's device.

    Args:
        blocks: globs over module names selecting the candidates (empty: class names with Block/Bottleneck).
        exclude: globs over module names to leave out.
        metrics: ``{name: metric(logits, targets) -> 0-d tensor}``; ``None`` is ``{"accuracy": ...}``.

    Raises:
        TypeError: if a glob is not a string or a metric is not callable.
        ValueError: if a metric is named ``loss`` or contains ``/``.

    Example:
        >>> probe = BlockLesionProbe(blocks=["layer?.?"])
    """

    def __init__(
        self,
        blocks: Sequence[str] = (),
        exclude: Sequence[str] = (),
        metrics: Mapping[str, LesionMetric] | None = None,
    ) -> None:
        self.block_globs = check_strings("blocks", blocks)
        self.exclude = check_strings("exclude", exclude)
        self.metrics: dict[str, LesionMetric] = {"accuracy": _accuracy} if metrics is None else dict(metrics)
        for name, metric in self.metrics.items():
            if not isinstance(name, str) or not name or name == "loss" or "/" in name:
                raise ValueError(
                    f"`metrics` names must be non-empty strings other than 'loss', without '/', got {name!r}."
                )
            check_callable(f"metrics[{name!r}]", metric)
        self._selector = ModuleSelector((nn.Module,), self.block_globs, self.exclude)
        self.skipped: dict[str, str] = {}

    @property
    def stats(self) -> list[str]:
        """The column names of a sums row: ``loss`` then the metrics."""
        return ["loss", *self.metrics]

    def candidates(self, model: nn.Module) -> dict[str, nn.Module]:
        """The candidate blocks of ``model``, in registration order."""
        return {
            name: module
            for name, module in self._selector.select(model)
            if self.block_globs or any(word in type(module).__name__.lower() for word in _DEFAULT_CLASS_WORDS)
        }

    def run(
        self, model: nn.Module, batches: Sequence[Any], step: LesionStep, candidates: Mapping[str, nn.Module]
    ) -> Tensor:
        """Sums ``(1 + len(candidates), 2 * (1 + len(metrics)))`` on the model's device, columns
        ``[sum, count]`` per stat: row 0 the intact model, row ``1 + i`` candidate ``i`` lesioned (zeros when it
        was skipped). Rows of sums, not means, so that ranks can add theirs up.
        """  # noqa: D205
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                intact, lesionable = self._intact_pass(model, batches, step, candidates)
                rows: list[Tensor | None] = [intact]
                for name, module in candidates.items():
                    rows.append(self._lesioned_pass(model, batches, step, module) if name in lesionable else None)
        finally:
            model.train(was_training)
        zeros = torch.zeros_like(intact)
        return torch.stack([zeros if row is None else row for row in rows])

    def summarise(self, sums: Sequence[Sequence[float]], names: Sequence[str]) -> LesionResult:
        """Turn (reduced, host) sums from :meth:`run` into means and deltas; a block whose row counted nothing
        for a stat gets no delta for it, one that counted nothing at all is skipped.
        """  # noqa: D205
        baseline = _means(sums[0], self.stats)
        deltas = {}
        for name, row in zip(names, sums[1:], strict=True):
            lesioned = _means(row, self.stats)
            if not lesioned:
                self.skipped.setdefault(name, "not lesioned on any rank")
                continue
            deltas[name] = {stat: lesioned[stat] - baseline[stat] for stat in lesioned if stat in baseline}
        skipped = {name: reason for name, reason in self.skipped.items() if name not in deltas}
        return LesionResult(baseline, deltas, skipped)

    def _intact_pass(
        self, model: nn.Module, batches: Sequence[Any], step: LesionStep, candidates: Mapping[str, nn.Module]
    ) -> tuple[Tensor, set[str]]:
        """One pass of the intact model that also records which candidates kept their input's shape."""
        self.skipped = {name: "not called in the forward" for name in candidates}
        shape_kept: dict[str, bool] = {}
        handles = [
            module.register_forward_hook(self._record_shapes(name, shape_kept)) for name, module in candidates.items()
        ]
        try:
            sums = self._pass(model, batches, step)
        finally:
            for handle in handles:
                handle.remove()
        lesionable = {name for name, kept in shape_kept.items() if kept}
        for name in lesionable:
            del self.skipped[name]
        return sums, lesionable

    def _record_shapes(self, name: str, shape_kept: dict[str, bool]) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
            if not inputs or not isinstance(inputs[0], Tensor) or not isinstance(output, Tensor):
                shape_kept[name] = False
                self.skipped[name] = "does not take and return one tensor"
            elif inputs[0].shape != output.shape:
                shape_kept[name] = False
                self.skipped[name] = (
                    f"output shape {tuple(output.shape)} differs from input shape {tuple(inputs[0].shape)} "
                    "(downsampling block)"
                )
            else:
                shape_kept.setdefault(name, True)

        return hook

    def _lesioned_pass(self, model: nn.Module, batches: Sequence[Any], step: LesionStep, block: nn.Module) -> Tensor:
        handle = block.register_forward_hook(_pass_input_through)
        try:
            return self._pass(model, batches, step)
        finally:
            handle.remove()

    def _pass(self, model: nn.Module, batches: Sequence[Any], step: LesionStep) -> Tensor:
        rows: list[Tensor] = []
        for batch in batches:
            loss, logits, targets = step(model, batch)
            size = float(_batch_size(logits, targets))
            loss = loss.detach().float()
            columns = [loss * size, torch.full_like(loss, size)]
            for metric in self.metrics.values():
                value = metric(logits, targets).detach().float() if logits is not None and targets is not None else None
                # a NaN metric means "not counted for this batch", unlike a NaN loss, which must show
                counted = torch.zeros_like(loss, dtype=torch.bool) if value is None else ~value.isnan()
                value = torch.zeros_like(loss) if value is None else value
                columns += [torch.where(counted, value * size, 0.0), counted.float() * size]
            rows.append(torch.stack(columns))
        if not rows:
            raise ValueError("`batches` is empty: the lesion probe needs at least one batch.")
        return torch.stack(rows).sum(dim=0)


def _pass_input_through(module: nn.Module, inputs: tuple[Any, ...], output: Any) -> Any:
    """Forward hook making a block the identity (only installed on blocks whose output has the input's shape)."""
    return inputs[0]


def _batch_size(logits: Tensor | None, targets: Tensor | None) -> int:
    for tensor in (targets, logits):
        if tensor is not None and tensor.dim() > 0:
            return int(tensor.shape[0])
    return 1


def _means(row: Sequence[float], stats: Sequence[str]) -> dict[str, float]:
    return {stat: row[2 * i] / row[2 * i + 1] for i, stat in enumerate(stats) if row[2 * i + 1] > 0}


def lesion_blocks(
    model: nn.Module,
    batches: Iterable[Any],
    step: LesionStep | None = None,
    blocks: Sequence[str] = (),
    exclude: Sequence[str] = (),
    max_batches: int | None = None,
    metrics: Mapping[str, LesionMetric] | None = None,
) -> LesionResult:
    """Lesion every residual block of ``model`` in turn over ``batches`` and return the deltas (plain-function
    form of :class:`~lightning_deadunits.BlockLesion`; see :class:`BlockLesionProbe` for the protocol).

    Args:
        model: the network, with its batches' device.
        batches: batches for ``step`` (e.g. a validation ``DataLoader``); at most ``max_batches`` are used.
        step: ``step(model, batch) -> (loss, logits, targets)``; default :func:`default_lesion_step`.
        blocks: globs over module names selecting the candidate blocks (empty: Block/Bottleneck class names).
        exclude: globs over module names to leave out.
        max_batches: how many batches to use (``None``: all).
        metrics: ``{name: metric(logits, targets)}``; ``None`` is multiclass accuracy.

    Returns:
        The intact loss and metrics, the deltas (lesioned minus intact) per block and the skipped candidates.

    Raises:
        ValueError: if ``max_batches`` is below 1 or there are no batches.
        TypeError: on a wrongly typed argument, or a batch the default step cannot read.

    Example:
        >>> result = lesion_blocks(model, val_loader, max_batches=8)  # doctest: +SKIP
        >>> result.deltas["layer1.1"]["loss"]  # doctest: +SKIP
    """  # noqa: D205
    if max_batches is not None:
        check_int("max_batches", max_batches, minimum=1)
    step = default_lesion_step if step is None else check_callable("step", step)
    probe = BlockLesionProbe(blocks, exclude, metrics)
    chosen: list[Any] = []
    for batch in batches:
        if max_batches is not None and len(chosen) >= max_batches:
            break
        chosen.append(batch)
    candidates = probe.candidates(model)
    sums = probe.run(model, chosen, step, candidates)
    return probe.summarise(sums.double().cpu().tolist(), list(candidates))
