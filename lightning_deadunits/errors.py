"""Errors and warnings raised by lightning-deadunits."""

__all__ = ["DeadUnitsError", "DeadUnitsWarning"]


class DeadUnitsError(RuntimeError):
    """Raised by an alarm whose action is ``"raise"``, on every rank at the same step."""


class DeadUnitsWarning(UserWarning):
    """Warned when a monitor cannot do part of its work and carries on without it."""
