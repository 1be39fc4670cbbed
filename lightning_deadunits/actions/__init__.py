"""What to do when something is alarming: one file per action, all following :class:`Action`."""

from lightning_deadunits.actions.action import Action
from lightning_deadunits.actions.alarm_handler import BUILTIN_ACTIONS, AlarmAction, AlarmHandler
from lightning_deadunits.actions.batch_dump import BatchDumper, rng_states
from lightning_deadunits.actions.call_function import CallFunction
from lightning_deadunits.actions.log_alarm import LogAlarm
from lightning_deadunits.actions.raise_alarm import RaiseAlarm
from lightning_deadunits.actions.skip_update import SkipUpdate
from lightning_deadunits.actions.stop_training import StopTraining
from lightning_deadunits.actions.warn_alarm import WarnAlarm

__all__ = [
    "BUILTIN_ACTIONS",
    "Action",
    "AlarmAction",
    "AlarmHandler",
    "BatchDumper",
    "CallFunction",
    "LogAlarm",
    "RaiseAlarm",
    "SkipUpdate",
    "StopTraining",
    "WarnAlarm",
    "rng_states",
]
