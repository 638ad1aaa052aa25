"""Drop-in scheduler tests need diffusers (a test dependency); the helpers live in dropin_helpers.py."""

import pytest
import torch

pytest.importorskip("diffusers")


@pytest.fixture(autouse=True)
def _one_thread():
    """Small CPU tensors: intra-op threads only add contention (100x slower UNet calls on a loaded 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
