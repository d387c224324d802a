"""Hopper (sm_90) gate / up projections of the Gemma 4 MLP with ``gelu_tanh(gate) * up`` in their epilogue, in
Gluon: ``linear_gelu_mul_coop_fwd_kernel`` (the default), ``linear_gelu_mul_ws_fwd_kernel`` and
``linear_gelu_mul_fwd_kernel``, launcher ``linear_gelu_mul_fwd``.

``h = gelu_tanh(x @ w_gate^T) * (x @ w_up^T)`` for bf16 / fp16 ``x [M, K]``, ``w_gate`` and ``w_up [N, K]``, written
once as ``h [M, N]`` in x's dtype. cuBLAS writes ``gate`` and ``up`` (``2 M N`` elements) and the fused activation
reads both back and writes ``h``: at E2B's 8k tokens that pass moves ~17 GB over a forward (5.7 ms on an H100).
Here both products of one output tile are accumulated side by side and the activation runs on the accumulators.

Rounding is that of the unfused path (cuBLAS then ``gelu_mul``): each fp32 accumulator is rounded to x's dtype (the
GEMMs' outputs), then ``gelu_tanh(g) * u`` is computed in fp32 and rounded once, as ``gelu_mul`` does. Only the
GEMMs' summation order differs (on the H100 the outputs equalled the unfused path's bit for bit at every measured
shape).

Design (``linear_gelu_mul_coop_fwd_kernel``; the LM head's cooperative kernel, ``kernels/softcap/lm_head_hopper.py``,
with two weight operands): a persistent program walks output tiles of ``128 x 128``, down groups of row blocks of
one column block before the next, so programs in flight share the weight tiles they read from L2. A 1-warp loader
streams x, gate and up tiles through a TMA ring of ``STAGES`` 48 KB slots; two consumer warpgroups multiply the two
64-row halves of each tile, each with gate and up accumulators (``m64n128k16`` MMAs), reading the same weight tiles
and releasing each slot together, then apply the activation and hand their half to the TMA engine. Rows past ``M``
and columns past ``N`` are clipped by TMA; the K tail is zero-filled. ``linear_gelu_mul_ws_fwd_kernel`` (ping-pong:
consumers on alternate 64-row tiles, each weight tile read twice) and ``linear_gelu_mul_fwd_kernel`` (8 warps on one
tile without warp specialization) are kept as A/B baselines.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma, warpgroup_mma
from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma_wait

from .._common import pinned_config, sm_count
from ..softcap.lm_head_hopper import (WS_CONSUMER_REGS, WS_LOADER_REGS, WS_MAXNREG, WS_NUM_WARPS, _descriptor,
                                      _grouped_tile, _ws_plan)

NUM_WARPS = 8
#: Pins one config for tests (JSON, e.g. '{"BLOCK_N": 64, "STAGES": 3}'), merged over the default.
CONFIG_ENV = "GEMMA4_FAST_LINEAR_GELU_MUL_CONFIG"


@gluon.jit
def _gelu_tanh(g):
    """tanh-approximated GELU of fp32 ``g`` as ``g * sigmoid(2 * inner)`` (``gelu_mul``'s form: the exponential
    only sees non-positive arguments)."""
    inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
    t = gl.exp(-2.0 * gl.abs(inner))
    s = 1.0 / (1.0 + t)
    return g * gl.where(inner >= 0, s, t * s)


@gluon.jit
def _issue_step(a_desc, g_desc, u_desc, a_smem, g_smem, u_smem, bars, step, pid, nprog, num_m, k_tiles,
                BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
    """TMA loads of this program's global step ``step`` (its ``step // k_tiles``-th tile, k block
    ``step % k_tiles``) into ring slot ``step % STAGES``: the x tile and both weight tiles."""
    tile = pid + (step // k_tiles) * nprog
    off_m = (tile % num_m) * BLOCK_M
    off_n = (tile // num_m) * BLOCK_N
    off_k = (step % k_tiles) * BLOCK_K
    slot = step % STAGES
    bar = bars.index(slot)
    mbarrier.expect(bar, a_desc.block_type.nbytes + 2 * g_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(a_desc, [off_m, off_k], bar, a_smem.index(slot))
    tma.async_copy_global_to_shared(g_desc, [off_n, off_k], bar, g_smem.index(slot))
    tma.async_copy_global_to_shared(u_desc, [off_n, off_k], bar, u_smem.index(slot))


@gluon.jit
def linear_gelu_mul_fwd_kernel(a_desc, g_desc, u_desc, c_desc, M, N, K, BLOCK_M: gl.constexpr,
                               BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
    """Persistent program over output tiles ``pid, pid + nprog, ...`` (tile ``t``: row block ``t % num_m``, column
    block ``t // num_m``). ``a_desc``: TMA descriptor over ``x [M, K]`` (block ``[BLOCK_M, BLOCK_K]``); ``g_desc`` /
    ``u_desc`` over ``w_gate`` / ``w_up [N, K]`` (block ``[BLOCK_N, BLOCK_K]``); ``c_desc`` over ``h [M, N]`` (block
    ``[BLOCK_M, BLOCK_N]``)."""
    dtype: gl.constexpr = a_desc.dtype
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[gl.num_warps(), 1],
                                                         instr_shape=[16, BLOCK_N, 16])
    a_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, BLOCK_K], a_desc.layout)
    g_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, BLOCK_K], g_desc.layout)
    u_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, BLOCK_K], u_desc.layout)
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
            _issue_step(a_desc, g_desc, u_desc, a_smem, g_smem, u_smem, bars, s, pid, nprog, num_m, k_tiles,
                        BLOCK_M, BLOCK_N, BLOCK_K, STAGES)

    acc_g = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, acc_layout)
    acc_u = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, acc_layout)
    for step in range(total):
        slot = step % STAGES
        kk = step % k_tiles
        mbarrier.wait(bars.index(slot), (step // STAGES) & 1)
        a = a_smem.index(slot)
        acc_g = warpgroup_mma(a, g_smem.index(slot).permute((1, 0)), acc_g, use_acc=kk > 0, is_async=True)
        acc_u = warpgroup_mma(a, u_smem.index(slot).permute((1, 0)), acc_u, use_acc=kk > 0, is_async=True)
        acc_g, acc_u = warpgroup_mma_wait(2, deps=[acc_g, acc_u])
        nxt = step + STAGES - 1
        if nxt < total:
            _issue_step(a_desc, g_desc, u_desc, a_smem, g_smem, u_smem, bars, nxt, pid, nprog, num_m, k_tiles,
                        BLOCK_M, BLOCK_N, BLOCK_K, STAGES)
        if kk == k_tiles - 1:
            acc_g, acc_u = warpgroup_mma_wait(0, deps=[acc_g, acc_u])
            tile = pid + (step // k_tiles) * nprog
            g = acc_g.to(dtype).to(gl.float32)
            u = acc_u.to(dtype).to(gl.float32)
            h = _gelu_tanh(g) * u
            tma.store_wait(0)
            c_smem.store(h.to(dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(c_desc, [(tile % num_m) * BLOCK_M, (tile // num_m) * BLOCK_N], c_smem)
    tma.store_wait(0)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))


@gluon.jit
def _ws_loader(a_desc, g_desc, u_desc, c_desc, a_smem, g_smem, u_smem, c_smem, full, empty, order, M, N, K, group_m):
    """The 1-warp load partition: every step of the program's tiles in order (tile ``i`` is consumer ``i % 2``'s):
    the x tile and both weight tiles, into ring slot ``step % STAGES`` once the consumer that read the slot has
    released it."""
    STAGES: gl.constexpr = a_smem.type.shape[0]
    BLOCK_M: gl.constexpr = a_smem.type.shape[1]
    BLOCK_K: gl.constexpr = a_smem.type.shape[2]
    BLOCK_N: gl.constexpr = g_smem.type.shape[1]
    pid, nprog, num_m, num_n, k_tiles, my_tiles = _ws_plan(M, N, K, BLOCK_M, BLOCK_N, BLOCK_K)
    for step in range(my_tiles * k_tiles):
        slot = step % STAGES
        mbarrier.wait(empty.index(slot), ((step // STAGES) & 1) ^ 1)
        pm, pn = _grouped_tile(pid + (step // k_tiles) * nprog, num_m, num_n, group_m)
        off_k = (step % k_tiles) * BLOCK_K
        bar = full.index(slot)
        mbarrier.expect(bar, a_desc.block_type.nbytes + 2 * g_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(a_desc, [pm * BLOCK_M, off_k], bar, a_smem.index(slot))
        tma.async_copy_global_to_shared(g_desc, [pn * BLOCK_N, off_k], bar, g_smem.index(slot))
        tma.async_copy_global_to_shared(u_desc, [pn * BLOCK_N, off_k], bar, u_smem.index(slot))


@gluon.jit
def _ws_consume(a_desc, g_desc, u_desc, c_desc, a_smem, g_smem, u_smem, c_smem, full, empty, order, M, N, K, group_m,
                WHICH: gl.constexpr):
    """One consumer warpgroup: the program's tiles ``WHICH, WHICH + 2, ...``, each ``BLOCK_M x BLOCK_N`` with two
    accumulators (gate and up), the activation and the store through its own output buffer while the other
    warpgroup multiplies. Main loops alternate through ``order`` (see ``lm_head_hopper._ws_consume``: it also keeps
    every ring wait within one lap)."""
    STAGES: gl.constexpr = a_smem.type.shape[0]
    BLOCK_M: gl.constexpr = a_smem.type.shape[1]
    BLOCK_K: gl.constexpr = a_smem.type.shape[2]
    BLOCK_N: gl.constexpr = g_smem.type.shape[1]
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
        acc_g = zero
        acc_u = zero
        for kk in range(k_tiles):
            step = base + kk
            slot = step % STAGES
            mbarrier.wait(full.index(slot), (step // STAGES) & 1)
            a = a_smem.index(slot)
            acc_g = warpgroup_mma(a, g_smem.index(slot).permute((1, 0)), acc_g, use_acc=kk > 0, is_async=True)
            acc_u = warpgroup_mma(a, u_smem.index(slot).permute((1, 0)), acc_u, use_acc=kk > 0, is_async=True)
            acc_g, acc_u = warpgroup_mma_wait(2, deps=[acc_g, acc_u])
            if kk > 0:
                mbarrier.arrive(empty.index((step - 1) % STAGES), count=1)
        mbarrier.arrive(order.index(WHICH), count=1)
        acc_g, acc_u = warpgroup_mma_wait(0, deps=[acc_g, acc_u])
        mbarrier.arrive(empty.index((base + k_tiles - 1) % STAGES), count=1)
        pm, pn = _grouped_tile(pid + i * nprog, num_m, num_n, group_m)
        h = _gelu_tanh(acc_g.to(dtype).to(gl.float32)) * acc_u.to(dtype).to(gl.float32)
        tma.store_wait(0)
        out.store(h.to(dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(c_desc, [pm * BLOCK_M, pn * BLOCK_N], out)
    tma.store_wait(0)


@gluon.jit
def _ws_consumer_0(a_desc, g_desc, u_desc, c_desc, a_smem, g_smem, u_smem, c_smem, full, empty, order, M, N, K,
                   group_m):
    """The default-partition consumer: the program's even tiles."""
    _ws_consume(a_desc, g_desc, u_desc, c_desc, a_smem, g_smem, u_smem, c_smem, full, empty, order, M, N, K, group_m,
                0)


