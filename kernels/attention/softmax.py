"""Triton row softmax for hook-edited attention scores (``softmax_scores``), with its launcher and configs.

``softmax_scores_fwd_kernel``: one program per row of a ``[rows, n]`` view (unit column stride), fp32 math,
output in the scores' dtype. Rows up to ``BLOCK_N`` columns are held in registers (one read, one write);
longer rows take an online max/sum pass over ``BLOCK_N`` chunks, then a write pass (two reads, one write).
A row whose scores are all ``-inf`` (fully masked) gives zeros, as ``naive.softmax_scores`` does; the
torch version's multi-pass fp32 temporaries are what this replaces on the hooked ``scores`` path.

Configs: ``softmax_configs(n)`` (named generator; ``BLOCK_N`` up to 4096, warps by block size), pinned by
``GEMMA4_FAST_SOFTMAX_CONFIG`` (e.g. ``'{"BLOCK_N": 16, "num_warps": 1}'``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import next_power_of_2, pinned_config

ENV_SOFTMAX = "GEMMA4_FAST_SOFTMAX_CONFIG"
MAX_BLOCK = 4096


@triton.jit
def softmax_scores_fwd_kernel(S, P, N_COLS, stride_s, stride_p, BLOCK_N: tl.constexpr, SINGLE: tl.constexpr):
    """Softmax of row ``program_id(0)`` of ``S`` into ``P`` (fp32 math, ``P``'s dtype)."""
    row = tl.program_id(0).to(tl.int64)
    s_ptr = S + row * stride_s
    p_ptr = P + row * stride_p
    offs = tl.arange(0, BLOCK_N)
    if SINGLE:
        mask = offs < N_COLS
        x = tl.load(s_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
        m = tl.max(x, 0)
        m_use = tl.where(m == float("-inf"), 0.0, m)
        e = tl.exp(x - m_use)
        l_sum = tl.sum(e, 0)
        inv = tl.where(l_sum > 0.0, 1.0 / tl.where(l_sum > 0.0, l_sum, 1.0), 0.0)
        tl.store(p_ptr + offs, (e * inv).to(P.dtype.element_ty), mask=mask)
    else:
        m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
        l_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N_COLS, BLOCK_N):
            cols = start + offs
            x = tl.load(s_ptr + cols, mask=cols < N_COLS, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, x)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_acc = l_acc * tl.exp(m - m_use) + tl.exp(x - m_use)
            m = m_new
        m_row = tl.max(m, 0)
        m_row_use = tl.where(m_row == float("-inf"), 0.0, m_row)
        m_lane = tl.where(m == float("-inf"), 0.0, m)
        l_sum = tl.sum(l_acc * tl.exp(m_lane - m_row_use), 0)
        inv = tl.where(l_sum > 0.0, 1.0 / tl.where(l_sum > 0.0, l_sum, 1.0), 0.0)
        for start in range(0, N_COLS, BLOCK_N):
            cols = start + offs
            cmask = cols < N_COLS
            x = tl.load(s_ptr + cols, mask=cmask, other=float("-inf")).to(tl.float32)
            tl.store(p_ptr + cols, (tl.exp(x - m_row_use) * inv).to(P.dtype.element_ty), mask=cmask)


def softmax_configs(n_cols: int) -> list[dict[str, int]]:
    """Candidate configs for rows of ``n_cols``, best guess first: the whole row in one block up to
    ``MAX_BLOCK`` columns, else ``MAX_BLOCK``-column chunks; more warps for wider blocks."""
    block = min(MAX_BLOCK, max(16, next_power_of_2(n_cols)))
    warps = 1 if block <= 256 else 4 if block <= 1024 else 8
    out = [{"BLOCK_N": block, "num_warps": warps}]
    if block > 1024:
        out.append({"BLOCK_N": 1024, "num_warps": 4})
    return out


def select_config(n_cols: int) -> dict[str, int]:
    """Pinned config (``GEMMA4_FAST_SOFTMAX_CONFIG``), else the first candidate."""
    cfg = dict(softmax_configs(n_cols)[0])
    pinned = pinned_config(ENV_SOFTMAX)
    if pinned:
        cfg.update(pinned)
    return cfg


def softmax_scores_fwd(scores: torch.Tensor, out: torch.Tensor, config: dict[str, int]) -> None:
    """Launch the kernel over ``scores`` / ``out`` viewed as ``[rows, n]`` (both with unit last stride and
    rows laid out with one stride each: contiguous tensors). No validation."""
    n = scores.shape[-1]
    s2, p2 = scores.reshape(-1, n), out.view(-1, n)
    rows = s2.shape[0]
    block = config["BLOCK_N"]
    softmax_scores_fwd_kernel[(rows,)](s2, p2, n, s2.stride(0), p2.stride(0), BLOCK_N=block,
                                       SINGLE=n <= block, num_warps=config["num_warps"])


__all__ = ["softmax_scores_fwd_kernel", "softmax_scores_fwd", "softmax_configs", "select_config", "ENV_SOFTMAX"]
