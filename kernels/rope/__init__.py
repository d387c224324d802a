"""Fused rotary position embedding (RoPE) for Gemma 4 (HF ``apply_rotary_pos_emb`` semantics).

``rope`` / ``rope_qk`` run a Triton kernel on CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``)
and raise a clear error on other devices; they run the autograd-capable ``rope_naive`` /
``rope_qk_naive`` when gradients are needed (logged once). ``unsupported_reason`` tells a dispatcher
why an input cannot take the kernel.
"""
from .naive import rms_norm_rope_naive, rope_naive, rope_qk_naive
from .rope import rms_norm_rope, rope, rope_qk, unsupported_reason

__all__ = ["rope", "rope_qk", "rms_norm_rope", "rope_naive", "rope_qk_naive", "rms_norm_rope_naive",
           "unsupported_reason"]
