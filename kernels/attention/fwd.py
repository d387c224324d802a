"""Triton attention kernels: prefill (``attention_fwd_kernel``) and split-key decode
(``attention_split_fwd_kernel`` + ``attention_combine_kernel``), with their launchers.

Scope: q ``[B, Hq, Sq, D]``, k / v ``[B, Hkv, Sk, D]`` of one dtype (bf16, fp16, fp32), any strides
with a unit stride on D, D <= 512 (padded to ``BLOCK_D``, the next power of two >= 16), GQA through
``GROUPS = Hq // Hkv`` (no repeat_kv copy), queries at the end of the keys (position ``Sk - Sq + i``).

Visibility is one rule for every mode: with ``diff = pos - j``, key ``j`` is visible iff
``-WR <= diff <= WL`` and ``j < Sk`` and (with a padding mask) ``kpm[b, j]``. The launchers set
``(WL, WR)``: causal ``(W - 1 or BIG, 0)``, bidirectional ``(BIG, BIG)``, bidirectional window
``(W - 1, W - 1)``. A query block only visits the key blocks of its band ``[pos0 - WL, pos1 + WR]``,
so a windowed layer costs O(S * W); blocks visible to every row of the query block skip the
positional mask.

Softmax runs in base 2 on fp32 scores (``qk_scale`` folds ``scale * log2(e)``; with a softcap,
``s = tanh(qk * scale / cap) * cap * log2(e)``), with the running max guarded so a row with no
visible key yields ``l = 0``: its output is written as zeros and its LSE as ``-inf``.

The kernels are policy-free: the public wrappers in ``api.py`` validate, pick configs, allocate.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
from triton.tools.tensor_descriptor import TensorDescriptor

from .._common import interpret_mode

LOG2E = 1.4426950408889634
#: Stand-in for "no limit" on the band offsets (int32-safe when added to positions < 2**30).
BIG = 1 << 30
#: Set to "0" to launch the decode combine kernel without programmatic dependent launch (A/Bs, diagnosis).
DECODE_PDL_ENV = "GEMMA4_FAST_DECODE_PDL"


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _scores(qk, qk_scale, cap_scale, HAS_SOFTCAP: tl.constexpr):
    if HAS_SOFTCAP:
        return _tanh(qk * qk_scale) * cap_scale
    return qk * qk_scale


@triton.jit
def _visible(pos, cols, sk, wl, wr):
    diff = pos[:, None] - cols[None, :]
    return (diff <= wl) & (diff >= -wr) & (cols[None, :] < sk)


@triton.jit
def _fwd_step(acc, l_i, m_i, q, k_base, v_base, kpm_base, stride_kn, stride_vn, pos, start_n,
              SK, WL, WR, qk_scale, cap_scale, DV_LIM, tma_b, tma_h, tma_dv,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
              MASKED: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_KPM: tl.constexpr,
              KV_SAME: tl.constexpr, WRITE_O: tl.constexpr, DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
              FOLD_SCALE: tl.constexpr):
    """One key block ``[start_n, start_n + BLOCK_N)`` of the online softmax.

    ``v_base`` points at the first of the ``BLOCK_DV`` output columns this program owns (``DV_LIM``
    of them valid); ``KV_SAME`` reuses the K tile as V (only when ``BLOCK_DV == BLOCK_D``). With
    ``USE_TMA``, ``k_base`` / ``v_base`` are 4-D tensor descriptors (blocks ``[1, 1, BLOCK_N, BLOCK_D]`` /
    ``[1, 1, BLOCK_N, BLOCK_DV]``) read at batch ``tma_b``, head ``tma_h``, column ``tma_dv``; rows past
    the keys and columns past the head dim come back as zeros.
    """
    offs_n = tl.arange(0, BLOCK_N)
    cols = start_n + offs_n
    if USE_TMA:
        k = k_base.load([tma_b, tma_h, start_n, 0]).reshape([BLOCK_N, BLOCK_D])
    else:
        offs_d = tl.arange(0, BLOCK_D)
        if MASKED:
            ldmask = (cols[:, None] < SK) & (offs_d[None, :] < HEAD_DIM)
            k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=ldmask, other=0.0)
        elif HEAD_DIM == BLOCK_D:
            k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :])
        else:
            k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :], mask=offs_d[None, :] < HEAD_DIM,
                        other=0.0)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if FOLD_SCALE and not MASKED and not HAS_KPM:
        # every key of the block is visible: the scale folds into one FMA (qk_scale > 0) and the max is finite
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
    else:
        s = _scores(qk, qk_scale, cap_scale, HAS_SOFTCAP)
        if MASKED:
            vis = _visible(pos, cols, SK, WL, WR)
            if HAS_KPM:
                kp = tl.load(kpm_base + cols, mask=cols < SK, other=0) != 0
                vis = vis & kp[None, :]
            s = tl.where(vis, s, float("-inf"))
        elif HAS_KPM:
            kp = tl.load(kpm_base + cols) != 0
            s = tl.where(kp[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    if WRITE_O:
        if KV_SAME:
            v = k
        elif USE_TMA:
            v = v_base.load([tma_b, tma_h, start_n, tma_dv]).reshape([BLOCK_N, BLOCK_DV])
        else:
            offs_dv = tl.arange(0, BLOCK_DV)
            v_ptrs = v_base + cols[:, None] * stride_vn + offs_dv[None, :]
            if MASKED:
                v = tl.load(v_ptrs, mask=(cols[:, None] < SK) & (offs_dv[None, :] < DV_LIM), other=0.0)
            elif HEAD_DIM % BLOCK_DV == 0:
                v = tl.load(v_ptrs)
            else:
                v = tl.load(v_ptrs, mask=offs_dv[None, :] < DV_LIM, other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, kpm_base, stride_kn, stride_vn, pos, start, end,
               SK, WL, WR, qk_scale, cap_scale, DV_LIM, tma_b, tma_h, tma_dv,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr,
               MASKED: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_KPM: tl.constexpr,
               KV_SAME: tl.constexpr, WRITE_O: tl.constexpr, DOT_PRECISION: tl.constexpr,
               WHILE_LOOP: tl.constexpr, USE_TMA: tl.constexpr, FOLD_SCALE: tl.constexpr):
    """Key blocks ``start, start + BLOCK_N, ... < end``.

    ``WHILE_LOOP`` (set under ``TRITON_INTERPRET``, whose ``range`` cannot take bounds computed in the
    kernel) walks the same blocks with a while loop; compiled kernels use a pipelined ``for``.
    """
    if WHILE_LOOP:
        start_n = start
        while start_n < end:
            acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k_base, v_base, kpm_base, stride_kn, stride_vn, pos,
                                      start_n, SK, WL, WR, qk_scale, cap_scale, DV_LIM, tma_b, tma_h, tma_dv,
                                      HEAD_DIM, BLOCK_D, BLOCK_DV, BLOCK_N,
                                      MASKED, HAS_SOFTCAP, HAS_KPM, KV_SAME, WRITE_O, DOT_PRECISION, USE_TMA,
                                      FOLD_SCALE)
            start_n += BLOCK_N
    else:
        for start_n in range(start, end, BLOCK_N):
            acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k_base, v_base, kpm_base, stride_kn, stride_vn, pos,
                                      start_n, SK, WL, WR, qk_scale, cap_scale, DV_LIM, tma_b, tma_h, tma_dv,
                                      HEAD_DIM, BLOCK_D, BLOCK_DV, BLOCK_N,
                                      MASKED, HAS_SOFTCAP, HAS_KPM, KV_SAME, WRITE_O, DOT_PRECISION, USE_TMA,
                                      FOLD_SCALE)
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["H_Q", "GROUPS", "SQ", "SK", "WL", "WR"])
def attention_fwd_kernel(Q, K, V, O, LSE, KPM,
                         stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                         stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om, stride_kpmb,
                         H_Q, GROUPS, SQ, SK, WL, WR, qk_scale, cap_scale,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                         HAS_KPM: tl.constexpr, KV_SAME: tl.constexpr, WRITE_O: tl.constexpr,
                         WRITE_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr, WHILE_LOOP: tl.constexpr,
                         USE_TMA: tl.constexpr = False, FOLD_SCALE: tl.constexpr = False,
                         HEADS_INNER: tl.constexpr = False):
    """One program: BLOCK_M queries of one (batch, query head), output columns of one BLOCK_DV chunk.

    Grid ``(B * Hq * (BLOCK_D // BLOCK_DV), cdiv(Sq, BLOCK_M))`` with ``HEADS_INNER`` (query blocks heaviest
    first across all heads: a causal launch ends on short blocks of every head rather than on the long blocks
    of the last heads), else ``(cdiv(Sq, BLOCK_M) * (BLOCK_D // BLOCK_DV), B * Hq)`` (one head's query blocks,
    heaviest first, then the next head's). The D chunks of a query block are adjacent programs (they share Q
    and K through L2) and each recomputes ``q @ k^T`` (so a split costs 1.5x the dot products at D chunks of
    half; it buys a smaller accumulator for head_dim 512). ``O`` is written through its strides (D
    unit-stride); ``LSE`` (written by the first chunk) is a ``[B, Hq, Sq]``-contiguous fp32 buffer (natural
    log); ``KPM`` a ``[B, Sk]`` uint8 mask. ``USE_TMA``: ``Q, K, V, O`` are 4-D tensor descriptors over the
    ``[B, H, S, D]`` tensors (blocks ``[1, 1, BLOCK_M, BLOCK_D]``, ``[1, 1, BLOCK_N, BLOCK_D]``,
    ``[1, 1, BLOCK_N, BLOCK_DV]``, ``[1, 1, BLOCK_M, BLOCK_DV]``; the copy engine zero-fills reads past the
    edges and clips writes), and the pointer strides are unused. ``FOLD_SCALE`` (``qk_scale > 0``, no
    softcap) folds the scale into the exponent's FMA on blocks every row sees in full.
    """
    N_DV: tl.constexpr = BLOCK_D // BLOCK_DV
    pid0 = tl.program_id(0)
    pid_dv = pid0 % N_DV
    if HEADS_INNER:
        pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
        pid_bh = pid0 // N_DV
    else:
        pid_m = tl.num_programs(0) // N_DV - 1 - pid0 // N_DV
        pid_bh = tl.program_id(1)
    off_b = pid_bh // H_Q
    off_h = pid_bh % H_Q
    off_hk = off_h // GROUPS
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    rmask = offs_m[:, None] < SQ
    dv0 = pid_dv * BLOCK_DV
    dv_lim = HEAD_DIM - dv0

    off_b64 = off_b.to(tl.int64)
    kpm_base = KPM + off_b64 * stride_kpmb
    if USE_TMA:
        k_base = K
        v_base = V
        q = Q.load([off_b, off_h, start_m, 0]).reshape([BLOCK_M, BLOCK_D])
    else:
        offs_d = tl.arange(0, BLOCK_D)
        q_base = Q + off_b64 * stride_qb + off_h.to(tl.int64) * stride_qh
        k_base = K + off_b64 * stride_kb + off_hk.to(tl.int64) * stride_kh
        v_base = V + off_b64 * stride_vb + off_hk.to(tl.int64) * stride_vh + dv0
        q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :],
                    mask=rmask & (offs_d[None, :] < HEAD_DIM), other=0.0)

    shift = SK - SQ
    pos = offs_m + shift
    pos0 = start_m + shift
    pos1 = tl.minimum(start_m + BLOCK_M, SQ) - 1 + shift
    lo = tl.maximum(pos0 - WL, 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.minimum(pos1 + WR + 1, SK)
    full_lo = tl.maximum(pos1 - WL, 0)
    full_lo = tl.cdiv(full_lo, BLOCK_N) * BLOCK_N
    full_hi = (tl.minimum(pos0 + WR + 1, SK) // BLOCK_N) * BLOCK_N
    a = tl.minimum(tl.maximum(full_lo, lo), hi)
    b = tl.maximum(full_hi, a)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, kpm_base, stride_kn, stride_vn, pos,
                               lo, a, SK, WL, WR, qk_scale, cap_scale, dv_lim, off_b, off_hk, dv0, HEAD_DIM,
                               BLOCK_D, BLOCK_DV, BLOCK_N, True, HAS_SOFTCAP, HAS_KPM, KV_SAME, WRITE_O,
                               DOT_PRECISION, WHILE_LOOP, USE_TMA, FOLD_SCALE)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, kpm_base, stride_kn, stride_vn, pos,
                               a, b, SK, WL, WR, qk_scale, cap_scale, dv_lim, off_b, off_hk, dv0, HEAD_DIM,
                               BLOCK_D, BLOCK_DV, BLOCK_N, False, HAS_SOFTCAP, HAS_KPM, KV_SAME, WRITE_O,
                               DOT_PRECISION, WHILE_LOOP, USE_TMA, FOLD_SCALE)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, kpm_base, stride_kn, stride_vn, pos,
                               b, hi, SK, WL, WR, qk_scale, cap_scale, dv_lim, off_b, off_hk, dv0, HEAD_DIM,
                               BLOCK_D, BLOCK_DV, BLOCK_N, True, HAS_SOFTCAP, HAS_KPM, KV_SAME, WRITE_O,
                               DOT_PRECISION, WHILE_LOOP, USE_TMA, FOLD_SCALE)

    nonempty = l_i > 0.0
    if WRITE_O:
        l_safe = tl.where(nonempty, l_i, 1.0)
        out = acc / l_safe[:, None]
        if USE_TMA:
            O.store([off_b, off_h, start_m, dv0], out.to(O.dtype).reshape([1, 1, BLOCK_M, BLOCK_DV]))
        else:
            offs_dv = tl.arange(0, BLOCK_DV)
            o_base = O + off_b64 * stride_ob + off_h.to(tl.int64) * stride_oh + dv0
            tl.store(o_base + offs_m[:, None] * stride_om + offs_dv[None, :], out.to(O.dtype.element_ty),
                     mask=rmask & (offs_dv[None, :] < dv_lim))
    if WRITE_LSE:
        if pid_dv == 0:
            lse = tl.where(nonempty, (m_i + tl.math.log2(tl.where(nonempty, l_i, 1.0))) * 0.6931471805599453,
                           float("-inf"))
            tl.store(LSE + pid_bh.to(tl.int64) * SQ + offs_m, lse, mask=offs_m < SQ)


@triton.jit
def _split_keys(KVLEN, off_b, pid_s, SK, SQ, WL, key_lo, key_hi, keys_per_split, HAS_KVLEN: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """``(sk, start, end)`` of split ``pid_s`` of batch row ``off_b``: the valid key count (``KVLEN[b]`` on the device
    with ``HAS_KVLEN``, else ``SK``) and the split's key range, cut to the valid keys and, with ``HAS_KVLEN``, started
    at the first block the window of the last query can see."""
    if HAS_KVLEN:
        sk = tl.load(KVLEN + off_b)
    else:
        sk = SK
    start = key_lo + pid_s * keys_per_split
    end = tl.minimum(start + keys_per_split, key_hi)
    if HAS_KVLEN:
        end = tl.minimum(end, sk)
        start = tl.maximum(start, (tl.maximum(sk - SQ - WL, 0) // BLOCK_N) * BLOCK_N)
    return sk, start, end


@triton.jit(do_not_specialize=["H_KV", "GROUPS", "SQ", "SK", "WL", "WR", "key_lo", "key_hi", "keys_per_split",
                              "NUM_SPLITS"])
def attention_split_fwd_kernel(Q, K, V, OP, MP, LP, KPM, KVLEN,
                               stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                               stride_vb, stride_vh, stride_vn, stride_kpmb,
                               H_KV, GROUPS, SQ, SK, WL, WR, qk_scale, cap_scale, key_lo, key_hi,
                               keys_per_split, NUM_SPLITS,
                               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                               BLOCK_N: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_KPM: tl.constexpr,
                               HAS_KVLEN: tl.constexpr, KV_SAME: tl.constexpr, DOT_PRECISION: tl.constexpr,
                               WHILE_LOOP: tl.constexpr, USE_PDL: tl.constexpr = False):
    """Partial attention of all ``GROUPS * Sq`` query rows of one (batch, KV head) over one key chunk.

    Grid ``(NUM_SPLITS, B * Hkv)``. Row ``r`` is query head ``hk * GROUPS + r // Sq``, query
    ``r % Sq`` (GQA heads packed into the rows, so K/V are read once per KV head). Writes the
    unnormalised fp32 accumulator ``OP [B*Hkv, NUM_SPLITS, BLOCK_R, BLOCK_D]`` and the base-2 running
    max / sum ``MP, LP [B*Hkv, NUM_SPLITS, BLOCK_R]`` of its valid rows (every split writes, even an
    empty one: ``m = -inf, l = 0, o = 0``). With ``HAS_KVLEN`` the number of valid keys of batch row b
    is read from ``KVLEN[b]`` (int32, on the device: CUDA-graph friendly) instead of ``SK``; the queries
    then sit at the end of those keys and the launcher passes the whole buffer as the key range.
    ``USE_PDL`` (sm_90): every program lets the combine kernel launch as soon as it starts
    (``griddepcontrol.launch_dependents``); the combine waits for this grid's writes.
    """
    if USE_PDL:
        gdc_launch_dependents()
    pid_s = tl.program_id(0)
    pid_bk = tl.program_id(1)
    off_b = pid_bk // H_KV
    off_hk = pid_bk % H_KV
    rows = tl.arange(0, BLOCK_R)
    n_rows = GROUPS * SQ
    g = rows // SQ
    qi = rows % SQ
    rvalid = rows < n_rows
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d[None, :] < HEAD_DIM

    off_b64 = off_b.to(tl.int64)
    head = (off_hk * GROUPS + g).to(tl.int64)
    q = tl.load(Q + off_b64 * stride_qb + head[:, None] * stride_qh + qi[:, None] * stride_qm + offs_d[None, :],
                mask=rvalid[:, None] & dmask, other=0.0)
    k_base = K + off_b64 * stride_kb + off_hk.to(tl.int64) * stride_kh
    v_base = V + off_b64 * stride_vb + off_hk.to(tl.int64) * stride_vh
    kpm_base = KPM + off_b64 * stride_kpmb
    sk, start, end = _split_keys(KVLEN, off_b, pid_s, SK, SQ, WL, key_lo, key_hi, keys_per_split, HAS_KVLEN, BLOCK_N)
    pos = qi + (sk - SQ)
    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, kpm_base, stride_kn, stride_vn, pos,
                               start, end, sk, WL, WR, qk_scale, cap_scale, HEAD_DIM, 0, 0, 0, HEAD_DIM, BLOCK_D,
                               BLOCK_D, BLOCK_N, True, HAS_SOFTCAP, HAS_KPM, KV_SAME, True, DOT_PRECISION,
                               WHILE_LOOP, False, False)
    part = (pid_bk * NUM_SPLITS + pid_s).to(tl.int64) * BLOCK_R
    tl.store(OP + (part + rows[:, None]) * BLOCK_D + offs_d[None, :], acc, mask=rvalid[:, None])
    tl.store(MP + part + rows, m_i, mask=rvalid)
    tl.store(LP + part + rows, l_i, mask=rvalid)


@triton.jit(do_not_specialize=["H_KV", "GROUPS", "SQ", "NUM_SPLITS"])
def attention_combine_kernel(OP, MP, LP, O, LSE, stride_ob, stride_oh, stride_om,
                             H_KV, GROUPS, SQ, NUM_SPLITS,
                             HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DC: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, CHUNK_S: tl.constexpr,
                             WRITE_LSE: tl.constexpr, USE_PDL: tl.constexpr = False):
    """Merge the split partials of one query row, ``BLOCK_DC`` output columns per program; grid
    ``(B * Hkv * GROUPS * Sq, BLOCK_D // BLOCK_DC)`` (the column chunks of a row spread the partial reads over
    more programs; the first chunk writes the LSE). ``CHUNK_S`` splits are read per step; when one step covers all
    ``BLOCK_S``, the partials, maxima and sums are loaded together. ``USE_PDL``: launched as a programmatic
    dependent of the split kernel, it computes its indices, then waits for that grid (``griddepcontrol.wait``)
    before reading."""
    pid = tl.program_id(0)
    pid_d = tl.program_id(1)
    n_rows = GROUPS * SQ
    pid_bk = pid // n_rows
    r = pid % n_rows
    off_b = pid_bk // H_KV
    off_h = (pid_bk % H_KV) * GROUPS + r // SQ
    qi = r % SQ
    offs_s = tl.arange(0, BLOCK_S)
    base = pid_bk.to(tl.int64) * NUM_SPLITS * BLOCK_R + r
    if USE_PDL:
        gdc_wait()
    offs_d = pid_d * BLOCK_DC + tl.arange(0, BLOCK_DC)
    smask = offs_s < NUM_SPLITS
    m_s = tl.load(MP + base + offs_s * BLOCK_R, mask=smask, other=float("-inf"))
    l_s = tl.load(LP + base + offs_s * BLOCK_R, mask=smask, other=0.0)
    if CHUNK_S >= BLOCK_S:
        # every partial in one step: the three loads are independent, so they are in flight together
        o = tl.load(OP + (base + offs_s[:, None] * BLOCK_R) * BLOCK_D + offs_d[None, :], mask=smask[:, None],
                    other=0.0)
    m = tl.max(m_s, 0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    w_s = tl.math.exp2(m_s - m_use)
    l_tot = tl.sum(l_s * w_s, 0)
    if CHUNK_S >= BLOCK_S:
        acc = tl.sum(o * w_s[:, None], 0)
    else:
        offs_c = tl.arange(0, CHUNK_S)
        acc = tl.zeros([BLOCK_DC], dtype=tl.float32)
        for s0 in range(0, BLOCK_S, CHUNK_S):
            sc = s0 + offs_c
            cmask = sc < NUM_SPLITS
            w = tl.math.exp2(tl.load(MP + base + sc * BLOCK_R, mask=cmask, other=float("-inf")) - m_use)
            oc = tl.load(OP + (base + sc[:, None] * BLOCK_R) * BLOCK_D + offs_d[None, :], mask=cmask[:, None],
                         other=0.0)
            acc += tl.sum(oc * w[:, None], 0)
    nonempty = l_tot > 0.0
    out = acc / tl.where(nonempty, l_tot, 1.0)
    o_ptr = O + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh + qi.to(tl.int64) * stride_om
    tl.store(o_ptr + offs_d, out.to(O.dtype.element_ty), mask=offs_d < HEAD_DIM)
    if WRITE_LSE:
        if pid_d == 0:
            lse = tl.where(nonempty, (m + tl.math.log2(tl.where(nonempty, l_tot, 1.0))) * 0.6931471805599453,
                           float("-inf"))
            tl.store(LSE + (off_b * H_KV * GROUPS + off_h).to(tl.int64) * SQ + qi, lse)


def band(window, causal: bool) -> tuple[int, int]:
    """``(WL, WR)``: key j is visible to position p iff ``-WR <= p - j <= WL``."""
    if causal:
        return (BIG if window is None else int(window) - 1), 0
    if window is None:
        return BIG, BIG
    return int(window) - 1, int(window) - 1


def score_constants(scale: float, softcap, log2_domain: bool) -> tuple[float, float]:
    """``(qk_scale, cap_scale)`` for ``_scores``; base-2 scores when ``log2_domain``."""
    f = LOG2E if log2_domain else 1.0
    if softcap is None:
        return scale * f, 0.0
    return scale / float(softcap), float(softcap) * f


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs use exact fp32 products ("ieee"); 16-bit inputs are exact in any mode."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _same_tensor(k, v) -> bool:
    return v is k or (v.data_ptr() == k.data_ptr() and v.stride() == k.stride() and v.shape == k.shape)


def _kpm_args(kpm, q):
    if kpm is None:
        return q, 0
    return kpm, kpm.stride(0)


def attention_fwd(q, k, v, o, lse, kpm, *, scale: float, window, softcap, causal: bool,
                  config: dict, write_o: bool = True) -> None:
    """Launch ``attention_fwd_kernel`` into ``o`` (``[B, Hq, Sq, D]``, any strides, unit D stride) and
    ``lse`` (``[B, Hq, Sq]`` contiguous fp32, or None); ``kpm`` ``[B, Sk]`` uint8 or None.

    ``write_o=False`` computes only the LSE (no V reads), for pattern emission.
    """
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    wl, wr = band(window, causal)
    qk_scale, cap_scale = score_constants(scale, softcap, True)
    kpm_t, kpm_stride = _kpm_args(kpm, q)
    bd = max(16, triton.next_power_of_2(D))
    o_t = o if o is not None else q
    lse_t = lse if lse is not None else q
    bdv = min(config.get("BLOCK_DV", bd), bd) if write_o and o is not None else bd
    kv_same = bdv == bd and _same_tensor(k, v)
    bm, bn = config["BLOCK_M"], config["BLOCK_N"]
    heads_inner = bool(config.get("HEADS_INNER", 0)) and triton.cdiv(Sq, bm) <= 65535
    if heads_inner:  # (batch, head, column chunk) fastest, query blocks heaviest first on the slow axis
        grid = (B * Hq * (bd // bdv), triton.cdiv(Sq, bm))
    else:
        grid = (triton.cdiv(Sq, bm) * (bd // bdv), B * Hq)
    descs = None
    if config.get("TMA", 0):
        descs = tma_descriptors((q, [bm, bd]), (k, [bn, bd]), (v, [bn, bdv]), (o_t, [bm, bdv]))
    qa, ka, va, oa = descs if descs is not None else (q, k, v, o_t)
    attention_fwd_kernel[grid](
        qa, ka, va, oa, lse_t, kpm_t,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o_t.stride(0), o_t.stride(1), o_t.stride(2), kpm_stride,
        Hq, Hq // Hkv, Sq, Sk, wl, wr, qk_scale, cap_scale,
        HEAD_DIM=D, BLOCK_D=bd, BLOCK_DV=bdv, BLOCK_M=bm, BLOCK_N=bn,
        HAS_SOFTCAP=softcap is not None, HAS_KPM=kpm is not None, KV_SAME=kv_same,
        WRITE_O=write_o and o is not None, WRITE_LSE=lse is not None, DOT_PRECISION=dot_precision(q.dtype),
        WHILE_LOOP=interpret_mode(), USE_TMA=descs is not None,
        FOLD_SCALE=softcap is None and qk_scale > 0 and bool(config.get("FOLD", 1)), HEADS_INNER=heads_inner,
        num_warps=config["num_warps"], num_stages=config["num_stages"])


def tma_descriptors(*tensors_blocks):
    """4-D tensor descriptors ``[(t, [rows, cols]), ...]`` -> blocks ``[1, 1, rows, cols]``, or None when
    any tensor breaks the copy engine's rules (16-byte aligned base and strides, unit last stride).

    A size-1 dim gets the stride a contiguous tensor would have there (it is never stepped over).
    """
    out = []
    for t, (rows, cols) in tensors_blocks:
        if t.dim() != 4 or t.stride(-1) != 1 or t.data_ptr() % 16:
            return None
        strides = list(t.stride())
        for i in (2, 1, 0):
            if t.shape[i] == 1:
                strides[i] = strides[i + 1] * t.shape[i + 1]
        if any(st <= 0 or (st * t.element_size()) % 16 for st in strides[:-1]):
            return None
        out.append(TensorDescriptor(t, list(t.shape), strides, [1, 1, rows, cols]))
    return out


def split_rows(groups: int, sq: int) -> int:
    """Padded row count of the split kernel (``tl.dot`` needs at least 16 rows)."""
    return max(16, triton.next_power_of_2(groups * sq))


def num_splits(n_keys: int, block_n: int, bh_kv: int, sm_count: int, max_splits: int = 128,
               min_blocks: int = 4, programs_per_sm: int = 4) -> tuple[int, int]:
    """``(splits, keys_per_split)``: at most ``programs_per_sm`` programs per SM over the ``bh_kv`` (batch, KV head)
    pairs (rounded down: with one program per SM, 17 splits for 8 pairs on 132 SMs would make 136 programs, the
    last 4 a second wave as long as the first; see docs/notes/attention.md, "Decode v5"), whole key blocks per
    split, at least ``min_blocks`` blocks per split (fewer, longer splits keep the fp32 partials small next to K/V),
    at most ``max_splits``, at least one."""
    n_blocks = max(1, triton.cdiv(n_keys, block_n))
    want = max(1, min(n_blocks // min_blocks, programs_per_sm * sm_count // max(bh_kv, 1), max_splits))
    per = triton.cdiv(n_blocks, want)
    return triton.cdiv(n_blocks, per), per * block_n


def attention_split_fwd(q, k, v, o, lse, kpm, *, scale: float, window, softcap, causal: bool,
                        config: dict, sm_count: int, new_empty, kv_lens=None) -> None:
    """Launch the split-key kernel and the combine kernel (decode / short query blocks); on sm_90 the combine is a
    programmatic dependent launch (its launch and index math overlap the split kernel's tail; a config's ``PDL: 0``
    or ``DECODE_PDL_ENV=0`` turns that off).

    Config keys besides the kernel's tile: ``MIN_BLOCKS``, ``MAX_SPLITS``, ``PROGRAMS_PER_SM`` (the split plan,
    ``num_splits``), ``COMBINE_D`` (output columns per combine program) and ``COMBINE_S`` (splits per combine step;
    default every split at once while that is at most 8192 partial elements per program).

    ``config["KEYS_AS_ROWS"]`` (truthy) launches ``decode.attention_decode_fwd_kernel`` (the keys as the MMA rows)
    instead of ``attention_split_fwd_kernel``; both write the same partials.

    ``new_empty(shape, dtype, device)`` allocates the fp32 partial buffers. ``kv_lens`` (``[B]`` int32 or
    None): valid keys per batch row, read on the device; the split plan then covers the whole buffer.
    """
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    groups = Hq // Hkv
    wl, wr = band(window, causal)
    qk_scale, cap_scale = score_constants(scale, softcap, True)
    kpm_t, kpm_stride = _kpm_args(kpm, q)
    bd = max(16, triton.next_power_of_2(D))
    br = split_rows(groups, Sq)
    bn = config["BLOCK_N"]
    if kv_lens is None:
        key_lo = max(0, Sk - Sq - wl) // bn * bn
        key_hi = min(Sk, Sk - 1 + wr + 1)
    else:
        key_lo, key_hi = 0, Sk
    ns, per = num_splits(key_hi - key_lo, bn, B * Hkv, sm_count, max_splits=config.get("MAX_SPLITS", 128),
                         min_blocks=config.get("MIN_BLOCKS", 4), programs_per_sm=config.get("PROGRAMS_PER_SM", 4))
    op = new_empty((B * Hkv, ns, br, bd), torch.float32, q.device)
    mp = new_empty((B * Hkv, ns, br), torch.float32, q.device)
    lp = new_empty((B * Hkv, ns, br), torch.float32, q.device)
    kv_same = _same_tensor(k, v)
    pdl = (bool(config.get("PDL", 1)) and q.is_cuda
           and torch.cuda.get_device_capability(q.device)[0] >= 9 and not interpret_mode()
           and os.environ.get(DECODE_PDL_ENV, "1") != "0")
    split_kernel = attention_split_fwd_kernel
    if config.get("KEYS_AS_ROWS"):
        from .decode import attention_decode_fwd_kernel as split_kernel
    split_kernel[(ns, B * Hkv)](
        q, k, v, op, mp, lp, kpm_t, kv_lens if kv_lens is not None else q,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), kpm_stride,
        Hkv, groups, Sq, Sk, wl, wr, qk_scale, cap_scale, key_lo, key_hi, per, ns,
        HEAD_DIM=D, BLOCK_D=bd, BLOCK_R=br, BLOCK_N=bn, HAS_SOFTCAP=softcap is not None,
        HAS_KPM=kpm is not None, HAS_KVLEN=kv_lens is not None, KV_SAME=kv_same,
        DOT_PRECISION=dot_precision(q.dtype), WHILE_LOOP=interpret_mode(), USE_PDL=pdl, num_warps=config["num_warps"],
        num_stages=config["num_stages"])
    lse_t = lse if lse is not None else mp
    bdc = min(bd, config.get("COMBINE_D", bd))
    block_s = max(2, triton.next_power_of_2(ns))
    chunk = config.get("COMBINE_S", max(1, min(block_s, 8192 // bdc)))
    attention_combine_kernel[(B * Hkv * groups * Sq, bd // bdc)](
        op, mp, lp, o, lse_t, o.stride(0), o.stride(1), o.stride(2), Hkv, groups, Sq, ns,
        HEAD_DIM=D, BLOCK_D=bd, BLOCK_DC=bdc, BLOCK_R=br, BLOCK_S=block_s,
        CHUNK_S=triton.next_power_of_2(chunk), WRITE_LSE=lse is not None, USE_PDL=pdl,
        num_warps=4 if bdc >= 256 else 2, launch_pdl=pdl)


__all__ = ["attention_fwd_kernel", "attention_split_fwd_kernel", "attention_combine_kernel", "attention_fwd",
           "attention_split_fwd", "tma_descriptors", "band", "score_constants", "dot_precision", "split_rows", "num_splits",
           "BIG", "LOG2E"]
