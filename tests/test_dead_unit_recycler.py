import logging
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn

from lightning_deadunits import ActivationMonitor, KernelNormMonitor
from lightning_deadunits.actions.recycle import (
    UnitFlowTracer,
    cap_units,
    fresh_parameters,
    recycle_seed,
    recycle_units,
)
from lightning_deadunits.callbacks.dead_unit_recycler import DeadUnitRecycler
from lightning_deadunits.functional.kernels import filter_matrix
from tests.helpers.ddp import DDP_OPTIONS, RecordOnEachRank, read_ranks
from tests.helpers.residual_models import ChainModule, ConvChain, PlantedMasks

TRAINER_OPTIONS: dict[str, Any] = dict(
    logger=False,
    enable_progress_bar=False,
    enable_model_summary=False,
    enable_checkpointing=False,
)
# index of ``model.a`` among the conv/linear layers of ChainModule, which seeds its fresh weights
A_INDEX = 0


def _trained_chain() -> tuple[ConvChain, torch.optim.Adam]:
    """A ConvChain after two Adam steps, so that every optimizer state entry is non-zero."""
    model = ConvChain()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(4, 3, 6, 6)).pow(2).mean().backward()
        optimizer.step()
    return model, optimizer


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    tensors = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    names = {param: name for name, param in model.named_parameters()}
    for param, state in optimizer.state.items():
        for key, value in state.items():
            tensors[f"{names[param]}:{key}"] = value.clone()
    return tensors


def _units(count: int, *indices: int) -> Tensor:
    mask = torch.zeros(count, dtype=torch.bool)
    mask[list(indices)] = True
    return mask


def test_recycle_units_touches_exactly_the_flagged_rows() -> None:
    model, optimizer = _trained_chain()
    before = _snapshot(model, optimizer)
    recycle_units(model.a, _units(8, 1, 5), 7, consumers=[model.b], norms=[model.bn], optimizers=[optimizer])
    after = _snapshot(model, optimizer)
    fresh = fresh_parameters(model.a, 7)
    # b has groups=2 (4 input channels, 3 output filters per group): channel 1 is column 1 of filters 0-2,
    # channel 5 is column 1 of filters 3-5
    b_columns = torch.zeros(6, 4, 3, 3, dtype=torch.bool)
    b_columns[0:3, 1] = True
    b_columns[3:6, 1] = True
    rows = _units(8, 1, 5)
    touched = {
        "a.weight": rows.view(8, 1, 1, 1).expand(8, 3, 3, 3),
        "a.bias": rows,
        "b.weight": b_columns,
        **{f"bn.{name}": rows for name in ("weight", "bias", "running_mean", "running_var")},
    }
    for key, value in after.items():
        name, _, state = key.partition(":")
        mask = touched.get(name)
        if mask is None or state == "step":
            assert torch.equal(value, before[key]), key
            continue
        assert torch.equal(value[~mask], before[key][~mask]), key
        if state:
            assert (value[mask] == 0).all(), key
    assert torch.equal(after["a.weight"][rows], fresh["weight"][rows])
    assert torch.equal(after["a.bias"][rows], fresh["bias"][rows])
    assert (after["b.weight"][b_columns] == 0).all()
    assert after["bn.weight"][rows].tolist() == [1.0, 1.0] and after["bn.bias"][rows].tolist() == [0.0, 0.0]
    assert after["bn.running_mean"][rows].tolist() == [0.0, 0.0]
    assert after["bn.running_var"][rows].tolist() == [1.0, 1.0]
    assert after["bn.num_batches_tracked"] == before["bn.num_batches_tracked"]


def test_recycle_units_linear_outgoing_columns() -> None:
    model, optimizer = _trained_chain()
    before = _snapshot(model, optimizer)
    recycle_units(model.fc1, _units(5, 0, 3), 1, consumers=[model.fc2], optimizers=[optimizer])
    assert (model.fc2.weight[:, [0, 3]] == 0).all()
    assert torch.equal(model.fc2.weight[:, [1, 2, 4]], before["fc2.weight"][:, [1, 2, 4]])
    assert (optimizer.state[model.fc2.weight]["exp_avg_sq"][:, [0, 3]] == 0).all()
    assert torch.equal(model.fc1.weight[[1, 2, 4]], before["fc1.weight"][[1, 2, 4]])
    assert not torch.equal(model.fc1.weight[[0, 3]], before["fc1.weight"][[0, 3]])


