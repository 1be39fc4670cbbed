"""The figures of the image panels and of ``deadunits report``, drawn with matplotlib's Agg renderer.

Every function takes numbers and labels and returns an ``(H, W, 3)`` uint8 image (what
``SummaryWriter.add_image(..., dataformats="HWC")`` takes), so callers never import matplotlib. Figures are drawn on
``matplotlib.figure.Figure`` with ``FigureCanvasAgg`` directly: pyplot and the user's global backend are never
touched. Each kind of figure reuses one ``Figure`` per thread (cleared before drawing); pass ``figure=`` to draw
into your own instead (e.g. to read its artists back in a test). One style for all: the title ends with the step,
axes are labelled with their units, layer names label the category axis and the legend names every colour.

Figures:

====================  ==========================================================================================
:func:`bar_chart`     one value per layer, for several series (e.g. dead filters by rule), as horizontal bars
                      with the layer names on the vertical axis (thinned beyond 120 layers)
:func:`heatmap_grid`  one tile per filter of a layer, one colour scale, filter indices on the axes, dead filters
                      outlined
:func:`band_chart`    every channel's ``[min, max]`` range over training steps, as the fraction of channels
                      covering each value, with the outermost range and a zero line
:func:`series_chart`  lines over training steps (e.g. dead filters per layer), with marked steps (loss spikes)
====================  ==========================================================================================
"""

import functools
import io
import math
import threading
import weakref
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.colorbar import Colorbar
    from matplotlib.figure import Figure

__all__ = ["band_chart", "bar_chart", "heatmap_grid", "png_bytes", "series_chart", "shorten"]

_DPI = 100
_WIDTH = 7.5  # inches, every figure
_FONT = 8.0  # points: tick labels, legends
_TITLE_FONT = 10.0
_LAYER_ROW = 0.18  # inches per layer on the category axis: 7-pt names (0.1 in) never touch
_MAX_LABELLED_LAYERS = 120  # beyond this, every k-th layer name is shown so the figure stays under ~24 inches
_MAX_NAME = 48  # characters of a layer name on an axis; longer names are shortened in the middle
_MAX_LEGEND = 12  # series named in a legend; the rest are counted in one entry
_SERIES_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
_TOTAL_COLOUR = "#d4d4d4"
_MARK_COLOUR = "#d62728"
_ZERO_COLOUR = "#555555"
_RANGE_BINS = 160
# Margins in inches around the plot (a fixed layout: constrained layout doubled the cost of a figure).
_TOP = 0.4  # the title
_TOP_WITH_AXIS = 0.8  # the title, then an axis label and tick labels on top (heat maps)
_BOTTOM = 0.6  # tick labels and the axis label, below which the legend goes
_LEGEND_ROW = 0.2
_LEGEND_COLUMNS = 4
_LEFT = 0.85  # numeric tick labels and the axis label
_RIGHT = 0.3
_COLOUR_BAR = 1.15  # the gap, the bar, its tick labels and its label
_X_LABEL_OFFSET = 0.26  # inches from the plot's edge to the x-axis label, beyond the tick labels
_Y_LABEL_EDGE = 0.3  # inches from the figure's left edge to the y-axis label's right side

_local = threading.local()
Artists = dict[str, Any]
"""What a figure function keeps of a figure it drew, to update it next time."""
_held: "weakref.WeakKeyDictionary[Figure, tuple[tuple[Any, ...], Artists]]" = weakref.WeakKeyDictionary()

Numbers = Sequence[float] | np.ndarray
"""One number (or bool) per layer, step or channel: a sequence or a 1-D array."""


