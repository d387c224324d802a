"""gemma4-fast: Triton-kernel-accelerated, hooked Gemma 4 runtime for TransformerLens's TransformerBridge.

``import gemma4_fast`` registers the ``"gemma4_fast"`` attention / mask / experts implementations with
transformers, the package's TransformerLens adapter, and the ``fast_kernels`` flag of
``TransformerBridge.boot_transformers``.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .bridge_integration import (
    FastKernelsReport,
    FastKernelsUnavailable,
    boot_transformers,
    disable_fast_kernels,
    enable_fast_kernels,
    install_boot_flag,
    register_adapters,
)
from .decode import generate
from .graphs import disable_prefill_graphs, enable_prefill_graphs
from .models import build_model, build_model_split, load_model, offline_tokenizer
from .patch import PatchReport, is_patched, patch_model, unpatch_model
from .presets import PRESETS, get_preset
from .registration import register

register()
register_adapters()
install_boot_flag()

__all__ = ["boot_transformers", "enable_fast_kernels", "disable_fast_kernels", "FastKernelsReport",
           "FastKernelsUnavailable", "generate", "enable_prefill_graphs", "disable_prefill_graphs", "patch_model",
           "unpatch_model", "is_patched", "PatchReport", "register", "build_model", "build_model_split", "load_model",
           "offline_tokenizer", "PRESETS", "get_preset"]
