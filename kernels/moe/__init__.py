"""Gemma 4 mixture-of-experts ops: router, token/expert alignment and the grouped expert matmul.

``moe_experts`` (Triton grouped GEMMs), ``moe_align_block_size`` (Triton, on the GPU) and ``moe_router`` (the
router's input rows in one Triton pass, ``router_norm``; HF's ops after them) are the fast entry points; the
``*_naive`` functions are the plain PyTorch references mirroring HF ``Gemma4TextExperts`` / ``Gemma4TextRouter``.
"""
from .align import moe_align_block_size
from .experts import moe_experts
from .naive import moe_align_block_size_naive, moe_experts_naive, moe_router_naive, router_norm_naive
from .router import moe_router, router_norm

__all__ = [
    "moe_experts",
    "moe_router",
    "router_norm",
    "router_norm_naive",
    "moe_align_block_size",
    "moe_experts_naive",
    "moe_router_naive",
    "moe_align_block_size_naive",
]
