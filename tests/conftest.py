"""Shared pytest setup: the ``cuda`` marker skips without a GPU; tiny sizes on the CPU."""
from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, Triton kernels run on the CPU through the interpreter. The flag is read when a
# kernel is decorated, so it must be set before any gemma4_fast.kernels module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (no GPU visible)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
