"""gemma4-fast: Triton-kernel-accelerated, hooked Gemma 4 runtime for TransformerLens's TransformerBridge."""
from __future__ import annotations

__version__ = "0.1.0"
