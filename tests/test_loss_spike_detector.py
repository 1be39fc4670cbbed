import math
from typing import Any

import pytest

from lightning_deadunits.triggers.loss_spike import SpikeDetector, SpikeVerdict


def _feed(detector: SpikeDetector, losses: list[float], start: int = 0) -> list[SpikeVerdict]:
    return [detector.update(loss, step) for step, loss in enumerate(losses, start=start)]


def _calm(count: int) -> list[float]:
    return [1.0 + 0.05 * (i % 5) for i in range(count)]  # median 1.1, MAD 0.05, spread 0.074


def test_detector_decides_nothing_during_warmup() -> None:
    detector = SpikeDetector(window=10, warmup=5)
    verdicts = _feed(detector, [1.0, 1.0, 50.0, 1.0, 1.0])
    assert [v.reason for v in verdicts] == ["warm-up"] * 5
    assert not any(v.flagged for v in verdicts)
    assert not detector.warming_up


def test_detector_flags_a_spike_and_keeps_it_out_of_the_baseline() -> None:
    detector = SpikeDetector(window=20, warmup=10)
    _feed(detector, _calm(20))
    before = detector.baseline()
    spike = detector.update(30.0, step=20)
    assert spike.flagged and spike.spike and spike.reason == "ratio and z-score"
    assert spike.baseline == pytest.approx(1.1) and spike.loss == 30.0
    assert spike.limit is not None and 1.1 < spike.limit < 30.0
    assert detector.baseline() == before
    assert 30.0 not in detector.window
    assert detector.recent[-1] == (20, 30.0)


def test_detector_needs_both_ratio_and_z_score() -> None:
    detector = SpikeDetector(window=20, warmup=10, ratio=2.0, z_score=6.0)
    _feed(detector, _calm(20))
    verdict = detector.update(1.5, step=20)  # z = 0.4 / 0.074 = 5.4 and ratio 1.36: neither crosses
    assert verdict.score == pytest.approx(0.4 / (1.4826 * 0.05), rel=1e-4) and not verdict.flagged
    assert detector.update(2.3, step=21).ratio == pytest.approx(2.3 / 1.1)  # z 16 crosses, ratio 2.09 too
    noisy = SpikeDetector(window=20, warmup=10, ratio=2.0, z_score=6.0)
    _feed(noisy, [1.0 + (i % 5) for i in range(20)])  # median 3, MAD 1
    verdict = noisy.update(7.0, step=20)  # ratio 2.33 crosses 2, but z = 4 / 1.48 = 2.7 does not cross 6
    assert verdict.ratio is not None and verdict.ratio > 2.0 and not verdict.flagged


def test_detector_flags_nan_and_inf_always_even_in_warmup() -> None:
    detector = SpikeDetector(window=10, warmup=5)
    first = detector.update(math.nan, step=0)
    assert first.spike and first.reason == "non-finite" and first.baseline is None
    _feed(detector, _calm(10), start=1)
    verdict = detector.update(math.inf, step=11)
    assert verdict.spike and verdict.baseline is not None
    assert all(math.isfinite(loss) for loss in detector.window)


def test_detector_patience_needs_consecutive_flags() -> None:
    detector = SpikeDetector(window=20, warmup=10, patience=2)
    _feed(detector, _calm(20))
    verdicts = _feed(detector, [30.0, 1.0, 30.0, 30.0, 30.0, 30.0], start=20)
    assert [v.flagged for v in verdicts] == [True, False, True, True, True, True]
    # the second flag in a row starts the episode; while it is open every flagged batch is a spike
    assert [v.spike for v in verdicts] == [False, False, False, True, True, True]


def test_detector_takes_a_lasting_new_level_as_the_baseline() -> None:
    detector = SpikeDetector(window=10, warmup=5, rebaseline_after=4)
    _feed(detector, _calm(10))
    verdicts = _feed(detector, [10.0, 10.5, 11.0, 10.2, 10.1], start=10)
    assert [v.flagged for v in verdicts] == [True, True, True, True, False]
    assert verdicts[3].rebaselined
    assert verdicts[4].baseline == pytest.approx(10.35)


def test_a_non_finite_loss_restarts_the_count_towards_a_rebaseline() -> None:
    detector = SpikeDetector(window=10, warmup=5, rebaseline_after=3)
    _feed(detector, _calm(10))
    verdicts = _feed(detector, [10.0, 10.5, math.nan, 11.0, 10.2, 10.1], start=10)
    # three flagged finite losses in a row only after the NaN: 11.0, 10.2, 10.1
    assert [v.rebaselined for v in verdicts] == [False, False, False, False, False, True]
    assert verdicts[5].baseline is not None and verdicts[5].baseline < 2.0  # judged against the calm window


def test_detector_never_rebaselines_when_disabled() -> None:
    detector = SpikeDetector(window=10, warmup=5, rebaseline_after=None)
    _feed(detector, _calm(10))
    assert all(v.flagged for v in _feed(detector, [10.0] * 30, start=10))


def test_detector_state_dict_round_trip_continues_identically() -> None:
    losses = [*_calm(30), 9.0, 1.1, 9.5, 9.4, math.nan, 1.0]
    detector = SpikeDetector(window=12, warmup=6, patience=2, rebaseline_after=5)
    _feed(detector, losses[:31])
    restored = SpikeDetector(window=12, warmup=6, patience=2, rebaseline_after=5)
    restored.load_state_dict(detector.state_dict())
    assert restored.state_dict() == detector.state_dict()
    resumed, uninterrupted = _feed(restored, losses[31:], start=31), _feed(detector, losses[31:], start=31)
    assert [repr(v) for v in resumed] == [repr(v) for v in uninterrupted]  # repr: NaN != NaN
    assert any(v.spike for v in resumed)


def test_detector_load_state_dict_tolerates_missing_keys() -> None:
    detector = SpikeDetector()
    detector.load_state_dict({"window": [1.0, 2.0]})
    assert list(detector.window) == [1.0, 2.0] and not detector.recent


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"window": 1}, "`window` must be an int >= 2, got 1"),
        ({"warmup": 0}, "`warmup` must be an int >= 1, got 0"),
        ({"window": 10, "warmup": 11}, r"`warmup` must not exceed `window` \(10\), got 11"),
        ({"ratio": 1.0}, r"`ratio` must be a finite number in \(1.0, inf\], got 1.0"),
        ({"z_score": 0}, r"`z_score` must be a finite number in \(0.0, inf\], got 0"),
        ({"patience": 0}, "`patience` must be an int >= 1, got 0"),
        ({"rebaseline_after": 0}, "`rebaseline_after` must be an int >= 1, got 0"),
    ],
)
def test_detector_rejects_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SpikeDetector(**kwargs)


def test_verdict_to_dict_is_plain() -> None:
    verdict = SpikeDetector(window=2, warmup=1).update(1.0, step=3)
    assert verdict.to_dict()["step"] == 3 and verdict.to_dict()["reason"] == "warm-up"
