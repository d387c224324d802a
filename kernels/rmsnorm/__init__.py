"""Fused RMSNorm for Gemma 4 (``Gemma4RMSNorm`` semantics: fp32 math, no ``1 + w`` offset).

``rms_norm`` / ``rms_norm_residual`` / ``rms_norm_pair_residual`` (the MoE layer's tail) run Triton kernels on
CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``) and raise a clear error on other devices; they run the
autograd-capable naive twins when gradients are needed (logged once).
"""
from .naive import RMSNormOutput, rms_norm_naive, rms_norm_pair_residual_naive, rms_norm_residual_naive
from .rmsnorm import rms_norm, rms_norm_pair_residual, rms_norm_residual

__all__ = ["RMSNormOutput", "rms_norm", "rms_norm_residual", "rms_norm_pair_residual", "rms_norm_naive",
           "rms_norm_residual_naive", "rms_norm_pair_residual_naive"]
