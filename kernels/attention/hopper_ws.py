"""Warp-specialized Hopper (sm_90) prefill attention in Gluon: ``attention_hopper_ws_fwd_kernel`` (head_dim <= 256)
and ``attention_hopper_ws512_fwd_kernel`` (head_dim 512), launchers ``attention_hopper_ws_fwd`` /
``attention_hopper_ws512_fwd``.

Scope: what ``hopper.hopper_unsupported`` accepts (head_dim 256 or 512): bf16 / fp16 q ``[B, Hq, Sq, D]``, k / v
``[B, Hkv, Sk, D]``, causal (optionally with a window), no softcap, no key padding mask, queries at the end of the
keys; at head_dim 512 separate K and V (``hopper.attention_hopper_fwd`` keeps K is V on its 64-key ring kernel).

Why: ``attention_hopper_rows_fwd_kernel`` gives each of its two warpgroups 64 of a program's 128 query rows, but one
CTA-wide barrier a step (the refill of a K / V ring slot must wait until both warpgroups have read it) keeps the
warpgroups in lockstep, so one's softmax cannot run under the other's MMAs. Here the refills move to a producer
warp and the slots are released through mbarriers that each consumer warpgroup arrives on when its MMA that read
the slot has finished: the consumers drift apart and the tensor cores see one warpgroup's MMAs while the other
runs its softmax (the schedule FlashAttention 3 uses).

Partitions (``gl.warp_specialize``): the default partition (4 warps) and a 4-warp worker are the consumers, rows
``[0, 64)`` and ``[64, 128)`` of the program's query block; a 1-warp worker issues every TMA load. Per consumer and
step ``j``: ``S_j = Q K_j^T`` and ``O += P_{j-1} V_{j-1}`` as asynchronous warpgroup MMAs, the softmax of block ``j``
while ``P_{j-1} V_{j-1}`` runs, then ``K_j``'s and ``V_{j-1}``'s slots released. K and V have rings of
``K_STAGES`` / ``V_STAGES`` tiles; the producer loads ``K_{j+1}`` before ``V_j``, the order the consumers need them.
The softmax, masking, band and epilogue are those of ``hopper.py``.

head_dim 512 (``attention_hopper_ws512_fwd_kernel``): a 64 x 512 fp32 accumulator does not fit one warpgroup, so
``hopper.py``'s kernel splits the score and output columns over its two warpgroups and exchanges the probabilities
through shared memory behind a CTA barrier each step. Here a score warpgroup computes ``S_j`` and the softmax and
hands ``P_j`` and the rescale factors to two output warpgroups (256 columns each) through a two-slot buffer guarded
by mbarriers; the softmax of one block runs while the output warpgroups multiply the previous one. By default
(``Q_SPLIT: 2``) the score warpgroup holds the first 256 columns of Q in registers, so half of its score MMAs read
only K from shared memory.

Measured on the H100 (``bench/ab_attention_ws.py``, graph replays, ``docs/notes/attention.md``): head_dim 256 causal
529 / 644 / 686 TFLOP/s at 4k / 8k / 16k (1.0-1.06x SDPA; the lockstep kernel 392-533); head_dim 512 causal 380-449
TFLOP/s at 4k-32k with half of Q in registers (354-419 without, the lockstep kernel 308-364, in the same run).
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma
from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma_wait

from .._common import pinned_config
from .hopper import _descriptor, _epilogue, _first_block, _issue_load, _program_band, _softmax_block

#: Query rows of a program (64 per consumer warpgroup).
WS_BLOCK_M = 128
#: Warps of the default partition (one consumer warpgroup); the kernel adds a 4-warp consumer and a 1-warp producer.
WS_NUM_WARPS = 4
#: Registers per thread at launch (12 warps' worth fit 64K) and after reallocation: consumers, producer.
WS_MAXNREG = 168
WS_CONSUMER_REGS = gl.constexpr(240)
WS_PRODUCER_REGS = gl.constexpr(24)


@gluon.jit
def _ws_producer(q_desc, k_desc, v_desc, o_desc, LSE, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, k_free, v_free,
                 H_Q, GROUPS, SQ, SK, WL, qk_scale, WRITE_LSE):
    """The 1-warp load partition: both Q halves, then ``K_0``, and per step ``K_{j+1}`` and ``V_j``, each into its
    ring slot once both consumers have released the tile that held it."""
    HALF: gl.constexpr = 64
    BLOCK_N: gl.constexpr = k_smem.type.shape[3]
    K_STAGES: gl.constexpr = k_smem.type.shape[0]
    V_STAGES: gl.constexpr = v_smem.type.shape[0]
    pid_bh, off_b, off_h, off_hk, start_m, pos0, lo, full_lo, full_hi, n_blocks = _program_band(
        H_Q, GROUPS, SQ, SK, WL, 2 * HALF, BLOCK_N)
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [off_b, off_h, start_m, 0], q_bar, q_smem.index(0))
    tma.async_copy_global_to_shared(q_desc, [off_b, off_h, start_m + HALF, 0], q_bar, q_smem.index(1))
    _issue_load(k_desc, off_b, off_hk, lo, k_bar.index(0), k_smem.index(0))
    for j in range(n_blocks):
        nk = j + 1
        if nk < n_blocks:
            ks = nk % K_STAGES
            mbarrier.wait(k_free.index(ks), ((nk // K_STAGES) & 1) ^ 1)
            _issue_load(k_desc, off_b, off_hk, lo + nk * BLOCK_N, k_bar.index(ks), k_smem.index(ks))
        vs = j % V_STAGES
        mbarrier.wait(v_free.index(vs), ((j // V_STAGES) & 1) ^ 1)
        _issue_load(v_desc, off_b, off_hk, lo + j * BLOCK_N, v_bar.index(vs), v_smem.index(vs))


@gluon.jit
def _ws_consume(q_desc, k_desc, v_desc, o_desc, LSE, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, k_free, v_free,
                H_Q, GROUPS, SQ, SK, WL, qk_scale, WRITE_LSE, HALF_IDX: gl.constexpr):
    """One consumer warpgroup: rows ``[64 * HALF_IDX, 64 * HALF_IDX + 64)`` of the program's query block, every
    key block of the band (blocks a row does not see are masked), then its half of the output and, when
    ``WRITE_LSE`` is nonzero, the LSE."""
    HALF: gl.constexpr = 64
    HEAD_DIM: gl.constexpr = k_smem.type.shape[4]
    BLOCK_N: gl.constexpr = k_smem.type.shape[3]
    K_STAGES: gl.constexpr = k_smem.type.shape[0]
    V_STAGES: gl.constexpr = v_smem.type.shape[0]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    dtype: gl.constexpr = q_desc.dtype
    p_op: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)

    pid_bh, off_b, off_h, off_hk, start_m, pos0, lo, full_lo, full_hi, n_blocks = _program_band(
        H_Q, GROUPS, SQ, SK, WL, 2 * HALF, BLOCK_N)
    my_start = start_m + HALF_IDX * HALF
    q_tile = q_smem.index(HALF_IDX)
    q2, pos, s_zero, acc, p, m_i, l_part = _first_block(q_tile, q_bar, k_smem, k_bar, pos0 + HALF_IDX * HALF, lo,
                                                        full_lo, full_hi, SK, WL, qk_scale, HEAD_DIM, HALF, BLOCK_N,
                                                        s_layout, o_layout)
    mbarrier.arrive(k_free.index(0), count=1)
    p_prev = gl.convert_layout(p.to(dtype), p_op)

    for j in range(1, n_blocks):
        ks = j % K_STAGES
        vs = (j - 1) % V_STAGES
        start_n = lo + j * BLOCK_N
        mbarrier.wait(k_bar.index(ks), (j // K_STAGES) & 1)
        kt = k_smem.index(ks).reshape([BLOCK_N, HEAD_DIM]).permute((1, 0))
        s_tok = warpgroup_mma(q2, kt, s_zero, use_acc=False, is_async=True)
        mbarrier.wait(v_bar.index(vs), ((j - 1) // V_STAGES) & 1)
        acc_tok = warpgroup_mma(p_prev, v_smem.index(vs).reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
        s = warpgroup_mma_wait(1, deps=[s_tok])
        mbarrier.arrive(k_free.index(ks), count=1)
        p, alpha, m_i, l_part = _softmax_block(s, m_i, l_part, pos, start_n, full_lo, full_hi, SK, WL, qk_scale,
                                               BLOCK_N, s_layout)
        acc, p_prev = warpgroup_mma_wait(0, deps=[acc_tok, p_prev])
        mbarrier.arrive(v_free.index(vs), count=1)
        acc = acc * gl.convert_layout(alpha, row_o)[:, None]
        p_prev = gl.convert_layout(p.to(dtype), p_op)

    last = n_blocks - 1
    mbarrier.wait(v_bar.index(last % V_STAGES), (last // V_STAGES) & 1)
    acc = warpgroup_mma(p_prev, v_smem.index(last % V_STAGES).reshape([BLOCK_N, HEAD_DIM]), acc)
    mbarrier.arrive(v_free.index(last % V_STAGES), count=1)

    _epilogue(acc, l_part, m_i, q_tile, q2, o_desc, LSE, pid_bh, off_b, off_h, my_start, SQ, HALF, row_s, row_o,
              WRITE_LSE != 0)


@gluon.jit
def _ws_consumer_hi(q_desc, k_desc, v_desc, o_desc, LSE, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, k_free, v_free,
                    H_Q, GROUPS, SQ, SK, WL, qk_scale, WRITE_LSE):
    """The worker consumer: rows ``[64, 128)``."""
    _ws_consume(q_desc, k_desc, v_desc, o_desc, LSE, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, k_free, v_free,
                H_Q, GROUPS, SQ, SK, WL, qk_scale, WRITE_LSE, 1)


@gluon.jit
def _ws_consumer_lo(q_desc, k_desc, v_desc, o_desc, LSE, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, k_free, v_free,
                    H_Q, GROUPS, SQ, SK, WL, qk_scale, WRITE_LSE):
    """The default-partition consumer: rows ``[0, 64)``."""
    _ws_consume(q_desc, k_desc, v_desc, o_desc, LSE, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, k_free, v_free,
                H_Q, GROUPS, SQ, SK, WL, qk_scale, WRITE_LSE, 0)


@gluon.jit
def attention_hopper_ws_fwd_kernel(q_desc, k_desc, v_desc, o_desc, LSE, H_Q, GROUPS, SQ, SK, WL, qk_scale, WRITE_LSE,
                                   HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, K_STAGES: gl.constexpr,
                                   V_STAGES: gl.constexpr):
    """One program: 128 queries of one (batch, query head), all ``HEAD_DIM`` output columns, in three partitions
    (see the module docstring). Grid ``(cdiv(Sq, 128), B * Hq)``, heaviest query block first. ``q_desc`` /
    ``o_desc``: 4-D TMA descriptors over ``[B, H, S, D]`` with blocks ``[1, 1, 64, D]``; ``k_desc`` / ``v_desc``
    with blocks ``[1, 1, BLOCK_N, D]`` (reads past the keys zero-filled, writes past the queries clipped). Causal with
    ``WL = window - 1`` (``1 << 30`` without a window). ``LSE``: ``[B, Hq, Sq]`` fp32 (natural log), written when
    ``WRITE_LSE`` is nonzero (a run-time flag: worker partitions take no compile-time arguments; they read the tile
    sizes from their shared-memory buffers)."""
    dtype: gl.constexpr = q_desc.dtype
    q_smem = gl.allocate_shared_memory(dtype, [2, 1, 1, 64, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [K_STAGES, 1, 1, BLOCK_N, HEAD_DIM], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [V_STAGES, 1, 1, BLOCK_N, HEAD_DIM], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bar = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], mbarrier.MBarrierLayout())
    v_bar = gl.allocate_shared_memory(gl.int64, [V_STAGES, 1], mbarrier.MBarrierLayout())
    k_free = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], mbarrier.MBarrierLayout())
    v_free = gl.allocate_shared_memory(gl.int64, [V_STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(K_STAGES):
        mbarrier.init(k_bar.index(i), count=1)
        mbarrier.init(k_free.index(i), count=2)
    for i in gl.static_range(V_STAGES):
        mbarrier.init(v_bar.index(i), count=1)
        mbarrier.init(v_free.index(i), count=2)
    fence_async_shared()
    args = (q_desc, k_desc, v_desc, o_desc, LSE, q_smem, k_smem, v_smem, q_bar, k_bar, v_bar, k_free, v_free, H_Q,
            GROUPS, SQ, SK, WL, qk_scale, WRITE_LSE)
    gl.warp_specialize([(_ws_consumer_lo, args), (_ws_consumer_hi, args), (_ws_producer, args)], [4, 1],
                       [WS_CONSUMER_REGS, WS_PRODUCER_REGS])


def _lse_arg(lse, q):
    """The LSE pointer argument: ``lse``, or a one-element fp32 tensor when none is written (the flag is a run-time
    argument of the worker partitions, so the pointer's type must be fp32 either way)."""
    return lse if lse is not None else torch.empty(1, device=q.device, dtype=torch.float32)


def ws_configs() -> list[dict[str, int]]:
    """The candidate configs: 64-key steps with two-tile K and V rings (192 KB with the two 64-row Q halves), or a
    three-tile K ring (224 KB)."""
    return [dict(BLOCK_N=64, K_STAGES=2, V_STAGES=2), dict(BLOCK_N=64, K_STAGES=3, V_STAGES=2)]


def attention_hopper_ws_fwd(q, k, v, o, lse, *, scale: float, window, config: dict) -> None:
    """Launch ``attention_hopper_ws_fwd_kernel`` into ``o`` (``[B, Hq, Sq, D]``, D <= 256) and ``lse``
    (``[B, Hq, Sq]`` contiguous fp32, or None). Inputs as accepted by ``hopper.hopper_unsupported``. ``config``:
    ``BLOCK_N``, ``K_STAGES`` / ``V_STAGES`` (default 2 / 2)."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    wl = (1 << 30) if window is None else int(window) - 1
    bn = config["BLOCK_N"]
    grid = (triton.cdiv(Sq, WS_BLOCK_M), B * Hq)
    lse_arg = _lse_arg(lse, q)
    attention_hopper_ws_fwd_kernel[grid](
        _descriptor(q, 64), _descriptor(k, bn), _descriptor(v, bn), _descriptor(o, 64), lse_arg, Hq, Hq // Hkv, Sq,
        Sk, wl, float(scale) * 1.4426950408889634, int(lse is not None), HEAD_DIM=D, BLOCK_N=bn,
        K_STAGES=config.get("K_STAGES", 2), V_STAGES=config.get("V_STAGES", 2), num_warps=WS_NUM_WARPS,
        maxnreg=WS_MAXNREG)


# ---------------------------------------------------------------------------------------------------------------
# head_dim 512: one score warpgroup, two output warpgroups
# ---------------------------------------------------------------------------------------------------------------

#: Registers per thread of the head_dim-512 kernel at launch (12 warps' worth fit 64K) and after reallocation: the
#: score warpgroup and the second output warpgroup (the default partition, the first output warpgroup, keeps the
#: rest).
WS512_MAXNREG = 168
WS512_SCORE_REGS = gl.constexpr(96)
WS512_OUT_REGS = gl.constexpr(208)
#: The same with the first half of Q held in the score warpgroup's registers (``Q_SPLIT: 2``): 64 more there.
WS512_QREG_SCORE_REGS = gl.constexpr(160)
WS512_QREG_OUT_REGS = gl.constexpr(176)
#: Pins the head_dim-512 kernel's config for tests and A/Bs (JSON, e.g. '{"Q_SPLIT": 1}'), merged over the default.
WS512_CONFIG_ENV = "GEMMA4_FAST_ATTENTION_WS512_CONFIG"


@gluon.jit
def _ws512_issue_k(k_desc, k_smem, k_bar, off_b, off_hk, row, slot):
    """TMA loads of the K tile at key ``row`` into ring slot ``slot``: one ``[BLOCK_N, 512]`` tile, or its two
    256-column halves (slots ``2 * slot`` and ``2 * slot + 1``) when Q is split (``q_smem`` holds two halves)."""
    QS: gl.constexpr = k_smem.type.shape[0] // k_bar.type.shape[0]
    PART_D: gl.constexpr = k_smem.type.shape[4]
    bar = k_bar.index(slot)
    mbarrier.expect(bar, QS * k_desc.block_type.nbytes)
    for h in gl.static_range(QS):
        tma.async_copy_global_to_shared(k_desc, [off_b, off_hk, row, h * PART_D], bar, k_smem.index(QS * slot + h))


@gluon.jit
def _ws512_scores(q_desc, k_desc, v_desc, O, LSE, q_smem, k_smem, v_smem, p_smem, a_smem, l_smem, q_bar, k_bar,
                  v_bar, p_ready, p_free, l_bar, so_b, so_h, so_s, H_Q, GROUPS, SQ, SK, WL, qk_scale, WRITE_LSE):
    """The score warpgroup: loads Q and streams K through its ring; per key block ``S_j = Q K_j^T``, the online
    softmax, and ``P_j`` with the rescale factors handed to the output warpgroups through a two-slot buffer; at
    the end the row sums (and the LSE)."""
    QS: gl.constexpr = q_smem.type.shape[0]
    BLOCK_N: gl.constexpr = k_smem.type.shape[3]
    PART_D: gl.constexpr = k_smem.type.shape[4]
    K_STAGES: gl.constexpr = k_smem.type.shape[0] // QS
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    dtype: gl.constexpr = q_desc.dtype
    pid_bh, off_b, off_h, off_hk, start_m, pos0, lo, full_lo, full_hi, n_blocks = _program_band(
        H_Q, GROUPS, SQ, SK, WL, 64, BLOCK_N)
    mbarrier.expect(q_bar, QS * q_desc.block_type.nbytes)
    for h in gl.static_range(QS):
        tma.async_copy_global_to_shared(q_desc, [off_b, off_h, start_m, h * PART_D], q_bar, q_smem.index(h))
    for i in gl.static_range(K_STAGES):
        if i < n_blocks:
            _ws512_issue_k(k_desc, k_smem, k_bar, off_b, off_hk, lo + i * BLOCK_N, i)
    pos = pos0 + gl.arange(0, 64, layout=row_s)
    s_zero = gl.zeros([64, BLOCK_N], gl.float32, s_layout)
    l_part = gl.zeros([64, BLOCK_N], gl.float32, s_layout)
    m_i = gl.full([64], float("-inf"), gl.float32, row_s)
    mbarrier.wait(q_bar, 0)
    if QS == 2:
        q_lo = q_smem.index(0).reshape([64, PART_D]).load(gl.DotOperandLayout(operand_index=0, parent=s_layout,
                                                                              k_width=2))
    for j in range(n_blocks):
        ks = j % K_STAGES
        mbarrier.wait(k_bar.index(ks), (j // K_STAGES) & 1)
        if QS == 2:
            s = warpgroup_mma(q_lo, k_smem.index(2 * ks).reshape([BLOCK_N, PART_D]).permute((1, 0)), s_zero,
                              use_acc=False, is_async=True)
            s = warpgroup_mma(q_smem.index(1).reshape([64, PART_D]),
                              k_smem.index(2 * ks + 1).reshape([BLOCK_N, PART_D]).permute((1, 0)), s, is_async=True)
            s = warpgroup_mma_wait(0, deps=[s])
        else:
            s = warpgroup_mma(q_smem.index(0).reshape([64, PART_D]),
                              k_smem.index(ks).reshape([BLOCK_N, PART_D]).permute((1, 0)), s_zero, use_acc=False)
        if j + K_STAGES < n_blocks:
            _ws512_issue_k(k_desc, k_smem, k_bar, off_b, off_hk, lo + (j + K_STAGES) * BLOCK_N, ks)
        p, alpha, m_i, l_part = _softmax_block(s, m_i, l_part, pos, lo + j * BLOCK_N, full_lo, full_hi, SK, WL,
                                               qk_scale, BLOCK_N, s_layout)
        ps = j % 2
        mbarrier.wait(p_free.index(ps), ((j // 2) & 1) ^ 1)
        p_smem.index(ps).store(p.to(dtype))
        a_smem.index(ps).store(alpha)
        fence_async_shared()
        mbarrier.arrive(p_ready.index(ps), count=1)
    l_i = gl.sum(l_part, 1)
    l_smem.store(l_i)
    mbarrier.arrive(l_bar, count=1)
    if WRITE_LSE != 0:
        rows = start_m + gl.arange(0, 64, layout=row_s)
        nonempty = l_i > 0.0
        lse = gl.where(nonempty, (m_i + gl.log2(gl.where(nonempty, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
        gl.store(LSE + pid_bh.to(gl.int64) * SQ + rows, lse, mask=rows < SQ)


@gluon.jit
def _ws512_out(v_desc, O, v_smem, p_smem, a_smem, l_smem, v_bar, p_ready, p_free, l_bar, so_b, so_h, so_s, H_Q,
               GROUPS, SQ, SK, WL, HALF_IDX: gl.constexpr):
    """An output warpgroup: columns ``[256 * HALF_IDX, 256 * HALF_IDX + 256)`` of the 64 rows' output. It streams its
    half of V through its own ring; per key block ``O = O * alpha_j + P_j V_j``; then the division by the row sums
    and the store."""
    V_STAGES: gl.constexpr = v_smem.type.shape[0] // 2
    BLOCK_N: gl.constexpr = v_smem.type.shape[3]
    HALF_D: gl.constexpr = v_smem.type.shape[4]
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HALF_D, 16])
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    col_o: gl.constexpr = gl.SliceLayout(0, o_layout)
    pid_bh, off_b, off_h, off_hk, start_m, pos0, lo, full_lo, full_hi, n_blocks = _program_band(
        H_Q, GROUPS, SQ, SK, WL, 64, BLOCK_N)
    first: gl.constexpr = HALF_IDX * V_STAGES
    col0 = HALF_IDX * HALF_D
    for i in gl.static_range(V_STAGES):
        if i < n_blocks:
            mbarrier.expect(v_bar.index(first + i), v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(v_desc, [off_b, off_hk, lo + i * BLOCK_N, col0], v_bar.index(first + i),
                                            v_smem.index(first + i))
    acc = gl.zeros([64, HALF_D], gl.float32, o_layout)
    for j in range(n_blocks):
        ps = j % 2
        vs = first + j % V_STAGES
        mbarrier.wait(p_ready.index(ps), (j // 2) & 1)
        alpha = a_smem.index(ps).load(row_o)
        acc = acc * alpha[:, None]
        mbarrier.wait(v_bar.index(vs), (j // V_STAGES) & 1)
        acc = warpgroup_mma(p_smem.index(ps), v_smem.index(vs).reshape([BLOCK_N, HALF_D]), acc)
        mbarrier.arrive(p_free.index(ps), count=1)
        if j + V_STAGES < n_blocks:
            mbarrier.expect(v_bar.index(vs), v_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(v_desc, [off_b, off_hk, lo + (j + V_STAGES) * BLOCK_N, col0],
                                            v_bar.index(vs), v_smem.index(vs))
    mbarrier.wait(l_bar, 0)
    l_i = l_smem.load(row_o)
    out = acc / gl.where(l_i > 0.0, l_i, 1.0)[:, None]
    rows = start_m + gl.arange(0, 64, layout=row_o)
    cols = col0 + gl.arange(0, HALF_D, layout=col_o)
    base = O + off_b.to(gl.int64) * so_b + off_h.to(gl.int64) * so_h
    gl.store(base + rows[:, None].to(gl.int64) * so_s + cols[None, :], out.to(O.dtype.element_ty),
             mask=(rows < SQ)[:, None])


@gluon.jit
def _ws512_out_lo(q_desc, k_desc, v_desc, O, LSE, q_smem, k_smem, v_smem, p_smem, a_smem, l_smem, q_bar, k_bar,
                  v_bar, p_ready, p_free, l_bar, so_b, so_h, so_s, H_Q, GROUPS, SQ, SK, WL, qk_scale, WRITE_LSE):
    _ws512_out(v_desc, O, v_smem, p_smem, a_smem, l_smem, v_bar, p_ready, p_free, l_bar, so_b, so_h, so_s, H_Q,
               GROUPS, SQ, SK, WL, 0)


@gluon.jit
def _ws512_out_hi(q_desc, k_desc, v_desc, O, LSE, q_smem, k_smem, v_smem, p_smem, a_smem, l_smem, q_bar, k_bar,
                  v_bar, p_ready, p_free, l_bar, so_b, so_h, so_s, H_Q, GROUPS, SQ, SK, WL, qk_scale, WRITE_LSE):
    _ws512_out(v_desc, O, v_smem, p_smem, a_smem, l_smem, v_bar, p_ready, p_free, l_bar, so_b, so_h, so_s, H_Q,
               GROUPS, SQ, SK, WL, 1)


@gluon.jit
def attention_hopper_ws512_fwd_kernel(q_desc, k_desc, v_desc, O, LSE, so_b, so_h, so_s, H_Q, GROUPS, SQ, SK, WL,
                                      qk_scale, WRITE_LSE, BLOCK_N: gl.constexpr, K_STAGES: gl.constexpr,
                                      V_STAGES: gl.constexpr, Q_SPLIT: gl.constexpr):
    """head_dim 512: one program owns 64 query rows of one (batch, query head). A score warpgroup computes ``S_j``
    and the softmax and hands ``P_j`` (bf16) and the rescale factors to two output warpgroups through a two-slot
    shared buffer; each output warpgroup accumulates 256 of the 512 output columns (``64 x 256`` fp32), so the
    softmax of block ``j + 1`` runs while ``P_j V_j`` is on the tensor cores and no warpgroup waits for a CTA-wide
    barrier. Each warpgroup issues the TMA loads of what only it reads: Q and K (ring of ``K_STAGES`` tiles) by the
    score warpgroup, each 256-column half of V (ring of ``V_STAGES``) by its output warpgroup. Grid
    ``(cdiv(Sq, 64), B * Hq)``, heaviest query block first. ``Q_SPLIT`` 1: ``q_desc`` blocks ``[1, 1, 64, 512]``,
    ``k_desc`` ``[1, 1, BLOCK_N, 512]``; ``Q_SPLIT`` 2: both in 256-column halves (``[1, 1, 64, 256]`` /
    ``[1, 1, BLOCK_N, 256]``), the first half of Q held in the score warpgroup's registers (``S_j`` as one MMA with
    Q from registers and one from shared memory; registers moved from the output warpgroups to the score one).
    ``v_desc``: ``[1, 1, BLOCK_N, 256]``. ``O``: output pointer with element strides
    ``so_b``, ``so_h``, ``so_s`` (unit stride along D; rows past the queries are not written). Causal with ``WL =
    window - 1``; ``LSE`` ``[B, Hq, Sq]`` fp32 written when ``WRITE_LSE`` is nonzero."""
    dtype: gl.constexpr = q_desc.dtype
    p_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([64, BLOCK_N], dtype)
    vec_layout: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [0])
    q_smem = gl.allocate_shared_memory(dtype, [Q_SPLIT, 1, 1, 64, 512 // Q_SPLIT], q_desc.layout)
    k_smem = gl.allocate_shared_memory(dtype, [K_STAGES * Q_SPLIT, 1, 1, BLOCK_N, 512 // Q_SPLIT], k_desc.layout)
    v_smem = gl.allocate_shared_memory(dtype, [2 * V_STAGES, 1, 1, BLOCK_N, 256], v_desc.layout)
    p_smem = gl.allocate_shared_memory(dtype, [2, 64, BLOCK_N], p_layout)
    a_smem = gl.allocate_shared_memory(gl.float32, [2, 64], vec_layout)
    l_smem = gl.allocate_shared_memory(gl.float32, [64], vec_layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bar = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], mbarrier.MBarrierLayout())
    v_bar = gl.allocate_shared_memory(gl.int64, [2 * V_STAGES, 1], mbarrier.MBarrierLayout())
    p_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    p_free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    l_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    mbarrier.init(l_bar, count=1)
    for i in gl.static_range(K_STAGES):
        mbarrier.init(k_bar.index(i), count=1)
    for i in gl.static_range(2 * V_STAGES):
        mbarrier.init(v_bar.index(i), count=1)
    for h in gl.static_range(2):
        mbarrier.init(p_ready.index(h), count=1)
        mbarrier.init(p_free.index(h), count=2)
    fence_async_shared()
    args = (q_desc, k_desc, v_desc, O, LSE, q_smem, k_smem, v_smem, p_smem, a_smem, l_smem, q_bar, k_bar, v_bar,
            p_ready, p_free, l_bar, so_b, so_h, so_s, H_Q, GROUPS, SQ, SK, WL, qk_scale, WRITE_LSE)
    if Q_SPLIT == 2:
        gl.warp_specialize([(_ws512_out_lo, args), (_ws512_scores, args), (_ws512_out_hi, args)], [4, 4],
                           [WS512_QREG_SCORE_REGS, WS512_QREG_OUT_REGS])
    else:
        gl.warp_specialize([(_ws512_out_lo, args), (_ws512_scores, args), (_ws512_out_hi, args)], [4, 4],
                           [WS512_SCORE_REGS, WS512_OUT_REGS])


def ws512_configs() -> list[dict[str, int]]:
    """Candidate configs of the head_dim-512 kernel: 32-key steps with a two-tile K ring and two-tile rings of
    each V half (Q 64 KB, K 64 KB, V 64 KB, P 8 KB; a third K tile would exceed sm_90's 227 KB). First (the default)
    ``Q_SPLIT: 2``: Q and K tiles in 256-column halves, the first half of Q in the score warpgroup's registers, so
    half of the score MMAs read only K from shared memory (at 32-key steps the score MMAs' operand reads, not the
    tensor cores, set the pace): 1.06-1.08x the all-shared-memory schedule, which follows. Issuing the score MMA of
    block ``j + 1`` before the softmax of block ``j`` measured 0.67-0.78x (46dd9f8)."""
    return [dict(BLOCK_N=32, K_STAGES=2, V_STAGES=2, Q_SPLIT=2), dict(BLOCK_N=32, K_STAGES=2, V_STAGES=2)]


def pick_ws512_config() -> dict[str, int]:
    """The head_dim-512 kernel's default config, or the pinned one (``WS512_CONFIG_ENV``) merged over it."""
    cfg = dict(ws512_configs()[0])
    cfg.update(pinned_config(WS512_CONFIG_ENV) or {})
    return cfg


def attention_hopper_ws512_fwd(q, k, v, o, lse, *, scale: float, window, config: dict) -> None:
    """Launch ``attention_hopper_ws512_fwd_kernel`` into ``o`` (``[B, Hq, Sq, 512]``) and ``lse`` (``[B, Hq, Sq]``
    contiguous fp32, or None). Inputs as accepted by ``hopper.hopper_unsupported``. ``config``: ``BLOCK_N``,
    ``K_STAGES`` / ``V_STAGES`` (default 2 / 2), ``Q_SPLIT`` (1 or 2, default 1)."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    wl = (1 << 30) if window is None else int(window) - 1
    bn = config["BLOCK_N"]
    lse_arg = _lse_arg(lse, q)
    grid = (triton.cdiv(Sq, 64), B * Hq)
    qs = config.get("Q_SPLIT", 1)
    attention_hopper_ws512_fwd_kernel[grid](
        _descriptor(q, 64, D // qs), _descriptor(k, bn, D // qs), _descriptor(v, bn, D // 2), o, lse_arg, o.stride(0),
        o.stride(1), o.stride(2), Hq, Hq // Hkv, Sq, Sk, wl, float(scale) * 1.4426950408889634, int(lse is not None),
        BLOCK_N=bn, K_STAGES=config.get("K_STAGES", 2), V_STAGES=config.get("V_STAGES", 2), Q_SPLIT=qs, num_warps=4,
        maxnreg=WS512_MAXNREG)
