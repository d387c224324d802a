"""Plain PyTorch reference for the Gemma 4 mixture-of-experts block.

Mirrors ``transformers.models.gemma4.modeling_gemma4``:

* ``moe_experts_naive``  -> ``Gemma4TextExperts.forward`` (the eager per-expert loop),
* ``moe_router_naive``   -> ``Gemma4TextRouter.forward`` (scale-free ``Gemma4RMSNorm``, scale, linear,
  fp32 softmax, top-k, renormalise, ``per_expert_scale``),
* ``moe_align_block_size_naive`` -> the token/expert sort the Triton path runs on the GPU (no HF
  counterpart; the layout follows the grouped-GEMM convention of sorting (token, slot) pairs by expert).

Weights are used exactly as HF stores them: ``gate_up_proj [E, 2I, H]`` (gate rows first, then up) and
``down_proj [E, H, I]``. The activation is ``gelu_pytorch_tanh`` (``gelu(approximate="tanh")``).

Out-of-range expert indices: HF 5.23 uses ``E`` as a "no expert" sentinel and skips it; here every index
outside ``[0, E)`` (``E``, larger values, negatives) is skipped and contributes nothing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _act(gate: torch.Tensor) -> torch.Tensor:
    return F.gelu(gate, approximate="tanh")


def moe_experts_naive(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    *,
    return_expert_outputs: bool = False,
):
    """Reference expert mixture, mirroring HF ``Gemma4TextExperts.forward``.

    Args:
        x: ``[T, H]`` hidden states (bf16/fp16/fp32).
        top_k_index: ``[T, k]`` integer expert ids; ids outside ``[0, E)`` are skipped.
        top_k_weights: ``[T, k]`` routing weights (fp32 or x's dtype).
        gate_up_proj: ``[E, 2I, H]``; rows ``[:I]`` are the gate, ``[I:]`` the up projection.
        down_proj: ``[E, H, I]``.
        return_expert_outputs: also return ``[T, k, H]`` (x's dtype): each chosen expert's output before
            its routing weight (zeros for skipped slots).

    Returns:
        ``y [T, H]`` in x's dtype, or ``(y, expert_outputs)``.

    Arithmetic follows HF: both linears run in x's dtype, the product with the routing weight follows
    torch type promotion, and the sum over slots is an ``index_add_`` in x's dtype.
    """
    num_experts = gate_up_proj.shape[0]
    num_tokens, top_k = top_k_index.shape
    y = torch.zeros_like(x)
    expert_outputs = (
        torch.zeros(num_tokens, top_k, x.shape[-1], dtype=x.dtype, device=x.device) if return_expert_outputs else None
    )
    with torch.no_grad():
        valid = (top_k_index >= 0) & (top_k_index < num_experts)
        hit = torch.unique(top_k_index[valid]).tolist()
    for expert in hit:
        token_idx, slot_idx = torch.where((top_k_index == expert) & valid)
        state = x[token_idx]
        gate, up = F.linear(state, gate_up_proj[expert]).chunk(2, dim=-1)
        out = F.linear(_act(gate) * up, down_proj[expert])
        if expert_outputs is not None:
            expert_outputs[token_idx, slot_idx] = out.to(x.dtype)
        weighted = out * top_k_weights[token_idx, slot_idx, None]
        y.index_add_(0, token_idx, weighted.to(y.dtype))
    if return_expert_outputs:
        return y, expert_outputs
    return y


def router_norm_naive(x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The router's input rows, HF ``Gemma4TextRouter.forward`` up to ``self.proj``: ``self.norm(x)`` (RMSNorm
    without a learned weight, fp32 math, cast back to x's dtype), ``* self.scale``, ``* hidden_size ** -0.5``,
    each product rounded to x's dtype as HF's three ops do.

    Args:
        x: ``[T, H]`` hidden states.
        scale: ``[H]`` (``router.scale``).
        eps: the norm's epsilon.

    Returns:
        ``[T, H]`` in the promoted dtype of x and scale (x's dtype for a model in one dtype).
    """
    xf = x.float()
    normed = (xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)).type_as(x)
    return normed * scale * (x.shape[-1] ** -0.5)


def moe_router_naive(
    x: torch.Tensor,
    proj_weight: torch.Tensor,
    scale: torch.Tensor,
    per_expert_scale: torch.Tensor,
    *,
    top_k: int,
    eps: float = 1e-6,
):
    """Reference router, mirroring HF ``Gemma4TextRouter.forward``.

    Args:
        x: ``[T, H]`` hidden states (the residual stream before the MLP).
        proj_weight: ``[E, H]`` router linear weight (``router.proj.weight``).
        scale: ``[H]`` (``router.scale``).
        per_expert_scale: ``[E]`` (``router.per_expert_scale``).
        top_k: experts per token.
        eps: RMSNorm epsilon (``config.rms_norm_eps``).

    Returns:
        ``(probs [T, E] fp32, top_k_weights [T, k], top_k_index [T, k] int64)``; ``top_k_weights`` has the
        promoted dtype of fp32 and ``per_expert_scale`` (fp32 for bf16/fp16/fp32 parameters), as in HF.
    """
    logits = F.linear(router_norm_naive(x, scale, eps), proj_weight)
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)
    top_k_weights, top_k_index = torch.topk(probs, k=top_k, dim=-1)
    top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
    top_k_weights = top_k_weights * per_expert_scale[top_k_index]
    return probs, top_k_weights, top_k_index


def moe_align_block_size_naive(top_k_index: torch.Tensor, num_experts: int, block_m: int):
    """Reference token/expert alignment (host-side PyTorch; same contract as ``moe_align_block_size``).

    Args:
        top_k_index: ``[T, k]`` integer expert ids; ids outside ``[0, num_experts)`` are dropped.
        num_experts: ``E``.
        block_m: rows per block of the grouped GEMM.

    Returns:
        ``sorted_ids [T*k + min(E, T*k)*(block_m-1)]`` int32: flat (token*k + slot) ids grouped by expert in
        ascending expert order, each expert's group padded to a multiple of ``block_m`` with the pad value
        ``T*k``; entries past the used length also hold ``T*k``.
        ``expert_ids [cdiv(len(sorted_ids), block_m)]`` int32: the expert of each block, ``-1`` for unused
        blocks.
        ``num_tokens_post_padded [1]`` int32: the used length of ``sorted_ids``.
        Within an expert, pairs keep ascending flat-id order.
    """
    num_tokens, top_k = top_k_index.shape
    numel = num_tokens * top_k
    max_len = numel + min(num_experts, numel) * (block_m - 1)
    device = top_k_index.device
    flat = top_k_index.reshape(-1).long()
    sorted_ids = torch.full((max_len,), numel, dtype=torch.int32, device=device)
    expert_ids = torch.full(((max_len + block_m - 1) // block_m,), -1, dtype=torch.int32, device=device)
    pos = 0
    for expert in range(num_experts):
        ids = torch.nonzero(flat == expert).flatten()
        if ids.numel() == 0:
            continue
        sorted_ids[pos : pos + ids.numel()] = ids.to(torch.int32)
        padded = (ids.numel() + block_m - 1) // block_m * block_m
        expert_ids[pos // block_m : (pos + padded) // block_m] = expert
        pos += padded
    return sorted_ids, expert_ids, torch.tensor([pos], dtype=torch.int32, device=device)
