import json
import math
import random
from typing import Any

import pytest

from lightning_deadunits.triggers.alarm import Alarm
from lightning_deadunits.triggers.trend import TrendRule

KEY = "deadunits/kernels/layer5.dw/dead"


def _feed(rule: TrendRule, series: list[tuple[int, float]], key: str = KEY) -> list[Alarm]:
    return [alarm for step, value in series for alarm in rule.evaluate({key: value}, step, "kernels")]


def _noisy(
    level: float, slope_per_check: float, checks: int, every: int = 100, seed: int = 0
) -> list[tuple[int, float]]:
    noise = random.Random(seed)
    return [(i * every, level + slope_per_check * i + noise.uniform(-0.2, 0.2)) for i in range(checks)]


def test_trend_rule_fires_on_the_kth_consecutive_rise() -> None:
    rule = TrendRule(KEY, rising_checks=3)
    alarms = _feed(rule, [(0, 5), (100, 5), (200, 6), (300, 7), (400, 8), (500, 8)])
    assert [alarm.step for alarm in alarms] == [400]
    (alarm,) = alarms
    assert (alarm.source, alarm.key, alarm.value, alarm.threshold, alarm.rule) == (
        "kernels",
        KEY,
        8.0,
        5.0,
        "TrendRule",
    )
    assert alarm.message == f"{KEY} rising on 3 consecutive checks, 5 -> 8 (steps 100..400)"


def test_trend_rule_projects_the_crossing_step() -> None:
    # 10, 13, 16, 19 dead kernels at steps 0..1500: ~3 per 500 steps, so 25 is reached at step 2500.
    rule = TrendRule(KEY, limit=25, horizon=1200, window=3, level="error")
    alarms = _feed(rule, [(0, 10), (500, 13), (1000, 16), (1500, 19)])
    assert [alarm.step for alarm in alarms] == [1500]  # at step 1000 the crossing is 1500 steps away
    (alarm,) = alarms
    assert (alarm.threshold, alarm.level, alarm.value) == (25.0, "error", 19.0)
    assert alarm.message == f"{KEY} rising ~3 per 500 steps, 25 projected by step 2500"


def test_trend_rule_fires_on_planted_rise_not_on_flat_noise() -> None:
    settings: dict[str, Any] = dict(rising_checks=3, min_rise=0.5, limit=14, horizon=500, window=5)
    rising, flat = TrendRule(KEY, **settings), TrendRule(KEY, **settings)
    rising_alarms = _feed(rising, _noisy(10, 0.6, 40))
    assert rising_alarms[0].step == 400  # the first check with a full window
    assert rising_alarms[0].message == f"{KEY} rising ~0.553 per 100 steps, 14 projected by step 702"
    assert _feed(flat, _noisy(10, 0.0, 200)) == []
    # Without `min_rise`, three rises in a row happen by chance in noise.
    assert _feed(TrendRule(KEY, rising_checks=3), _noisy(10, 0.0, 200))


def test_trend_rule_min_t_keeps_noisy_slopes_quiet() -> None:
    # A shallow rise buried in noise projects a crossing, but its slope is not significant.
    series = [(0, 10.0), (100, 10.4), (200, 9.9), (300, 10.5), (400, 10.1)]
    assert _feed(TrendRule(KEY, limit=10.5, horizon=1000, min_t=0.0), series)
    assert _feed(TrendRule(KEY, limit=10.5, horizon=1000, min_t=2.0), series) == []


def test_trend_rule_falling_direction() -> None:
    rule = TrendRule("deadunits/activations/*/std", limit=0.1, horizon=300, window=4, direction="falling")
    series = [(0, 1.0), (500, 0.8), (1000, 0.6), (1500, 0.4), (2000, 0.2)]
    alarms = _feed(rule, series, key="deadunits/activations/block3/std")
    assert [alarm.step for alarm in alarms] == [2000]
    assert (
        alarms[0].message == "deadunits/activations/block3/std falling ~0.2 per 500 steps, 0.1 projected by step 2250"
    )
    assert _feed(TrendRule(KEY, rising_checks=2, direction="falling"), [(0, 3), (1, 2), (2, 1)])[0].threshold == 3.0


def test_trend_rule_already_past_the_limit_fires_now() -> None:
    rule = TrendRule(KEY, limit=5, horizon=10, window=3)
    (alarm,) = _feed(rule, [(0, 4), (100, 6), (200, 8)])
    assert alarm.message.endswith("5 projected by step 200")


def test_trend_rule_ignores_nonfinite_and_replaces_a_repeated_step() -> None:
    rule = TrendRule(KEY, rising_checks=2)
    assert _feed(rule, [(0, 1), (1, math.nan), (2, 2), (2, 1.5), (3, math.inf)]) == []
    assert rule.state_dict()["history"][KEY] == [[0, 1.0], [2, 1.5]]
    assert [alarm.step for alarm in _feed(rule, [(4, 3)])] == [4]


def test_trend_rule_keeps_one_history_per_key_and_honours_cooldown() -> None:
    rule = TrendRule("deadunits/kernels/*/dead", rising_checks=1, cooldown=200)
    readings = [{"deadunits/kernels/a/dead": float(s), "deadunits/kernels/b/dead": 0.0} for s in range(5)]
    fired = [alarm.step for step, reading in enumerate(readings) for alarm in rule.evaluate(reading, step * 100, "k")]
    assert fired == [100, 300]


def test_trend_rule_state_dict_round_trip_continues_identically() -> None:
    series = _noisy(10, 0.6, 30, seed=3)
    uninterrupted = TrendRule(KEY, rising_checks=3, limit=20, horizon=800, patience=2)
    expected = [alarm.step for alarm in _feed(uninterrupted, series)]
    first = TrendRule(KEY, rising_checks=3, limit=20, horizon=800, patience=2)
    _feed(first, series[:12])
    resumed = TrendRule(KEY, rising_checks=3, limit=20, horizon=800, patience=2)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert [alarm.step for alarm in _feed(resumed, series[12:])] == [step for step in expected if step >= 1200]
    assert expected
    empty = TrendRule(KEY, rising_checks=1)
    empty.load_state_dict({})
    assert empty.state_dict() == {"streaks": {}, "last_fired": {}, "history": {}}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, r"`TrendRule` needs `rising_checks` or `limit` and `horizon`, got neither"),
        ({"limit": 1.0}, r"`limit` and `horizon` go together, got limit=1.0, horizon=None"),
        ({"horizon": 10, "rising_checks": 2}, r"`limit` and `horizon` go together, got limit=None, horizon=10"),
        ({"rising_checks": 0}, r"`rising_checks` must be an int >= 1, got 0"),
        ({"rising_checks": 2, "min_rise": -1}, r"`min_rise` must be a finite number in \[0.0, inf\], got -1"),
        ({"limit": math.nan, "horizon": 5}, r"`limit` must be a finite number in \[-inf, inf\], got nan"),
        ({"limit": 1.0, "horizon": 0}, r"`horizon` must be an int >= 1, got 0"),
        ({"rising_checks": 2, "window": 2}, r"`window` must be an int >= 3, got 2"),
        ({"rising_checks": 2, "min_t": -1.0}, r"`min_t` must be a finite number in \[0.0, inf\], got -1.0"),
        ({"rising_checks": 2, "direction": "up"}, r"`direction` must be one of 'rising', 'falling', got 'up'"),
        ({"rising_checks": 2, "level": "fatal"}, r"`level` must be one of 'info', 'warning', 'error', got 'fatal'"),
    ],
)
def test_trend_rule_rejects_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TrendRule(KEY, **kwargs)