def bar_chart(
    layer_names: Sequence[str],
    values: Mapping[str, Numbers],
    *,
    title: str,
    value_label: str,
    step: int,
    total: tuple[str, Numbers] | None = None,
    marked: Sequence[bool] | np.ndarray | None = None,
    marked_label: str = "",
    order: str = "in model order",
    figure: "Figure | None" = None,
) -> np.ndarray:
    """Horizontal bars, one row per layer (first layer on top) and one bar per series in each row.

    ``total`` (e.g. dead filters by any rule) is drawn as a wide pale bar behind each row's series bars (e.g. the
    counts of each rule, which overlap). Values may be negative (a zero line is drawn); non-finite values are
    drawn as 0. Layers where ``marked`` is true get their name in red, explained by a legend entry.

    Args:
        layer_names: one name per row.
        values: ``{legend label: one value per layer}``.
        title: what the figure shows; `` (step <step>)`` is appended.
        value_label: the value axis's label, with its unit.
        step: the training step of the values.
        total: ``(legend label, one value per layer)`` drawn behind the series.
        marked: one bool per layer.
        marked_label: what a red name means (required with ``marked``).
        order: how the layers are ordered, for the axis label.
        figure: draw into this figure instead of the reused one.

    Returns:
        The image.

    Raises:
        ValueError: if a sequence's length differs from ``layer_names``'s, or ``marked`` comes without
            ``marked_label``.

    Example:
        >>> image = bar_chart(["conv1", "conv2"], {"abs": [0, 3]}, title="dead", value_label="filters", step=5)
        >>> image.dtype, image.shape[2]
        (dtype('uint8'), 3)
    """
    layers = len(layer_names)
    columns: dict[str, Numbers | Sequence[bool]] = {f"values[{label!r}]": series for label, series in values.items()}
    if total is not None:
        columns["total"] = total[1]
    if marked is not None:
        columns["marked"] = marked
        if not marked_label:
            raise ValueError("`marked_label` must say what a marked layer is when `marked` is given, got ''.")
    for name, column in columns.items():
        if len(column) != layers:
            raise ValueError(f"`{name}` must have one entry per layer ({layers}), got {len(column)}.")
    shown = range(0, layers, max(1, math.ceil(layers / _MAX_LABELLED_LAYERS)))
    names = [shorten(layer_names[index]) for index in shown]
    marked_legend = f"red name: {marked_label}"
    legend = [*([total[0]] if total is not None else []), *values, *([marked_legend] if marked is not None else [])]
    structure = (tuple(legend), total is not None, marked is not None)
    figure, held = _reuse("bar_chart", figure, structure)
    if held is None:
        held = _hold("bar_chart", figure, structure, _bar_artists(figure, legend, len(values), total is not None))
    ax: Axes = held["ax"]
    title_y = _place(
        figure,
        ax,
        None,
        _LAYER_ROW * min(max(layers, 1), _MAX_LABELLED_LAYERS),
        left=0.45 + _text_width(tuple(names), _FONT - 1),
        legend=legend,
    )
    for bars in held["bars"]:
        bars.remove()
    positions = np.arange(layers, dtype=np.float64)
    lengths = [_finite(series) for series in values.values()]
    held["bars"] = [] if total is None else [_bars(ax, positions, _finite(total[1]), 0.84, _TOTAL_COLOUR)]
    height = 0.84 / max(len(values), 1)
    for index, series_lengths in enumerate(lengths):
        offset = -0.42 + height * (index + 0.5)
        colour = _SERIES_COLOURS[index % len(_SERIES_COLOURS)]
        held["bars"].append(_bars(ax, positions + offset, series_lengths, height, colour))
    every = np.concatenate([np.zeros(1), *lengths, *([] if total is None else [_finite(total[1])])])
    low, high = float(every.min()), float(every.max())
    high = high if high > low else low + 1.0
    ax.set_xlim(low - 0.05 * (high - low), high + 0.05 * (high - low))
    ax.set_yticks(list(shown), names, fontsize=_FONT - 1)
    ax.set_ylim(max(layers, 1) - 0.5, -0.5)
    if marked is not None:
        for tick, index in zip(ax.get_yticklabels(), shown, strict=True):
            tick.set_color(_MARK_COLOUR if marked[index] else held["name_colour"])
    from matplotlib.ticker import AutoLocator, MaxNLocator

    integers = all(float(value).is_integer() for series in columns.values() for value in _finite(series))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True) if integers else AutoLocator())
    skipped = "" if len(shown) == layers else f", every {shown.step}th name shown"
    y_label = f"layer ({layers}, {order}{skipped})"
    _label(ax, title, step, value_label, y_label, title_y)
    colours = None if marked is None else tuple(bool(marked[index]) for index in shown)
    return _pixels_over_background(figure, ax, held, (tuple(names), colours, y_label), kept=[ax.yaxis])


