"""A small character-level transformer language model on text that ships with Python (the standard library's sources).

Shared by the transformer example, the spike benchmark and the overhead benchmark (``from char_lm import ...``: a
script's folder is on ``sys.path``; the tests and benchmarks put this folder there). Offline: no download.
"""

import sysconfig
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["VOCAB", "CharLM", "CharLMModule", "char_windows", "stdlib_text"]

VOCAB = 128
"""ASCII codes; any other character is read as ``?``."""


def stdlib_text(max_chars: int = 400_000) -> str:
    """The first ``max_chars`` characters of the standard library's ``*.py`` files, in sorted path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts: list[str] = []
    total = 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return "".join(parts)[:max_chars]


def char_windows(text: str, seq_len: int = 64, stride: int | None = None) -> TensorDataset:
    """``(inputs, targets, ids)``: windows of ``seq_len`` character codes, the next character of each, window ids."""
    codes = torch.tensor([ord(c) if ord(c) < VOCAB else ord("?") for c in text], dtype=torch.long)
    stride = stride or seq_len
    starts = torch.arange(0, len(codes) - seq_len - 1, stride)
    index = starts[:, None] + torch.arange(seq_len + 1)
    windows = codes[index]
    return TensorDataset(windows[:, :-1], windows[:, 1:], torch.arange(len(starts)))


class CharLM(nn.Module):
    """Embedding, learned positions, ``layers`` pre-norm ``nn.TransformerEncoderLayer`` (causal), a linear head.

    Args:
        width: the model width (``d_model``).
        layers: encoder layers.
        heads: attention heads.
        ffn: feed-forward width (``dim_feedforward``).
        activation: the feed-forward activation (``"relu"`` or ``"gelu"``, applied as a function inside the layer).
        seq_len: the longest sequence.
    """

    def __init__(
        self,
        width: int = 64,
        layers: int = 2,
        heads: int = 4,
        ffn: int = 256,
        activation: Literal["relu", "gelu"] = "relu",
        seq_len: int = 64,
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.position = nn.Parameter(torch.zeros(seq_len, width))
        layer = nn.TransformerEncoderLayer(
            width, heads, ffn, dropout=0.0, activation=activation, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, codes: Tensor) -> Tensor:
        length = codes.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=codes.device)
        hidden = self.embed(codes) + self.position[:length]
        return self.head(self.norm(self.encoder(hidden, mask=mask, is_causal=True)))  # type: ignore[no-any-return]


class CharLMModule(pl.LightningModule):
    """Trains :class:`CharLM` with AdamW; ``training_step`` returns the loss, per-sample losses and window ids.

    Args:
        data: a dataset from :func:`char_windows`.
        lr: AdamW's learning rate.
        batch_size: windows per batch (the loader does not shuffle, so batch ``i`` is the same in every run).
        model_options: passed to :class:`CharLM`.
    """

    def __init__(self, data: TensorDataset, lr: float = 3e-3, batch_size: int = 32, **model_options: Any) -> None:
        super().__init__()
        self.data = data
        self.lr = lr
        self.batch_size = batch_size
        self.model = CharLM(seq_len=data.tensors[0].shape[1], **model_options)

    def forward(self, codes: Tensor) -> Tensor:
        return self.model(codes)  # type: ignore[no-any-return]

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        codes, targets, ids = batch
        logits = self(codes)
        per_token = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
        per_sample = per_token.mean(dim=1)
        return {"loss": per_sample.mean(), "per_sample_loss": per_sample.detach(), "sample_ids": ids}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.0)

    def train_dataloader(self) -> DataLoader[Any]:
        return DataLoader(self.data, batch_size=self.batch_size, shuffle=False)