@gluon.jit
def _ws_consumer_1(a_desc, g_desc, u_desc, c_desc, a_smem, g_smem, u_smem, c_smem, full, empty, order, M, N, K,
                   group_m):
    """The worker consumer: the program's odd tiles."""
    _ws_consume(a_desc, g_desc, u_desc, c_desc, a_smem, g_smem, u_smem, c_smem, full, empty, order, M, N, K, group_m,
                1)


@gluon.jit
def linear_gelu_mul_ws_fwd_kernel(a_desc, g_desc, u_desc, c_desc, M, N, K, group_m, BLOCK_M: gl.constexpr,
                                  BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
    """The ping-pong variant of ``linear_gelu_mul_fwd_kernel`` (same operands, rounding and epilogue; tiles in
    groups of ``group_m`` row blocks, ``lm_head_hopper._grouped_tile``): a 1-warp TMA loader and two consumer
    warpgroups on alternate tiles of the program, each with its own gate and up accumulators and output buffer;
    their main loops alternate, so one's activation and store run under the other's MMAs (the LM head's
    ``linear_softcap_ws_fwd_kernel`` with two weight operands)."""
    dtype: gl.constexpr = a_desc.dtype
    a_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, BLOCK_K], a_desc.layout)
    g_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, BLOCK_K], g_desc.layout)
    u_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, BLOCK_K], u_desc.layout)
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
    args = (a_desc, g_desc, u_desc, c_desc, a_smem, g_smem, u_smem, c_smem, full, empty, order, M, N, K, group_m)
    gl.warp_specialize([(_ws_consumer_0, args), (_ws_consumer_1, args), (_ws_loader, args)], [4, 1],
                       [WS_CONSUMER_REGS, WS_LOADER_REGS])


