"""Gemma 4 router (HF ``Gemma4TextRouter.forward``) as PyTorch ops.

The router is left to PyTorch on purpose: its cost is a ``[T, H] x [H, E]`` product (E = 128) plus a
softmax and a top-k over 128 values, small next to the expert GEMMs, and a fused kernel cannot match
HF's top-k choices bit for bit (the bf16 logits would round differently, and near-ties would pick
other experts). Using the same ops in the same order keeps the routing identical to HF's.
"""
from __future__ import annotations

import torch

from .naive import moe_router_naive


def moe_router(
    x: torch.Tensor,
    proj_weight: torch.Tensor,
    scale: torch.Tensor,
    per_expert_scale: torch.Tensor,
    *,
    top_k: int,
    eps: float = 1e-6,
):
    """Route tokens to experts exactly as HF's ``Gemma4TextRouter``.

    ``normed = x * (mean(x**2) + eps) ** -0.5`` (fp32, cast back to x's dtype, no learned scale),
    ``logits = (normed * scale * H**-0.5) @ proj_weight.T``, ``probs = softmax(logits)`` in fp32, top-k,
    renormalised to sum 1, times ``per_expert_scale[top_k_index]``.

    Args:
        x: ``[T, H]`` hidden states (the residual stream entering the MLP), bf16/fp16/fp32.
        proj_weight: ``[E, H]`` router projection (``router.proj.weight``), x's dtype.
        scale: ``[H]`` (``router.scale``).
        per_expert_scale: ``[E]`` (``router.per_expert_scale``).
        top_k: experts per token, ``1 <= top_k <= E``.
        eps: RMSNorm epsilon (``config.rms_norm_eps``).

    Returns:
        ``(probs [T, E] float32, top_k_weights [T, k], top_k_index [T, k] int64)``. ``top_k_weights`` is
        float32 for bf16/fp16/fp32 parameters (fp32 probabilities times ``per_expert_scale`` promote
        to fp32), as HF produces. Autograd flows through the PyTorch ops.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got shape {tuple(x.shape)}")
    if proj_weight.dim() != 2 or proj_weight.shape[1] != x.shape[1]:
        raise ValueError(f"proj_weight must be [E, H] with H = {x.shape[1]}, got {tuple(proj_weight.shape)}")
    if scale.shape != (x.shape[1],):
        raise ValueError(f"scale must be [H] = [{x.shape[1]}], got {tuple(scale.shape)}")
    if per_expert_scale.shape != (proj_weight.shape[0],):
        raise ValueError(f"per_expert_scale must be [E] = [{proj_weight.shape[0]}], got "
                         f"{tuple(per_expert_scale.shape)}")
    if not 1 <= top_k <= proj_weight.shape[0]:
        raise ValueError(f"top_k must be in [1, {proj_weight.shape[0]}], got {top_k}")
    return moe_router_naive(x, proj_weight, scale, per_expert_scale, top_k=top_k, eps=eps)
