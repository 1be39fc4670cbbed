import os
import sys
from pathlib import Path

import pytest
import torch

# The demo's model and data (`digits_demo`) live with the examples, which import it from their own folder.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

# Two cores: keep intra-op threads at one per process so DDP tests and parallel runs do not oversubscribe.
torch.set_num_threads(1)
os.environ.setdefault("DEADUNITS_FAST", "1")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
