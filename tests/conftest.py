import os

import pytest
import torch

# Two cores: keep intra-op threads at one per process so DDP tests and parallel runs do not oversubscribe.
torch.set_num_threads(1)
os.environ.setdefault("DEADUNITS_FAST", "1")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
