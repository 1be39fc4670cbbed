"""Comparing callback states: tensors by dtype, shape and value; containers element by element."""

from typing import Any

import torch


def identical(a: Any, b: Any) -> bool:
    """Whether two states (nested dicts, lists, tuples, tensors, plain values) are equal, tensors exactly."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(identical(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)
