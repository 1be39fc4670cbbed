"""Transformers and modern blocks: functional activations, sequences, attention heads and embeddings."""

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_deadunits.callbacks.activation_monitor import ActivationMonitor
from lightning_deadunits.errors import DeadUnitsWarning
from lightning_deadunits.metrics.activation_stats import ActivationStats
from lightning_deadunits.probes.activations import DEFAULT_ACTIVATION_TYPES, ActivationProbe
from tests.helpers.activation_models import FunctionalRelu, hook_count
from tests.helpers.memory_logger import MemoryLogger

KEY = "deadunits/activations"
WIDTH, FFN = 16, 32
PLANTED = {0: [3, 7], 1: [5]}


class SequenceTask(pl.LightningModule):
    """Regresses `model(x)` on zeros over fixed `(N, T, F)` batches of alternating sequence lengths, with SGD."""

    def __init__(self, model: nn.Module, lengths: tuple[int, ...], steps: int, lr: float = 1e-3) -> None:
        super().__init__()
        self.model = model
        generator = torch.Generator().manual_seed(0)
        self.batches = [torch.randn(4, lengths[i % len(lengths)], WIDTH, generator=generator) for i in range(steps)]
        self.lr = lr
        self.function_modes: list[int] = []

    def forward(self, x: Tensor) -> Tensor:
        self.function_modes.append(torch._C._len_torch_function_stack())
        return self.model(x)  # type: ignore[no-any-return]

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return self(batch).pow(2).mean()  # type: ignore[no-any-return]

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        self(batch)

    def train_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(self.batches, batch_size=None)

    def val_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(self.batches[:2], batch_size=None)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _encoder(activation: str, plant: bool) -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(WIDTH, 2, FFN, dropout=0.0, activation=activation, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    if plant:
        with torch.no_grad():
            for index, units in PLANTED.items():
                encoder.layers[index].linear1.weight[units] = 0.0  # type: ignore[index]
                encoder.layers[index].linear1.bias[units] = -10.0  # type: ignore[index]
    return encoder


def _fit(tmp_path: Path, task: pl.LightningModule, monitor: ActivationMonitor, **kwargs: Any) -> MemoryLogger:
    memory = MemoryLogger()
    options: dict[str, Any] = dict(
        max_epochs=1,
        logger=[memory],
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    pl.Trainer(callbacks=[monitor], **{**options, **kwargs}).fit(task)
    return memory


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("plant", [True, False])
def test_stock_transformer_encoder_counts_the_planted_dead_ffn_neurons_per_layer(
    tmp_path: Path, activation: str, plant: bool
) -> None:
    task = SequenceTask(_encoder(activation, plant), lengths=(6, 11), steps=4)
    monitor = ActivationMonitor(every_n_steps=1, log_every_n_samples=2, window=4, on_validation=True)
    memory = _fit(tmp_path, task, monitor, limit_val_batches=2, val_check_interval=4)
    sites = {f"model.layers.{index}:{activation}#0": index for index in PLANTED}
    assert {monitor.probe.site_name(site) for site in monitor.stats.sites} == set(sites)
    assert all(state.totals.shape[1] == FFN for state in monitor.stats.sites.values())  # both lengths: one layout
    assert set(monitor.probe.channel_dims.values()) == {-1}
    for name, index in sites.items():
        planted = len(PLANTED[index]) if plant else 0
        assert memory.series(f"{KEY}/{name}/dead") == {1: planted, 3: planted}
        assert memory.series(f"{KEY}/{name}/dead_frac") == {1: planted / FFN, 3: planted / FFN}
        # the validation pass runs the layer in eval mode without grad: the fused path would hide the FFN
        assert memory.series(f"{KEY}/val/{name}/dead") == {4: planted}
    for name, index in sites.items():
        site = next(site for site in monitor.stats.dead_masks(window=4) if monitor.probe.site_name(site) == name)
        mask = monitor.stats.dead_masks(window=4)[site]
        assert mask.nonzero().flatten().tolist() == (PLANTED[index] if plant else [])


class SwiGLU(nn.Module):
    """A LLaMA-style MLP: `down(silu(gate(x)) * up(x))`."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(width, hidden)
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))  # type: ignore[no-any-return]


def test_swiglu_mlp_is_watched_without_any_argument(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(SwiGLU(WIDTH, 24), nn.LayerNorm(WIDTH), SwiGLU(WIDTH, 24))
    with torch.no_grad():
        model[2].gate.weight[[1, 20]] = 0.0
        model[2].gate.bias[[1, 20]] = -30.0  # silu(-30) = -2.8e-12: dead under the 1e-6 tolerance
    monitor = ActivationMonitor(every_n_steps=1, log_every_n_samples=1, window=3)
    memory = _fit(tmp_path, SequenceTask(model, lengths=(5, 9), steps=3), monitor)
    assert memory.series(f"{KEY}/model.0:silu#0/dead") == {0: 0, 1: 0, 2: 0}
    assert memory.series(f"{KEY}/model.2:silu#0/dead") == {0: 2, 1: 2, 2: 2}
    assert memory.series(f"{KEY}/total/channels")[2] == 48


def test_functional_relu_model_is_watched_by_default_and_nothing_warns_only_when_nothing_is_there(
    tmp_path: Path,
) -> None:
    class Images(SequenceTask):
        def __init__(self, model: nn.Module) -> None:
            super().__init__(model, lengths=(1,), steps=2)
            self.batches = [torch.randn(2, 3, 5, 5) for _ in range(2)]

    monitor = ActivationMonitor(every_n_steps=1)
    memory = _fit(tmp_path, Images(FunctionalRelu()), monitor)
    dead = memory.series(f"{KEY}/model:relu#0/dead")[1]
    assert memory.series(f"{KEY}/model:relu#0/dead_frac")[1] == pytest.approx(float(dead) / 4)
    assert monitor.probe.channel_dims == {("model:relu#0", 0): 1, ("model:relu#1", 0): 1}  # conv outputs: dim 1
    with pytest.warns(
        DeadUnitsWarning, match="found no module to watch in .*, nor an activation function called in a forward"
    ):
        _fit(tmp_path, SequenceTask(nn.Linear(WIDTH, 2), lengths=(3,), steps=1), ActivationMonitor(every_n_steps=1))


def test_interception_exists_only_inside_sampled_forwards(tmp_path: Path) -> None:
    task = SequenceTask(_encoder("relu", plant=False), lengths=(4,), steps=5)
    hooks: list[int] = []
    task.on_train_batch_end = lambda *args: hooks.append(hook_count(task))  # type: ignore[method-assign]
    _fit(tmp_path, task, ActivationMonitor(every_n_steps=2))
    assert task.function_modes == [1, 0, 1, 0, 1]  # the mode is on in sampled forwards, absent elsewhere
    assert hooks == [0] * 5  # removed at every batch end (the monitor's hook runs first)
    assert torch._C._len_torch_function_stack() == 0


class ScaledRelu(nn.Module):
    """`relu(fc(x) * 0.5)`: an operation between the linear layer and the activation module."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(WIDTH, 6)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(F.dropout(self.fc(x) * 0.5, 0.0))  # type: ignore[no-any-return]


def test_channel_dim_follows_data_flow_through_shape_keeping_operations() -> None:
    model = ScaledRelu()
    probe = ActivationProbe(DEFAULT_ACTIVATION_TYPES)
    probe.attach(model)
    stats = ActivationStats()
    for length in (5, 9):
        stats.begin_sample()
        probe.start(stats)
        model(torch.randn(3, length, WIDTH))
        probe.stop()
    assert probe.channel_dims == {("act", 0): -1}  # not dim 1, the sequence positions
    summary = stats.summarise(window=2)[("act", 0)]
    assert summary.channels == 6 and summary.count == 3 * 5 + 3 * 9  # every position of both lengths
    assert list(stats.sites) == [("act", 0)]  # nn.ReLU's own F.relu is not a second site


class AttentionRecurrentLM(nn.Module):
    """Embedding (with a padding row) -> multi-head attention -> GRU -> linear head, on token ids."""

    def __init__(self, vocab: int = 12, heads: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, WIDTH, padding_idx=0)
        self.attn = nn.MultiheadAttention(WIDTH, heads, batch_first=True)
        self.rnn = nn.GRU(WIDTH, 8, batch_first=True)
        self.head = nn.Linear(8, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        x = self.attn(x, x, x, need_weights=False)[0]
        return self.head(self.rnn(x)[0])  # type: ignore[no-any-return]


def test_attention_heads_recurrent_gates_and_embeddings_are_read_apart(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = AttentionRecurrentLM()
    head_dim = WIDTH // 4
    with torch.no_grad():
        model.attn.in_proj_weight[WIDTH + 2 * head_dim : WIDTH + 3 * head_dim] = 0.0  # the keys of head 2
        model.rnn.weight_ih_l0[8 + 3] = 0.0  # unit 3 of the update gate z (rows r, z, n)
        model.rnn.weight_hh_l0[8 + 3] = 0.0
        model.embed.weight[[4, 9]] = 0.0  # two dead tokens; row 0 is padding, zero by design

    class Tokens(SequenceTask):
        def __init__(self) -> None:
            super().__init__(model, lengths=(1,), steps=2, lr=0.0)
            self.batches = [torch.randint(0, 12, (3, 7)) for _ in range(2)]

    from lightning_deadunits.callbacks.kernel_norm_monitor import KernelNormMonitor

    monitor = KernelNormMonitor(every_n_steps=1)
    memory = _fit(tmp_path, Tokens(), monitor)
    last = {key: series[max(series)] for key, series in memory.metrics.items() if key.startswith("deadunits/kernels")}
    kernels = "deadunits/kernels"
    heads = {
        key: last[key] for qkv in "qkv" for h in range(4) if (key := f"{kernels}/model.attn.in_proj.{qkv}.head{h}/dead")
    }
    assert heads == {key: (head_dim if key == f"{kernels}/model.attn.in_proj.k.head2/dead" else 0.0) for key in heads}
    assert last[f"{kernels}/model.rnn.l0.gate_z/dead"] == 1 and last[f"{kernels}/model.rnn.l0.gate_r/dead"] == 0
    assert last[f"{kernels}/model.embed/dead"] == 2 and last[f"{kernels}/total_embedding/dead"] == 2
    assert last[f"{kernels}/total_embedding/tokens"] == 12 and f"{kernels}/total_embedding/dead_rel" not in last
    filters = 3 * WIDTH + WIDTH + 3 * 8 + 12  # q/k/v rows, out_proj, GRU gate rows, head: no token
    assert last[f"{kernels}/total/filters"] == filters
    assert last[f"{kernels}/total/dead"] == head_dim + 1


def test_scan_reports_embeddings_in_their_own_section_never_in_filter_totals(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from lightning_deadunits.cli import main

    torch.manual_seed(0)
    model = AttentionRecurrentLM()
    with torch.no_grad():
        model.embed.weight[[4, 9]] = 0.0  # two dead tokens, besides the padding row 0 (a file cannot tell)
        model.head.weight[1] = 0.0  # one dead filter
    torch.save(model.state_dict(), tmp_path / "lm.pt")
    assert main(["scan", str(tmp_path / "lm.pt"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["embeddings"] == [
        {"name": "embed", "tokens": 12, "dead": 3, "norm_median": pytest.approx(report["embeddings"][0]["norm_median"])}
    ]
    assert report["embedding_total"] == {"tokens": 12, "dead": 3}
    assert [layer["name"] for layer in report["layers"]] == ["attn.out_proj", "head"]  # packed in_proj: no `.weight`
    assert report["total"]["filters"] == WIDTH + 12 and report["total"]["dead_abs"] == 1
    assert main(["scan", str(tmp_path / "lm.pt")]) == 0
    table = capsys.readouterr().out
    assert "embeddings (not in" in table and table.count("│ embed ") == 1


class PaddedTask(pl.LightningModule):
    """`relu(fc(x))` on `(N, T, 4)` batches given as `{"x", "token_mask"}`: unit 3 fires only at padded positions."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        with torch.no_grad():
            self.fc.weight.zero_()
            self.fc.weight[:, 1] = 1.0
            self.fc.bias.fill_(0.5)
            self.fc.weight[3] = torch.tensor([1.0, 0.0, 0.0, 0.0])
            self.fc.bias[3] = -0.5
        x = torch.rand(2, 6, 4)
        x[:, :, 0] = 0.0
        mask = torch.ones(2, 6, dtype=torch.bool)
        mask[0, 4:] = mask[1, 2:] = False
        x[~mask] = 5.0  # padding: unit 3 active there only
        self.batch = {"x": x, "token_mask": mask}

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.fc(x))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return self(batch["x"]).sum() * 0.0  # type: ignore[no-any-return]

    def train_dataloader(self) -> Any:
        return torch.utils.data.DataLoader([self.batch] * 2, batch_size=None)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize("masked", [True, False])
def test_padding_mask_keeps_padded_positions_out_of_the_counts(tmp_path: Path, masked: bool) -> None:
    task = PaddedTask()
    if not masked:
        del task.batch["token_mask"]
    memory = _fit(tmp_path, task, ActivationMonitor(every_n_steps=1))
    assert memory.series(f"{KEY}/:relu#0/dead")[1] == (1 if masked else 0)
    zero_frac = memory.series(f"{KEY}/:relu#0/zero_frac")[1]
    assert zero_frac == pytest.approx(1 / 6 if masked else (1 / 6) * (6 / 12))  # 6 real of 12 positions


class RankLengths(SequenceTask):
    """Each DDP rank trains on its own sequence length (6 on rank 0, 11 on rank 1)."""

    def train_dataloader(self) -> Any:
        length = 6 + 5 * self.trainer.global_rank
        generator = torch.Generator().manual_seed(self.trainer.global_rank)
        batches = [torch.randn(4, length, WIDTH, generator=generator) for _ in range(3)]
        return torch.utils.data.DataLoader(batches, batch_size=None)


def _dead_units(trainer: pl.Trainer) -> dict[str, Any]:
    (monitor,) = [c for c in trainer.callbacks if isinstance(c, ActivationMonitor)]  # type: ignore[attr-defined]
    return {name: mask.nonzero().flatten().tolist() for name, mask in monitor.dead_masks.items()}


@pytest.mark.slow
def test_functional_sites_agree_across_ddp_ranks_with_different_sequence_lengths(tmp_path: Path) -> None:
    from tests.helpers.ddp import DDP_OPTIONS, RecordOnEachRank, read_ranks

    task = RankLengths(_encoder("relu", plant=True), lengths=(1,), steps=1)
    callbacks = [ActivationMonitor(every_n_steps=1, window=3), RecordOnEachRank(tmp_path / "ranks", _dead_units)]
    trainer = pl.Trainer(max_steps=3, logger=False, callbacks=callbacks, use_distributed_sampler=False, **DDP_OPTIONS)
    trainer.fit(task)
    expected = {f"model.layers.{index}:relu#0": units for index, units in PLANTED.items()}
    assert read_ranks(tmp_path / "ranks") == [expected, expected]
