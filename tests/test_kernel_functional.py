import numpy as np
import pytest
import torch
from torch import nn

from lightning_deadunits.functional import dead_kernel_masks, filter_heatmaps, filter_matrix, kernel_norms, layer_kind
from lightning_deadunits.metrics import KernelDeathTracker


@pytest.mark.parametrize(
    ("module", "kind"),
    [
        (nn.Conv2d(8, 16, 3), "conv"),
        (nn.Conv2d(16, 16, 3, groups=16), "depthwise"),
        (nn.Conv2d(16, 32, 3, groups=16), "depthwise"),
        (nn.Conv2d(16, 8, 3, groups=4), "grouped"),
        (nn.Conv1d(1, 4, 3), "conv"),
        (nn.Conv3d(4, 4, 3, groups=4), "depthwise"),
        (nn.ConvTranspose2d(8, 6, 2, groups=2), "transpose"),
        (nn.ConvTranspose1d(4, 4, 2, groups=4), "transpose"),
        (nn.Linear(5, 3), "linear"),
    ],
)
def test_layer_kind_classifies(module: nn.Module, kind: str) -> None:
    assert layer_kind(module) == kind


def test_layer_kind_rejects_other_modules() -> None:
    with pytest.raises(TypeError, match=r"`module` must be a convolution or nn\.Linear, got ReLU"):
        layer_kind(nn.ReLU())


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_transpose_filter_rows_hold_the_weights_of_each_output_channel(groups: int) -> None:
    layer = nn.ConvTranspose2d(8, 12, 3, groups=groups)
    rows = filter_matrix(layer)
    assert rows.shape == (12, (8 // groups) * 9)
    in_per_group, out_per_group = 8 // groups, 12 // groups
    for out in range(12):
        group, j = divmod(out, out_per_group)
        expected = layer.weight[group * in_per_group : (group + 1) * in_per_group, j].reshape(-1)
        torch.testing.assert_close(rows[out], expected)


def test_transpose_zeroed_output_channel_is_the_one_with_zero_norm() -> None:
    layer = nn.ConvTranspose2d(4, 6, 3, groups=2)
    with torch.no_grad():
        layer.weight[2:4, 1] = 0  # group 1, its second output: channel 4
    l1, l2 = kernel_norms(layer)
    assert torch.nonzero(l1 == 0).flatten().tolist() == [4]
    assert torch.nonzero(l2 == 0).flatten().tolist() == [4]


def test_norms_match_numpy_in_float32_for_half_weights() -> None:
    layer = nn.Conv2d(3, 5, 3).half()
    l1, l2 = kernel_norms(layer)
    weights = layer.weight.detach().float().numpy().reshape(5, -1)
    assert l1.dtype == torch.float32
    np.testing.assert_allclose(l1.numpy(), np.abs(weights).sum(1), rtol=1e-6)
    np.testing.assert_allclose(l2.numpy(), np.sqrt((weights**2).sum(1)), rtol=1e-6)


def test_dead_masks_count_subnormals_and_relative_collapse() -> None:
    l1 = torch.tensor([0.0, 1e-40, 0.05, 1.0, 1.1, 0.9, 1.2, 0.95])
    dead_abs, dead_rel, median = dead_kernel_masks(l1, abs_threshold=1e-6, rel_threshold=0.1)
    assert median.item() == pytest.approx(float(np.median(l1.numpy())))
    assert dead_abs.tolist() == [True, True, False, False, False, False, False, False]
    assert dead_rel.tolist() == [True, True, True, False, False, False, False, False]


def test_zero_thresholds_count_nothing_even_exact_zeros() -> None:
    dead_abs, dead_rel, _ = dead_kernel_masks(torch.zeros(4), 0.0, 0.0)
    assert not dead_abs.any() and not dead_rel.any()


def test_heatmaps_sum_over_input_channels() -> None:
    conv = nn.Conv2d(3, 4, 3)
    maps = filter_heatmaps(conv)
    assert maps is not None and maps.shape == (4, 3, 3)
    torch.testing.assert_close(maps, conv.weight.detach().abs().sum(1))
    assert filter_heatmaps(nn.Conv1d(2, 4, 5)).shape == (4, 1, 5)  # type: ignore[union-attr]
    assert filter_heatmaps(nn.Conv3d(2, 4, 3)).shape == (4, 3, 3)  # type: ignore[union-attr]
    assert filter_heatmaps(nn.ConvTranspose2d(4, 6, 2, groups=2)).shape == (6, 2, 2)  # type: ignore[union-attr]
    assert filter_heatmaps(nn.Linear(3, 4)) is None


def test_tracker_records_death_step_and_revivals() -> None:
    tracker = KernelDeathTracker()
    new, revived = tracker.update("conv", torch.tensor([False, True, False]), step=10)
    assert (int(new), int(revived)) == (1, 0)
    new, revived = tracker.update("conv", torch.tensor([True, True, False]), step=20)
    assert (int(new), int(revived)) == (1, 0)
    assert tracker.dead_since["conv"].tolist() == [20, 10, -1]
    new, revived = tracker.update("conv", torch.tensor([True, False, False]), step=30)
    assert (int(new), int(revived)) == (0, 1)
    assert tracker.dead_since["conv"].tolist() == [20, -1, -1]
    restored = KernelDeathTracker()
    restored.load_state_dict(tracker.state_dict())
    assert restored.dead_since["conv"].tolist() == [20, -1, -1]
    assert int(restored.revived_total["conv"]) == 1