@pytest.mark.parametrize(
    "layer",
    [nn.ConvTranspose2d(4, 6, 2, groups=2), nn.Conv2d(4, 6, 3, groups=2), nn.Conv1d(6, 6, 3, groups=6)],
    ids=["transpose", "grouped", "depthwise"],
)
def test_recycle_units_changes_only_the_filters_of_the_units(layer: nn.Module) -> None:
    before = filter_matrix(layer).detach().clone()
    units = _units(6, 1, 4)
    recycle_units(layer, units, 3)
    after = filter_matrix(layer).detach()
    assert torch.equal(after[~units], before[~units])
    assert torch.equal(after[units], filter_matrix(_with_parameters(layer, fresh_parameters(layer, 3)))[units])


def _with_parameters(layer: nn.Module, parameters: dict[str, Tensor]) -> nn.Module:
    for name, value in parameters.items():
        setattr(layer, name, nn.Parameter(value))
    return layer


def test_recycle_units_transposed_consumer_rows_are_zeroed() -> None:
    producer, consumer = nn.Conv2d(2, 4, 1), nn.ConvTranspose2d(4, 6, 2, groups=2)
    before = consumer.weight.detach().clone()
    recycle_units(producer, _units(4, 2), 0, consumers=[consumer])
    assert (consumer.weight[2] == 0).all()
    assert torch.equal(consumer.weight[[0, 1, 3]], before[[0, 1, 3]])


def test_recycle_units_rejects_wrong_mask_and_layers_without_own_init() -> None:
    with pytest.raises(ValueError, match=r"`units` must have shape \(4,\) for Conv2d, got \(3,\)"):
        recycle_units(nn.Conv2d(2, 4, 1), torch.zeros(3, dtype=torch.bool), 0)
    layer = nn.utils.parametrizations.weight_norm(nn.Linear(3, 4))
    with pytest.raises(TypeError, match="`layer` must have its own `reset_parameters` and no parametrization"):
        fresh_parameters(layer, 0)


def test_fresh_parameters_follow_the_layers_init_from_the_seed_only() -> None:
    layer = nn.Conv2d(4, 8, 3)
    original = layer.weight
    state = torch.get_rng_state()
    first, again, other = fresh_parameters(layer, 5), fresh_parameters(layer, 5), fresh_parameters(layer, 6)
    assert torch.equal(torch.get_rng_state(), state)
    assert layer.weight is original
    assert torch.equal(first["weight"], again["weight"]) and not torch.equal(first["weight"], other["weight"])
    bound = 1 / (4 * 3 * 3) ** 0.5  # kaiming_uniform(a=sqrt(5)) and the bias both stay within 1/sqrt(fan_in)
    assert first["weight"].abs().max() <= bound and first["bias"].abs().max() <= bound
    assert first["weight"].std() > bound / 3


def test_cap_units_picks_at_most_the_cap_among_flagged_and_is_seeded() -> None:
    flagged = _units(10, 0, 2, 3, 5, 7, 9)
    chosen = cap_units(flagged, 2, seed=4)
    assert chosen.sum() == 2 and not (chosen & ~flagged).any()
    assert torch.equal(chosen, cap_units(flagged, 2, seed=4))
    assert torch.equal(cap_units(flagged, 8, seed=4), flagged)
    assert recycle_seed(0, 1, 2) != recycle_seed(0, 2, 1)


def test_unit_flow_tracer_finds_consumers_norms_and_sites() -> None:
    model = ConvChain()
    tracer = UnitFlowTracer()
    layers = {name: module for name, module in model.named_modules() if name in ("a", "b", "fc1", "fc2")}
    tracer.start(model, layers)
    model(torch.randn(2, 3, 6, 6))
    tracer.finish()
    # the flatten between pool and fc1 is functional: b has no consumer
    assert tracer.consumers == {"a": ["b"], "fc1": ["fc2"]}
    assert tracer.norms == {"a": ["bn"]}
    assert tracer.sites == {
        "a": "a",
        "bn": "a",
        "act_a": "a",
        "b": "b",
        "act_b": "b",
        "pool": "b",
        "fc1": "fc1",
        "act_fc": "fc1",
        "fc2": "fc2",
    }
    assert tracer.hooks_attached == 0 and tracer.traced and not tracer.pending
    restored = UnitFlowTracer()
    restored.load_state_dict(tracer.state_dict())
    assert restored.state_dict() == tracer.state_dict()


