import json
import math
from typing import Any

import pytest

from lightning_deadunits.triggers.alarm import Alarm
from lightning_deadunits.triggers.threshold import ThresholdRule

KEY = "deadunits/kernels/total/dead_rel"


def _fired(rule: ThresholdRule, values: list[float], key: str = KEY, every: int = 10) -> list[int]:
    return [alarm.step for i, value in enumerate(values) for alarm in rule.evaluate({key: value}, i * every, "kernels")]


def test_threshold_rule_above_and_below_make_a_band() -> None:
    rule = ThresholdRule(KEY, above=10, below=2)
    alarms = [
        alarm for i, v in enumerate([5.0, 12.0, 1.0, 10.0, 2.0]) for alarm in rule.evaluate({KEY: v}, i, "kernels")
    ]
    assert [(alarm.step, alarm.threshold) for alarm in alarms] == [(1, 10.0), (2, 2.0)]
    assert alarms[0] == Alarm(
        "kernels", KEY, 12.0, 10.0, "warning", f"{KEY} = 12 rose above 10 at step 1", 1, "ThresholdRule"
    )
    assert alarms[1].message == f"{KEY} = 1 fell below 2 at step 2"


def test_threshold_rule_nonfinite_is_always_alarming() -> None:
    (alarm,) = ThresholdRule(KEY, below=0.5, name="nan-guard").evaluate({KEY: math.nan}, 7, "loss")
    assert (alarm.threshold, alarm.rule, alarm.message) == (0.5, "nan-guard", f"{KEY} is nan (not finite) at step 7")
    assert ThresholdRule(KEY, above=1).evaluate({KEY: -math.inf}, 0, "loss")[0].threshold == 1.0


def test_threshold_rule_patience_needs_consecutive_checks() -> None:
    rule = ThresholdRule(KEY, above=0, patience=3)
    # alarming at checks 0, 1, (reset at 2), 3, 4, 5 -> fires at 5; the streak restarts after firing.
    assert _fired(rule, [1, 1, 0, 1, 1, 1, 1, 1, 1]) == [50, 80]


def test_threshold_rule_cooldown_is_per_key_in_steps() -> None:
    rule = ThresholdRule("deadunits/kernels/*/dead", above=0, cooldown=25)
    readings = {"deadunits/kernels/a/dead": 1.0, "deadunits/kernels/b/dead": 1.0, "deadunits/other": 9.0}
    fired = [(a.key, a.step) for step in range(0, 60, 10) for a in rule.evaluate(readings, step, "kernels")]
    assert fired == [(k, s) for s in (0, 30) for k in ("deadunits/kernels/a/dead", "deadunits/kernels/b/dead")]


def test_threshold_rule_matches_any_of_several_globs() -> None:
    rule = ThresholdRule(["*/a/dead", "*/total/*"], above=0)
    assert rule.matches("deadunits/kernels/a/dead") and rule.matches(KEY)
    assert not rule.matches("deadunits/kernels/b/dead")


def test_threshold_rule_state_dict_round_trip_keeps_streaks_and_cooldowns() -> None:
    rule = ThresholdRule(KEY, above=0, patience=2, cooldown=100)
    assert _fired(rule, [1, 1, 1]) == [10]
    restored = ThresholdRule(KEY, above=0, patience=2, cooldown=100)
    restored.load_state_dict(json.loads(json.dumps(rule.state_dict())))
    assert restored.state_dict() == rule.state_dict() == {"streaks": {KEY: 1}, "last_fired": {KEY: 10}}
    # step 30 completes the streak but is cooling (30 - 10 < 100); step 110 fires.
    assert [a.step for step in (30, 110, 120) for a in restored.evaluate({KEY: 1.0}, step, "k")] == [110]


def test_alarm_dict_round_trip() -> None:
    alarm = Alarm("loss", "deadunits/loss/spike", 9.5, 3.0, "error", "spike", 12, "spike")
    assert Alarm.from_dict(json.loads(json.dumps(alarm.to_dict()))) == alarm


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({}, ValueError, r"`ThresholdRule` needs `above` or `below`, got neither"),
        ({"above": 1, "below": 2}, ValueError, r"`below` must not exceed `above`, got below=2, above=1"),
        ({"above": math.inf}, ValueError, r"`above` must be a finite number in \[-inf, inf\], got inf"),
        ({"below": "x"}, ValueError, r"`below` must be a finite number in \[-inf, inf\], got 'x'"),
        ({"above": 1, "level": "fatal"}, ValueError, r"`level` must be one of 'info', 'warning', 'error', got 'fatal'"),
        ({"above": 1, "patience": 0}, ValueError, r"`patience` must be an int >= 1, got 0"),
        ({"above": 1, "cooldown": -1}, ValueError, r"`cooldown` must be an int >= 0, got -1"),
        ({"above": 1, "keys": 3}, TypeError, r"`keys` must be a string or a list of strings, got 3"),
    ],
)
def test_threshold_rule_rejects_bad_arguments(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    arguments = {"keys": KEY, **kwargs}
    with pytest.raises(error, match=match):
        ThresholdRule(**arguments)
