"""The statistics pass against its floor: one plain read (``x.sum()``) of the same activations.

The activation monitor's cost per sampled step is mostly :func:`~lightning_deadunits.functional.channel_stats` over
every watched activation. Its floor is reading each value once; this measures, per model, the eager passes, the
fused compiled pass and one ``x.sum()`` over the very tensors the monitor sees in one step (the outputs of the
watched activation modules for one batch), interleaved repetition by repetition so that drift hits all three alike,
on one thread; on CUDA with CUDA events. The ratios to ``x.sum()`` are the roofline column of the tables.
"""

import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightning_deadunits.functional import activations as functional
from lightning_deadunits.probes.module_kinds import DEFAULT_ACTIVATION_TYPES
from models import Built

PASSES = ("eager", "fused", "sum")
"""The passes compared: the eager statistics, the fused compiled statistics, one plain reduction."""


def watched_activations(built: Built, device: str) -> list[tuple[Tensor, int]]:
    """The outputs of the watched activation modules for one batch, with their channel dim (last for sequences)."""
    outputs: list[tuple[Tensor, int]] = []

    def keep(module: torch.nn.Module, inputs: Any, output: Tensor) -> None:
        outputs.append((output.detach().clone(), -1 if output.dim() == 3 else 1))

    model = built.model.to(device)
    handles = [m.register_forward_hook(keep) for m in model.modules() if isinstance(m, DEFAULT_ACTIVATION_TYPES)]
    with torch.no_grad():
        model(built.data[: built.batch_size][0].to(device))
    for handle in handles:
        handle.remove()
    return outputs


def _statistics(compile_after: int | None) -> Callable[[Tensor, int], Any]:
    def measure(values: Tensor, channel_dim: int) -> Any:
        functional.COMPILE_AFTER_CALLS = compile_after
        # The fused pass on any device, the CPU included (where a run compiles only if asked to).
        functional.COMPILE_DEVICES = (values.device.type,) if compile_after is not None else ()
        return functional.channel_stats(values, channel_dim, eps=0.0, nonnegative=True)

    return measure


def _plain_sum(values: Tensor, channel_dim: int) -> Tensor:
    return values.sum()


def _seconds(fn: Callable[[Tensor, int], Any], tensors: list[tuple[Tensor, int]], loops: int, cuda: bool) -> float:
    """Seconds per step (one call per tensor) of ``fn``, over ``loops`` steps."""
    if cuda:
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))  # type: ignore[no-untyped-call]
        start.record()
        for _ in range(loops):
            for values, channel_dim in tensors:
                fn(values, channel_dim)
        end.record()
        end.synchronize()
        return float(start.elapsed_time(end)) / 1000 / loops
    began = time.perf_counter()
    for _ in range(loops):
        for values, channel_dim in tensors:
            fn(values, channel_dim)
    return (time.perf_counter() - began) / loops


def roofline(built: Built, device: str, repeats: int, loops: int, fused: bool = True) -> dict[str, float]:
    """Median ms per sampled step of each pass over one step's activations and the statistics' ratios to the sum.

    ``fused=False`` skips the compiled pass (smoke runs: compiling takes seconds). The fused pass is compiled for
    the device whatever :data:`COMPILE_DEVICES` says (on the CPU a run compiles only when asked to), and stays
    compiled for the rest of the process, as it does in a long run once :data:`COMPILE_AFTER_CALLS` tensors were
    measured on a device of :data:`COMPILE_DEVICES`.
    """
    tensors = watched_activations(built, device)
    previous = functional.COMPILE_AFTER_CALLS, functional.COMPILE_DEVICES
    passes = {"eager": _statistics(None), "fused": _statistics(0), "sum": _plain_sum}
    if not fused:
        del passes["fused"]
    cuda = device == "cuda"
    times: dict[str, list[float]] = {name: [] for name in passes}
    try:
        for fn in passes.values():  # warm up (compiles the fused kernel)
            _seconds(fn, tensors, 1, cuda)
        order = list(passes)
        shuffle = random.Random(0)
        for _ in range(repeats):
            shuffle.shuffle(order)
            for name in order:
                times[name].append(_seconds(passes[name], tensors, loops, cuda))
    finally:
        functional.COMPILE_AFTER_CALLS, functional.COMPILE_DEVICES = previous
    ms = {name: 1000 * statistics.median(values) for name, values in times.items()}
    result = {f"{name}_ms": value for name, value in ms.items()}
    result["values"] = float(sum(values.numel() for values, _ in tensors))
    for name in ("eager", "fused"):
        if name in ms:
            result[f"{name}_over_sum"] = ms[name] / ms["sum"]
    return result
