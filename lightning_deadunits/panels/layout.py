"""Custom-scalars layouts declared as data per source, and the one builder that turns them into categories."""

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["LayoutSpec", "build_layout"]


@dataclass(frozen=True)
class LayoutSpec:
    """Which charts a source's panels hold.

    Args:
        totals: ``{chart title: stat regex}`` over ``<base>/total/<stat>``, in a category ``"<title>: totals"``.
        per_layer: ``{chart title: stat regex}`` over ``<base>/<layer>/<stat>`` for each group of layers, in a
            category ``"<title>: <group_category>"``; titles and ``group_category`` may hold ``{group}``.
        group_category: the category name of a group of layers.

    Example:
        >>> spec = LayoutSpec({"dead": "dead"}, {"{group}: dead": "dead"}, "{group} layers")
        >>> layout = build_layout("deadunits/kernels", "deadunits/kernels", spec, {"conv": ["c1"]})
        >>> layout["deadunits/kernels: conv layers"]
        {'conv: dead': ['deadunits/kernels/(c1)/dead$']}
    """

    totals: Mapping[str, str]
    per_layer: Mapping[str, str] = field(default_factory=dict)
    group_category: str = "layers"


def build_layout(
    base: str, title: str, spec: LayoutSpec, groups: Mapping[str, Sequence[str]]
) -> dict[str, dict[str, list[str]]]:
    """The categories of ``spec`` for keys under ``base``, with ``groups`` of layer names (``{group: [layer]}``).

    Returns:
        ``{category: {chart title: [tag regex]}}``; groups with no layers get no category.
    """
    categories: dict[str, dict[str, list[str]]] = {}
    if spec.totals:
        categories[f"{title}: totals"] = {chart: [f"{base}/total/{stat}$"] for chart, stat in spec.totals.items()}
    for group, layers in sorted(groups.items()):
        if not layers or not spec.per_layer:
            continue
        alternation = "|".join(re.escape(layer) for layer in layers)
        categories[f"{title}: {spec.group_category.format(group=group)}"] = {
            chart.format(group=group): [f"{base}/({alternation})/{stat}$"] for chart, stat in spec.per_layer.items()
        }
    return categories
