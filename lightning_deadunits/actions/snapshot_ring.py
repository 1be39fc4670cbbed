"""A ring of training-state snapshots in host memory whose tensor buffers are reused from one snapshot to the next."""

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_deadunits._validation import check_int

__all__ = ["SnapshotRing", "tensor_bytes"]


@dataclass(frozen=True)
class _Tensor:
    """Where a tensor stood in a state: its index in the slot's buffers and the device it came from."""

    index: int
    device: torch.device


@dataclass
class _Slot:
    step: int = -1
    position: Any = None
    skeleton: Any = None
    buffers: list[Tensor] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(buffer.numel() * buffer.element_size() for buffer in self.buffers)


class SnapshotRing:
    """Keeps the ``keep`` latest snapshots of a nested state (dicts, lists, tuples of tensors and plain values).

    Tensors are copied into host buffers owned by the ring slot, allocated on the first snapshot of a slot and
    reused by every later one whose tensors have the same shapes and dtypes (so taking a snapshot allocates
    nothing once the ring is full). When ``pin`` is set (CUDA training) the buffers are pinned and filled with
    non-blocking copies, so taking a snapshot does not wait for the device; the copies are ordered on the current
    stream before any later kernel that could change the source tensors. Plain values are deep-copied.

    Args:
        keep: snapshots kept; the oldest is overwritten.
        pin: pin the host buffers and copy without blocking.

    Raises:
        ValueError: if ``keep < 1``.

    Example:
        >>> ring = SnapshotRing(keep=2)
        >>> ring.store(10, {"w": torch.ones(3)})
        >>> ring.latest_before(11)[0]
        10
    """

    def __init__(self, keep: int, pin: bool = False) -> None:
        self.keep = check_int("keep", keep, minimum=1)
        self.pin = pin
        self._slots: list[_Slot] = []
        self._next = 0

    @property
    def steps(self) -> list[int]:
        """The steps of the snapshots held, oldest first."""
        return sorted(slot.step for slot in self._slots)

    @property
    def nbytes(self) -> int:
        """Host bytes held by the ring's tensor buffers."""
        return sum(slot.nbytes for slot in self._slots)

    def fits(self, state: Any, max_bytes: int) -> bool:
        """Whether storing ``state`` keeps the ring within ``max_bytes`` (the slot it would overwrite freed)."""
        overwritten = self._slots[self._next].nbytes if len(self._slots) == self.keep else 0
        return self.nbytes - overwritten + tensor_bytes(state) <= max_bytes

    def clear(self) -> None:
        """Drop every snapshot and its buffers."""
        self._slots = []
        self._next = 0

    def store(self, step: int, state: Any, position: Any = None) -> None:
        """Snapshot ``state`` (taken at ``step``; ``position`` is kept as it is) in the oldest slot."""
        if len(self._slots) < self.keep:
            self._slots.append(_Slot())
        slot = self._slots[self._next]
        self._next = (self._next + 1) % self.keep
        sources: list[Tensor] = []
        skeleton = _split(state, sources)
        if [(b.shape, b.dtype) for b in slot.buffers] != [(s.shape, s.dtype) for s in sources]:
            slot.buffers = [torch.empty(s.shape, dtype=s.dtype, pin_memory=self.pin) for s in sources]
        with torch.no_grad():
            for buffer, source in zip(slot.buffers, sources, strict=True):
                buffer.copy_(source.detach(), non_blocking=self.pin)
        slot.step, slot.position, slot.skeleton = step, position, skeleton

    def latest_before(self, step: int) -> tuple[int, Any, Any] | None:
        """``(step, position, state)`` of the newest snapshot taken before ``step``, or ``None``.

        The state's tensors are fresh copies on their original devices: restoring never aliases the ring.
        """
        candidates = [slot for slot in self._slots if slot.step < step]
        if not candidates:
            return None
        slot = max(candidates, key=lambda slot: slot.step)
        if self.pin:
            torch.cuda.synchronize()  # the non-blocking copies into the buffers must have landed
        return slot.step, slot.position, _join(slot.skeleton, slot.buffers)


def tensor_bytes(state: Any) -> int:
    """The bytes of the tensors in ``state`` (what a snapshot of it takes in the ring)."""
    if isinstance(state, Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, Mapping):
        return sum(tensor_bytes(item) for item in state.values())
    if isinstance(state, (list, tuple)):
        return sum(tensor_bytes(item) for item in state)
    return 0


def _split(value: Any, tensors: list[Tensor]) -> Any:
    """``value`` with each tensor replaced by a :class:`_Tensor` marker (appending the tensor to ``tensors``)."""
    if isinstance(value, Tensor):
        tensors.append(value)
        return _Tensor(len(tensors) - 1, value.device)
    if isinstance(value, Mapping):
        return {key: _split(item, tensors) for key, item in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_split(item, tensors) for item in value)
    return copy.deepcopy(value)


def _join(skeleton: Any, buffers: list[Tensor]) -> Any:
    if isinstance(skeleton, _Tensor):
        return buffers[skeleton.index].to(skeleton.device, copy=True)
    if isinstance(skeleton, Mapping):
        return {key: _join(item, buffers) for key, item in skeleton.items()}
    if isinstance(skeleton, (list, tuple)) and not hasattr(skeleton, "_fields"):
        return type(skeleton)(_join(item, buffers) for item in skeleton)
    return copy.deepcopy(skeleton)