class _BasicBlock(nn.Module):
    """torchvision's BasicBlock shape: one ReLU module called twice, the second time on a sum."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.relu(self.conv2(self.relu(self.conv1(x))) + x)  # type: ignore[no-any-return]


def test_unit_flow_tracer_names_repeated_calls_and_stops_at_functional_sums() -> None:
    model = nn.Sequential(_BasicBlock(), _BasicBlock())
    layers = {name: module for name, module in model.named_modules() if isinstance(module, nn.Conv2d)}
    tracer = UnitFlowTracer()
    tracer.start(model, layers)
    model(torch.randn(1, 4, 5, 5))
    tracer.finish()
    assert tracer.sites["0.relu#0"] == "0.conv1" and tracer.sites["1.relu#0"] == "1.conv1"
    assert "0.relu#1" not in tracer.sites and "0.relu" not in tracer.sites
    assert tracer.consumers == {"0.conv1": ["0.conv2"], "1.conv1": ["1.conv2"]}


def test_dead_unit_recycler_recycles_dead_kernels_and_checks_survival(tmp_path: Path) -> None:
    module = ChainModule(lr=0.0, dead_filters=(1, 5))
    monitor = KernelNormMonitor(every_n_steps=2, log_histograms=False, log_images=False)
    recycler = DeadUnitRecycler(every_n_steps=1, max_fraction=0.5)
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=3, callbacks=[monitor, recycler], **TRAINER_OPTIONS)
    trainer.fit(module)
    fresh = fresh_parameters(module.model.a, recycle_seed(0, 1, A_INDEX))
    rows = _units(8, 1, 5)
    assert torch.equal(module.model.a.weight[rows], fresh["weight"][rows])
    assert (module.model.b.weight[:, 1] == 0).all()
    assert recycler.history == [
        {"step": 1.0, "flagged": 2.0, "recycled": 2.0, "recycled_cumulative": 2.0},
        {
            "step": 2.0,
            "still_alive": 2.0,
            "still_alive_frac": 1.0,
            "flagged": 0.0,
            "recycled": 0.0,
            "recycled_cumulative": 2.0,
        },
    ]
    assert recycler.recycled_total == 2
    assert monitor.dead_counts["model.a"] == 0


@pytest.mark.parametrize("recycler_first", [False, True])
def test_dead_unit_recycler_acts_at_the_same_step_whatever_the_callback_order(
    tmp_path: Path, recycler_first: bool
) -> None:
    monitor = KernelNormMonitor(every_n_steps=10, log_histograms=False, log_images=False)
    recycler = DeadUnitRecycler(every_n_steps=1, max_fraction=0.5)
    callbacks = [recycler, monitor] if recycler_first else [monitor, recycler]
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=3, callbacks=callbacks, **TRAINER_OPTIONS)
    trainer.fit(ChainModule(lr=0.0, dead_filters=(1, 5)))
    # the fit-start check is acted on before the second batch, whichever callback comes first
    assert [(entry["step"], entry["recycled"]) for entry in recycler.history] == [(1.0, 2.0)]


def test_dead_unit_recycler_respects_every_n_steps_and_max_fraction(tmp_path: Path) -> None:
    planted = PlantedMasks({"model.a": (0, 1, 2, 3, 4)}, {"model.a": 8}, at_steps=tuple(range(1, 7)))
    recycler = DeadUnitRecycler(every_n_steps=3, max_fraction=0.25)
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=6, callbacks=[planted, recycler], **TRAINER_OPTIONS)
    trainer.fit(ChainModule(lr=0.0, batches=6))
    recyclings = [
        (entry["step"], entry["flagged"], entry["recycled"]) for entry in recycler.history if "recycled" in entry
    ]
    assert recyclings == [(1.0, 5.0, 2.0), (4.0, 5.0, 2.0)]
    # the two units recycled at step 1 are reported dead again by the planted monitor at step 2
    assert recycler.history[1] == {"step": 2.0, "still_alive": 0.0, "still_alive_frac": 0.0}


@pytest.mark.parametrize("require_consumer", [True, False])
def test_dead_unit_recycler_maps_activation_sites_to_layers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, require_consumer: bool
) -> None:
    masks = {"model.act_a": (2,), "model.pool": (4,), "model.act_fc": (4,), "model.nowhere": (0,), "model.bn": (1,)}
    units = {"model.act_a": 8, "model.pool": 6, "model.act_fc": 5, "model.nowhere": 3, "model.bn": 3}
    module = ChainModule(lr=0.0)
    before = {name: tensor.clone() for name, tensor in module.state_dict().items()}
    recycler = DeadUnitRecycler(every_n_steps=1, max_fraction=1.0, require_consumer=require_consumer)
    trainer = pl.Trainer(
        default_root_dir=tmp_path, max_steps=2, callbacks=[PlantedMasks(masks, units), recycler], **TRAINER_OPTIONS
    )
    with caplog.at_level(logging.INFO, logger="lightning_deadunits"):
        trainer.fit(module)
    after = module.state_dict()
    assert not torch.equal(after["model.a.weight"][2], before["model.a.weight"][2])
    assert (after["model.b.weight"][:3, 2] == 0).all()  # channel 2 is column 2 of group 0 (filters 0-2)
    assert (after["model.fc2.weight"][:, 4] == 0).all()
    assert torch.equal(after["model.fc1.weight"][:4, 0], before["model.fc1.weight"][:4, 0])
    assert "cannot recycle 'model.nowhere' (planted)" in caplog.text
    assert "cannot recycle 'model.bn' (planted): its mask has shape (3,), layer 'model.a' has 8 units" in caplog.text
    # b's units reach fc1 only through a functional flatten: no reader found
    b_changed = not torch.equal(after["model.b.weight"][4], before["model.b.weight"][4])
    if require_consumer:
        assert not b_changed and "does not recycle 'model.b'" in caplog.text
    else:
        assert b_changed and "leaves the outgoing weights of 'model.b'" in caplog.text
    assert recycler.history[0]["recycled"] == (2.0 if require_consumer else 3.0)


def test_dead_unit_recycler_recycles_the_conv_behind_a_dead_relu_channel(tmp_path: Path) -> None:
    # filter 3 of conv a is zero: BatchNorm makes the channel 0 (its beta) and the ReLU keeps it dead
    module = ChainModule(lr=0.0, dead_filters=(3,))
    monitor = ActivationMonitor(
        every_n_steps=1,
        log_every_n_samples=1,
        window=1,
        include=["model.act_a"],
        log_histograms=False,
        log_images=False,
    )
    recycler = DeadUnitRecycler(every_n_steps=1, max_fraction=0.5)
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=2, callbacks=[monitor, recycler], **TRAINER_OPTIONS)
    trainer.fit(module)
    fresh = fresh_parameters(module.model.a, recycle_seed(0, 1, A_INDEX))
    assert torch.equal(module.model.a.weight[3], fresh["weight"][3])
    assert (module.model.b.weight[:3, 3] == 0).all()  # channel 3 is column 3 of group 0 (filters 0-2)
    assert recycler.history[0] == {"step": 1.0, "flagged": 1.0, "recycled": 1.0, "recycled_cumulative": 1.0}
    assert monitor.dead_counts["model.act_a"] == 0


def test_dead_unit_recycler_state_dict_round_trip(tmp_path: Path) -> None:
    recycler = DeadUnitRecycler(every_n_steps=1, max_fraction=0.5)
    planted = PlantedMasks({"model.a": (3,)}, {"model.a": 8})
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=2, callbacks=[planted, recycler], **TRAINER_OPTIONS)
    trainer.fit(ChainModule(lr=0.0))
    state = recycler.state_dict()
    assert state["pending"]["model.a"][1] == 1
    restored = DeadUnitRecycler(every_n_steps=1, max_fraction=0.5)
    restored.load_state_dict(state)
    again = restored.state_dict()
    assert torch.equal(again.pop("pending")["model.a"][0], state.pop("pending")["model.a"][0])
    assert again == state
    empty = DeadUnitRecycler()
    empty.load_state_dict({})
    assert empty.last_recycle_step is None and empty.tracer.pending


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(every_n_steps=0), ValueError, "`every_n_steps` must be an int >= 1, got 0"),
        (dict(max_fraction=0.0), ValueError, r"`max_fraction` must be a finite number in \(0.0, 1.0\], got 0.0"),
        (dict(max_fraction=1.5), ValueError, r"`max_fraction` must be a finite number in \(0.0, 1.0\], got 1.5"),
        (dict(seed=-1), ValueError, "`seed` must be an int >= 0, got -1"),
        (dict(sources=3), TypeError, "`sources` must be a string or a list of strings, got 3"),
        (dict(include=[1]), TypeError, "`include` must be a string or a list of strings"),
        (dict(require_consumer=1), TypeError, "`require_consumer` must be a bool, got 1"),
        (dict(on_alarm="shout"), ValueError, "`on_alarm` must be one of"),
    ],
)
def test_dead_unit_recycler_rejects_bad_arguments(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        DeadUnitRecycler(**kwargs)


def _parameters_and_state(trainer: pl.Trainer) -> dict[str, Any]:
    module = trainer.lightning_module
    optimizer = trainer.optimizers[0]
    return {
        "parameters": {name: param.tolist() for name, param in module.named_parameters()},
        "exp_avg_sq": {
            name: optimizer.state[param]["exp_avg_sq"].tolist() for name, param in module.named_parameters()
        },
    }


def test_dead_unit_recycler_ddp_ranks_recycle_the_same_rows_with_the_same_values(tmp_path: Path) -> None:
    # rank 0 reports unit 3 dead, rank 1 unit 6; both report unit 1: every rank must recycle {1, 3, 6}
    planted = PlantedMasks({"model.a": (1,)}, {"model.a": 8}, rank_masks={0: {"model.a": (3,)}, 1: {"model.a": (6,)}})
    module = ChainModule(lr=0.0)
    initial = module.model.a.weight.detach().clone()
    callbacks = [
        planted,
        DeadUnitRecycler(every_n_steps=1, max_fraction=1.0),
        RecordOnEachRank(tmp_path, _parameters_and_state),
    ]
    trainer = pl.Trainer(default_root_dir=tmp_path, logger=False, max_steps=2, callbacks=callbacks, **DDP_OPTIONS)
    trainer.fit(module)
    ranks = read_ranks(tmp_path)
    assert ranks[0] == ranks[1]
    weight = torch.tensor(ranks[0]["parameters"]["model.a.weight"])
    recycled = _units(8, 1, 3, 6)
    assert torch.equal(weight[~recycled], initial[~recycled])
    fresh = fresh_parameters(module.model.a, recycle_seed(0, 1, A_INDEX))
    assert torch.equal(weight[recycled], fresh["weight"][recycled])


def test_dead_unit_recycler_recycles_at_least_one_unit_of_a_small_layer(tmp_path: Path) -> None:
    planted = PlantedMasks({"model.a": (0, 1)}, {"model.a": 8})
    recycler = DeadUnitRecycler(every_n_steps=1)  # max_fraction 0.1 of 8 units: 0.8, rounded up to one unit
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=3, callbacks=[planted, recycler], **TRAINER_OPTIONS)
    trainer.fit(ChainModule(lr=0.0))
    assert [(entry["step"], entry["flagged"], entry["recycled"]) for entry in recycler.history] == [(1.0, 2.0, 1.0)]


def test_dead_unit_recycler_keeps_a_bounded_history(tmp_path: Path) -> None:
    recycler = DeadUnitRecycler()
    recycler.load_state_dict({"history": [{"step": float(step)} for step in range(1500)]})
    planted = PlantedMasks({"model.a": (0,)}, {"model.a": 8})
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=3, callbacks=[planted, recycler], **TRAINER_OPTIONS)
    trainer.fit(ChainModule(lr=0.0))
    assert len(recycler.history) == 1000 and recycler.history[-1]["step"] == 1.0
