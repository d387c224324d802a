"""Hopper (sm_90) LM head with the final softcap in its epilogue, in Gluon: ``linear_softcap_fwd_kernel`` and its
launcher ``linear_softcap_fwd``.

``y = cap * tanh((x @ w^T) / cap)`` for bf16 / fp16 ``x [M, K]`` and ``w [N, K]`` (the LM head's weight, tied to
the embedding in Gemma 4), written once as ``y [M, N]`` in x's dtype. cuBLAS runs the LM head GEMM near the
tensor cores' rate but writes the raw logits, which the softcap then reads and writes again: at 8k tokens and a
262144-word vocabulary that second pass moves 8.6 GB (3 ms on an H100). Here the softcap is applied to the fp32
accumulator before the only store.

Design: a persistent program per SM walks output tiles of ``BLOCK_M x BLOCK_N`` (128 x 256), down the rows of one
column block before the next, so the programs in flight share the weight tile they read (from L2) and the whole
of ``x`` stays in L2. Both warpgroups (8 warps) work on one tile, 64 rows each (``m64n256k16`` warpgroup MMAs).
Operands stream through a TMA ring of ``STAGES`` slots across tile boundaries: the loads of the next tile start
while the current tile's epilogue runs. The epilogue scales, takes the hardware ``tanh.approx.f32`` (relative
error about 2**-11, under half a bf16 unit in the last place), rounds once, stores the tile to shared memory and
hands it to the TMA engine, which writes it while the next tile's MMAs run. Rows past ``M`` and columns past
``N`` are clipped by TMA; the K tail is zero-filled.

Measured (H100, ``bench/ab_lm_head.py``, ``docs/notes/softcap.md``): the main loop alone runs at cuBLAS's rate (674
TFLOP/s at E2B 8k) but the epilogue stalls the tensor cores (one accumulator per warpgroup, no room for a second
tile): E2B 8k 12.1 ms against 12.8 for cuBLAS's addmm plus the softcap, 4k 6.2 against 6.4; at hidden 2816
(26B-A4B) it is slower than cuBLAS, which ``linear_softcap`` therefore keeps (``MAX_K``).
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


def _gl_dtype(dtype: torch.dtype):
    return gl.bfloat16 if dtype == torch.bfloat16 else gl.float16


def _descriptor(t: torch.Tensor, block: list[int]) -> TensorDescriptor:
    layout = gl.NVMMASharedLayout.get_default_for(block, _gl_dtype(t.dtype))
    return TensorDescriptor(t, list(t.shape), list(t.stride()), block, layout)


def linear_softcap_configs() -> list[dict[str, int]]:
    """The candidate configs (8 warps each): 128 x 256 output tiles with a 3-slot ring (the default: the largest
    ring that fits beside the 64 KB output tile) and 128 x 128 tiles with a 4-slot ring. All fit sm_90's 227 KB
    of shared memory per block."""
    return [dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=64, STAGES=3), dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, STAGES=4)]


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
    """Launch ``linear_softcap_fwd_kernel``: ``out [M, N] = cap * tanh((x [M, K] @ w [N, K]^T) / cap)``.

    No validation (``hopper_unsupported`` is the check). ``cfg``: ``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K``,
    ``STAGES``. ``programs``: persistent programs (default: one per SM, at most one per tile)."""
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    m, k = x.shape
    n = w.shape[0]
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    grid = (min(tiles, programs or sm_count(x.device)),)
    with torch.cuda.device(x.device):
        linear_softcap_fwd_kernel[grid](
            _descriptor(x, [bm, bk]), _descriptor(w, [bn, bk]), _descriptor(out, [bm, bn]), m, n, k, 1.0 / cap,
            float(cap), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, STAGES=cfg["STAGES"], num_warps=NUM_WARPS)
