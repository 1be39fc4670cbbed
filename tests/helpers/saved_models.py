"""Saved models with planted dead filters, in every format `deadunits scan` reads, and the scans' dead indices."""

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from safetensors.torch import save_file

from lightning_deadunits.cli.scan import scan_checkpoint


def planted_state_dict(dead: dict[str, list[int]]) -> dict[str, torch.Tensor]:
    """`stem` (conv 8x3x3x3), `blocks.0` (linear 16x8), `head` (linear 5x16) with the given filters zeroed.

    Other filters are ~N(0, 1) (L1 far above 1e-6); biases and a norm weight (1-D) are never scanned.
    """
    generator = torch.Generator().manual_seed(0)
    shapes = {"stem": (8, 3, 3, 3), "blocks.0": (16, 8), "head": (5, 16)}
    state: dict[str, torch.Tensor] = {}
    for name, shape in shapes.items():
        weight = torch.randn(shape, generator=generator)
        weight[dead.get(name, [])] = 0
        state[f"{name}.weight"] = weight
        state[f"{name}.bias"] = torch.zeros(shape[0])
    state["norm.weight"] = torch.zeros(5)
    return state


def save_shards(directory: Path, state: dict[str, torch.Tensor], index: bool = True) -> None:
    """Two safetensors shards (the first tensor alone in the first), with a `model.safetensors.index.json`."""
    directory.mkdir(parents=True, exist_ok=True)
    names = list(state)
    shards = {"model-00001-of-00002.safetensors": names[:1], "model-00002-of-00002.safetensors": names[1:]}
    for shard, shard_names in shards.items():
        save_file({name: state[name] for name in shard_names}, directory / shard)
    if index:
        weight_map = {name: shard for shard, shard_names in shards.items() for name in shard_names}
        (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def onnx_model(layers: list[tuple[str, str, np.ndarray, dict[str, Any], int]]) -> onnx.ModelProto:
    """One node per layer `(op_type, initializer name, weight, attributes, weight's input position)`.

    Each node reads its own graph input, so the weights are exactly the planted arrays (no exporter in between).
    """
    nodes, inputs, outputs, initializers = [], [], [], []
    for index, (op_type, name, weight, attributes, position) in enumerate(layers):
        operands = [f"x{index}"]
        operands.insert(position, name)
        nodes.append(helper.make_node(op_type, operands, [f"y{index}"], name=f"{op_type.lower()}{index}", **attributes))
        inputs.append(helper.make_tensor_value_info(f"x{index}", TensorProto.FLOAT, []))
        outputs.append(helper.make_tensor_value_info(f"y{index}", TensorProto.FLOAT, []))
        initializers.append(numpy_helper.from_array(weight, name))
    model = helper.make_model(helper.make_graph(nodes, "planted", inputs, outputs, initializers))
    onnx.checker.check_model(model)
    return model


def dead_indices(path: Path, rel_threshold: float = 0.0) -> list[tuple[str, str, int, list[int], bool]]:
    """`(name, kind, filters, dead filter indices, kind_from_shape)` per layer, as `scan_checkpoint` finds them."""
    _, scans = scan_checkpoint(path, rel_threshold=rel_threshold)
    return [
        (layer.name, layer.kind, layer.filters, dead.nonzero().flatten().tolist(), layer.kind_from_shape)
        for layer, dead in scans
    ]