def _bar_artists(figure: "Figure", legend: Sequence[str], series: int, total: bool) -> Artists:
    """What every bar chart with these legend entries shares: axes, the zero line, the grid and the legend."""
    from matplotlib import rcParams
    from matplotlib.patches import Patch

    ax, _ = _axes(figure)
    ax.axvline(0.0, color=_ZERO_COLOUR, linewidth=0.8)
    ax.grid(axis="x", alpha=0.3)
    colours = [*([_TOTAL_COLOUR] if total else []), *(_SERIES_COLOURS[i % len(_SERIES_COLOURS)] for i in range(series))]
    colours += ["none"] * (len(legend) - len(colours))  # the marked layers' entry: a red name, no bar
    _legend(figure, [Patch(color=colour, label=label) for colour, label in zip(colours, legend, strict=True)])
    name_colour = rcParams["ytick.labelcolor"]
    return {"ax": ax, "bars": [], "name_colour": rcParams["ytick.color"] if name_colour == "inherit" else name_colour}


def heatmap_grid(
    maps: Sequence[np.ndarray] | np.ndarray,
    *,
    layer: str,
    step: int,
    dead: Sequence[bool] | np.ndarray | None = None,
    value_label: str = "sum of |w| over input channels",
    columns: int = 16,
    figure: "Figure | None" = None,
) -> np.ndarray:
    """One tile per filter (row-major, ``columns`` per row) on one colour scale from 0, dead filters outlined red.

    A collapsed filter shows as a black tile among bright ones, because all tiles share one scale, shown by the
    colour bar. The axes give the filter index: the row's first filter on the left, plus the column on top.

    Args:
        maps: 2-D arrays (e.g. ``|w|`` of one filter summed over input channels), all one shape, filter 0 first.
        layer: the layer's name, for the title.
        step: the training step of the weights.
        dead: one bool per map: outlined when true.
        value_label: the colour bar's label, with its unit.
        columns: tiles per row (>= 1).
        figure: draw into this figure instead of the reused one.

    Returns:
        The image.

    Raises:
        ValueError: if ``columns`` < 1, the maps differ in shape or are not 2-D, or ``dead`` has another length.
    """
    if columns < 1:
        raise ValueError(f"`columns` must be an int >= 1, got {columns!r}.")
    stack = np.stack([np.asarray(tile, dtype=np.float64) for tile in maps]) if len(maps) else np.zeros((0, 1, 1))
    if stack.ndim != 3:
        raise ValueError(f"`maps` must be 2-D arrays of one shape, got an array of shape {stack.shape}.")
    count, tile_rows, tile_cols = stack.shape
    if dead is not None and len(dead) != count:
        raise ValueError(f"`dead` must have one entry per map ({count}), got {len(dead)}.")
    columns = max(1, min(columns, count))
    rows = max(1, -(-count // columns))
    # One mosaic with a blank cell between tiles: one image artist however many filters.
    mosaic = np.full((rows * (tile_rows + 1) - 1, columns * (tile_cols + 1) - 1), np.nan)
    for index, tile in enumerate(stack):
        top, left = (index // columns) * (tile_rows + 1), (index % columns) * (tile_cols + 1)
        mosaic[top : top + tile_rows, left : left + tile_cols] = tile
    finite = stack[np.isfinite(stack)]
    peak = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    aspect = mosaic.shape[0] / max(mosaic.shape[1], 1)
    plot_width = _WIDTH - _LEFT - _COLOUR_BAR
    dead_indices = [] if dead is None else [index for index, is_dead in enumerate(dead) if is_dead]
    dead_legend = f"dead filter ({len(dead_indices)} of {count})"
    structure = (dead is not None,)
    figure, held = _reuse("heatmap_grid", figure, structure)
    if held is None:
        held = _hold(
            "heatmap_grid", figure, structure, _heatmap_artists(figure, dead_legend if dead is not None else None)
        )
    ax: Axes = held["ax"]
    title_y = _place(
        figure,
        ax,
        held["colour_axes"],
        min(plot_width * aspect, 16.0),
        top=_TOP_WITH_AXIS,
        bottom=0.2,
        legend=[] if dead is None else [dead_legend],
        x_on_top=True,
    )
    image = held["image"]
    image.set_data(mosaic)
    image.set_extent((-0.5, mosaic.shape[1] - 0.5, mosaic.shape[0] - 0.5, -0.5))
    image.set_clim(0.0, peak)
    ax.set_xlim(-0.5, mosaic.shape[1] - 0.5)
    ax.set_ylim(mosaic.shape[0] - 0.5, -0.5)
    held["colour_bar"].set_label(value_label, fontsize=_FONT + 1)
    centres = [column * (tile_cols + 1) + (tile_cols - 1) / 2 for column in range(columns)]
    ax.set_xticks(centres, [f"+{column}" for column in range(columns)], fontsize=_FONT - 1)
    row_step = max(1, math.ceil(rows / 32))
    ax.set_yticks(
        [row * (tile_rows + 1) + (tile_rows - 1) / 2 for row in range(0, rows, row_step)],
        [str(row * columns) for row in range(0, rows, row_step)],
        fontsize=_FONT - 1,
    )
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    if held["outlines"] is not None:
        held["outlines"].remove()
    # One collection however many filters are dead (a patch each costs ~1 ms to add and draw).
    corners = [
        ((index % columns) * (tile_cols + 1) - 0.5, (index // columns) * (tile_rows + 1) - 0.5)
        for index in dead_indices
    ]
    held["outlines"] = ax.add_collection(
        PatchCollection(
            [Rectangle(corner, tile_cols, tile_rows) for corner in corners],
            facecolors="none",
            edgecolors=_MARK_COLOUR,
            linewidths=1.5,
        ),
        autolim=False,
    )
    if dead is not None:
        figure.legends[0].get_texts()[0].set_text(dead_legend)
    _label(
        ax,
        f"{layer}: kernel magnitude per filter",
        step,
        x_label="filter index: row start + column",
        y_label="row start (filter index)",
        title_y=title_y,
    )
    return _pixels(figure)


def _heatmap_artists(figure: "Figure", dead_legend: str | None) -> Artists:
    """What every heat map shares: axes with the filter axis on top, the image and its colour bar, the legend."""
    from matplotlib import colormaps
    from matplotlib.patches import Rectangle

    ax, colour_axes = _axes(figure, colour_bar=True)
    colour_map = colormaps["magma"].with_extremes(bad="white")
    image = ax.imshow(np.zeros((1, 1)), cmap=colour_map, vmin=0.0, vmax=1.0, aspect="auto")
    colour_bar = _colour_bar(figure, image, colour_axes, "")
    ax.tick_params(length=0)
    ax.xaxis.set_label_position("top")
    ax.xaxis.tick_top()
    if dead_legend is not None:
        _legend(figure, [Rectangle((0, 0), 1, 1, fill=False, edgecolor=_MARK_COLOUR, label=dead_legend)])
    return {"ax": ax, "colour_axes": colour_axes, "image": image, "colour_bar": colour_bar, "outlines": None}


def band_chart(
    mins: np.ndarray,
    maxs: np.ndarray,
    *,
    steps: Sequence[int],
    layer: str,
    step: int,
    value_label: str = "activation value",
    figure: "Figure | None" = None,
) -> np.ndarray:
    """Every channel's ``[min, max]`` at each training step, shaded by the fraction of channels covering a value.

    ``mins`` and ``maxs`` are ``(T, C)``: ``T`` steps of ``C`` channels. Channels collapsing towards 0 show as the
    band narrowing onto the zero line, dead ReLU channels as a band on it; one exploding channel stays visible as
    the outermost range (the lowest minimum and highest maximum, drawn as lines). Non-finite ranges are left out.

    Args:
        mins: per-step, per-channel minima.
        maxs: per-step, per-channel maxima, same shape.
        steps: the training step of each row, increasing.
        layer: the layer's name, for the title.
        step: the training step of the figure.
        value_label: the value axis's label, with its unit.
        figure: draw into this figure instead of the reused one.

    Returns:
        The image.

    Raises:
        ValueError: if ``mins`` and ``maxs`` differ in shape or ``steps`` has another length than their rows.
    """
    lows = np.atleast_2d(np.asarray(mins, dtype=np.float64))
    highs = np.atleast_2d(np.asarray(maxs, dtype=np.float64))
    if lows.shape != highs.shape:
        raise ValueError(f"`mins` and `maxs` must have one shape, got {lows.shape} and {highs.shape}.")
    if len(steps) != lows.shape[0]:
        raise ValueError(f"`steps` must have one entry per row of `mins` ({lows.shape[0]}), got {len(steps)}.")
    channels = lows.shape[1]
    finite = np.isfinite(lows) & np.isfinite(highs) & (lows <= highs)
    bottom = min(float(lows[finite].min(initial=0.0)), 0.0)
    top = max(float(highs[finite].max(initial=0.0)), 0.0)
    span = (top - bottom) or 1.0
    edges = np.linspace(bottom - 0.02 * span, top + 0.02 * span, _RANGE_BINS + 1)
    first = np.clip(np.searchsorted(edges, np.where(finite, lows, 0.0), side="right") - 1, 0, _RANGE_BINS - 1)
    last = np.clip(np.searchsorted(edges, np.where(finite, highs, 0.0), side="right") - 1, 0, _RANGE_BINS - 1)
    # Coverage of every bin at every step at once: +1 where a range starts, -1 past where it ends, summed.
    changes = np.zeros((lows.shape[0], _RANGE_BINS + 1))
    rows = np.arange(lows.shape[0])[:, None].repeat(channels, axis=1)
    np.add.at(changes, (rows[finite], first[finite]), 1.0)
    np.add.at(changes, (rows[finite], last[finite] + 1), -1.0)
    coverage = np.cumsum(changes, axis=1)[:, :_RANGE_BINS] / max(channels, 1)
    step_values = np.asarray(steps, dtype=np.float64)
    figure, held = _reuse("band_chart", figure, ())
    if held is None:
        held = _hold("band_chart", figure, (), _band_artists(figure))
    ax: Axes = held["ax"]
    title_y = _place(figure, ax, held["colour_axes"], 3.0, legend=_BAND_LEGEND)
    if held["mesh"] is not None:
        held["mesh"].remove()
    step_edges = _edges(step_values)
    held["mesh"] = ax.pcolormesh(
        step_edges, edges, np.where(coverage > 0, coverage, np.nan).T, cmap=held["colour_map"], vmin=0.0, vmax=1.0
    )
    lowest = np.where(finite, lows, np.inf).min(axis=1)
    highest = np.where(finite, highs, -np.inf).max(axis=1)
    shown = np.isfinite(lowest)
    for line, values in ((held["highest"], highest), (held["lowest"], lowest)):
        line.set_data(step_values[shown], values[shown])
        line.set_marker("o" if lows.shape[0] == 1 else "None")
    ax.set_xlim(step_edges[0], step_edges[-1])
    ax.set_ylim(edges[0], edges[-1])
    _label(ax, f"{layer}: per-channel [min, max] of {channels} channels", step, "training step", value_label, title_y)
    return _pixels_over_background(figure, ax, held)


_BAND_LEGEND = ("highest max", "lowest min", "zero")


def _band_artists(figure: "Figure") -> Artists:
    """What every band chart shares: axes, a colour bar of fixed scale, the outer-range lines, zero line, legend."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.ticker import MaxNLocator

    ax, colour_axes = _axes(figure, colour_bar=True)
    colour_map = colormaps["Blues"].with_extremes(bad="white")
    scale = ScalarMappable(Normalize(0.0, 1.0), colour_map)
    _colour_bar(figure, scale, colour_axes, "fraction of channels covering the value").set_ticks([0.0, 0.5, 1.0])
    highest, lowest, zero = _BAND_LEGEND
    handles = [
        ax.plot([], [], color=_SERIES_COLOURS[1], label=highest)[0],
        ax.plot([], [], color=_SERIES_COLOURS[0], label=lowest)[0],
        ax.axhline(0.0, color=_ZERO_COLOUR, linewidth=0.9, linestyle="--", label=zero),
    ]
    # Few ticks (each tick label is a text to lay out and draw, the larger part of a figure's cost); no grid: the
    # shading already shows where values lie.
    ax.xaxis.set_major_locator(MaxNLocator(6, integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(6, steps=[1, 2, 2.5, 5, 10]))
    _legend(figure, handles)
    return {
        "ax": ax,
        "colour_axes": colour_axes,
        "colour_map": colour_map,
        "mesh": None,
        "highest": handles[0],
        "lowest": handles[1],
    }


def series_chart(
    series: Mapping[str, Sequence[tuple[int, float]]],
    *,
    title: str,
    value_label: str,
    step: int,
    marks: Sequence[int] = (),
    marks_label: str = "loss spike",
    figure: "Figure | None" = None,
) -> np.ndarray:
    """Lines of values over training steps, with dashed red lines at ``marks`` (e.g. loss spikes).

    With more than 12 series the legend names the 12 with the largest last values and counts the others.

    Args:
        series: ``{legend label: [(step, value), ...]}``; non-finite values leave gaps.
        title: what the figure shows; `` (step <step>)`` is appended.
        value_label: the value axis's label, with its unit.
        step: the last training step shown.
        marks: steps to mark.
        marks_label: what a mark is, for the legend.
        figure: draw into this figure instead of the reused one.

    Returns:
        The image.
    """
    more_legend = f"and {len(series) - _MAX_LEGEND} more (smaller last values)"
    legend = [*list(series)[:_MAX_LEGEND], *([more_legend] if len(series) > _MAX_LEGEND else [])]
    # Drawn anew each time: series charts are drawn by `deadunits report`, once per figure, not during training.
    figure, _ = _reuse("series_chart", figure, None)
    ax, _ = _axes(figure)
    title_y = _place(figure, ax, None, 3.0, legend=[*legend, *([marks_label] if marks else [])])
    lines = []
    for index, (label, points) in enumerate(series.items()):
        steps = [point[0] for point in points]
        values = [point[1] if math.isfinite(point[1]) else math.nan for point in points]
        colour = _SERIES_COLOURS[index % len(_SERIES_COLOURS)]
        (line,) = ax.plot(steps, values, ".-", color=colour, linewidth=1.2, markersize=3, label=label)
        lines.append((values[-1] if values and math.isfinite(values[-1]) else -math.inf, line))
    named = set(sorted(range(len(lines)), key=lambda index: -lines[index][0])[:_MAX_LEGEND])
    handles: list[Any] = [line for index, (_, line) in enumerate(lines) if index in named]
    if len(lines) > _MAX_LEGEND:
        from matplotlib.patches import Patch

        handles.append(Patch(color="none", label=more_legend))
    for index, mark in enumerate(sorted(set(marks))):
        line = ax.axvline(mark, color=_MARK_COLOUR, linestyle="--", linewidth=0.8, label=marks_label)
        if index == 0:
            handles.append(line)
    ax.grid(alpha=0.3)
    _label(ax, title, step, "training step", value_label, title_y)
    _legend(figure, handles)
    return _pixels(figure)


def png_bytes(image: np.ndarray) -> bytes:
    """The PNG encoding of an ``(H, W, 3)`` uint8 image (e.g. to embed a figure in HTML, or in a TensorBoard event).

    zlib's fastest level: half the time of the default level (which ``SummaryWriter.add_image`` uses, 8 of a band
    chart's 16 ms) for files about 10% larger, since figures are mostly flat colour.
    """
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buffer, format="png", compress_level=1)
    return buffer.getvalue()


def shorten(name: str, width: int = _MAX_NAME) -> str:
    """``name`` if it fits in ``width`` characters, else its start and end around ``…`` (never a line break).

    Example:
        >>> shorten("backbone.stages.3.blocks.11.attention.proj", 24)
        'backbone.sta…ention.proj'

    Raises:
        ValueError: if ``width`` < 1.
    """
    if width < 1:
        raise ValueError(f"`width` must be an int >= 1, got {width!r}.")
    if len(name) <= width:
        return name
    head = width // 2
    tail = width - 1 - head
    return name[:head] + "…" + (name[-tail:] if tail else "")


def _reuse(kind: str, figure: "Figure | None", structure: tuple[Any, ...] | None) -> tuple["Figure", Artists | None]:
    """``figure`` (or this thread's figure of ``kind``) on an Agg canvas, and what a previous call drew into it.

    The artists are those a previous call with the same ``structure`` kept; ``None`` means the figure was cleared
    (``structure=None`` always clears). Re-creating axes, ticks, a colour bar and a legend takes about half of a
    figure's cost (tick objects are deep-copied one by one), so a figure whose structure is unchanged only has its
    data, texts and geometry updated.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if figure is None:
        cache: dict[str, Figure] = _local.__dict__.setdefault("figures", {})
        if kind not in cache:
            cache[kind] = Figure()
        figure = cache[kind]
    if not isinstance(figure.canvas, FigureCanvasAgg):
        FigureCanvasAgg(figure)
    held = _held.get(figure)
    if structure is not None and held is not None and held[0] == (kind, *structure):
        return figure, held[1]
    _held.pop(figure, None)
    figure.clear()
    figure.set_size_inches(_WIDTH, figure.get_figheight())  # the legend's columns are fitted to the width
    figure.set_dpi(_DPI)
    figure.set_layout_engine("none")
    return figure, None


def _hold(kind: str, figure: "Figure", structure: tuple[Any, ...], artists: Artists) -> Artists:
    """Remember ``artists`` as what ``figure`` holds for ``structure`` (see :func:`_reuse`)."""
    _held[figure] = ((kind, *structure), artists)
    return artists


def _axes(figure: "Figure", colour_bar: bool = False) -> tuple["Axes", "Axes | None"]:
    """The plot's axes and, with ``colour_bar``, the colour bar's (placed by :func:`_place`)."""
    ax = figure.add_axes((0.1, 0.1, 0.8, 0.8))
    return ax, (figure.add_axes((0.92, 0.1, 0.02, 0.8)) if colour_bar else None)


def _place(
    figure: "Figure",
    ax: "Axes",
    colour_axes: "Axes | None",
    plot_height: float,
    *,
    left: float = _LEFT,
    top: float = _TOP,
    bottom: float = _BOTTOM,
    legend: Sequence[str] = (),
    x_on_top: bool = False,
) -> float:
    """Size ``figure`` and place its axes; return the title's height in axes coordinates (for :func:`_label`).

    The plot is ``plot_height`` inches high and as wide as the figure allows beside the margins (in inches): the title
    above, ``bottom`` (tick labels and the axis label) and the rows of the
    ``legend`` entries below, and the colour bar's axes on the right; the x-axis label below the plot, or above it
    with ``x_on_top`` (the title then goes above the part of ``top`` beyond the usual title margin).
    """
    right = _RIGHT if colour_axes is None else _COLOUR_BAR
    width = max(_WIDTH, left + right + 2.0)
    if legend:
        bottom += _LEGEND_ROW * math.ceil(len(legend) / _legend_columns(tuple(legend), width)) + 0.1
    height = plot_height + top + bottom
    if tuple(figure.get_size_inches()) != (width, height):
        figure.set_size_inches(width, height)
    ax.set_position((left / width, bottom / height, (width - left - right) / width, plot_height / height))
    if colour_axes is not None:
        colour_axes.set_position(((width - right + 0.15) / width, bottom / height, 0.15 / width, plot_height / height))
    # Axis labels and the title at fixed offsets in the margins (which are sized for them), so that drawing does not
    # measure every tick label to place them (a fifth of a figure's cost).
    x_label_offset = _X_LABEL_OFFSET / plot_height
    ax.xaxis.set_label_coords(0.5, 1 + x_label_offset if x_on_top else -x_label_offset)
    ax.yaxis.set_label_coords(-(left - _Y_LABEL_EDGE) / (width - left - right), 0.5)
    return 1 + (top - _TOP) / plot_height


@functools.lru_cache(maxsize=256)
def _text_width(texts: tuple[str, ...], size: float) -> float:
    """The width in inches of the widest of ``texts`` in the figures' font at ``size`` points (0 for none)."""
    from matplotlib.font_manager import FontProperties
    from matplotlib.textpath import TextToPath

    longest = sorted(texts, key=len)[-3:]  # the widest is among the longest
    measure = TextToPath()
    font = FontProperties(size=size)
    return max(
        (measure.get_text_width_height_descent(text, font, ismath=False)[0] / 72 for text in longest), default=0.0
    )


def _legend_columns(labels: tuple[str, ...], width: float) -> int:
    """As many legend columns (up to 4) as fit ``width`` inches, each as wide as the widest entry and its key."""
    column = _text_width(labels, _FONT) + 0.6
    return max(1, min(len(labels), _LEGEND_COLUMNS, int((width - 0.2) // column)))


def _colour_bar(figure: "Figure", mappable: Any, colour_axes: "Axes | None", label: str) -> "Colorbar":
    colour_bar = figure.colorbar(mappable, cax=colour_axes)
    colour_bar.set_label(label, fontsize=_FONT + 1)
    colour_bar.ax.tick_params(labelsize=_FONT)
    return colour_bar


def _label(ax: "Axes", title: str, step: int, x_label: str, y_label: str, title_y: float) -> None:
    ax.set_title(f"{title} (step {step})", fontsize=_TITLE_FONT, loc="left", y=title_y)
    ax.set_xlabel(x_label, fontsize=_FONT + 1)
    ax.set_ylabel(y_label, fontsize=_FONT + 1)
    ax.tick_params(axis="x", labelsize=_FONT)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _legend(figure: "Figure", handles: Sequence[Any]) -> None:
    if handles:
        figure.legend(
            handles=handles,
            loc="lower center",
            bbox_to_anchor=(0.5, 0.0),
            ncols=_legend_columns(tuple(handle.get_label() for handle in handles), figure.get_figwidth()),
            fontsize=_FONT,
            frameon=False,
        )


def _pixels(figure: "Figure") -> np.ndarray:
    figure.canvas.draw()
    return np.asarray(figure.canvas.buffer_rgba())[..., :3].copy()  # type: ignore[attr-defined]


def _pixels_over_background(
    figure: "Figure", ax: "Axes", held: Artists, key: tuple[Any, ...] = (), kept: Sequence[Any] = ()
) -> np.ndarray:
    """Like :func:`_pixels`, drawing only ``ax`` (less its ``kept`` parts) over a kept rendering of the rest.

    For the parts of a figure that do not change from call to call (legend, colour bar of a fixed scale, layer
    names): drawing text is most of a figure's cost. The rendering is made anew when ``key`` (what those parts
    show) or the figure's size changes.
    """
    canvas = figure.canvas
    key = (tuple(figure.bbox.size), *key)
    if held.get("background_key") != key:
        ax.set_visible(False)
        canvas.draw()
        ax.set_visible(True)
        for artist in kept:
            figure.draw_artist(artist)
        held["background"] = canvas.copy_from_bbox(figure.bbox)  # type: ignore[attr-defined]
        held["background_key"] = key
    canvas.restore_region(held["background"])  # type: ignore[attr-defined]
    for artist in kept:
        artist.set_visible(False)
    figure.draw_artist(ax)
    for artist in kept:
        artist.set_visible(True)
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()  # type: ignore[attr-defined]


def _bars(ax: "Axes", centres: np.ndarray, lengths: np.ndarray, height: float, colour: str) -> Any:
    """Horizontal bars as one collection (a patch per bar costs ~1 ms each to add and draw)."""
    from matplotlib.collections import PolyCollection

    low, high = centres - height / 2, centres + height / 2
    zeros = np.zeros_like(lengths)
    corners = np.stack([[zeros, low], [lengths, low], [lengths, high], [zeros, high]]).transpose(2, 0, 1)
    return ax.add_collection(PolyCollection(list(corners), facecolors=colour, edgecolors="none"), autolim=False)


def _finite(values: Numbers | Sequence[bool]) -> np.ndarray:
    return np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)


def _edges(centres: np.ndarray) -> np.ndarray:
    """Cell edges around increasing ``centres``: midpoints, and half a gap beyond each end (1 for one centre)."""
    if centres.size == 1:
        return np.array([centres[0] - 0.5, centres[0] + 0.5])
    middle = (centres[1:] + centres[:-1]) / 2
    return np.concatenate([[2 * centres[0] - middle[0]], middle, [2 * centres[-1] - middle[-1]]])
