"""When a reading is alarming: pure, serialisable rules that turn readings into :class:`Alarm` records."""

from lightning_deadunits.triggers.alarm import Alarm, AlarmLevel
from lightning_deadunits.triggers.loss_spike import SpikeDetector, SpikeVerdict
from lightning_deadunits.triggers.rule import Rule
from lightning_deadunits.triggers.spike_episodes import SpikeEpisodes
from lightning_deadunits.triggers.threshold import ThresholdRule
from lightning_deadunits.triggers.trend import TrendRule

__all__ = [
    "Alarm",
    "AlarmLevel",
    "Rule",
    "SpikeDetector",
    "SpikeEpisodes",
    "SpikeVerdict",
    "ThresholdRule",
    "TrendRule",
]
