from pathlib import Path

from lightning.pytorch.loggers import TensorBoardLogger

from lightning_deadunits import KernelNormMonitor, ThresholdRule
from tests.helpers.tb_helpers import PLANTED_DEAD, fit_planted, get_bytes, get_json, query, serve_tensorboard

RUN = "fit/version_0"


def test_tensorboard_server_serves_layout_scalars_images_and_alarm_text(tmp_path: Path) -> None:
    monitor = KernelNormMonitor(
        every_n_steps=2,
        images_every_n_checks=1,
        alarms=[
            ThresholdRule("deadunits/kernels/total/dead", above=1, name="dead total"),
            ThresholdRule("deadunits/kernels/*/dead_abs", above=1, name="dead abs"),
        ],
    )
    fit_planted(tmp_path, TensorBoardLogger(tmp_path, name="fit", version=0), [monitor], max_steps=4)

    with serve_tensorboard(tmp_path) as url:
        scalar_tags = get_json(f"{url}/data/plugin/scalars/tags")[RUN]
        layout = get_json(f"{url}/data/plugin/custom_scalars/layout")
        dead_abs = get_json(
            f"{url}/data/plugin/scalars/scalars?{query(run=RUN, tag='deadunits/kernels/model.conv/dead_abs')}"
        )
        image_tags = get_json(f"{url}/data/plugin/images/tags")[RUN]
        bar_chart = get_json(
            f"{url}/data/plugin/images/images?{query(run=RUN, tag='deadunits/kernels/dead_per_layer', sample=0)}"
        )
        png = get_bytes(f"{url}/data/plugin/images/individualImage?{bar_chart[-1]['query']}")
        text_tags = get_json(f"{url}/data/plugin/text/tags")[RUN]
        alarms = get_json(f"{url}/data/plugin/text/text?{query(run=RUN, tag='deadunits/alarms/text_summary')}")

    assert {
        "deadunits/kernels/total/dead",
        "deadunits/kernels/model.conv/dead_abs",
        "deadunits/kernels/model.conv/dead_rel",
        "deadunits/kernels/model.head/dead",
    } <= set(scalar_tags)
    assert [(step, value) for _, step, value in dead_abs] == [(0, PLANTED_DEAD), (2, PLANTED_DEAD), (4, PLANTED_DEAD)]

    charts = {category["title"]: [chart["title"] for chart in category["chart"]] for category in layout["category"]}
    assert charts["deadunits/kernels: totals"] == [
        "dead filters (all rules)",
        "dead filters by rule",
        "new dead and revived per check",
    ]
    assert charts["deadunits/kernels: conv layers"] == [
        "conv: dead filters",
        "conv: dead fraction",
        "conv: median filter L1",
    ]
    assert "deadunits/kernels: linear layers" in charts

    assert {"deadunits/kernels/dead_per_layer", "deadunits/kernels/heatmap/model.conv"} <= set(image_tags)
    assert [image["step"] for image in bar_chart] == [0, 2, 4]
    assert png.startswith(b"\x89PNG\r\n\x1a\n")

    assert "deadunits/alarms/text_summary" in text_tags
    assert [entry["step"] for entry in alarms] == [0, 2, 4]
    for entry in alarms:  # three alarms per check, all shown although TensorBoard keeps one text per step
        assert "[dead total] deadunits/kernels/total/dead = 2 rose above 1" in entry["text"]
        assert "[dead abs] deadunits/kernels/total/dead_abs = 2 rose above 1" in entry["text"]
        assert "[dead abs] deadunits/kernels/model.conv/dead_abs = 2 rose above 1" in entry["text"]
