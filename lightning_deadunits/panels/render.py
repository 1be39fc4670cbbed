"""Tiny raster renderers (numpy only) for the image panels: bar charts, heat-map grids, band charts."""

import numpy as np

__all__ = ["bar_chart", "heatmap_grid"]

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
    for index, tile in enumerate(normalised):
        top = gap + (index // columns) * (tile_h + gap)
        left = gap + (index % columns) * (tile_w + gap)
        pixels = (np.kron(tile, np.ones((scale, scale))) * 255).astype(np.uint8)
        image[top : top + tile_h, left : left + tile_w] = pixels[..., None]
    return image
