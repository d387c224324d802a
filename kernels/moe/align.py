"""Token/expert alignment on the GPU: sort (token, slot) pairs by expert and pad each group to a block.

The grouped GEMMs walk ``sorted_ids`` in blocks of ``block_m`` rows; every block belongs to one expert
(``expert_ids[block]``), so each program reads one expert's weight tile. Ids outside ``[0, E)`` (HF's
"no expert" sentinel ``E``, or anything else out of range) are dropped: they get no row.

Two paths, both without a host sync and deterministic (pairs keep ascending flat-id order inside an
expert, the same layout as ``moe_align_block_size_naive``):

* small (``T*k <= SMALL_MAX``, decode): one program does everything in registers (one launch);
* large: a per-chunk expert histogram, one program for the prefix sums over chunks and experts, and a
  per-chunk scatter (three launches plus the pad fill).

Output contract (shared with the naive version), with ``numel = T*k``:
``max_len = numel + min(E, numel) * (block_m - 1)`` (worst-case padded length),
``sorted_ids [max_len]`` int32 (pad value ``numel``), ``expert_ids [cdiv(max_len, block_m)]`` int32 (``-1``
past the used length), ``num_tokens_post_padded [1]`` int32.
"""
from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from .._common import can_launch, device_of, next_power_of_2
from .naive import moe_align_block_size_naive

logger = logging.getLogger("gemma4_fast")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)

SMALL_MAX = 256
CHUNK = 128
_OFFSET_ROWS = 32
_EXPERT_BLOCKS = 64


@triton.jit
def _block_expert_ids(expert_ids_ptr, ends, total, num_blocks, BLOCK_M: tl.constexpr, NB: tl.constexpr):
    for b0 in range(0, num_blocks, NB):
        blk = b0 + tl.arange(0, NB)
        first = blk * BLOCK_M
        eid = tl.sum((ends[None, :] <= first[:, None]).to(tl.int32), axis=1)
        eid = tl.where(first < total, eid, -1)
        tl.store(expert_ids_ptr + blk, eid, mask=blk < num_blocks)


@triton.jit
def _onehot(idx_ptr, start, numel, num_experts, N: tl.constexpr, E_P2: tl.constexpr):
    """Entries ``[start, start + N)`` of the flat expert index: their offsets, expert ids, validity (in range
    and a real expert) and the ``[N, E_P2]`` int32 one-hot of the valid ones."""
    offs = start + tl.arange(0, N)
    in_range = offs < numel
    e = tl.load(idx_ptr + offs, mask=in_range, other=-1)
    valid = in_range & (e >= 0) & (e < num_experts)
    cols = tl.arange(0, E_P2)
    onehot = ((e[:, None] == cols[None, :]) & valid[:, None]).to(tl.int32)
    return offs, e, valid, onehot


@triton.jit
def moe_align_block_size_small_fwd_kernel(
    idx_ptr, sorted_ptr, expert_ids_ptr, ntpp_ptr,
    numel, num_experts, max_len, num_blocks,
    BLOCK_M: tl.constexpr, N_P2: tl.constexpr, E_P2: tl.constexpr, FILL: tl.constexpr, NB: tl.constexpr,
):
    offs, e, valid, onehot = _onehot(idx_ptr, 0, numel, num_experts, N_P2, E_P2)
    counts = tl.sum(onehot, axis=0)
    rank = tl.sum(tl.cumsum(onehot, axis=0) * onehot, axis=1) - 1
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    starts = ends - padded
    pos = tl.sum(onehot * starts[None, :], axis=1) + rank
    total = tl.sum(padded, axis=0)
    for f0 in range(0, max_len, FILL):
        fo = f0 + tl.arange(0, FILL)
        tl.store(sorted_ptr + fo, tl.full([FILL], 0, tl.int32) + numel, mask=fo < max_len)
    tl.debug_barrier()
    tl.store(sorted_ptr + pos, offs, mask=valid)
    _block_expert_ids(expert_ids_ptr, ends, total, num_blocks, BLOCK_M, NB)
    tl.store(ntpp_ptr, total)


@triton.jit
def moe_align_block_size_count_fwd_kernel(
    idx_ptr, table_ptr, numel, num_experts,
    CHUNK: tl.constexpr, E_P2: tl.constexpr,
):
    c = tl.program_id(0)
    offs, e, valid, onehot = _onehot(idx_ptr, c * CHUNK, numel, num_experts, CHUNK, E_P2)
    cols = tl.arange(0, E_P2)
    tl.store(table_ptr + c * num_experts + cols, tl.sum(onehot, axis=0), mask=cols < num_experts)


