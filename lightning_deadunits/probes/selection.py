"""Choosing modules by name glob and by type: one rule for every probe."""

import fnmatch
import warnings
from collections.abc import Iterator, Mapping, Sequence

from torch import nn

from lightning_deadunits.errors import DeadUnitsWarning

__all__ = ["ModuleSelector", "replaced_modules", "warn_nothing_selected"]


class ModuleSelector:
    """Selects the named submodules of a model whose type is in ``types`` and whose name passes the globs.

    A module is kept when its name matches any ``include`` glob (all names when ``include`` is empty) and no
    ``exclude`` glob. Names are those of ``model.named_modules()``; the root module (name ``""``) is never kept.

    Args:
        types: the module classes to keep (subclasses count).
        include: glob patterns over module names, e.g. ``["features.*"]``.
        exclude: glob patterns over module names to drop, e.g. ``["*.downsample.*"]``.

    Example:
        >>> selector = ModuleSelector((nn.Conv2d,), include=["features.*"])
    """

    def __init__(self, types: Sequence[type], include: Sequence[str] = (), exclude: Sequence[str] = ()) -> None:
        self.types = tuple(types)
        self.include = tuple(include)
        self.exclude = tuple(exclude)

    def select(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        """Yield ``(name, module)`` for every kept module, in registration order, each module once."""
        for name, module in model.named_modules():
            if name and isinstance(module, self.types) and self.keeps(name):
                yield name, module  # type: ignore[misc]

    def keeps(self, name: str) -> bool:
        """Whether ``name`` passes the include and exclude globs."""
        included = not self.include or any(fnmatch.fnmatchcase(name, p) for p in self.include)
        return included and not any(fnmatch.fnmatchcase(name, p) for p in self.exclude)


def warn_nothing_selected(
    who: str, what: str, model: nn.Module, selector: ModuleSelector, more: str = "", advice: str = ""
) -> None:
    """Warn that the monitor ``who`` found no ``what`` to watch in ``model`` with ``selector``, so will log nothing.

    Args:
        who: the monitor's class name.
        what: what it watches (``"layer"``, ``"module"``).
        model: the model searched.
        selector: the selection that kept nothing (its types and globs are named).
        more: what else was looked for in vain (``", nor ..."``).
        advice: what to do about it (a sentence after the message).

    Example:
        >>> import pytest
        >>> with pytest.warns(DeadUnitsWarning, match="found no layer to watch in Sequential"):
        ...     warn_nothing_selected("Monitor", "layer", nn.Sequential(), ModuleSelector((nn.Conv2d,)))
    """
    warnings.warn(
        f"`{who}` found no {what} to watch in {type(model).__name__} (types {[t.__name__ for t in selector.types]}, "
        f"include={list(selector.include)}, exclude={list(selector.exclude)}){more}; it will log nothing.{advice}",
        DeadUnitsWarning,
        stacklevel=3,
    )


def replaced_modules(model: nn.Module, watched: Mapping[str, nn.Module]) -> list[str]:
    """The names in ``watched`` whose module in ``model`` is now another object, or gone (e.g. swapped by surgery).

    Example:
        >>> model = nn.Sequential(nn.ReLU())
        >>> watched = dict(model.named_children())
        >>> model[0] = nn.ReLU()
        >>> replaced_modules(model, watched)
        ['0']
    """
    current = dict(model.named_modules())
    return [name for name, module in watched.items() if current.get(name) is not module]
