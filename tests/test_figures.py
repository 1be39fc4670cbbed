import subprocess
import sys
from itertools import pairwise

import numpy as np
import pytest
from matplotlib.collections import Collection, PatchCollection, QuadMesh
from matplotlib.figure import Figure
from matplotlib.image import AxesImage
from matplotlib.patches import Patch
from matplotlib.text import Text

from lightning_deadunits.panels.render import band_chart, bar_chart, heatmap_grid, png_bytes, series_chart, shorten

RULES = {
    "abs: L1 < 1e-06": [0, 2, 1],
    "rel: L1 < 0.1 x layer median": [1, 3, 0],
    "BatchNorm: |gamma| < 0.001": [0, 0, 1],
}


def _texts(figure: Figure) -> list[str]:
    """Every text the figure draws: titles, axis labels, tick labels, legend entries, colour-bar labels."""
    return [text.get_text() for text in figure.findobj(Text) if text.get_visible() and text.get_text()]


def _legend_entries(figure: Figure) -> list[str]:
    return [text.get_text() for legend in figure.legends for text in legend.get_texts()]


def _is_image(image: np.ndarray) -> bool:
    return image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8 and image.shape[0] > 100


def test_bar_chart_holds_title_step_axes_layer_names_and_rule_legend() -> None:
    figure = Figure()
    image = bar_chart(
        ["model.conv1", "model.dw", "model.head"],
        RULES,
        total=("any rule", [1, 4, 2]),
        marked=[False, True, False],
        marked_label="depthwise layer",
        title="deadunits/kernels: dead filters per layer",
        value_label="dead filters (count)",
        step=120,
        figure=figure,
    )
    assert _is_image(image)
    (ax,) = figure.axes
    assert ax.get_title(loc="left") == "deadunits/kernels: dead filters per layer (step 120)"
    assert ax.get_xlabel() == "dead filters (count)"
    assert ax.get_ylabel() == "layer (3, in model order)"
    names = [tick.get_text() for tick in ax.get_yticklabels()]
    assert names == ["model.conv1", "model.dw", "model.head"]
    colours = [tick.get_color() for tick in ax.get_yticklabels()]
    assert colours[1] == "#d62728" and colours[0] != colours[1]  # the depthwise layer's name in red
    assert _legend_entries(figure) == ["any rule", *RULES, "red name: depthwise layer"]
    assert all(tick == round(tick) for tick in ax.get_xticks())  # counts: integer ticks only
    assert ax.get_xlim()[1] >= 4  # the largest bar fits


def test_bar_chart_with_60_layers_keeps_every_name_without_overlap() -> None:
    names = [f"backbone.stage{index // 10}.block{index % 10}.conv" for index in range(60)]
    figure = Figure()
    bar_chart(names, {"abs": list(range(60))}, title="dead", value_label="dead filters (count)", step=3, figure=figure)
    (ax,) = figure.axes
    labels = [label for label in ax.get_yticklabels() if label.get_text()]
    assert [label.get_text() for label in labels] == names
    renderer = figure.canvas.get_renderer()  # type: ignore[attr-defined]
    boxes = sorted((label.get_window_extent(renderer) for label in labels), key=lambda box: box.y0)
    for lower, upper in pairwise(boxes):
        assert lower.y1 <= upper.y0, "layer names overlap"
    figure_box = figure.bbox
    assert all(box.x0 >= 0 and box.x1 <= figure_box.x1 and box.y0 >= 0 for box in boxes)  # nothing cut off


def test_bar_chart_thins_names_beyond_120_layers_and_says_so() -> None:
    names = [f"layer{index}" for index in range(300)]
    figure = Figure()
    bar_chart(names, {"abs": [1.0] * 300}, title="dead", value_label="count", step=0, figure=figure)
    (ax,) = figure.axes
    shown = [label.get_text() for label in ax.get_yticklabels()]
    assert shown == names[::3]
    assert "every 3th name shown" in ax.get_ylabel()


