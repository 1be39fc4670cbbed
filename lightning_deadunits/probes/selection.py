"""Choosing modules by name glob and by type: one rule for every probe."""

import fnmatch
from collections.abc import Iterator, Mapping, Sequence

from torch import nn

__all__ = ["ModuleSelector", "replaced_modules"]


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
