"""Fused Gemma 4 MLP activation: ``h = gelu_tanh(gate) * up`` in one pass (fp32 math, one rounding).

``gelu_mul`` runs a Triton kernel on CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``) and
raises a clear error on other devices; it runs the autograd-capable ``gelu_mul_naive`` when
gradients are needed (logged once).

``linear_gelu_mul(x, w_gate, w_up)`` is the MLP's gate and up projections with that activation: on an sm_90 GPU one
Gluon kernel (``mlp_hopper.py``) applies it to the two GEMMs' accumulators, so ``gate`` and ``up`` are never written;
elsewhere two GEMMs then ``gelu_mul``.
"""
from .gelu_mul import gelu_mul
from .linear import linear_gelu_mul
from .naive import gelu_mul_naive, linear_gelu_mul_naive

__all__ = ["gelu_mul", "gelu_mul_naive", "linear_gelu_mul", "linear_gelu_mul_naive"]
