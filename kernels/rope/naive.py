"""Plain PyTorch reference for the rotary position embedding (RoPE) ops.

Mirrors ``transformers.models.gemma4.modeling_gemma4.apply_rotary_pos_emb(x, cos, sin, unsqueeze_dim=2)``
with its ``rotate_half``: ``x * cos + cat(-x[..., D/2:], x[..., :D/2]) * sin``, cos/sin broadcast over
the head dim. The operations and their order are HF's, so the result is bit-identical to HF's call in
every dtype (the products and the sum round in x's dtype when cos/sin are in x's dtype).

These functions define the semantics the Triton kernel in ``rope.py`` reproduces (it computes in fp32 and
rounds once) and are the autograd path: they are differentiable.
"""
from __future__ import annotations

import torch


def rope_naive(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE of ``x`` as HF ``apply_rotary_pos_emb(x, cos, sin, unsqueeze_dim=2)``.

    Args:
        x: ``[B, S, H, D]`` queries or keys, any float dtype, D even.
        cos, sin: ``[B|1, S, D]`` (HF's rotary embedding output, in x's dtype).

    Returns:
        ``[B, S, H, D]`` in torch's promotion of the dtypes (x's dtype when they match).
    """
    cos = cos.unsqueeze(2)
    sin = sin.unsqueeze(2)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos) + (rotated * sin)


def rope_qk_naive(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                  sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rope_naive(q, cos, sin), rope_naive(k, cos, sin))``: q ``[B, S, Hq, D]``, k ``[B, S, Hk, D]``."""
    return rope_naive(q, cos, sin), rope_naive(k, cos, sin)


def rms_norm_rope_naive(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                        eps: float = 1e-6) -> torch.Tensor:
    """HF's query/key path: ``Gemma4RMSNorm`` with scale (fp32 math, cast back to x's dtype), then
    ``apply_rotary_pos_emb``: ``rope_naive(rms_norm_naive(x, weight, eps), cos, sin)``.

    Args:
        x: ``[B, S, H, D]``; weight ``[D]``; cos, sin ``[B|1, S, D]`` in x's dtype; eps as the norm's.
    Returns:
        ``[B, S, H, D]`` in x's dtype.
    """
    from ..rmsnorm.naive import rms_norm_naive

    return rope_naive(rms_norm_naive(x, weight, eps), cos, sin)
