"""Compose docs/tensorboard.png from the image panels a real run logged, read back with TensorBoard's event reader.

No browser runs offline here, so instead of a screenshot of TensorBoard this pastes the very PNGs TensorBoard would
show (pixel for pixel, not redrawn) side by side, each under its tag and step:

    python examples/zero_kernels.py --epochs 8 --out runs/zero_kernels
    python scripts/compose_panels.py runs/zero_kernels/adam docs/tensorboard.png
"""

import argparse
import io
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.image import imread
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

CAPTION = 28  # pixels above each panel for its tag and step
GAP = 16


def latest_images(run: Path, prefix: str) -> tuple[dict[str, tuple[int, np.ndarray]], dict[str, float]]:
    """``{tag: (step, RGB image)}`` of the last image of each ``<prefix>/...`` tag; the last dead count per layer."""
    accumulator = EventAccumulator(str(run), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    images = {}
    for tag in accumulator.Tags()["images"]:
        if tag.startswith(f"{prefix}/"):
            event = accumulator.Images(tag)[-1]
            images[tag] = (event.step, imread(io.BytesIO(event.encoded_image_string), format="png")[..., :3])
    start, end = f"{prefix}/kernels/", "/dead"
    dead = {
        tag[len(start) : -len(end)]: accumulator.Scalars(tag)[-1].value
        for tag in accumulator.Tags()["scalars"]
        if tag.startswith(start) and tag.endswith(end)
    }
    return images, dead


def compose(columns: list[list[tuple[str, int, np.ndarray]]], path: Path) -> None:
    """Paste ``(tag, step, image)`` panels in columns, top to bottom, at 1:1 pixels, and save the PNG."""
    widths = [max(image.shape[1] for _, _, image in column) for column in columns]
    heights = [sum(CAPTION + image.shape[0] + GAP for _, _, image in column) for column in columns]
    width, height = sum(widths) + GAP * (len(columns) + 1), max(heights) + GAP
    figure = Figure(figsize=(width / 100, height / 100), dpi=100)
    FigureCanvasAgg(figure)
    left = GAP
    for column, column_width in zip(columns, widths, strict=True):
        top = GAP
        for tag, step, image in column:
            figure.text(left / width, 1 - (top + CAPTION * 0.7) / height, f"{tag}  (step {step})", fontsize=11)
            top += CAPTION
            figure.figimage(image, xo=left, yo=height - top - image.shape[0])
            top += image.shape[0] + GAP
        left += column_width + GAP
    figure.savefig(path, dpi=100)


def main() -> None:
    """Read the run's last images and write the composed PNG."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run's log directory (holding its event file)")
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument("--prefix", default="deadunits")
    args = parser.parse_args()
    images, dead = latest_images(args.run, args.prefix)
    bars = f"{args.prefix}/kernels/dead_per_layer"
    last_check = images[bars][0]
    heatmap_prefix = f"{args.prefix}/kernels/heatmap/"
    # The heat map of the layer with the most dead filters at the last check; the band chart of the last layer.
    heatmaps = [tag for tag in images if tag.startswith(heatmap_prefix) and images[tag][0] == last_check]
    worst = max(heatmaps, key=lambda tag: dead.get(tag[len(heatmap_prefix) :], 0.0))
    band = sorted(tag for tag in images if tag.endswith("/channel_range"))[-1]
    left = [(bars, *images[bars])]
    right = [(tag, *images[tag]) for tag in (worst, band)]
    compose([left, right], args.out)
    print(f"wrote {args.out} from {', '.join(tag for tag, _, _ in left + right)}")


if __name__ == "__main__":
    main()
