"""Hopper (sm_90) prefill attention kernels in Gluon: ``attention_hopper_fwd_kernel`` (head_dim 512),
``attention_hopper_rows_fwd_kernel`` (head_dim 256) and their launcher ``attention_hopper_fwd``.

Scope: bf16 / fp16 q ``[B, Hq, Sq, D]`` and k / v ``[B, Hkv, Sk, D]`` with D in {256, 512}, causal (optionally
with a window), no softcap, no key padding mask, queries at the end of the keys. Everything else stays on the
portable Triton kernel in ``fwd.py``; ``hopper_unsupported`` is the test the public op applies.

Why a second kernel: at head_dim 512 a 128-row program cannot hold a 128 x 512 fp32 accumulator, so the portable
kernel splits the output columns over two programs that each recompute ``q @ k^T`` (1.5x the tensor-core work).
Triton 3.6 places every warp of a chained-dot kernel along the rows, so a 64-row program with two warpgroups
would replicate ``q @ k^T`` instead of sharing it. Here the layout is explicit: one program owns 64 query rows;
its two warpgroups each compute half of the key block's scores (``warps_per_cta=[4, 2]``), exchange the row
maxima, write their halves of the probabilities to shared memory, and each accumulates half of the output
columns from the whole probability tile. No dot product is computed twice.

Pipeline (one program, 8 warps): Q is read once by the copy engine (TMA); K and V blocks stream through rings of
``K_STAGES`` / ``V_STAGES`` tiles (TMA + mbarriers; one ring of ``KV_STAGES`` tiles read as both when K is V).
Each step issues ``S_j = Q K_j^T`` and ``O += P_{j-1} V_{j-1}`` as asynchronous warpgroup MMAs, waits for ``S_j``
only, runs the softmax of block ``j`` while ``P_{j-1} V_{j-1}`` is still on the tensor cores, then waits, rescales
``O`` and stores ``P_j``. A K slot is refilled once both warpgroups have read it, a V slot once the MMA that read it
has finished.

``attention_hopper_rows_fwd_kernel`` (head_dim 256): 128 rows, a warpgroup owns 64 of them with the whole
accumulator and keeps its probabilities in registers as the A operand of ``P V``. Its warp-specialized successor
(``hopper_ws.py``, config key ``WS``) releases the K / V slots through mbarriers instead of a CTA barrier a step and
is what the H100 table runs at head_dim 256; at head_dim 512 with separate K and V the table runs ``hopper_ws.py``'s
score / output warpgroup kernel.

Softmax in base 2 (``qk_scale = scale * log2(e)``), fp32 statistics; per-thread partial row sums are reduced once
at the end. Blocks every row sees in full skip the positional mask.

Measured on the H100 (CUDA-graph replays, ``bench/ab_attention_hopper.py``, ``docs/notes/attention.md``): head_dim
512 causal 310-369 TFLOP/s at 4k-32k (the portable kernel 258-296), 415-479 with K is V and 64-key tiles; head_dim
256 0.83-1.06x the portable kernel (ahead only from 16k keys, where the H100 table uses it).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma
from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

BLOCK_M = 64
#: Query rows of a program of the head_dim <= 256 kernel (64 per warpgroup).
ROWS_BLOCK_M = 128
NUM_WARPS = 8


@gluon.jit
def _issue_load(desc, b, h, row, bar, dst):
    mbarrier.expect(bar, desc.block_type.nbytes)
    tma.async_copy_global_to_shared(desc, [b, h, row, 0], bar, dst)


@gluon.jit
def _masked(s, pos, start_n, SK, WL, BLOCK_N: gl.constexpr, s_layout: gl.constexpr):
    cols = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    diff = pos[:, None] - cols[None, :]
    vis = (diff >= 0) & (diff <= WL) & (cols[None, :] < SK)
    return gl.where(vis, s, float("-inf"))


@gluon.jit
def _softmax_block(s, m_i, l_part, pos, start_n, full_lo, full_hi, SK, WL, qk_scale, BLOCK_N: gl.constexpr,
                   s_layout: gl.constexpr):
    """Scale (base 2), mask blocks that some row does not see in full, online max; returns
    ``(p, alpha, m_new, l_part)`` with the per-thread partial row sums rescaled and increased by ``p``."""
    s = s * qk_scale
    if (start_n < full_lo) | (start_n + BLOCK_N > full_hi):
        s = _masked(s, pos, start_n, SK, WL, BLOCK_N, s_layout)
    m_new = gl.maximum(m_i, gl.max(s, 1))
    m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    p = gl.exp2(s - m_use[:, None])
    alpha = gl.exp2(m_i - m_use)
    l_part = l_part * alpha[:, None] + p
    return p, alpha, m_new, l_part


@gluon.jit
def _program_band(H_Q, GROUPS, SQ, SK, WL, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """This program's (batch, head) and query block, heaviest first, and its key band: blocks from ``lo``
    (``n_blocks`` of them), those in ``[full_lo, full_hi)`` visible to every row. Causal, ``WL = window - 1``."""
    pid_m = gl.num_programs(0) - 1 - gl.program_id(0)
    pid_bh = gl.program_id(1)
    off_b = pid_bh // H_Q
    off_h = pid_bh % H_Q
    start_m = pid_m * BLOCK_M
    shift = SK - SQ
    pos0 = start_m + shift
    pos1 = gl.minimum(start_m + BLOCK_M, SQ) - 1 + shift
    lo = (gl.maximum(pos0 - WL, 0) // BLOCK_N) * BLOCK_N
    hi = gl.minimum(pos1 + 1, SK)
    full_lo = gl.cdiv(gl.maximum(pos1 - WL, 0), BLOCK_N) * BLOCK_N
    full_hi = (gl.minimum(pos0 + 1, SK) // BLOCK_N) * BLOCK_N
    return pid_bh, off_b, off_h, off_h // GROUPS, start_m, pos0, lo, full_lo, full_hi, gl.cdiv(hi - lo, BLOCK_N)


@gluon.jit
def _first_block(q_smem, q_bar, k_smem, k_bar, pos0, lo, full_lo, full_hi, SK, WL, qk_scale, HEAD_DIM: gl.constexpr,
                 BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr):
    """Both kernels' start: the Q tile as an MMA operand, the rows' positions, a zero score tile, the zero output
    accumulator; then, once Q and the first K tile have landed (ring slot 0), the first block's scores and softmax.
    Returns ``(q2, pos, s_zero, acc, p, m_i, l_part)``."""
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    q2 = q_smem.reshape([BLOCK_M, HEAD_DIM])
    pos = pos0 + gl.arange(0, BLOCK_M, layout=row_s)
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
    l_part = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_s)
    mbarrier.wait(q_bar, 0)
    mbarrier.wait(k_bar.index(0), 0)
    s = warpgroup_mma(q2, k_smem.index(0).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0)), s_zero, use_acc=False)
    p, alpha, m_i, l_part = _softmax_block(s, m_i, l_part, pos, lo, full_lo, full_hi, SK, WL, qk_scale, BLOCK_N,
                                           s_layout)
    return q2, pos, s_zero, acc, p, m_i, l_part


@gluon.jit
def _epilogue(acc, l_part, m_i, q_smem, q2, o_desc, LSE, pid_bh, off_b, off_h, start_m, SQ, BLOCK_M: gl.constexpr,
              row_s: gl.constexpr, row_o: gl.constexpr, WRITE_LSE):
    """Normalise, write O through the Q tile's shared memory by TMA (rows past the queries clipped), and the LSE when
    ``WRITE_LSE`` (a compile-time flag here, a run-time one in ``hopper_ws.py``'s partitions)."""
    l_i = gl.sum(l_part, 1)
    nonempty = l_i > 0.0
    l_safe = gl.where(nonempty, l_i, 1.0)
    out = acc / gl.convert_layout(l_safe, row_o)[:, None]
    q2.store(out.to(q2.dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [off_b, off_h, start_m, 0], q_smem)
    if WRITE_LSE:
        rows = start_m + gl.arange(0, BLOCK_M, layout=row_s)
        lse = gl.where(nonempty, (m_i + gl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
        gl.store(LSE + pid_bh.to(gl.int64) * SQ + rows, lse, mask=rows < SQ)
    tma.store_wait(0)


@gluon.jit
def attention_hopper_fwd_kernel(q_desc, k_desc, v_desc, o_desc, LSE, H_Q, GROUPS, SQ, SK, WL, qk_scale,
                                HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                                KV_SAME: gl.constexpr, KV_STAGES: gl.constexpr, K_STAGES: gl.constexpr,
                                V_STAGES: gl.constexpr, WRITE_LSE: gl.constexpr):
    """One program: ``BLOCK_M`` queries of one (batch, query head), all ``HEAD_DIM`` output columns.

    Grid ``(cdiv(Sq, BLOCK_M), B * Hq)``, heaviest query block first. ``q_desc``, ``k_desc``, ``v_desc``,
    ``o_desc``: 4-D TMA descriptors over ``[B, H, S, D]`` views (blocks ``[1, 1, BLOCK_M or BLOCK_N, D]``;
    reads past the keys are zero-filled, writes past the queries clipped). Causal with ``WL = window - 1``
    (``1 << 30`` without a window). ``LSE``: ``[B, Hq, Sq]`` fp32 (natural log), written when ``WRITE_LSE``.
    ``KV_SAME``: K is V; one ring of ``KV_STAGES`` tiles serves both (a tile is read by ``S_j`` and, one step
    later, by ``P_j V_j``), halving the bytes read. Otherwise K and V have rings of ``K_STAGES`` and ``V_STAGES``
    tiles (a K tile is free once both warpgroups have its scores, a V tile once ``P_j V_j`` has finished).
    """
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                       instr_shape=[16, BLOCK_N // 2, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                       instr_shape=[16, HEAD_DIM // 2, 16])
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    dtype: gl.constexpr = q_desc.dtype
    p_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N], dtype)
    NK: gl.constexpr = KV_STAGES if KV_SAME else K_STAGES
    NV: gl.constexpr = KV_STAGES if KV_SAME else V_STAGES

    pid_bh, off_b, off_h, off_hk, start_m, pos0, lo, full_lo, full_hi, n_blocks = _program_band(
        H_Q, GROUPS, SQ, SK, WL, BLOCK_M, BLOCK_N)

    q_smem = gl.allocate_shared_memory(dtype, [1, 1, BLOCK_M, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [NK, 1, 1, BLOCK_N, HEAD_DIM], k_desc.layout)
    p_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M, BLOCK_N], p_layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bar = gl.allocate_shared_memory(gl.int64, [NK, 1], mbarrier.MBarrierLayout())
    if KV_SAME:
        v_smem = k_smem
        v_bar = k_bar
    else:
        v_smem = gl.allocate_shared_memory(dtype, [NV, 1, 1, BLOCK_N, HEAD_DIM], v_desc.layout)
        v_bar = gl.allocate_shared_memory(gl.int64, [NV, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(NK):
        mbarrier.init(k_bar.index(i), count=1)
    if not KV_SAME:
        for i in gl.static_range(NV):
            mbarrier.init(v_bar.index(i), count=1)
    fence_async_shared()

    _issue_load(q_desc, off_b, off_h, start_m, q_bar, q_smem)
    for i in gl.static_range(NK):
        if i < n_blocks:
            _issue_load(k_desc, off_b, off_hk, lo + i * BLOCK_N, k_bar.index(i), k_smem.index(i))
    if not KV_SAME:
        for i in gl.static_range(NV):
            if i < n_blocks:
                _issue_load(v_desc, off_b, off_hk, lo + i * BLOCK_N, v_bar.index(i), v_smem.index(i))

    q2, pos, s_zero, acc, p, m_i, l_part = _first_block(q_smem, q_bar, k_smem, k_bar, pos0, lo, full_lo, full_hi, SK,
                                                        WL, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, s_layout, o_layout)
    p_smem.index(0).store(p.to(dtype))
    fence_async_shared()
    gl.thread_barrier()
    if not KV_SAME:
        if NK < n_blocks:
            _issue_load(k_desc, off_b, off_hk, lo + NK * BLOCK_N, k_bar.index(0), k_smem.index(0))

    for j in range(1, n_blocks):
        kslot = j % NK
        vslot = (j - 1) % NV
        start_n = lo + j * BLOCK_N
        mbarrier.wait(k_bar.index(kslot), (j // NK) & 1)
        kt = k_smem.index(kslot).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
        s_tok = warpgroup_mma(q2, kt, s_zero, use_acc=False, is_async=True)
        mbarrier.wait(v_bar.index(vslot), ((j - 1) // NV) & 1)
        acc_tok = warpgroup_mma(p_smem.index((j - 1) % 2), v_smem.index(vslot).reshape([BLOCK_N, HEAD_DIM]), acc,
                                is_async=True)
        s = warpgroup_mma_wait(1, deps=[s_tok])
        p, alpha, m_i, l_part = _softmax_block(s, m_i, l_part, pos, start_n, full_lo, full_hi, SK, WL, qk_scale,
                                               BLOCK_N, s_layout)
        acc = warpgroup_mma_wait(0, deps=[acc_tok])
        acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        p_smem.index(j % 2).store(p.to(dtype))
        fence_async_shared()
        gl.thread_barrier()
        if KV_SAME:
            if j - 1 + NK < n_blocks:
                _issue_load(k_desc, off_b, off_hk, start_n + (NK - 1) * BLOCK_N, k_bar.index(vslot),
                            k_smem.index(vslot))
        else:
            if j + NK < n_blocks:
                _issue_load(k_desc, off_b, off_hk, start_n + NK * BLOCK_N, k_bar.index(kslot), k_smem.index(kslot))
            if j - 1 + NV < n_blocks:
                _issue_load(v_desc, off_b, off_hk, start_n + (NV - 1) * BLOCK_N, v_bar.index(vslot),
                            v_smem.index(vslot))

    last = n_blocks - 1
    mbarrier.wait(v_bar.index(last % NV), (last // NV) & 1)
    acc = warpgroup_mma(p_smem.index(last % 2), v_smem.index(last % NV).reshape([BLOCK_N, HEAD_DIM]), acc)

    _epilogue(acc, l_part, m_i, q_smem, q2, o_desc, LSE, pid_bh, off_b, off_h, start_m, SQ, BLOCK_M, row_s, row_o,
              WRITE_LSE)
    mbarrier.invalidate(q_bar)
    for i in gl.static_range(NK):
        mbarrier.invalidate(k_bar.index(i))
    if not KV_SAME:
        for i in gl.static_range(NV):
            mbarrier.invalidate(v_bar.index(i))


def _layout(block, dtype: torch.dtype):
    return gl.NVMMASharedLayout.get_default_for(block, gl.bfloat16 if dtype == torch.bfloat16 else gl.float16)


def _descriptor(t: torch.Tensor, rows: int, cols: Optional[int] = None):
    """4-D TMA descriptor over ``t`` ``[B, H, S, D]`` with blocks ``[1, 1, rows, cols]`` (``cols`` default D; size-1
    dims get the stride a contiguous tensor would have: they are never stepped over)."""
    strides = list(t.stride())
    for i in (2, 1, 0):
        if t.shape[i] == 1:
            strides[i] = strides[i + 1] * t.shape[i + 1]
    block = [1, 1, rows, cols or t.shape[3]]
    return TensorDescriptor(t, list(t.shape), strides, block, _layout(block, t.dtype))


def hopper_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o, window, softcap, causal: bool,
                       kpm) -> Optional[str]:
    """Why ``attention_hopper_fwd`` cannot take this call (a short phrase for the log), or None when it can:
    sm_90, bf16 / fp16, head_dim 256 or 512, causal, no softcap, no key padding mask, an output to write, every
    tensor TMA-addressable (16-byte aligned base and strides, unit last stride)."""
    if q.device.type != "cuda" or torch.cuda.get_device_capability(q.device)[0] != 9:
        return "does not run on an sm_90 GPU"
    if q.dtype not in (torch.bfloat16, torch.float16) or q.shape[3] not in (256, 512):
        return "has a dtype or head_dim the Hopper kernel lacks"
    if not causal or softcap is not None or kpm is not None:
        return "is bidirectional, softcapped or padded"
    if o is None:
        return "writes only the LSE"
    for t in (q, k, v, o):
        if t.stride(3) != 1 or t.data_ptr() % 16:
            return "has a tensor the copy engine cannot address"
        if any((st * t.element_size()) % 16 for st, n in zip(t.stride()[:3], t.shape[:3]) if n > 1):
            return "has a tensor the copy engine cannot address"
    return None


@gluon.jit
def attention_hopper_rows_fwd_kernel(q_desc, k_desc, v_desc, o_desc, LSE, H_Q, GROUPS, SQ, SK, WL, qk_scale,
                                     HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                                     WRITE_LSE: gl.constexpr):
    """Head dims up to 256: one program owns ``BLOCK_M = 128`` query rows, each warpgroup 64 of them with the whole
    ``64 x HEAD_DIM`` accumulator (``warps_per_cta=[8, 1]``), so a warpgroup computes the scores of its own rows and
    keeps its probabilities in registers as the A operand of ``P V`` (no exchange between warpgroups). K and V
    stream through two-slot rings; one CTA barrier a step guards the refills. Arguments as
    ``attention_hopper_fwd_kernel`` (grid ``(cdiv(Sq, 128), B * Hq)``)."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[8, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[8, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    dtype: gl.constexpr = q_desc.dtype
    p_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)

    pid_bh, off_b, off_h, off_hk, start_m, pos0, lo, full_lo, full_hi, n_blocks = _program_band(
        H_Q, GROUPS, SQ, SK, WL, BLOCK_M, BLOCK_N)

    q_smem = gl.allocate_shared_memory(dtype, [1, 1, BLOCK_M, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [2, 1, 1, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [2, 1, 1, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    v_bar = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(2):
        mbarrier.init(k_bar.index(i), count=1)
        mbarrier.init(v_bar.index(i), count=1)
    fence_async_shared()

    _issue_load(q_desc, off_b, off_h, start_m, q_bar, q_smem)
    for i in gl.static_range(2):
        if i < n_blocks:
            _issue_load(k_desc, off_b, off_hk, lo + i * BLOCK_N, k_bar.index(i), k_smem.index(i))
            _issue_load(v_desc, off_b, off_hk, lo + i * BLOCK_N, v_bar.index(i), v_smem.index(i))

    q2, pos, s_zero, acc, p, m_i, l_part = _first_block(q_smem, q_bar, k_smem, k_bar, pos0, lo, full_lo, full_hi, SK,
                                                        WL, qk_scale, HEAD_DIM, BLOCK_M, BLOCK_N, s_layout, o_layout)
    p_prev = gl.convert_layout(p.to(dtype), p_op)
    gl.thread_barrier()
    if 2 < n_blocks:
        _issue_load(k_desc, off_b, off_hk, lo + 2 * BLOCK_N, k_bar.index(0), k_smem.index(0))

    for j in range(1, n_blocks):
        kslot = j % 2
        vslot = 1 - kslot
        start_n = lo + j * BLOCK_N
        mbarrier.wait(k_bar.index(kslot), (j // 2) & 1)
        kt = k_smem.index(kslot).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
        s_tok = warpgroup_mma(q2, kt, s_zero, use_acc=False, is_async=True)
        mbarrier.wait(v_bar.index(vslot), ((j - 1) // 2) & 1)
        acc_tok = warpgroup_mma(p_prev, v_smem.index(vslot).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
        s = warpgroup_mma_wait(1, deps=[s_tok])
        p, alpha, m_i, l_part = _softmax_block(s, m_i, l_part, pos, start_n, full_lo, full_hi, SK, WL, qk_scale,
                                               BLOCK_N, s_layout)
        acc, p_prev = warpgroup_mma_wait(0, deps=[acc_tok, p_prev])
        acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        p_prev = gl.convert_layout(p.to(dtype), p_op)
        gl.thread_barrier()
        if j + 2 < n_blocks:
            _issue_load(k_desc, off_b, off_hk, start_n + 2 * BLOCK_N, k_bar.index(kslot), k_smem.index(kslot))
        if j + 1 < n_blocks:
            _issue_load(v_desc, off_b, off_hk, start_n + BLOCK_N, v_bar.index(vslot), v_smem.index(vslot))

    last = n_blocks - 1
    mbarrier.wait(v_bar.index(last % 2), (last // 2) & 1)
    acc = warpgroup_mma(p_prev, v_smem.index(last % 2).reshape([BLOCK_N, HEAD_DIM]), acc)

    _epilogue(acc, l_part, m_i, q_smem, q2, o_desc, LSE, pid_bh, off_b, off_h, start_m, SQ, BLOCK_M, row_s, row_o,
              WRITE_LSE)
    mbarrier.invalidate(q_bar)
    for i in gl.static_range(2):
        mbarrier.invalidate(k_bar.index(i))
        mbarrier.invalidate(v_bar.index(i))


#: Shared memory a block may use on sm_90, less room for the barriers and the reduction scratch.
_SHARED_BUDGET = 232448 - 4096


def _stages(d: int, bn: int, want: int, rings: int) -> int:
    """The deepest ring (at most ``want`` tiles, at least 1) whose ``rings`` rings of ``bn x d`` tiles fit shared
    memory beside the 64-row Q tile and the two probability tiles (2-byte elements)."""
    fixed = 2 * (BLOCK_M * d + 2 * BLOCK_M * bn)
    fit = (_SHARED_BUDGET - fixed) // (2 * bn * d * rings)
    return max(1, min(want, fit))


def attention_hopper_fwd(q, k, v, o, lse, *, scale: float, window, config: dict) -> None:
    """Launch ``attention_hopper_fwd_kernel`` (head_dim 512) or ``attention_hopper_rows_fwd_kernel`` (head_dim
    256) into ``o`` (``[B, Hq, Sq, D]``) and ``lse`` (``[B, Hq, Sq]`` contiguous fp32, or None). Inputs as accepted
    by ``hopper_unsupported``.

    ``config``: ``BLOCK_N`` keys per step with ``K_STAGES`` / ``V_STAGES`` (default 2 / 2) tiles in the K and V
    rings; when ``v`` is ``k``, ``KV_BLOCK_N`` (default ``BLOCK_N``) keys per step and ``KV_STAGES`` (default 3)
    tiles in the one ring. Ring depths are cut to what fits shared memory. ``WS: 1`` runs the warp-specialized
    kernels of ``hopper_ws.py``: at head_dim 256 with ``BLOCK_N``, ``K_STAGES`` / ``V_STAGES``; at head_dim 512 with
    separate K and V in its own config (``hopper_ws.pick_ws512_config``; K is V keeps the 64-key ring above).
    Without it the head_dim-256 rows kernel takes ``BLOCK_N`` only (two-tile K and V rings)."""
    from .fwd import _same_tensor

    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    wl = (1 << 30) if window is None else int(window) - 1
    if D <= 256 and config.get("WS"):
        from .hopper_ws import attention_hopper_ws_fwd

        attention_hopper_ws_fwd(q, k, v, o, lse, scale=scale, window=window, config=config)
        return
    if D <= 256:
        bn = config["BLOCK_N"]
        grid = (triton.cdiv(Sq, ROWS_BLOCK_M), B * Hq)
        attention_hopper_rows_fwd_kernel[grid](
            _descriptor(q, ROWS_BLOCK_M), _descriptor(k, bn), _descriptor(v, bn), _descriptor(o, ROWS_BLOCK_M),
            lse if lse is not None else q, Hq, Hq // Hkv, Sq, Sk, wl, float(scale) * 1.4426950408889634,
            HEAD_DIM=D, BLOCK_M=ROWS_BLOCK_M, BLOCK_N=bn, WRITE_LSE=lse is not None, num_warps=NUM_WARPS)
        return
    kv_same = _same_tensor(k, v)
    if config.get("WS") and not kv_same:
        from .hopper_ws import attention_hopper_ws512_fwd, pick_ws512_config

        attention_hopper_ws512_fwd(q, k, v, o, lse, scale=scale, window=window, config=pick_ws512_config())
        return
    bn = config.get("KV_BLOCK_N", config["BLOCK_N"]) if kv_same else config["BLOCK_N"]
    kv_stages = _stages(D, bn, config.get("KV_STAGES", 3), 1)
    k_stages = _stages(D, bn, config.get("K_STAGES", 2), 2)
    v_stages = _stages(D, bn, config.get("V_STAGES", 2), 2)
    grid = (triton.cdiv(Sq, BLOCK_M), B * Hq)
    k_desc = _descriptor(k, bn)
    attention_hopper_fwd_kernel[grid](
        _descriptor(q, BLOCK_M), k_desc, k_desc if kv_same else _descriptor(v, bn), _descriptor(o, BLOCK_M),
        lse if lse is not None else q, Hq, Hq // Hkv, Sq, Sk, wl, float(scale) * 1.4426950408889634,
        HEAD_DIM=D, BLOCK_M=BLOCK_M, BLOCK_N=bn, KV_SAME=kv_same, KV_STAGES=kv_stages, K_STAGES=k_stages,
        V_STAGES=v_stages, WRITE_LSE=lse is not None, num_warps=NUM_WARPS)
