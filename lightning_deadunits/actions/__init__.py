"""What to do when something is alarming."""

from lightning_deadunits.actions.alarm_handler import AlarmAction, AlarmHandler

__all__ = ["AlarmAction", "AlarmHandler"]
