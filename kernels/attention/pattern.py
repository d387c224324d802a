"""Triton scores / pattern emission (``attention_scores_fwd_kernel``) and ``pattern @ v`` with GQA.

Scope: q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Sk, D]`` (unit D stride, D <= 512), output
``[B, Hq, Sq, Sk]`` with a unit Sk stride. One program writes one ``BLOCK_M x BLOCK_N`` tile: tiles
that meet the visible band compute ``q @ k^T`` in ``BLOCK_DK``-wide chunks of the head dim, apply
scale, softcap and the mask, and write either the scores (masked ``-inf``) or the probabilities
``exp(s - lse)`` (masked 0); tiles outside the band only write ``-inf`` / 0. The cost is therefore the
output write plus the band's dot products.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fwd import _scores, _visible, band, dot_precision, score_constants


@triton.jit(do_not_specialize=["H_Q", "GROUPS", "SQ", "SK", "WL", "WR"])
def attention_scores_fwd_kernel(Q, K, OUT, LSE, KPM,
                                stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                                stride_ob, stride_oh, stride_om, stride_kpmb,
                                H_Q, GROUPS, SQ, SK, WL, WR, qk_scale, cap_scale,
                                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_DK: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_KPM: tl.constexpr,
                                PATTERN: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Grid ``(cdiv(Sk, BLOCK_N), cdiv(Sq, BLOCK_M), B * Hq)``.

    ``PATTERN``: write ``exp2(s2 - lse * log2 e)`` (``qk_scale``/``cap_scale`` in the base-2 domain,
    ``LSE`` ``[B, Hq, Sq]`` contiguous fp32) with masked entries 0; else write natural-unit scores with
    masked entries ``-inf``.
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_bh = tl.program_id(2)
    off_b = pid_bh // H_Q
    off_h = pid_bh % H_Q
    off_hk = off_h // GROUPS
    start_m = pid_m * BLOCK_M
    start_n = pid_n * BLOCK_N
    offs_m = start_m + tl.arange(0, BLOCK_M)
    cols = start_n + tl.arange(0, BLOCK_N)
    shift = SK - SQ
    pos = offs_m + shift
    pos0 = start_m + shift
    pos1 = tl.minimum(start_m + BLOCK_M, SQ) - 1 + shift
    last_n = tl.minimum(start_n + BLOCK_N, SK) - 1

    off_b64 = off_b.to(tl.int64)
    o_ptrs = (OUT + off_b64 * stride_ob + off_h.to(tl.int64) * stride_oh + offs_m[:, None].to(tl.int64) * stride_om
              + cols[None, :])
    rmask = offs_m[:, None] < SQ
    meets = (start_n <= pos1 + WR) & (last_n >= pos0 - WL)
    if meets:
        q_base = Q + off_b64 * stride_qb + off_h.to(tl.int64) * stride_qh
        k_base = K + off_b64 * stride_kb + off_hk.to(tl.int64) * stride_kh
        offs_dk = tl.arange(0, BLOCK_DK)
        qk = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for d0 in range(0, HEAD_DIM, BLOCK_DK):
            dm = (d0 + offs_dk)[None, :] < HEAD_DIM
            q = tl.load(q_base + offs_m[:, None] * stride_qm + (d0 + offs_dk)[None, :], mask=rmask & dm, other=0.0)
            k = tl.load(k_base + cols[:, None] * stride_kn + (d0 + offs_dk)[None, :],
                        mask=(cols[:, None] < SK) & dm, other=0.0)
            qk = tl.dot(q, tl.trans(k), qk, input_precision=DOT_PRECISION)
        s = _scores(qk, qk_scale, cap_scale, HAS_SOFTCAP)
        vis = _visible(pos, cols, SK, WL, WR)
        if HAS_KPM:
            kp = tl.load(KPM + off_b64 * stride_kpmb + cols, mask=cols < SK, other=0) != 0
            vis = vis & kp[None, :]
        if PATTERN:
            lse2 = tl.load(LSE + pid_bh.to(tl.int64) * SQ + offs_m, mask=offs_m < SQ, other=0.0) * 1.4426950408889634
            lse2 = tl.where(lse2 == float("-inf"), 0.0, lse2)
            out = tl.where(vis, tl.math.exp2(s - lse2[:, None]), 0.0)
        else:
            out = tl.where(vis, s, float("-inf"))
        out = out.to(OUT.dtype.element_ty)
    else:
        out = tl.full([BLOCK_M, BLOCK_N], 0.0 if PATTERN else float("-inf"), dtype=OUT.dtype.element_ty)
    # Interior tiles store under a row-only mask, which keeps the stores 16 bytes wide.
    if start_n + BLOCK_N <= SK:
        tl.store(o_ptrs, out, mask=rmask)
    else:
        tl.store(o_ptrs, out, mask=rmask & (cols[None, :] < SK))


def attention_scores_fwd(q, k, out, lse, kpm, *, scale: float, window, softcap, causal: bool,
                         config: dict) -> None:
    """Launch ``attention_scores_fwd_kernel`` into ``out`` ``[B, Hq, Sq, Sk]`` (unit last stride).

    With ``lse`` (``[B, Hq, Sq]`` contiguous fp32) the kernel writes probabilities, else scores.
    """
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    wl, wr = band(window, causal)
    pattern = lse is not None
    qk_scale, cap_scale = score_constants(scale, softcap, pattern)
    kpm_t, kpm_stride = (kpm, kpm.stride(0)) if kpm is not None else (q, 0)
    dk = min(config.get("BLOCK_DK", 64), max(16, triton.next_power_of_2(D)))
    grid = (triton.cdiv(Sk, config["BLOCK_N"]), triton.cdiv(Sq, config["BLOCK_M"]), B * Hq)
    attention_scores_fwd_kernel[grid](
        q, k, out, lse if pattern else q, kpm_t,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        out.stride(0), out.stride(1), out.stride(2), kpm_stride,
        Hq, Hq // Hkv, Sq, Sk, wl, wr, qk_scale, cap_scale,
        HEAD_DIM=D, BLOCK_M=config["BLOCK_M"], BLOCK_N=config["BLOCK_N"], BLOCK_DK=dk,
        HAS_SOFTCAP=softcap is not None, HAS_KPM=kpm is not None, PATTERN=pattern,
        DOT_PRECISION=dot_precision(q.dtype), num_warps=config["num_warps"], num_stages=config["num_stages"])


def pattern_apply_matmul(pattern: torch.Tensor, v: torch.Tensor, out_bshd: torch.Tensor) -> torch.Tensor:
    """``pattern @ v`` through one batched torch matmul, GQA without repeat_kv.

    The query heads of a KV group are stacked along the rows (``[B, Hkv, G * Sq, Sk] @ [B, Hkv, Sk, D]``,
    a view when the pattern is contiguous over its head/query dims); the product is copied into
    ``out_bshd`` (``[B, Sq, Hq, D]``) whose ``[B, Hq, Sq, D]`` view is returned.
    """
    B, Hq, Sq, Sk = pattern.shape
    Hkv, D = v.shape[1], v.shape[3]
    g = Hq // Hkv
    p = pattern.to(v.dtype).reshape(B, Hkv, g * Sq, Sk)
    prod = torch.matmul(p, v).view(B, Hq, Sq, D)
    o = out_bshd.permute(0, 2, 1, 3)
    o.copy_(prod)
    return o
