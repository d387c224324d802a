"""Hopper (sm_90) LM head with the final softcap in its epilogue, in Gluon: ``linear_softcap_coop_fwd_kernel`` (the
default), ``linear_softcap_ws_fwd_kernel`` and ``linear_softcap_fwd_kernel``, launcher ``linear_softcap_fwd``.

``y = cap * tanh((x @ w^T) / cap)`` for bf16 / fp16 ``x [M, K]`` and ``w [N, K]`` (the LM head's weight, tied to
the embedding in Gemma 4), written once as ``y [M, N]`` in x's dtype. cuBLAS runs the LM head GEMM near the
tensor cores' rate but writes the raw logits, which the softcap then reads and writes again: at 8k tokens and a
262144-word vocabulary that second pass moves 8.6 GB (3 ms on an H100). Here the softcap is applied to the fp32
accumulator before the only store.

Design (``linear_softcap_coop_fwd_kernel``): a persistent program per SM walks output tiles of ``128 x 256``, down
the rows of one column block before the next (in groups of 4096 rows), so the programs in flight share the weight
tile they read (from L2) and the rows of ``x`` they read stay in L2. Three partitions (``gl.warp_specialize``): a
1-warp loader streams the operands of every tile through a TMA ring of ``STAGES`` slots, and two consumer
warpgroups multiply the two 64-row halves of each tile (``m64n256k16`` warpgroup MMAs, each with its own
accumulator and output buffer), reading the same weight tile from each slot and releasing the slot together. The
epilogue (scale, the hardware ``tanh.approx.f32`` with relative error about 2**-11, under half a bf16 unit in the
last place, one rounding, the store to shared memory and the TMA store) runs while the loader refills the ring.
Rows past ``M`` and columns past ``N`` are clipped by TMA; the K tail is zero-filled.

``linear_softcap_ws_fwd_kernel`` (ping-pong, an A/B baseline): the two consumer warpgroups take alternate ``64 x
256`` tiles and their main loops alternate (CUTLASS's ping-pong schedule), so one's epilogue runs under the other's
MMAs; but two independent tiles read each weight tile twice, and the operand reads from L2 set its pace.
``linear_softcap_fwd_kernel`` (the first design, an A/B baseline): 8 warps on one ``128 x 256`` tile without
warp specialization; its loads are issued by the warps that multiply and its epilogue stalls them.

Measured (H100, ``bench/ab_lm_head.py``, ``docs/notes/softcap.md``): E2B 8k 9.65 ms (684 TFLOP/s) against 10.76 for
the ping-pong kernel and 13.9 for cuBLAS's GEMM plus the softcap pass; 4k 5.11 against 5.55 / 6.30; 26B-A4B 4k
(hidden 2816) 8.90 against 10.16 / 10.28.
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

from .._common import pinned_config, sm_count

NUM_WARPS = 8
#: Warps of the ping-pong kernel's default partition (one consumer warpgroup; it adds a second and a loader warp),
#: its registers per thread at launch (12 warps' worth fit 64K) and after reallocation: consumers, loader.
WS_NUM_WARPS = 4
WS_MAXNREG = 168
WS_CONSUMER_REGS = gl.constexpr(240)
WS_LOADER_REGS = gl.constexpr(24)
#: Pins one config for tests (JSON, e.g. '{"BLOCK_N": 128, "STAGES": 4}'), merged over the default.
CONFIG_ENV = "GEMMA4_FAST_LINEAR_SOFTCAP_CONFIG"


@gluon.jit
def _tanh_approx(x):
    return gl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=gl.float32, is_pure=True,
                                     pack=1)


@gluon.jit
def _issue_step(a_desc, b_desc, a_smem, b_smem, bars, step, pid, nprog, num_m, k_tiles,
                BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
    """TMA loads of this program's global step ``step`` (its ``step // k_tiles``-th tile, k block
    ``step % k_tiles``) into ring slot ``step % STAGES``."""
    tile = pid + (step // k_tiles) * nprog
    off_m = (tile % num_m) * BLOCK_M
    off_n = (tile // num_m) * BLOCK_N
    off_k = (step % k_tiles) * BLOCK_K
    slot = step % STAGES
    bar = bars.index(slot)
    mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(a_desc, [off_m, off_k], bar, a_smem.index(slot))
    tma.async_copy_global_to_shared(b_desc, [off_n, off_k], bar, b_smem.index(slot))


@gluon.jit
def linear_softcap_fwd_kernel(a_desc, b_desc, c_desc, M, N, K, inv_cap, cap, BLOCK_M: gl.constexpr,
                              BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
    """Persistent program over output tiles ``pid, pid + nprog, ...`` (tile ``t``: row block ``t % num_m``, column
    block ``t // num_m``). ``a_desc`` / ``b_desc``: TMA descriptors over ``x [M, K]`` and ``w [N, K]`` (blocks
    ``[BLOCK_M, BLOCK_K]`` / ``[BLOCK_N, BLOCK_K]``), ``c_desc`` over ``y [M, N]`` (block ``[BLOCK_M, BLOCK_N]``).
    ``inv_cap = 1 / cap``."""
    dtype: gl.constexpr = a_desc.dtype
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                         instr_shape=[16, BLOCK_N, 16])
    a_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, BLOCK_K], a_desc.layout)
    b_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, BLOCK_K], b_desc.layout)
    c_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, BLOCK_N], c_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    fence_async_shared()

    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    num_m = gl.cdiv(M, BLOCK_M)
    num_tiles = num_m * gl.cdiv(N, BLOCK_N)
    k_tiles = gl.cdiv(K, BLOCK_K)
    my_tiles = gl.cdiv(num_tiles - pid, nprog)
    total = my_tiles * k_tiles
    for s in gl.static_range(STAGES - 1):
        if s < total:
            _issue_step(a_desc, b_desc, a_smem, b_smem, bars, s, pid, nprog, num_m, k_tiles,
                        BLOCK_M, BLOCK_N, BLOCK_K, STAGES)

    acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, acc_layout)
    for step in range(total):
        slot = step % STAGES
        kk = step % k_tiles
        mbarrier.wait(bars.index(slot), (step // STAGES) & 1)
        acc = warpgroup_mma(a_smem.index(slot), b_smem.index(slot).permute((1, 0)), acc, use_acc=kk > 0,
                            is_async=True)
        acc = warpgroup_mma_wait(1, deps=[acc])
        nxt = step + STAGES - 1
        if nxt < total:
            _issue_step(a_desc, b_desc, a_smem, b_smem, bars, nxt, pid, nprog, num_m, k_tiles,
                        BLOCK_M, BLOCK_N, BLOCK_K, STAGES)
        if kk == k_tiles - 1:
            acc = warpgroup_mma_wait(0, deps=[acc])
            tile = pid + (step // k_tiles) * nprog
            off_n = (tile // num_m) * BLOCK_N
            y = _tanh_approx(acc * inv_cap) * cap
            tma.store_wait(0)
            c_smem.store(y.to(dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(c_desc, [(tile % num_m) * BLOCK_M, off_n], c_smem)
    tma.store_wait(0)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))


@gluon.jit
def _grouped_tile(tile, num_m, num_n, group_m):
    """Row and column block of output tile ``tile``: tiles go down ``group_m`` row blocks of one column block, then
    the next column block, one group of rows after the other (``group_m >= num_m``: down all the rows)."""
    per_group = group_m * num_n
    first_m = (tile // per_group) * group_m
    rows = gl.minimum(num_m - first_m, group_m)
    return first_m + (tile % per_group) % rows, (tile % per_group) // rows


@gluon.jit
def _ws_plan(M, N, K, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr):
    """``(pid, nprog, num_m, num_n, k_tiles, my_tiles)``: this program, the grid, the row / column / k block counts
    and how many output tiles the program takes (``pid, pid + nprog, ...``)."""
    pid = gl.program_id(0)
    nprog = gl.num_programs(0)
    num_m = gl.cdiv(M, BLOCK_M)
    num_n = gl.cdiv(N, BLOCK_N)
    return pid, nprog, num_m, num_n, gl.cdiv(K, BLOCK_K), gl.cdiv(num_m * num_n - pid, nprog)


@gluon.jit
def _ws_loader(a_desc, b_desc, c_desc, a_smem, b_smem, c_smem, full, empty, order, M, N, K, group_m, inv_cap, cap):
    """The 1-warp load partition: every step of the program's tiles in order (tile ``i`` is consumer ``i % 2``'s),
    each into ring slot ``step % STAGES`` once the consumer that read the slot's previous tile has released it."""
    STAGES: gl.constexpr = a_smem.type.shape[0]
    BLOCK_M: gl.constexpr = a_smem.type.shape[1]
    BLOCK_K: gl.constexpr = a_smem.type.shape[2]
    BLOCK_N: gl.constexpr = b_smem.type.shape[1]
    pid, nprog, num_m, num_n, k_tiles, my_tiles = _ws_plan(M, N, K, BLOCK_M, BLOCK_N, BLOCK_K)
    for step in range(my_tiles * k_tiles):
        slot = step % STAGES
        mbarrier.wait(empty.index(slot), ((step // STAGES) & 1) ^ 1)
        pm, pn = _grouped_tile(pid + (step // k_tiles) * nprog, num_m, num_n, group_m)
        off_k = (step % k_tiles) * BLOCK_K
        bar = full.index(slot)
        mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(a_desc, [pm * BLOCK_M, off_k], bar, a_smem.index(slot))
        tma.async_copy_global_to_shared(b_desc, [pn * BLOCK_N, off_k], bar, b_smem.index(slot))


@gluon.jit
def _ws_consume(a_desc, b_desc, c_desc, a_smem, b_smem, c_smem, full, empty, order, M, N, K, group_m, inv_cap, cap,
                WHICH: gl.constexpr):
    """One consumer warpgroup: the program's tiles ``WHICH, WHICH + 2, ...``, each ``BLOCK_M x BLOCK_N`` in its own
    accumulator, softcapped and stored through its own output buffer while the other warpgroup multiplies.

    The main loops of the two warpgroups alternate: a tile's starts once the other warpgroup has issued the last MMA
    of the tile before (``order``). Besides giving the tensor cores to one warpgroup at a time, this keeps every
    wait on a ring slot within one lap of the ring (a parity wait cannot tell laps apart)."""
    STAGES: gl.constexpr = a_smem.type.shape[0]
    BLOCK_M: gl.constexpr = a_smem.type.shape[1]
    BLOCK_K: gl.constexpr = a_smem.type.shape[2]
    BLOCK_N: gl.constexpr = b_smem.type.shape[1]
    dtype: gl.constexpr = a_desc.dtype
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BLOCK_N, 16])
    out = c_smem.index(WHICH)
    pid, nprog, num_m, num_n, k_tiles, my_tiles = _ws_plan(M, N, K, BLOCK_M, BLOCK_N, BLOCK_K)
    zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, acc_layout)
    for i in range(WHICH, my_tiles, 2):
        if i > 0:
            mbarrier.wait(order.index(1 - WHICH), ((i - 1) // 2) & 1)
        base = i * k_tiles
        acc = zero
        for kk in range(k_tiles):
            step = base + kk
            slot = step % STAGES
            mbarrier.wait(full.index(slot), (step // STAGES) & 1)
            acc = warpgroup_mma(a_smem.index(slot), b_smem.index(slot).permute((1, 0)), acc, use_acc=kk > 0,
                                is_async=True)
            acc = warpgroup_mma_wait(1, deps=[acc])
            if kk > 0:
                mbarrier.arrive(empty.index((step - 1) % STAGES), count=1)
        mbarrier.arrive(order.index(WHICH), count=1)
        acc = warpgroup_mma_wait(0, deps=[acc])
        mbarrier.arrive(empty.index((base + k_tiles - 1) % STAGES), count=1)
        pm, pn = _grouped_tile(pid + i * nprog, num_m, num_n, group_m)
        y = _tanh_approx(acc * inv_cap) * cap
        tma.store_wait(0)
        out.store(y.to(dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(c_desc, [pm * BLOCK_M, pn * BLOCK_N], out)
    tma.store_wait(0)


@gluon.jit
def _ws_consumer_0(a_desc, b_desc, c_desc, a_smem, b_smem, c_smem, full, empty, order, M, N, K, group_m, inv_cap, cap):
    """The default-partition consumer: the program's even tiles."""
    _ws_consume(a_desc, b_desc, c_desc, a_smem, b_smem, c_smem, full, empty, order, M, N, K, group_m, inv_cap, cap, 0)


@gluon.jit
def _ws_consumer_1(a_desc, b_desc, c_desc, a_smem, b_smem, c_smem, full, empty, order, M, N, K, group_m, inv_cap, cap):
    """The worker consumer: the program's odd tiles."""
    _ws_consume(a_desc, b_desc, c_desc, a_smem, b_smem, c_smem, full, empty, order, M, N, K, group_m, inv_cap, cap, 1)


@gluon.jit
def linear_softcap_ws_fwd_kernel(a_desc, b_desc, c_desc, M, N, K, group_m, inv_cap, cap, BLOCK_M: gl.constexpr,
                                 BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
    """The ping-pong variant of ``linear_softcap_fwd_kernel`` (same operands and epilogue; tiles in groups of
    ``group_m`` row blocks, see ``_grouped_tile``): two
    consumer warpgroups take alternate tiles of the program, each with a ``BLOCK_M x BLOCK_N`` accumulator, fed by a
    1-warp TMA loader through one ``STAGES``-slot ring in tile order. The warpgroups' main loops alternate (the
    ``order`` barriers), so one's softcap and store run while the other's MMAs keep the tensor cores busy (CUTLASS's
    ping-pong schedule). Slots are released by mbarrier arrivals, not CTA barriers."""
    dtype: gl.constexpr = a_desc.dtype
    a_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, BLOCK_K], a_desc.layout)
    b_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, BLOCK_K], b_desc.layout)
    c_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M, BLOCK_N], c_desc.layout)
    full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    order = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(full.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    for i in gl.static_range(2):
        mbarrier.init(order.index(i), count=1)
    fence_async_shared()
    args = (a_desc, b_desc, c_desc, a_smem, b_smem, c_smem, full, empty, order, M, N, K, group_m, inv_cap, cap)
    gl.warp_specialize([(_ws_consumer_0, args), (_ws_consumer_1, args), (_ws_loader, args)], [4, 1],
                       [WS_CONSUMER_REGS, WS_LOADER_REGS])


@gluon.jit
def _coop_consume(a_desc, b_desc, c_desc, a_smem, b_smem, c_smem, full, empty, order, M, N, K, group_m, inv_cap, cap,
                  WHICH: gl.constexpr):
    """One consumer warpgroup of the cooperative kernel: rows ``WHICH * BLOCK_M / 2 ...`` of every tile of the program,
    from the same ring slots as the other warpgroup (each slot is released by both: ``empty`` counts two arrivals),
    softcapped and stored through its own half of the output buffer. Both warpgroups read the slot's weight tile,
    so a ``BLOCK_M x BLOCK_N`` tile moves half the operand bytes per MMA of two ping-pong tiles of half its rows.
    No ordering barrier (``order`` is not used): the shared slots keep the two within ``STAGES`` steps of each other,
    one lap of the ring."""
    STAGES: gl.constexpr = a_smem.type.shape[0]
    BLOCK_M: gl.constexpr = a_smem.type.shape[1]
    BLOCK_K: gl.constexpr = a_smem.type.shape[2]
    BLOCK_N: gl.constexpr = b_smem.type.shape[1]
    HALF_M: gl.constexpr = BLOCK_M // 2
    dtype: gl.constexpr = a_desc.dtype
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BLOCK_N, 16])
    out = c_smem.index(WHICH)
    pid, nprog, num_m, num_n, k_tiles, my_tiles = _ws_plan(M, N, K, BLOCK_M, BLOCK_N, BLOCK_K)
    zero = gl.zeros([HALF_M, BLOCK_N], gl.float32, acc_layout)
    for i in range(my_tiles):
        base = i * k_tiles
        acc = zero
        for kk in range(k_tiles):
            step = base + kk
            slot = step % STAGES
            mbarrier.wait(full.index(slot), (step // STAGES) & 1)
            acc = warpgroup_mma(a_smem.index(slot).slice(WHICH * HALF_M, HALF_M), b_smem.index(slot).permute((1, 0)),
                                acc, use_acc=kk > 0, is_async=True)
            acc = warpgroup_mma_wait(1, deps=[acc])
            if kk > 0:
                mbarrier.arrive(empty.index((step - 1) % STAGES), count=1)
        acc = warpgroup_mma_wait(0, deps=[acc])
        mbarrier.arrive(empty.index((base + k_tiles - 1) % STAGES), count=1)
        pm, pn = _grouped_tile(pid + i * nprog, num_m, num_n, group_m)
        y = _tanh_approx(acc * inv_cap) * cap
        tma.store_wait(0)
        out.store(y.to(dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(c_desc, [pm * BLOCK_M + WHICH * HALF_M, pn * BLOCK_N], out)
    tma.store_wait(0)


@gluon.jit
def _coop_consumer_0(a_desc, b_desc, c_desc, a_smem, b_smem, c_smem, full, empty, order, M, N, K, group_m, inv_cap,
                     cap):
    """The default-partition consumer: the upper half of every tile's rows."""
    _coop_consume(a_desc, b_desc, c_desc, a_smem, b_smem, c_smem, full, empty, order, M, N, K, group_m, inv_cap, cap,
                  0)


@gluon.jit
def _coop_consumer_1(a_desc, b_desc, c_desc, a_smem, b_smem, c_smem, full, empty, order, M, N, K, group_m, inv_cap,
                     cap):
    """The worker consumer: the lower half of every tile's rows."""
    _coop_consume(a_desc, b_desc, c_desc, a_smem, b_smem, c_smem, full, empty, order, M, N, K, group_m, inv_cap, cap,
                  1)


@gluon.jit
def linear_softcap_coop_fwd_kernel(a_desc, b_desc, c_desc, M, N, K, group_m, inv_cap, cap, BLOCK_M: gl.constexpr,
                                   BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
    """The cooperative variant of ``linear_softcap_ws_fwd_kernel`` (same operands, loader, tile order and epilogue):
    both consumer warpgroups work on every ``BLOCK_M x BLOCK_N`` tile of the program, half of its rows each, reading
    one ring slot's weight tile together; ``c_desc``'s block is ``[BLOCK_M / 2, BLOCK_N]``. The epilogues of the two
    halves run at the same time (the tensor cores wait for them) while the loader fills the ring for the next tile."""
    dtype: gl.constexpr = a_desc.dtype
    a_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, BLOCK_K], a_desc.layout)
    b_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, BLOCK_K], b_desc.layout)
    c_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M // 2, BLOCK_N], c_desc.layout)
    full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    order = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(full.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    fence_async_shared()
    args = (a_desc, b_desc, c_desc, a_smem, b_smem, c_smem, full, empty, order, M, N, K, group_m, inv_cap, cap)
    gl.warp_specialize([(_coop_consumer_0, args), (_coop_consumer_1, args), (_ws_loader, args)], [4, 1],
                       [WS_CONSUMER_REGS, WS_LOADER_REGS])


def _gl_dtype(dtype: torch.dtype):
    return gl.bfloat16 if dtype == torch.bfloat16 else gl.float16


def _descriptor(t: torch.Tensor, block: list[int]) -> TensorDescriptor:
    layout = gl.NVMMASharedLayout.get_default_for(block, _gl_dtype(t.dtype))
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block, layout)


def linear_softcap_configs() -> list[dict[str, int]]:
    """The candidate configs. First (the default) the cooperative ``linear_softcap_coop_fwd_kernel`` (``COOP: 1``): a
    128 x 256 tile shared by the two consumer warpgroups (64 rows each), a 3-slot ring of 48 KB slots, two 32 KB
    output buffers, tiles in groups of 32 row blocks (4096 rows). Then the ping-pong ``linear_softcap_ws_fwd_kernel``
    (``WS: 1``: a 64 x 256 tile per consumer warpgroup, a 4-slot ring, groups of 64 row blocks) and
    ``linear_softcap_fwd_kernel`` (8 warps on one 128 x 256 tile, a 3-slot ring), kept as A/B baselines. All fit
    sm_90's 227 KB of shared memory per block. Measured (H100, ``bench/ab_lm_head.py``): the cooperative tile ran at
    684 TFLOP/s at E2B 8k (9.65 ms) against 613 for the ping-pong kernel and 476 for cuBLAS plus the softcap pass; the
    ping-pong kernel's two independent 64-row tiles read every weight tile twice, so at 64 x 256 its operand reads
    from L2 (~20 bytes per kFLOP) set its pace."""
    return [dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, STAGES=3, COOP=1, GROUP_M=32),
            dict(BLOCK_M=64, BLOCK_N=256, BLOCK_K=64, STAGES=4, WS=1, GROUP_M=64),
            dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, STAGES=3)]


def pick_config() -> dict[str, int]:
    """The default config, or the pinned one (``CONFIG_ENV``) merged over it."""
    cfg = dict(linear_softcap_configs()[0])
    pinned = pinned_config(CONFIG_ENV)
    if pinned:
        cfg.update(pinned)
    return cfg


def hopper_unsupported(x: torch.Tensor, w: torch.Tensor) -> Optional[str]:
    """Why ``linear_softcap_fwd`` cannot take ``x [M, K]`` and ``w [N, K]`` (a short phrase for the log), or None
    when it can: an sm_90 GPU, bf16 / fp16 operands of one dtype on one device, row-major with 16-byte aligned rows
    (K and N multiples of 8)."""
    if x.device.type != "cuda" or torch.cuda.get_device_capability(x.device)[0] != 9:
        return "does not run on an sm_90 GPU"
    if x.dtype not in (torch.bfloat16, torch.float16) or w.dtype != x.dtype or w.device != x.device:
        return "needs bf16 / fp16 x and weight of one dtype on one device"
    for t in (x, w):
        if t.dim() != 2 or t.stride(1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            return "has an operand the copy engine cannot address (rows must be 16-byte aligned)"
    if (w.shape[0] * x.element_size()) % 16:
        return "has a vocabulary size that is not a multiple of 8 (output rows must be 16-byte aligned)"
    return None


def linear_softcap_fwd(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, cap: float, cfg: dict[str, int],
                       programs: Optional[int] = None) -> None:
    """Launch the kernel ``cfg`` names (``COOP``: ``linear_softcap_coop_fwd_kernel``, ``WS``:
    ``linear_softcap_ws_fwd_kernel``, else ``linear_softcap_fwd_kernel``):
    ``out [M, N] = cap * tanh((x [M, K] @ w [N, K]^T) / cap)``.

    No validation (``hopper_unsupported`` is the check). ``cfg``: ``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``,
    ``STAGES``, optional ``COOP`` / ``WS`` and ``GROUP_M`` (row blocks per tile group of the warp-specialized kernels;
    default all).
    ``programs``: persistent programs (default: one per SM, at most one per tile)."""
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    m, k = x.shape
    n = w.shape[0]
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    grid = (min(tiles, programs or sm_count(x.device)),)
    coop = bool(cfg.get("COOP"))
    descs = (_descriptor(x, [bm, bk]), _descriptor(w, [bn, bk]), _descriptor(out, [bm // 2 if coop else bm, bn]))
    with torch.cuda.device(x.device):
        if cfg.get("WS") or coop:
            group = cfg.get("GROUP_M") or triton.cdiv(m, bm)
            kernel = linear_softcap_coop_fwd_kernel if coop else linear_softcap_ws_fwd_kernel
            kernel[grid](*descs, m, n, k, group, 1.0 / cap, float(cap), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                         STAGES=cfg["STAGES"], num_warps=WS_NUM_WARPS, maxnreg=WS_MAXNREG)
        else:
            linear_softcap_fwd_kernel[grid](*descs, m, n, k, 1.0 / cap, float(cap), BLOCK_M=bm, BLOCK_N=bn,
                                            BLOCK_K=bk, STAGES=cfg["STAGES"], num_warps=NUM_WARPS)