@triton.jit
def moe_align_block_size_offsets_fwd_kernel(
    table_ptr, starts_ptr, expert_ids_ptr, ntpp_ptr,
    num_chunks, num_experts, num_blocks,
    BLOCK_M: tl.constexpr, E_P2: tl.constexpr, ROWS: tl.constexpr, NB: tl.constexpr,
):
    cols = tl.arange(0, E_P2)
    col_ok = cols < num_experts
    carry = tl.zeros([E_P2], dtype=tl.int32)
    for r0 in range(0, num_chunks, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        ptrs = table_ptr + rows[:, None] * num_experts + cols[None, :]
        m = (rows[:, None] < num_chunks) & col_ok[None, :]
        t = tl.load(ptrs, mask=m, other=0)
        tl.store(ptrs, tl.cumsum(t, axis=0) - t + carry[None, :], mask=m)
        carry += tl.sum(t, axis=0)
    padded = (carry + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    total = tl.sum(padded, axis=0)
    tl.store(starts_ptr + cols, ends - padded, mask=col_ok)
    _block_expert_ids(expert_ids_ptr, ends, total, num_blocks, BLOCK_M, NB)
    tl.store(ntpp_ptr, total)


@triton.jit
def moe_align_block_size_scatter_fwd_kernel(
    idx_ptr, table_ptr, starts_ptr, sorted_ptr, numel, num_experts,
    CHUNK: tl.constexpr, E_P2: tl.constexpr,
):
    c = tl.program_id(0)
    offs, e, valid, onehot = _onehot(idx_ptr, c * CHUNK, numel, num_experts, CHUNK, E_P2)
    rank = tl.sum(tl.cumsum(onehot, axis=0) * onehot, axis=1) - 1
    ec = tl.where(valid, e, 0)
    base = tl.load(table_ptr + c * num_experts + ec, mask=valid, other=0)
    base += tl.load(starts_ptr + ec, mask=valid, other=0)
    tl.store(sorted_ptr + base + rank, offs, mask=valid)


def padded_length(numel: int, num_experts: int, block_m: int) -> int:
    """Worst-case length of ``sorted_ids``: every non-empty expert padded by up to ``block_m - 1``."""
    return numel + min(num_experts, numel) * (block_m - 1)


def moe_align_block_size_fwd(top_k_index: torch.Tensor, num_experts: int, block_m: int, *,
                             small_max: int = SMALL_MAX, chunk: int = CHUNK):
    """Launch the alignment kernels (no checks). ``top_k_index`` must be contiguous.

    ``small_max`` and ``chunk`` select the path and the chunk size (tests force the large path).
    """
    numel = top_k_index.numel()
    device = top_k_index.device
    max_len = padded_length(numel, num_experts, block_m)
    num_blocks = _cdiv(max_len, block_m)
    expert_ids = torch.empty(num_blocks, dtype=torch.int32, device=device)
    ntpp = torch.empty(1, dtype=torch.int32, device=device)
    e_p2 = max(16, next_power_of_2(num_experts))
    idx = top_k_index.reshape(-1)
    if numel == 0:
        ntpp.zero_()
        return torch.empty(0, dtype=torch.int32, device=device), expert_ids, ntpp
    with device_of(top_k_index):
        if numel <= small_max:
            sorted_ids = torch.empty(max_len, dtype=torch.int32, device=device)
            moe_align_block_size_small_fwd_kernel[(1,)](
                idx, sorted_ids, expert_ids, ntpp, numel, num_experts, max_len, num_blocks,
                BLOCK_M=block_m, N_P2=max(16, next_power_of_2(numel)), E_P2=e_p2, FILL=1024,
                NB=_EXPERT_BLOCKS, num_warps=4,
            )
            return sorted_ids, expert_ids, ntpp
        sorted_ids = torch.full((max_len,), numel, dtype=torch.int32, device=device)
        num_chunks = _cdiv(numel, chunk)
        table = torch.empty(num_chunks * num_experts, dtype=torch.int32, device=device)
        starts = torch.empty(num_experts, dtype=torch.int32, device=device)
        moe_align_block_size_count_fwd_kernel[(num_chunks,)](
            idx, table, numel, num_experts, CHUNK=chunk, E_P2=e_p2, num_warps=4)
        moe_align_block_size_offsets_fwd_kernel[(1,)](
            table, starts, expert_ids, ntpp, num_chunks, num_experts, num_blocks,
            BLOCK_M=block_m, E_P2=e_p2, ROWS=_OFFSET_ROWS, NB=_EXPERT_BLOCKS, num_warps=4)
        moe_align_block_size_scatter_fwd_kernel[(num_chunks,)](
            idx, table, starts, sorted_ids, numel, num_experts, CHUNK=chunk, E_P2=e_p2, num_warps=4)
    return sorted_ids, expert_ids, ntpp


def moe_align_block_size(top_k_index: torch.Tensor, num_experts: int, block_m: int):
    """Sort (token, slot) pairs by expert and pad each expert's group to a multiple of ``block_m``.

    Runs on the GPU without a host sync (one launch for ``T*k <= 256``, the decode case). Ids outside
    ``[0, num_experts)`` are dropped (HF's sentinel ``E`` contributes nothing).

    Args:
        top_k_index: ``[T, k]`` integer tensor (int64 from ``torch.topk``, or int32) of expert ids.
        num_experts: ``E``, the number of experts.
        block_m: rows per block of the grouped GEMM (>= 1; the GEMMs use 16, 32, 64 or 128).

    Returns:
        ``(sorted_ids, expert_ids, num_tokens_post_padded)``:
        ``sorted_ids [numel + min(E, numel)*(block_m-1)]`` int32, flat ids ``token*k + slot`` grouped by
        ascending expert, ascending inside an expert, each group padded to a multiple of ``block_m`` with
        ``numel = T*k`` (also the value of every unused entry);
        ``expert_ids [cdiv(len(sorted_ids), block_m)]`` int32, the expert of each block (``-1`` past the
        used length); ``num_tokens_post_padded [1]`` int32, the used length of ``sorted_ids``.
        Falls back to ``moe_align_block_size_naive`` (logged) where Triton cannot launch.
    """
    if top_k_index.dim() != 2:
        raise ValueError(f"top_k_index must be [T, k], got shape {tuple(top_k_index.shape)}")
    if top_k_index.dtype.is_floating_point or top_k_index.dtype == torch.bool:
        raise ValueError(f"top_k_index must hold integers, got {top_k_index.dtype}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if block_m < 1:
        raise ValueError(f"block_m must be >= 1, got {block_m}")
    if not can_launch(top_k_index):
        logger.info("moe_align_block_size: Triton cannot launch on %s; using the PyTorch reference",
                    top_k_index.device)
        return moe_align_block_size_naive(top_k_index, num_experts, block_m)
    return moe_align_block_size_fwd(top_k_index.contiguous(), num_experts, block_m)
