import gc
import weakref
from typing import Any

import torch
from torch import Tensor, nn

from lightning_deadunits.metrics.activation_stats import CallSite
from lightning_deadunits.probes.module_kinds import unit_count
from lightning_deadunits.probes.tracing import ForwardTracer


class _Bottleneck(nn.Module):
    """torchvision's Bottleneck shape: one in-place ReLU module called three times, the last time on a sum."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = nn.Conv2d(channels, channels, 1)
        self.bn3 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        # not torchvision's in-place ``out += x``: that sum is the same tensor object as bn3's output
        return self.relu(self.bn3(self.conv3(out)) + x)  # type: ignore[no-any-return]


class _Recorder:
    """Traces the leaves of a model, marking each output with its site and noting which site fed each call."""

    def __init__(self, model: nn.Module) -> None:
        self.fed_by: dict[CallSite, CallSite | None] = {}
        self.tracer: ForwardTracer[CallSite] = ForwardTracer(self.on_call)
        leaves = {name: module for name, module in model.named_modules() if name and not list(module.children())}
        self.tracer.attach(model, leaves)

    def on_call(self, site: CallSite, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> CallSite:
        self.fed_by[site] = self.tracer.mark_of(inputs)
        return site

    def named(self) -> dict[str, str | None]:
        """``{site name: name of the site that fed it}``, named after the forward."""
        name = self.tracer.site_name
        return {name(site): None if fed is None else name(fed) for site, fed in self.fed_by.items()}


def test_tracer_names_the_calls_of_a_reused_relu_and_their_producers() -> None:
    model = nn.Sequential(_Bottleneck(), _Bottleneck())
    recorder = _Recorder(model)
    recorder.tracer.start()
    model(torch.randn(2, 4, 5, 5))
    recorder.tracer.stop()
    assert recorder.named() == {
        "0.conv1": None,
        "0.bn1": "0.conv1",
        "0.relu#0": "0.bn1",
        "0.conv2": "0.relu#0",  # the in-place ReLU's output is its input tensor, now marked by the ReLU
        "0.bn2": "0.conv2",
        "0.relu#1": "0.bn2",
        "0.conv3": "0.relu#1",
        "0.bn3": "0.conv3",
        "0.relu#2": None,  # fed by a functional sum
        "1.conv1": "0.relu#2",
        "1.bn1": "1.conv1",
        "1.relu#0": "1.bn1",
        "1.conv2": "1.relu#0",
        "1.bn2": "1.conv2",
        "1.relu#1": "1.bn2",
        "1.conv3": "1.relu#1",
        "1.bn3": "1.conv3",
        "1.relu#2": None,
    }
    assert recorder.tracer.calls_per_forward == {
        name: 3 if name.endswith("relu") else 1 for name in recorder.tracer.modules
    }
    assert recorder.tracer.hooks_attached == 0 and recorder.tracer.mark_of((torch.ones(1),)) is None


def test_tracer_follows_a_sequential_with_batchnorm() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))
    recorder = _Recorder(model)
    recorder.tracer.start()
    model(torch.randn(2, 3, 6, 6))
    recorder.tracer.stop()
    assert recorder.named() == {"0": None, "1": "0", "2": "1", "3": "2", "4": "3"}
    assert [unit_count(model[0]), unit_count(model[3])] == [8, 4]


class _ReusedFromOutside(nn.Module):
    """``inner.1`` runs once inside ``inner``'s forward and once more from this module's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        self.head = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.inner[1](self.head(self.inner(x)))  # type: ignore[no-any-return]


def test_tracer_counts_a_module_called_from_outside_its_parent_since_the_parent_began() -> None:
    model = _ReusedFromOutside()
    recorder = _Recorder(model)
    recorder.tracer.start()
    for _ in range(2):  # ``inner``'s forward restarts the count: both forwards give the same sites
        recorder.fed_by.clear()
        model(torch.randn(2, 4))
        assert recorder.named() == {"inner.0": None, "inner.1#0": "inner.0", "head": "inner.1#0", "inner.1#1": "head"}
    recorder.tracer.stop()


def test_tracer_traces_only_the_named_modules_and_starts_counting_afresh() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    recorder = _Recorder(model)
    recorder.tracer.start(["1"])
    assert recorder.tracer.hooks_attached == 2  # the ReLU and its parent
    model(torch.randn(2, 4))
    recorder.tracer.start(["1"])  # restarting drops the hooks, marks and counts of the last start
    model(torch.randn(2, 4))
    recorder.tracer.stop()
    assert recorder.fed_by == {("1", 0): None}
    assert recorder.tracer.hooks_attached == 0


def test_tracer_holds_the_tensors_it_marks_only_weakly() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    recorder = _Recorder(model)
    recorder.tracer.start()
    with torch.no_grad():
        output = model(torch.randn(2, 4))
    freed = weakref.ref(output)
    assert recorder.tracer.mark_of((output,)) == ("0", 0)
    del output
    gc.collect()
    assert freed() is None
    recorder.tracer.stop()
