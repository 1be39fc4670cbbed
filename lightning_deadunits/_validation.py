"""Argument checks shared by every public class: one message shape for every bad value."""

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

__all__: list[str] = []

_T = TypeVar("_T")


def set_validated(settings: object, **values: Any) -> None:
    """Replace fields of a frozen settings dataclass by their validated values, from its ``__post_init__``.

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass(frozen=True)
        ... class Settings:
        ...     every_n_steps: int
        ...     def __post_init__(self):
        ...         set_validated(self, every_n_steps=check_int("every_n_steps", self.every_n_steps, minimum=1))
        >>> Settings(0)
        Traceback (most recent call last):
        ...
        ValueError: `every_n_steps` must be an int >= 1, got 0.
    """
    for name, value in values.items():
        object.__setattr__(settings, name, value)


def check_int(name: str, value: Any, minimum: int = 0) -> int:
    """Return ``value`` if it is an int >= ``minimum``; raise a ``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
    return value


def check_float(
    name: str,
    value: Any,
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    min_inclusive: bool = True,
    max_inclusive: bool = True,
) -> float:
    """Return ``value`` as a float if it is a finite number in the given range; raise ``ValueError`` otherwise."""
    low = "-inf" if minimum is None else f"{minimum}"
    high = "inf" if maximum is None else f"{maximum}"
    interval = f"{'[' if min_inclusive else '('}{low}, {high}{']' if max_inclusive else ')'}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number in {interval}, got {value!r}.")
    number = float(value)
    below = minimum is not None and (number < minimum if min_inclusive else number <= minimum)
    above = maximum is not None and (number > maximum if max_inclusive else number >= maximum)
    if below or above:
        raise ValueError(f"`{name}` must be a finite number in {interval}, got {value!r}.")
    return number


def check_optional_float(
    name: str, value: Any, minimum: float | None = None, maximum: float | None = None
) -> float | None:
    """Like :func:`check_float`, but ``None`` passes through (the feature is off)."""
    return None if value is None else check_float(name, value, minimum, maximum)


def check_choice(name: str, value: Any, choices: Sequence[_T]) -> _T:
    """Return ``value`` if it is one of ``choices``; raise ``ValueError`` listing them otherwise."""
    if value not in choices:
        allowed = ", ".join(repr(choice) for choice in choices)
        raise ValueError(f"`{name}` must be one of {allowed}, got {value!r}.")
    return value  # type: ignore[no-any-return]


def check_bool(name: str, value: Any) -> bool:
    """Return ``value`` if it is a bool; raise ``TypeError`` otherwise."""
    if not isinstance(value, bool):
        raise TypeError(f"`{name}` must be a bool, got {value!r}.")
    return value


def check_strings(name: str, value: Any) -> tuple[str, ...]:
    """Return a tuple of strings from a string or an iterable of strings; raise ``TypeError`` otherwise."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, Iterable):
        items = tuple(value)
        if all(isinstance(item, str) for item in items):
            return items
    raise TypeError(f"`{name}` must be a string or a list of strings, got {value!r}.")


def check_types(name: str, value: Any) -> tuple[type, ...]:
    """Return a tuple of classes from a class or an iterable of classes; raise ``TypeError`` otherwise."""
    items = (value,) if isinstance(value, type) else value
    if isinstance(items, Iterable) and not isinstance(items, str):
        classes = tuple(items)
        if all(isinstance(item, type) for item in classes):
            return classes
    raise TypeError(f"`{name}` must be a class or a list of classes, got {value!r}.")


def check_callable(name: str, value: Any) -> Callable[..., Any]:
    """Return ``value`` if it is callable; raise ``TypeError`` otherwise."""
    if not callable(value):
        raise TypeError(f"`{name}` must be callable, got {value!r}.")
    return value  # type: ignore[no-any-return]


def check_prefix(prefix: Any) -> str:
    """Return ``prefix`` if it can start logged keys; raise ``ValueError`` otherwise.

    Raises:
        ValueError: if ``prefix`` is not a non-empty string without leading or trailing ``/``.
    """
    if not isinstance(prefix, str) or not prefix or prefix.startswith("/") or prefix.endswith("/"):
        raise ValueError(f"`prefix` must be a non-empty string without leading or trailing '/', got {prefix!r}.")
    return prefix


def check_eps(value: Any) -> float | dict[type, float | None] | None:
    """``eps`` is ``None``, a number >= 0, or ``{module class: number >= 0 or None}``.

    Raises:
        TypeError: for anything else than numbers, classes and ``None`` in those places.
        ValueError: for a negative or non-finite number.
    """
    message = "`eps` must be None, a number >= 0, or a mapping {{module class: number >= 0 or None}}, got {!r}."
    if value is None:
        return None
    if isinstance(value, Mapping):
        table: dict[type, float | None] = {}
        for cls, eps in value.items():
            if not isinstance(cls, type):
                raise TypeError(message.format({cls: eps}))
            table[cls] = None if eps is None else _tolerance(eps, message.format({cls: eps}))
        return table
    return _tolerance(value, message.format(value))


def _tolerance(value: Any, message: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(message)
    if not math.isfinite(value) or value < 0:
        raise ValueError(message)
    return float(value)
