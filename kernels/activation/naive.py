"""Plain PyTorch reference for the fused MLP activation ``gelu_tanh(gate) * up``.

Mirrors the middle of ``transformers.models.gemma4.modeling_gemma4.Gemma4TextMLP.forward``
(``self.act_fn(self.gate_proj(x)) * self.up_proj(x)`` with ``act_fn = ACT2FN["gelu_pytorch_tanh"]``,
i.e. ``transformers.activations.GELUTanh``: ``torch.nn.functional.gelu(gate, approximate="tanh")``),
and the same step of ``Gemma4UnifiedTextMLP``. Differentiable; it is the autograd path of the op.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F


def gelu_mul_naive(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``gelu(gate, approximate="tanh") * up``, exactly as HF computes it (two roundings in low precision).

    Args:
        gate: ``[..., N]`` any float dtype (the ``gate_proj`` output).
        up: same shape as ``gate`` (the ``up_proj`` output); broadcasting follows torch.

    Returns:
        ``[..., N]`` in torch's promoted dtype of (gate, up).
    """
    return F.gelu(gate, approximate="tanh") * up


def linear_gelu_mul_naive(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    """``act_fn(gate_proj(x)) * up_proj(x)`` of ``Gemma4TextMLP.forward`` with bias-free projections, exactly as HF
    computes it: ``gelu(x @ w_gate^T, approximate="tanh") * (x @ w_up^T)`` (the GEMMs, the GELU and the product
    each rounded in low precision).

    Args:
        x: ``[..., K]`` the MLP input (after ``pre_feedforward_layernorm``).
        w_gate: ``[N, K]`` ``gate_proj.weight``.
        w_up: ``[N, K]`` ``up_proj.weight``.

    Returns:
        ``[..., N]``, the input of ``down_proj``, in torch's promoted dtype.
    """
    return F.gelu(F.linear(x, w_gate), approximate="tanh") * F.linear(x, w_up)
