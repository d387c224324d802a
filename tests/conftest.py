"""Shared pytest setup: the ``cuda`` marker skips without a GPU; tiny sizes on the CPU; ``tests/`` importable."""
from __future__ import annotations

import os
import sys

import pytest
import torch

# Shared helpers (tests/_inputs.py) import by name under --import-mode=importlib.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Tiny CPU tensors: one intra-op thread avoids oversubscription (a tiny generate runs ~50x faster on 2 cores).
torch.set_num_threads(1)
# Without a GPU, Triton kernels run on the CPU through the interpreter. The flag is read when a
# kernel is decorated, so it must be set before any gemma4_fast.kernels module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton.runtime.interpreter as _interp

    _orig_patch_lang_tensor = _interp._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        # numpy >= 2.4 refuses int() on 1-element arrays, which Triton's interpreter uses for run-time loop
        # bounds: give interpreted tensors an __index__ that reads the single element.
        _orig_patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interp._patch_lang_tensor = _patch_lang_tensor


def pytest_collection_modifyitems(config, items):
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    skip_cuda = pytest.mark.skip(reason="needs CUDA (no GPU visible)")
    skip_multi = pytest.mark.skip(reason=f"needs at least two CUDA GPUs ({n_gpus} visible)")
    for item in items:
        if "multigpu" in item.keywords and n_gpus < 2:
            item.add_marker(skip_multi)
        elif "cuda" in item.keywords and n_gpus < 1:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
