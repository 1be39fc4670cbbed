"""The fused, compiled statistics pass: the same numbers as the eager passes, compiled a bounded number of times,
and an eager fallback that never fails a run."""

import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lightning_deadunits.errors import DeadUnitsWarning
from lightning_deadunits.functional import activations as functional
from lightning_deadunits.functional.activations import ChannelStats, channel_stats

VALUES = st.one_of(st.sampled_from([0.0, -0.0, 1e-7, -1e-7, 3.0]), st.floats(-8, 8, width=32))


@pytest.fixture
def compiled(monkeypatch: pytest.MonkeyPatch) -> functional._FusedKernel:
    """A fresh fused kernel that compiles at the first call (the compiled code itself is cached per process)."""
    kernel = functional._FusedKernel()
    monkeypatch.setattr(functional, "_FUSED", kernel)
    monkeypatch.setattr(functional, "COMPILE_AFTER_CALLS", 0)
    monkeypatch.setattr(functional, "COMPILE_DEVICES", ("cuda", "cpu"))
    return kernel


def eager(values: torch.Tensor, channel_dim: int, eps: float | None) -> ChannelStats:
    with torch.no_grad():
        dim, _ = functional.reduction_dims(values.dim(), channel_dim)
        grid = values.reshape(int(np.prod(values.shape[:dim])), values.shape[dim], -1).float()
        return functional._eager_stats(grid, grid.numel() // grid.shape[1], eps, nonnegative=False)


def assert_same(fused: ChannelStats, reference: ChannelStats) -> None:
    assert fused.count == reference.count
    assert fused.totals.dtype == torch.float64 and fused.totals.shape == reference.totals.shape
    torch.testing.assert_close(fused.min, reference.min, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(fused.max, reference.max, rtol=0, atol=0, equal_nan=True)
    if reference.near_zero is not None:
        assert fused.near_zero is not None and fused.near_zero.tolist() == reference.near_zero.tolist()
    # float32 sums in another order: equal to float32 rounding of the sums of magnitudes.
    tolerance = float(reference.sum_abs.nan_to_num(0.0).max()) * 1e-5
    for row in ("sum", "sum_abs", "sum_sq"):
        torch.testing.assert_close(
            getattr(fused, row), getattr(reference, row), rtol=1e-5, atol=tolerance, equal_nan=True
        )


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.data(),
    channel_dim=st.sampled_from([1, -1]),
    eps=st.sampled_from([0.0, 1e-6, None]),
)
def test_fused_statistics_equal_the_eager_passes(
    compiled: functional._FusedKernel, data: st.DataObject, channel_dim: int, eps: float | None
) -> None:
    shape = data.draw(st.tuples(st.integers(2, 6), st.integers(1, 5), st.integers(2, 9)))
    array = data.draw(hnp.arrays(np.float32, shape, elements=VALUES))
    values = torch.from_numpy(array)
    assert_same(channel_stats(values, channel_dim, eps), eager(values, channel_dim, eps))
    assert compiled.variants, "the fused kernel did not run"


def test_fused_statistics_keep_nan_and_half_precision_semantics(compiled: functional._FusedKernel) -> None:
    values = torch.tensor([[[0.0, float("nan"), 0.0], [0.0, 1.0, -2.0]], [[0.0, 0.0, 0.0], [5.0, 0.0, 0.0]]])
    fused = channel_stats(values, 1, 0.0)
    assert fused.near_zero is not None and fused.near_zero.tolist() == [0, 3]  # the NaN channel counts no zero
    assert fused.max[0].isnan() and fused.max[1] == 5.0 and fused.min[1] == -2.0
    assert_same(channel_stats(values.bfloat16(), 1, 0.0), eager(values.bfloat16(), 1, 0.0))


def test_fused_kernel_compiles_once_per_layout_whatever_the_shapes(compiled: functional._FusedKernel) -> None:
    from torch._dynamo.utils import counters

    # Warm: the conv-like layout (batch and positions > 1), first with equal sizes (32 samples of 32 channels).
    for shape in [(32, 32, 4, 4), (5, 8, 3, 3), (3, 4, 6)]:
        channel_stats(torch.randn(shape), 1, 0.0)
    before = dict(counters["stats"])
    for index, shape in enumerate([(32, 64, 7, 2), (9, 2, 3, 3), (6, 33, 5), (8, 7, 2, 2, 2)]):
        values = torch.randn(shape).relu()
        assert_same(channel_stats(values, 1, eps=[0.0, 1e-6][index % 2]), eager(values, 1, [0.0, 1e-6][index % 2]))
    assert dict(counters["stats"]) == before, "new shapes or eps values recompiled the fused kernel"
    assert compiled.variants == {("cpu", torch.float32, False, False)}


def test_fused_kernel_stops_at_its_variant_budget(
    compiled: functional._FusedKernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(functional, "_MAX_VARIANTS", 1)
    channel_stats(torch.randn(3, 4, 5), 1, 0.0)
    values = torch.randn(6, 4)  # (outer, C, 1): another layout, beyond the budget: eager, same numbers
    assert_same(channel_stats(values, -1, 0.0), eager(values, -1, 0.0))
    assert compiled.variants == {("cpu", torch.float32, False, False)}


def test_a_failing_compiler_warns_once_and_falls_back_to_eager(compiled: functional._FusedKernel) -> None:
    def broken(grid: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise RuntimeError("no C++ compiler")

    compiled.kernel = broken
    values = torch.randn(4, 3, 5)
    with pytest.warns(DeadUnitsWarning, match="could not compile"):
        first = channel_stats(values, 1, 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = channel_stats(values, 1, 0.0)
    assert_same(first, eager(values, 1, 0.0))
    assert_same(second, eager(values, 1, 0.0))
    assert compiled.failed and not compiled.variants


def test_short_runs_never_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = functional._FusedKernel()
    monkeypatch.setattr(functional, "_FUSED", kernel)
    monkeypatch.setattr(functional, "COMPILE_AFTER_CALLS", 3)
    monkeypatch.setattr(functional, "COMPILE_DEVICES", ("cpu",))
    for _ in range(3):
        channel_stats(torch.randn(2, 3, 4), 1, 0.0)
    assert kernel.kernel is None
    monkeypatch.setattr(functional, "COMPILE_AFTER_CALLS", None)
    for _ in range(3):
        channel_stats(torch.randn(2, 3, 4), 1, 0.0)
    assert kernel.kernel is None


def test_cpu_activations_stay_eager_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = functional._FusedKernel()
    monkeypatch.setattr(functional, "_FUSED", kernel)
    monkeypatch.setattr(functional, "COMPILE_AFTER_CALLS", 0)
    assert "cpu" not in functional.COMPILE_DEVICES
    for _ in range(3):
        channel_stats(torch.randn(2, 3, 4), 1, 0.0)
    assert kernel.kernel is None
