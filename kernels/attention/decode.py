"""Split-key decode with the keys as the MMA rows (``attention_decode_fwd_kernel``).

Same contract as ``fwd.attention_split_fwd_kernel`` (grid ``(NUM_SPLITS, B * Hkv)``, the GQA heads of one KV head
packed into ``BLOCK_R`` query rows, fp32 partials ``OP / MP / LP`` merged by ``fwd.attention_combine_kernel``), but
both products are computed transposed:

- ``s^T = k @ q^T``: ``[BLOCK_N keys, BLOCK_D] @ [BLOCK_D, BLOCK_R]``,
- ``o^T += v^T @ p^T``: ``[BLOCK_D, BLOCK_N] @ [BLOCK_N, BLOCK_R]``.

Why: a decode step has 8-32 query rows per KV head. With the rows as the MMA's M dimension (the split kernel), the
tile is padded to 16 rows and sm_90 runs it on ``mma.sync`` with every K / V tile copied from shared memory into
registers. With the keys (``BLOCK_N`` >= 64) and the head dim as M, sm_90 runs warpgroup MMAs (m64, n = ``BLOCK_R``)
that read K and V straight from the shared-memory tiles the pipelined loads fill; the online softmax reduces along
the keys (axis 0). On other targets (sm_80, the interpreter) the same source runs on ``mma.sync`` / numpy.

Scope and limits: as the split kernel (``fwd.py``'s module docstring: visibility rule, base-2 softmax, empty rows
give ``m = -inf, l = 0, o = 0``); ``BLOCK_N`` must be at least 16 (64 for warpgroup MMAs); ``K`` and ``V`` may be
the same tensor (``KV_SAME`` reuses the loaded tile).
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents

from .fwd import _scores, _split_keys


@triton.jit(do_not_specialize=["H_KV", "GROUPS", "SQ", "SK", "WL", "WR", "key_lo", "key_hi", "keys_per_split",
                              "NUM_SPLITS"])
def attention_decode_fwd_kernel(Q, K, V, OP, MP, LP, KPM, KVLEN,
                                stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                                stride_vb, stride_vh, stride_vn, stride_kpmb,
                                H_KV, GROUPS, SQ, SK, WL, WR, qk_scale, cap_scale, key_lo, key_hi,
                                keys_per_split, NUM_SPLITS,
                                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                                BLOCK_N: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_KPM: tl.constexpr,
                                HAS_KVLEN: tl.constexpr, KV_SAME: tl.constexpr, DOT_PRECISION: tl.constexpr,
                                WHILE_LOOP: tl.constexpr, USE_PDL: tl.constexpr = False):
    """Partial attention of the ``GROUPS * Sq`` query rows of one (batch, KV head) over one key chunk, keys as the
    MMA rows. Arguments, outputs and ``HAS_KVLEN`` / ``USE_PDL`` as ``attention_split_fwd_kernel``; ``WHILE_LOOP``
    walks the key blocks with a while loop (the interpreter's ``range`` cannot take bounds computed in the kernel).
    """
    if USE_PDL:
        gdc_launch_dependents()
    pid_s = tl.program_id(0)
    pid_bk = tl.program_id(1)
    off_b = pid_bk // H_KV
    off_hk = pid_bk % H_KV
    rows = tl.arange(0, BLOCK_R)
    g = rows // SQ
    qi = rows % SQ
    rvalid = rows < GROUPS * SQ
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HEAD_DIM

    off_b64 = off_b.to(tl.int64)
    head = (off_hk * GROUPS + g).to(tl.int64)
    qt = tl.load(Q + off_b64 * stride_qb + head[None, :] * stride_qh + qi[None, :] * stride_qm + offs_d[:, None],
                 mask=rvalid[None, :] & dmask[:, None], other=0.0)
    k_base = K + off_b64 * stride_kb + off_hk.to(tl.int64) * stride_kh
    v_base = V + off_b64 * stride_vb + off_hk.to(tl.int64) * stride_vh
    kpm_base = KPM + off_b64 * stride_kpmb
    sk, start, end = _split_keys(KVLEN, off_b, pid_s, SK, SQ, WL, key_lo, key_hi, keys_per_split, HAS_KVLEN, BLOCK_N)
    pos = qi + (sk - SQ)
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D, BLOCK_R], dtype=tl.float32)
    offs_n = tl.arange(0, BLOCK_N)
    if WHILE_LOOP:
        start_n = start
        while start_n < end:
            acc, l_i, m_i = _decode_step(acc, l_i, m_i, qt, k_base, v_base, kpm_base, stride_kn, stride_vn, pos,
                                         start_n + offs_n, offs_d, dmask, sk, WL, WR, qk_scale, cap_scale,
                                         HAS_SOFTCAP, HAS_KPM, KV_SAME, DOT_PRECISION)
            start_n += BLOCK_N
    else:
        for start_n in range(start, end, BLOCK_N):
            acc, l_i, m_i = _decode_step(acc, l_i, m_i, qt, k_base, v_base, kpm_base, stride_kn, stride_vn, pos,
                                         start_n + offs_n, offs_d, dmask, sk, WL, WR, qk_scale, cap_scale,
                                         HAS_SOFTCAP, HAS_KPM, KV_SAME, DOT_PRECISION)
    part = (pid_bk * NUM_SPLITS + pid_s).to(tl.int64) * BLOCK_R
    tl.store(OP + (part + rows[None, :]) * BLOCK_D + offs_d[:, None], acc, mask=rvalid[None, :])
    tl.store(MP + part + rows, m_i, mask=rvalid)
    tl.store(LP + part + rows, l_i, mask=rvalid)


@triton.jit
def _decode_step(acc, l_i, m_i, qt, k_base, v_base, kpm_base, stride_kn, stride_vn, pos, cols, offs_d, dmask,
                 sk, WL, WR, qk_scale, cap_scale, HAS_SOFTCAP: tl.constexpr, HAS_KPM: tl.constexpr,
                 KV_SAME: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One key block (``cols``): transposed scores ``[BLOCK_N, BLOCK_R]``, online softmax along the keys, and
    ``acc [BLOCK_D, BLOCK_R] += v^T @ p^T``. Keys past ``sk`` load as zeros and are masked."""
    kmask = (cols[:, None] < sk) & dmask[None, :]
    k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=kmask, other=0.0)
    st = _scores(tl.dot(k, qt, input_precision=DOT_PRECISION), qk_scale, cap_scale, HAS_SOFTCAP)
    diff = pos[None, :] - cols[:, None]
    vis = (diff <= WL) & (diff >= -WR) & (cols[:, None] < sk)
    if HAS_KPM:
        vis = vis & (tl.load(kpm_base + cols, mask=cols < sk, other=0) != 0)[:, None]
    st = tl.where(vis, st, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(st, 0))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(st - m_use[None, :])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 0)
    if KV_SAME:
        v = k
    else:
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :], mask=kmask, other=0.0)
    acc = acc * alpha[None, :]
    acc = tl.dot(tl.trans(v), p.to(v.dtype), acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


__all__ = ["attention_decode_fwd_kernel"]
