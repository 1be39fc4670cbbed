"""Tiny raster renderers (numpy only) for the image panels: bar charts, heat-map grids, band charts."""

import numpy as np

__all__ = ["band_chart", "bar_chart", "heatmap_grid"]

_BACKGROUND = 255
_AXIS = (90, 90, 90)
_GRID = (225, 225, 225)
_BAR = (31, 119, 180)
_HIGHLIGHT = (214, 39, 40)


def bar_chart(
    values: np.ndarray, highlight: np.ndarray | None = None, height: int = 240, bar_width: int = 12
) -> np.ndarray:
    """Draw ``values`` (one bar each, left to right) as an ``(H, W, 3)`` uint8 image.

    Bars are scaled to the largest value; horizontal grid lines mark quarters of it. Bars where
    ``highlight`` is true are drawn red.

    Args:
        values: non-negative numbers, one per bar.
        highlight: optional boolean mask of the same length.
        height: image height in pixels.
        bar_width: width of each bar in pixels (a 2-pixel gap separates bars).

    Returns:
        The image.
    """
    values = np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0).clip(min=0)
    margin = 8
    step = bar_width + 2
    width = max(2 * margin + step * len(values), 64)
    image = np.full((height, width, 3), _BACKGROUND, dtype=np.uint8)
    plot_height = height - 2 * margin
    for quarter in range(1, 5):
        row = height - margin - (plot_height * quarter) // 4
        image[row, margin:-margin] = _GRID
    peak = values.max(initial=0.0)
    for index, value in enumerate(values):
        bar_height = 0 if peak == 0 else round(plot_height * value / peak)
        left = margin + index * step + 1
        color = _HIGHLIGHT if highlight is not None and highlight[index] else _BAR
        if bar_height:
            image[height - margin - bar_height : height - margin, left : left + bar_width] = color
    image[height - margin, margin:-margin] = _AXIS
    image[margin : height - margin + 1, margin] = _AXIS
    return image


def heatmap_grid(maps: list[np.ndarray], scale: int = 8, columns: int = 16) -> np.ndarray:
    """Tile 2-D maps into one grey ``(H, W, 3)`` uint8 image, each map normalised by the grid's maximum.

    A collapsed filter shows as a black tile among bright ones, because all tiles share one scale.

    Args:
        maps: 2-D non-negative arrays (e.g. ``|w|`` of one filter, summed over input channels), all one shape.
        scale: each map cell becomes a ``scale x scale`` block.
        columns: tiles per row.

    Returns:
        The image.
    """
    if not maps:
        return np.full((8, 8, 3), _BACKGROUND, dtype=np.uint8)
    stack = np.stack([np.asarray(m, dtype=np.float64) for m in maps])
    peak = np.nanmax(stack) if np.isfinite(stack).any() else 0.0
    normalised = np.zeros_like(stack) if peak <= 0 else np.nan_to_num(stack / peak).clip(0, 1)
    count, rows_per_map, cols_per_map = normalised.shape
    tile_h, tile_w = rows_per_map * scale, cols_per_map * scale
    columns = min(columns, count)
    rows = -(-count // columns)
    gap = 2
    image = np.full((rows * (tile_h + gap) + gap, columns * (tile_w + gap) + gap, 3), _BACKGROUND, np.uint8)
    pixels = (normalised.repeat(scale, axis=1).repeat(scale, axis=2) * 255).astype(np.uint8)
    for index, tile in enumerate(pixels):
        top = gap + (index // columns) * (tile_h + gap)
        left = gap + (index % columns) * (tile_w + gap)
        image[top : top + tile_h, left : left + tile_w] = tile[..., None]
    return image


def band_chart(mins: np.ndarray, maxs: np.ndarray, height: int = 240, step_width: int = 4) -> np.ndarray:
    """Draw every channel's ``[min, max]`` range at every time step as an ``(H, W, 3)`` uint8 image.

    ``mins`` and ``maxs`` are ``(T, C)``: ``T`` time steps, left to right, of ``C`` channels. At each step every
    channel paints its range; the colour deepens with the fraction of channels covering a value, and a value any
    channel covers is at least faintly coloured, so one exploding channel stays visible. One y scale spans every
    finite value and 0, where a grey line is drawn: channels collapsing towards 0 show as the band narrowing onto
    that line, dead ReLU channels as a band on it. Non-finite ranges are left out.

    Args:
        mins: per-step, per-channel minima.
        maxs: per-step, per-channel maxima, same shape.
        height: image height in pixels.
        step_width: pixels per time step (the last one is a gap when there are two or more).

    Returns:
        The image.
    """
    lows = np.atleast_2d(np.asarray(mins, dtype=np.float64))
    highs = np.atleast_2d(np.asarray(maxs, dtype=np.float64))
    steps, channels = lows.shape
    margin = 8
    width = max(2 * margin + steps * step_width, 64)
    image = np.full((height, width, 3), _BACKGROUND, dtype=np.uint8)
    plot_height = height - 2 * margin
    finite = np.isfinite(lows) & np.isfinite(highs) & (lows <= highs)
    bottom_value = min(float(lows[finite].min(initial=0.0)), 0.0)
    top_value = max(float(highs[finite].max(initial=0.0)), 0.0)
    span = (top_value - bottom_value) or 1.0

    def rows(values: np.ndarray) -> np.ndarray:
        return margin + np.round((top_value - values) / span * (plot_height - 1)).astype(np.int64)

    image[rows(np.zeros(1))[0], margin:-margin] = _AXIS
    image[margin : height - margin, margin] = _AXIS
    # Coverage of every pixel row at every step at once: +1 where a range starts, -1 below where it ends, summed.
    columns = height + 1
    offsets = np.arange(steps)[:, None] * columns
    weights = finite.astype(np.float64).ravel()
    starts = np.bincount((offsets + rows(np.where(finite, highs, 0.0))).ravel(), weights, steps * columns)
    ends = np.bincount((offsets + rows(np.where(finite, lows, 0.0)) + 1).ravel(), weights, steps * columns)
    coverage = np.cumsum((starts - ends).reshape(steps, columns), axis=1)[:, :height]
    step_index, row_index = np.nonzero(coverage > 0)
    strength = (0.25 + 0.75 * coverage[step_index, row_index] / max(channels, 1))[:, None]
    colours = (_BACKGROUND * (1 - strength) + np.array(_BAR, dtype=np.float64) * strength).astype(np.uint8)
    drawn = max(step_width - 1, 1)
    pixel_columns = margin + 1 + step_index[:, None] * step_width + np.arange(drawn)
    image[row_index[:, None], pixel_columns] = colours[:, None, :]
    return image
