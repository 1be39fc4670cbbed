import numpy as np
import pytest
import torch

from lightning_deadunits.functional.activations import (
    _channel_grid,
    channel_stats,
    dormant_channels,
    moments,
    reduction_dims,
)


def _reference(values: np.ndarray, channel_axis: int, eps: float) -> dict[str, np.ndarray]:
    """Per-channel statistics in float64 numpy, channel moved first."""
    per_channel = np.moveaxis(values.astype(np.float64), channel_axis, 0).reshape(values.shape[channel_axis], -1)
    return {
        "count": np.array(per_channel.shape[1]),
        "near_zero": (np.abs(per_channel) <= eps).sum(axis=1),
        "sum": per_channel.sum(axis=1),
        "sum_sq": (per_channel**2).sum(axis=1),
        "sum_abs": np.abs(per_channel).sum(axis=1),
        "min": per_channel.min(axis=1),
        "max": per_channel.max(axis=1),
    }


@pytest.mark.parametrize("nonnegative", [False, True])
@pytest.mark.parametrize(
    ("shape", "channel_dim", "channel_axis"),
    [
        ((4, 6, 5, 3), 1, 1),
        ((4, 6), 1, 1),
        ((4, 6), -1, 1),
        ((2, 7, 6), -1, 2),
        ((2, 6, 7), 1, 1),
        ((6,), 1, 0),
        ((3, 4, 8, 9), 1, 1),  # 72 positions per channel and sample: reduced along them first
        ((2, 70, 5), -1, 2),
    ],
)
def test_channel_stats_equal_numpy_per_channel(
    shape: tuple[int, ...], channel_dim: int, channel_axis: int, nonnegative: bool
) -> None:
    values = torch.randn(shape)
    if nonnegative:
        values = values.relu()
    values[values.abs() < 0.3] = 1e-7  # near zero for eps=1e-6, not for eps=0
    values.view(-1)[::7] = 0.0
    for eps in (1e-6, 0.0, 0.5):
        stats = channel_stats(values, channel_dim, eps=eps, nonnegative=nonnegative)
        expected = _reference(values.numpy(), channel_axis, eps)
        assert stats.count == expected["count"]
        assert stats.near_zero is not None
        np.testing.assert_array_equal(stats.near_zero.numpy(), expected["near_zero"])
        for field in ("sum", "sum_sq", "sum_abs", "min", "max"):
            np.testing.assert_allclose(getattr(stats, field).numpy(), expected[field], rtol=1e-6, atol=1e-5)
    without = channel_stats(values, channel_dim, eps=None, nonnegative=nonnegative)
    assert without.near_zero is None and torch.equal(without.totals, stats.totals[:3])


@pytest.mark.parametrize(
    ("shape", "memory_format"),
    [((4, 6, 5, 3), torch.channels_last), ((2, 6, 3, 4, 5), torch.channels_last_3d)],
)
def test_channels_last_activations_are_measured_in_place_with_the_same_numbers(
    shape: tuple[int, ...], memory_format: torch.memory_format
) -> None:
    values = torch.randn(shape).relu()
    strided = values.contiguous(memory_format=memory_format)
    grid = _channel_grid(strided, 1)
    # a view: reshaping channels-last memory as (N, C, positions) would copy every value first
    assert grid.data_ptr() == strided.data_ptr() and grid.shape == (values.numel() // 6, 6, 1)
    expected = _reference(values.numpy(), 1, 0.0)
    stats = channel_stats(strided, 1, eps=0.0, nonnegative=True)
    assert stats.near_zero is not None
    np.testing.assert_array_equal(stats.near_zero.numpy(), expected["near_zero"])
    for field in ("sum", "sum_sq", "sum_abs", "min", "max"):
        np.testing.assert_allclose(getattr(stats, field).numpy(), expected[field], rtol=1e-6, atol=1e-5)


def test_channel_stats_counts_negative_zero_and_skips_without_eps() -> None:
    values = torch.tensor([[0.0, -0.0, 1.0], [-0.0, 2.0, -3.0]])
    stats = channel_stats(values, channel_dim=-1, eps=0.0)
    assert stats.near_zero is not None
    assert stats.near_zero.tolist() == [2, 1, 0]
    assert channel_stats(values, channel_dim=-1, eps=None).near_zero is None


def test_channel_stats_reduce_half_precision_in_float32_and_wider() -> None:
    values = torch.full((64, 2, 32, 32), 1.0 + 2**-7, dtype=torch.bfloat16)
    stats = channel_stats(values)
    assert stats.sum.dtype == torch.float64
    # 65,536 bf16 values per channel: a bf16 accumulator would stall far below the exact sum.
    assert stats.sum.tolist() == [65536 * (1.0 + 2**-7)] * 2
    assert stats.min.dtype == torch.float32


def test_channel_stats_keep_no_graph() -> None:
    values = torch.randn(3, 4, requires_grad=True)
    stats = channel_stats(values * 2)
    assert not stats.sum.requires_grad and not stats.max.requires_grad


@pytest.mark.parametrize(
    ("ndim", "channel_dim", "match"),
    [(0, 1, "at least one dim"), (3, 2, "`channel_dim` must be 1 or -1, got 2")],
)
def test_reduction_dims_rejects(ndim: int, channel_dim: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        reduction_dims(ndim, channel_dim)


def test_channel_stats_reject_empty_tensor() -> None:
    with pytest.raises(ValueError, match="at least one element"):
        channel_stats(torch.zeros(0, 3))


def test_moments_equal_numpy() -> None:
    values = np.random.default_rng(0).normal(3.0, 2.0, size=1000)
    mean, std = moments(torch.tensor(values.sum()), torch.tensor((values**2).sum()), len(values))
    assert float(mean) == pytest.approx(values.mean(), rel=1e-12)
    assert float(std) == pytest.approx(values.std(), rel=1e-9)


def test_dormant_channels_follow_sokar_score() -> None:
    mean_abs = torch.tensor([1.0, 1.0, 1.0, 0.05, 0.0])  # layer mean 0.61: scores 1.64, ..., 0.082, 0
    assert dormant_channels(mean_abs, tau=0.1).tolist() == [False, False, False, True, True]
    assert dormant_channels(mean_abs, tau=0.0).tolist() == [False, False, False, False, True]
    assert dormant_channels(torch.zeros(3), tau=0.0).all()
    assert not dormant_channels(torch.tensor([float("nan"), 1.0]), tau=0.5)[0]


def test_channel_stats_count_a_channel_holding_a_nan_as_active() -> None:
    # `sign(NaN)` is 0, which once counted every value of such a channel as zero (a NaN layer looked dead).
    values = torch.tensor([[0.0, 0.0], [float("nan"), 0.0], [0.0, 1.0]])
    for eps in (0.0, 1e-3):
        stats = channel_stats(values, channel_dim=1, eps=eps)
        assert stats.near_zero is not None and stats.near_zero.tolist() == [0, 2]


@pytest.mark.parametrize("length", [64, 2040, 2048, 100])
def test_channel_stats_count_every_active_value_of_long_rows(length: int) -> None:
    values = torch.ones(3, 2, length)  # up to 255 ones in each byte lane of a word sum (2040), then past it
    values[1, 1, ::3] = 0.0
    values[2, 0] = -0.0
    stats = channel_stats(values, 1, eps=0.0, nonnegative=True)
    assert stats.near_zero is not None
    assert stats.near_zero.tolist() == [length, len(range(0, length, 3))]
