"""A model with planted dead filters, a short fit, and a real TensorBoard server to query over HTTP."""

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.helpers.kernel_models import LitWrapper

PLANTED_DEAD = 2  # filters of `model.conv` zeroed; with lr=0 they stay dead: every check counts exactly these


class PlantedDeadConv(nn.Module):
    """A 3x3 conv with 4 filters, the first `PLANTED_DEAD` zeroed, and a linear head: layers `conv`, `head`."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.conv.weight[:PLANTED_DEAD] = 0

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.relu(self.conv(x)).mean(dim=(2, 3)))  # type: ignore[no-any-return]


def fit_planted(tmp_path: Path, logger: Any, callbacks: list[Any], max_steps: int = 4) -> pl.Trainer:
    """Fit `PlantedDeadConv` (weights fixed by lr=0) for `max_steps` steps with the given logger(s)."""
    trainer = pl.Trainer(
        max_steps=max_steps,
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(LitWrapper(PlantedDeadConv(), lr=0.0))
    return trainer


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


def get_bytes(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()  # type: ignore[no-any-return]


def query(**params: Any) -> str:
    return urllib.parse.urlencode(params)


@contextmanager
def serve_tensorboard(logdir: Path, timeout_s: float = 25.0) -> Iterator[str]:
    """Run TensorBoard's own server on a free loopback port over `logdir`; yield its URL once it serves scalars."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while not _serves_scalars(url):
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                output = server.communicate()[0].decode(errors="replace")
                raise AssertionError(f"TensorBoard did not serve {logdir} within {timeout_s} s:\n{output}")
            time.sleep(0.2)
        yield url
    finally:
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        if server.stdout is not None:
            server.stdout.close()


def _serves_scalars(url: str) -> bool:
    try:
        tags = get_json(f"{url}/data/plugin/scalars/tags")
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False
    return any(tags.values())