@gluon.jit
def _coop_consume(a_desc, g_desc, u_desc, c_desc, a_smem, g_smem, u_smem, c_smem, full, empty, order, M, N, K,
                  group_m, WHICH: gl.constexpr):
    """One consumer warpgroup of the cooperative kernel: rows ``WHICH * BLOCK_M / 2 ...`` of every tile of the
    program, with gate and up accumulators, from the same ring slots as the other warpgroup (``empty`` counts two
    arrivals; see ``lm_head_hopper._coop_consume``), stored through its own half of the output buffer. ``order`` is
    not used (the partitions share the ping-pong kernel's argument list)."""
    STAGES: gl.constexpr = a_smem.type.shape[0]
    BLOCK_M: gl.constexpr = a_smem.type.shape[1]
    BLOCK_K: gl.constexpr = a_smem.type.shape[2]
    BLOCK_N: gl.constexpr = g_smem.type.shape[1]
    HALF_M: gl.constexpr = BLOCK_M // 2
    dtype: gl.constexpr = a_desc.dtype
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BLOCK_N, 16])
    out = c_smem.index(WHICH)
    pid, nprog, num_m, num_n, k_tiles, my_tiles = _ws_plan(M, N, K, BLOCK_M, BLOCK_N, BLOCK_K)
    zero = gl.zeros([HALF_M, BLOCK_N], gl.float32, acc_layout)
    for i in range(my_tiles):
        base = i * k_tiles
        acc_g = zero
        acc_u = zero
        for kk in range(k_tiles):
            step = base + kk
            slot = step % STAGES
            mbarrier.wait(full.index(slot), (step // STAGES) & 1)
            a = a_smem.index(slot).slice(WHICH * HALF_M, HALF_M)
            acc_g = warpgroup_mma(a, g_smem.index(slot).permute((1, 0)), acc_g, use_acc=kk > 0, is_async=True)
            acc_u = warpgroup_mma(a, u_smem.index(slot).permute((1, 0)), acc_u, use_acc=kk > 0, is_async=True)
            acc_g, acc_u = warpgroup_mma_wait(2, deps=[acc_g, acc_u])
            if kk > 0:
                mbarrier.arrive(empty.index((step - 1) % STAGES), count=1)
        acc_g, acc_u = warpgroup_mma_wait(0, deps=[acc_g, acc_u])
        mbarrier.arrive(empty.index((base + k_tiles - 1) % STAGES), count=1)
        pm, pn = _grouped_tile(pid + i * nprog, num_m, num_n, group_m)
        h = _gelu_tanh(acc_g.to(dtype).to(gl.float32)) * acc_u.to(dtype).to(gl.float32)
        tma.store_wait(0)
        out.store(h.to(dtype))
        fence_async_shared()
        tma.async_copy_shared_to_global(c_desc, [pm * BLOCK_M + WHICH * HALF_M, pn * BLOCK_N], out)
    tma.store_wait(0)


@gluon.jit
def _coop_consumer_0(a_desc, g_desc, u_desc, c_desc, a_smem, g_smem, u_smem, c_smem, full, empty, order, M, N, K,
                     group_m):
    """The default-partition consumer: the upper half of every tile's rows."""
    _coop_consume(a_desc, g_desc, u_desc, c_desc, a_smem, g_smem, u_smem, c_smem, full, empty, order, M, N, K,
                  group_m, 0)


@gluon.jit
def _coop_consumer_1(a_desc, g_desc, u_desc, c_desc, a_smem, g_smem, u_smem, c_smem, full, empty, order, M, N, K,
                     group_m):
    """The worker consumer: the lower half of every tile's rows."""
    _coop_consume(a_desc, g_desc, u_desc, c_desc, a_smem, g_smem, u_smem, c_smem, full, empty, order, M, N, K,
                  group_m, 1)


@gluon.jit
def linear_gelu_mul_coop_fwd_kernel(a_desc, g_desc, u_desc, c_desc, M, N, K, group_m, BLOCK_M: gl.constexpr,
                                    BLOCK_N: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr):
    """The cooperative variant (``lm_head_hopper.linear_softcap_coop_fwd_kernel`` with two weight operands): a 1-warp
    TMA loader and two consumer warpgroups on the two row halves of every ``BLOCK_M x BLOCK_N`` tile, reading one
    slot's gate and up tiles together; ``c_desc``'s block is ``[BLOCK_M / 2, BLOCK_N]``."""
    dtype: gl.constexpr = a_desc.dtype
    a_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, BLOCK_K], a_desc.layout)
    g_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, BLOCK_K], g_desc.layout)
    u_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, BLOCK_K], u_desc.layout)
    c_smem = gl.allocate_shared_memory(dtype, [2, BLOCK_M // 2, BLOCK_N], c_desc.layout)
    full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    order = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(full.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)
    fence_async_shared()
    args = (a_desc, g_desc, u_desc, c_desc, a_smem, g_smem, u_smem, c_smem, full, empty, order, M, N, K, group_m)
    gl.warp_specialize([(_coop_consumer_0, args), (_coop_consumer_1, args), (_ws_loader, args)], [4, 1],
                       [WS_CONSUMER_REGS, WS_LOADER_REGS])


def linear_gelu_mul_configs() -> list[dict[str, int]]:
    """The candidate configs. First (the default) the cooperative ``linear_gelu_mul_coop_fwd_kernel`` (``COOP: 1``):
    a 128 x 128 tile shared by the two consumer warpgroups (gate and up accumulators for 64 rows each), a 4-slot ring
    of 48 KB slots, two 16 KB output buffers (224 KB with the barriers), tiles in groups of 32 row blocks. Then the
    ping-pong ``linear_gelu_mul_ws_fwd_kernel`` (``WS: 1``: 64 x 128 per consumer warpgroup, 4 slots of 40 KB) and
    ``linear_gelu_mul_fwd_kernel`` (8 warps on one 128 x 128 tile, 4 slots), the A/B baselines. All fit sm_90's
    227 KB of shared memory per block. Measured (H100, ``bench/ab_mlp.py``): the cooperative kernel ran at 1.15-1.17x
    cuBLAS plus ``gelu_mul`` at E2B's 6144- and 12288-wide MLPs (4k-8k rows) and 1.39x at 1000 rows, against
    0.99-1.07x for the ping-pong kernel; 0.92x at 26B-A4B's 2112 x 2816."""
    return [dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, STAGES=4, COOP=1, GROUP_M=32),
            dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, STAGES=4, WS=1, GROUP_M=64),
            dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, STAGES=4)]


