"""Glue between gemma4_fast and TransformerLens's TransformerBridge (installed as
``gemma4_fast.bridge_integration``): the ``fast_kernels`` boot flag, enabling/disabling the fast kernels on a
booted bridge, the hook seams, and the HF-delegation fallback."""
from .adapters import register_adapters
from .boot import boot_transformers, install_boot_flag
from .fast import (
    FastKernelsReport,
    FastKernelsUnavailable,
    disable_fast_kernels,
    enable_fast_kernels,
    fast_kernels_report,
    resolve_backend,
)

__all__ = ["boot_transformers", "install_boot_flag", "register_adapters", "enable_fast_kernels",
           "disable_fast_kernels", "fast_kernels_report", "FastKernelsReport", "FastKernelsUnavailable",
           "resolve_backend"]
