"""Loading callback states written by an older version: what is missing keeps its default, and the log says so."""

import logging
from collections.abc import Mapping
from typing import Any, Protocol

__all__: list[str] = []

log = logging.getLogger("lightning_deadunits")


class _Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...


def note_missing_keys(owner: _Stateful, given: Mapping[str, Any]) -> None:
    """Log (once per load) the state keys ``owner`` saves today that ``given`` lacks."""
    missing = sorted(set(owner.state_dict()) - set(given))
    if missing:
        log.info(
            "deadunits: the saved state of `%s` has no %s (written by an older version): their defaults are used",
            type(owner).__name__,
            ", ".join(missing),
        )