def pick_config() -> dict[str, int]:
    """The default config, or the pinned one (``CONFIG_ENV``) merged over it."""
    cfg = dict(linear_gelu_mul_configs()[0])
    pinned = pinned_config(CONFIG_ENV)
    if pinned:
        cfg.update(pinned)
    return cfg


def hopper_unsupported(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> Optional[str]:
    """Why ``linear_gelu_mul_fwd`` cannot take ``x [M, K]``, ``w_gate`` and ``w_up [N, K]`` (a short phrase for the
    log), or None when it can: an sm_90 GPU, bf16 / fp16 operands of one dtype on one device, row-major with 16-byte
    aligned rows (K and N multiples of 8)."""
    if x.device.type != "cuda" or torch.cuda.get_device_capability(x.device)[0] != 9:
        return "does not run on an sm_90 GPU"
    if x.dtype not in (torch.bfloat16, torch.float16):
        return "needs bf16 / fp16 operands"
    for w in (w_gate, w_up):
        if w.dtype != x.dtype or w.device != x.device:
            return "needs x and both weights in one dtype on one device"
    for t in (x, w_gate, w_up):
        if t.dim() != 2 or t.stride(1) != 1 or (t.stride(0) * t.element_size()) % 16 or t.data_ptr() % 16:
            return "has an operand the copy engine cannot address (rows must be 16-byte aligned)"
    if (w_gate.shape[0] * x.element_size()) % 16:
        return "has an intermediate size that is not a multiple of 8 (output rows must be 16-byte aligned)"
    return None


def linear_gelu_mul_fwd(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, out: torch.Tensor,
                        cfg: dict[str, int], programs: Optional[int] = None) -> None:
    """Launch the kernel ``cfg`` names (``COOP``: ``linear_gelu_mul_coop_fwd_kernel``, ``WS``:
    ``linear_gelu_mul_ws_fwd_kernel``, else ``linear_gelu_mul_fwd_kernel``):
    ``out [M, N] = gelu_tanh(x [M, K] @ w_gate [N, K]^T) * (x @ w_up^T)``.

    No validation (``hopper_unsupported`` is the check). ``cfg``: ``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``, ``STAGES``,
    optional ``COOP`` / ``WS`` and ``GROUP_M`` (row blocks per tile group of the warp-specialized kernels; default
    all). ``programs``:
    persistent programs (default: one per SM, at most one per tile)."""
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    m, k = x.shape
    n = w_gate.shape[0]
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    grid = (min(tiles, programs or sm_count(x.device)),)
    coop = bool(cfg.get("COOP"))
    descs = (_descriptor(x, [bm, bk]), _descriptor(w_gate, [bn, bk]), _descriptor(w_up, [bn, bk]),
             _descriptor(out, [bm // 2 if coop else bm, bn]))
    with torch.cuda.device(x.device):
        if cfg.get("WS") or coop:
            group = cfg.get("GROUP_M") or triton.cdiv(m, bm)
            kernel = linear_gelu_mul_coop_fwd_kernel if coop else linear_gelu_mul_ws_fwd_kernel
            kernel[grid](*descs, m, n, k, group, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, STAGES=cfg["STAGES"],
                         num_warps=WS_NUM_WARPS, maxnreg=WS_MAXNREG)
        else:
            linear_gelu_mul_fwd_kernel[grid](*descs, m, n, k, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                                             STAGES=cfg["STAGES"], num_warps=NUM_WARPS)