def test_bar_chart_shows_negative_values_around_a_zero_line() -> None:
    figure = Figure()
    bar_chart(
        ["block1", "block2"], {"loss change": [0.5, -0.25]}, title="lesion", value_label="delta", step=0, figure=figure
    )
    (ax,) = figure.axes
    assert ax.get_xlim()[0] <= -0.25 and ax.get_xlim()[1] >= 0.5
    assert any(list(line.get_xdata()) == [0.0, 0.0] for line in ax.get_lines())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"values": {"abs": [1, 2]}}, r"`values\['abs'\]` must have one entry per layer \(3\), got 2"),
        ({"total": ("any", [1])}, r"`total` must have one entry per layer \(3\), got 1"),
        ({"marked": [True] * 3}, "`marked_label` must say what a marked layer is"),
    ],
)
def test_bar_chart_rejects_mismatched_lengths(kwargs: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {"values": {"abs": [1, 2, 3]}, "title": "t", "value_label": "v", "step": 0}
    with pytest.raises(ValueError, match=message):
        bar_chart(["a", "b", "c"], **{**arguments, **kwargs})  # type: ignore[arg-type]


def test_heatmap_grid_labels_layer_filters_colour_scale_and_dead_filters() -> None:
    maps = np.ones((20, 3, 3))
    maps[[3, 17]] = 0.0
    dead = [index in (3, 17) for index in range(20)]
    figure = Figure()
    image = heatmap_grid(list(maps), layer="model.features.4", step=40, dead=dead, columns=8, figure=figure)
    assert _is_image(image)
    ax, colour_bar = figure.axes
    assert ax.get_title(loc="left") == "model.features.4: kernel magnitude per filter (step 40)"
    assert colour_bar.get_ylabel() == "sum of |w| over input channels"
    assert [tick.get_text() for tick in ax.get_yticklabels()] == ["0", "8", "16"]  # first filter of each row
    assert [tick.get_text() for tick in ax.get_xticklabels()] == [f"+{column}" for column in range(8)]
    assert "filter index" in ax.get_xlabel()
    assert _legend_entries(figure) == ["dead filter (2 of 20)"]
    (outlines,) = [collection for collection in ax.collections if isinstance(collection, PatchCollection)]
    corners = sorted(tuple(path.vertices[0]) for path in outlines.get_paths())
    # filter 3 is row 0, column 3; filter 17 is row 2, column 1 (tiles of 3 cells and a 1-cell gap)
    assert corners == [(1 * 4 - 0.5, 2 * 4 - 0.5), (3 * 4 - 0.5, -0.5)]


@pytest.mark.parametrize("empty", ["bar_chart", "heatmap_grid", "series_chart"])
def test_figures_of_nothing_are_still_valid_images(empty: str) -> None:
    draw = {
        "bar_chart": lambda: bar_chart([], {"abs": []}, title="t", value_label="v", step=0),
        "heatmap_grid": lambda: heatmap_grid([], layer="c", step=0, dead=[]),
        "series_chart": lambda: series_chart({}, title="t", value_label="v", step=0),
    }[empty]
    assert _is_image(draw())


def test_heatmap_grid_rejects_a_dead_mask_of_another_length() -> None:
    with pytest.raises(ValueError, match=r"`dead` must have one entry per map \(2\), got 3"):
        heatmap_grid([np.ones((3, 3))] * 2, layer="c", step=0, dead=[True] * 3)
    with pytest.raises(ValueError, match="`columns` must be an int >= 1, got 0"):
        heatmap_grid([np.ones((3, 3))], layer="c", step=0, columns=0)


def test_band_chart_has_step_axis_zero_line_legend_and_channel_coverage() -> None:
    steps, channels = 5, 4
    lows = np.full((steps, channels), -1.0)
    highs = np.full((steps, channels), 3.0)
    lows[:, 0] = highs[:, 0] = 0.0  # a dead channel: a band on the zero line
    lows[2, 1] = np.nan  # left out
    figure = Figure()
    image = band_chart(lows, highs, steps=[0, 10, 20, 30, 40], layer="model.relu2", step=40, figure=figure)
    assert _is_image(image)
    ax, colour_bar = figure.axes
    assert ax.get_title(loc="left") == "model.relu2: per-channel [min, max] of 4 channels (step 40)"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("training step", "activation value")
    assert colour_bar.get_ylabel() == "fraction of channels covering the value"
    assert _legend_entries(figure) == ["highest max", "lowest min", "zero"]
    assert ax.get_xlim()[0] <= 0 and ax.get_xlim()[1] >= 40
    zero_lines = [line for line in ax.get_lines() if line.get_label() == "zero"]
    assert list(zero_lines[0].get_ydata()) == [0.0, 0.0]
    (mesh,) = [artist for artist in ax.get_children() if isinstance(artist, QuadMesh)]
    coverage = np.ma.filled(mesh.get_array(), np.nan).reshape(-1, steps)  # (value bins, steps)
    centres = (mesh.get_coordinates()[:-1, 0, 1] + mesh.get_coordinates()[1:, 0, 1]) / 2
    zero_bin, above_bin = np.argmin(np.abs(centres)), np.argmin(np.abs(centres - 1.5))
    assert coverage[zero_bin, 0] == 1.0 and coverage[above_bin, 0] == 0.75  # all 4 channels at 0, 3 above it
    assert coverage[above_bin, 2] == 0.5  # channel 1's range at step 20 is not finite


def test_band_chart_with_one_step_and_no_finite_values_still_draws() -> None:
    figure = Figure()
    image = band_chart(np.full((1, 2), np.inf), np.full((1, 2), -np.inf), steps=[7], layer="x", step=7, figure=figure)
    assert _is_image(image)
    with pytest.raises(ValueError, match=r"`steps` must have one entry per row of `mins` \(1\), got 2"):
        band_chart(np.zeros((1, 2)), np.zeros((1, 2)), steps=[1, 2], layer="x", step=2)


def test_series_chart_names_twelve_series_and_marks_spikes() -> None:
    series = {f"layer{index}": [(0, 0.0), (10, float(index))] for index in range(15)}
    figure = Figure()
    image = series_chart(
        series,
        title="dead filters per layer",
        value_label="dead filters (count)",
        step=10,
        marks=[5, 5, 8],
        figure=figure,
    )
    assert _is_image(image)
    (ax,) = figure.axes
    assert ax.get_title(loc="left") == "dead filters per layer (step 10)"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("training step", "dead filters (count)")
    legend = _legend_entries(figure)
    assert legend == [*(f"layer{index}" for index in range(3, 15)), "and 3 more (smaller last values)", "loss spike"]
    assert sorted(line.get_xdata()[0] for line in ax.get_lines() if line.get_label() == "loss spike") == [5, 8]


def test_reused_figures_give_the_same_image_and_png_encodes_it() -> None:
    arguments = {"title": "t", "value_label": "v", "step": 1}
    first = bar_chart(["a", "b"], {"abs": [1, 2]}, **arguments)  # type: ignore[arg-type]
    heatmap_grid([np.ones((3, 3))], layer="c", step=0)  # another kind in between
    again = bar_chart(["a", "b"], {"abs": [1, 2]}, **arguments)  # type: ignore[arg-type]
    assert np.array_equal(first, again)
    assert png_bytes(first).startswith(b"\x89PNG\r\n\x1a\n")


_REDRAWN = {
    "bar_chart": [
        lambda figure: bar_chart(["a", "b"], {"abs": [1, 2]}, title="t", value_label="v", step=1, figure=figure),
        lambda figure: bar_chart(["a", "b"], {"abs": [5.5, -1]}, title="u", value_label="w", step=2, figure=figure),
    ],
    "heatmap_grid": [
        lambda figure: heatmap_grid(
            list(np.eye(3)[None].repeat(5, 0)), layer="a", step=1, dead=[True] + [False] * 4, figure=figure
        ),
        lambda figure: heatmap_grid([np.ones((2, 2))] * 40, layer="b", step=2, dead=[False] * 40, figure=figure),
    ],
    "band_chart": [
        lambda figure: band_chart(
            -np.ones((3, 4)), np.arange(12.0).reshape(3, 4), steps=[0, 5, 9], layer="a", step=9, figure=figure
        ),
        lambda figure: band_chart(
            np.full((1, 8), 5.0), np.full((1, 8), 10.0), steps=[0], layer="b", step=4, figure=figure
        ),
    ],
}


@pytest.mark.parametrize("kind", list(_REDRAWN))
def test_a_reused_figure_draws_the_pixels_of_a_fresh_full_draw(kind: str) -> None:
    first, other = _REDRAWN[kind]
    fresh = Figure()
    expected = first(fresh)
    fresh.canvas.draw()  # everything drawn anew: the band chart's kept background must not show
    assert np.array_equal(expected, np.asarray(fresh.canvas.buffer_rgba())[..., :3])  # type: ignore[attr-defined]
    reused = Figure()
    first(reused)
    assert not np.array_equal(other(reused), expected)
    assert np.array_equal(first(reused), expected)  # nothing left of the other figure's data, texts or size
    assert np.array_equal(first(reused), expected)  # nor when drawn over the parts kept from the last call
    assert len(_shapes(reused)) == len(_shapes(fresh))  # nor of its bars, meshes or outlines, hidden or not


def _shapes(figure: Figure) -> list[object]:
    return figure.findobj(lambda artist: isinstance(artist, Collection | Patch | AxesImage))


def test_figures_leave_pyplot_and_the_global_backend_alone() -> None:
    # Lightning itself imports pyplot; the figures must not register with it nor switch its backend.
    code = (
        "import matplotlib; matplotlib.use('svg'); "
        "from lightning_deadunits.panels.render import bar_chart; "
        "bar_chart(['a'], {'abs': [1]}, title='t', value_label='v', step=0); "
        "import matplotlib.pyplot as plt; assert plt.get_fignums() == []; assert matplotlib.get_backend() == 'svg'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize(
    ("name", "width", "short"),
    [("conv", 8, "conv"), ("backbone.layer4.conv2", 11, "backb…conv2"), ("abc", 1, "…")],
)
def test_shorten_keeps_both_ends_of_a_long_name(name: str, width: int, short: str) -> None:
    assert shorten(name, width) == short and len(shorten(name, width)) <= width
