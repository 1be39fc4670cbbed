"""What to do when something is alarming."""

from lightning_deadunits.actions.alarm_handler import AlarmAction, AlarmHandler
from lightning_deadunits.actions.batch_dump import BatchDumper, rng_states

__all__ = ["AlarmAction", "AlarmHandler", "BatchDumper", "rng_states"]
