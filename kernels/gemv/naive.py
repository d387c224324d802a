"""Plain PyTorch reference for the few-row linear ``y = x @ weight^T (+ bias)``.

Mirrors ``torch.nn.Linear.forward`` (``torch.nn.functional.linear``), which HF's Gemma 4 projections
(``Gemma4TextAttention.q_proj`` / ``o_proj``, ``Gemma4TextMLP.gate_proj`` / ``up_proj`` / ``down_proj``, the
decoder layer's ``per_layer_input_gate`` / ``per_layer_projection``) call on every position; with
``logits_to_keep=1`` transformers cuts the KV-shared layers to the last position, where these run on one row.
"""
from __future__ import annotations

from typing import Optional

import torch


def gemv_naive(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``torch.nn.functional.linear(x, weight, bias)``: x ``[..., K]``, weight ``[N, K]``, bias ``[N]`` or None;
    returns ``[..., N]`` in x's dtype (differentiable)."""
    return torch.nn.functional.linear(x, weight, bias)
