"""Grouped expert matmul for Gemma 4 MoE (``Gemma4TextExperts``) in Triton.

Pipeline for ``T`` tokens, ``k`` slots, ``numel = T*k`` (token, slot) pairs, ids ``token*k + slot``:

1. Routing: pairs sorted by expert, each expert padded to ``BLOCK_M`` rows (``moe_align_block_size``);
   for ``numel <= 128`` (decode) every GEMM program derives its block from ``top_k_index`` in
   registers instead (``_fused_route``), which saves a launch and three allocations per call.
2. ``moe_experts_gate_up_fwd_kernel``: one program owns ``BLOCK_M`` rows of one expert and ``BLOCK_N``
   columns of the intermediate width; it gathers the token rows of ``x`` and multiplies them by the gate
   rows *and* the up rows of ``gate_up_proj[e]`` (two accumulators, one pass over ``x``), then writes
   only ``h = gelu_tanh(gate) * up`` (``[numel, I]``, x's dtype, fp32 accumulate).
3. ``moe_experts_down_fwd_kernel``: ``h`` rows times ``down_proj[e]``; the routing weight is applied in
   the epilogue (fp32) and the row is stored at its pair id in ``[numel, H]``.
4. ``moe_experts_sum_fwd_kernel``: ``y[t] = sum_j rows[t*k + j]`` in fp32, cast to x's dtype.

Why write ``[T, k, H]`` and reduce instead of fp32 atomics into ``y``: the reduction is deterministic
(bit-stable results for interpretability work), it needs no zero-fill and no final cast pass, and the
same buffer *is* ``expert_outputs`` when the caller asks for it (then the down GEMM stores the
unweighted rows and the weights are applied in the reduction, in fp32, as HF's grouped_mm does).
The extra pass reads ``numel*H`` elements once: about 6% of the time at M = 4096 (estimated from bytes).

Decode (a few tokens): ``BLOCK_M = 16`` and one block per expert, so each selected expert's weights are
read once; the work is weight-bandwidth bound. Host overhead (Python, allocations, three launches)
dominates an eager call at M=1; the path has no host sync, so CUDA graphs capture it.
Weights are used in HF's layout, no copies. Expert ids outside ``[0, E)`` (HF's sentinel ``E`` included) contribute nothing.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch
import triton
import triton.language as tl

from .._common import can_launch, device_of, log_once, needs_grad, next_power_of_2
from .align import _onehot, moe_align_block_size_fwd, padded_length
from .configs import get_config
from .naive import moe_experts_naive



def _cdiv(a: int, b: int) -> int:
    return -(-a // b)

_SUPPORTED = (torch.bfloat16, torch.float16, torch.float32)
@triton.jit
def _gelu_tanh(x):
    u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    return x / (1.0 + tl.exp(-2.0 * u))


@triton.jit
def _block_coords(num_m_blocks, N, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    return pid_m, pid_n


@triton.jit
def _fused_route(idx_ptr, numel, num_experts, pid_m, BLOCK_M: tl.constexpr, ROUTE_N: tl.constexpr,
                 ROUTE_E: tl.constexpr):
    """Block ``pid_m`` of the aligned layout computed from ``top_k_index`` in registers (small ``numel``).

    Same layout as ``moe_align_block_size``: experts ascending, each padded to ``BLOCK_M`` rows, pairs in
    ascending flat-id order. Returns the block's expert, its ``BLOCK_M`` flat ids (``numel`` = pad) and
    the padded total.
    """
    offs, e, valid, onehot = _onehot(idx_ptr, 0, numel, num_experts, ROUTE_N, ROUTE_E)
    cols = tl.arange(0, ROUTE_E)
    counts = tl.sum(onehot, axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, axis=0)
    total = tl.sum(padded, axis=0)
    first = pid_m * BLOCK_M
    expert = tl.sum((ends <= first).to(tl.int32), axis=0)
    start = tl.sum(tl.where(cols == expert, ends - padded, 0), axis=0)
    mine = valid & (e == expert)
    rank = tl.cumsum(mine.to(tl.int32), axis=0) - 1
    want = first - start + tl.arange(0, BLOCK_M)
    match = mine[None, :] & (rank[None, :] == want[:, None])
    ids = tl.sum(tl.where(match, offs[None, :], 0), axis=1)
    ids = tl.where(tl.sum(match.to(tl.int32), axis=1) > 0, ids, numel)
    return expert, ids, total


@triton.jit
def moe_experts_gate_up_fwd_kernel(
    x_ptr, w_ptr, h_ptr, sorted_ids_ptr, expert_ids_ptr, ntpp_ptr, idx_ptr,
    numel, top_k, N, K, num_m_blocks, num_experts,
    stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_hm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
    FUSED_ROUTE: tl.constexpr, ROUTE_N: tl.constexpr, ROUTE_E: tl.constexpr,
):
    pid_m, pid_n = _block_coords(num_m_blocks, N, BLOCK_N, GROUP_M)
    if FUSED_ROUTE:
        expert, ids, total = _fused_route(idx_ptr, numel, num_experts, pid_m, BLOCK_M, ROUTE_N, ROUTE_E)
    else:
        total = tl.load(ntpp_ptr)
    if pid_m * BLOCK_M >= total:
        return
    if not FUSED_ROUTE:
        expert = tl.load(expert_ids_ptr + pid_m)
        ids = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    expert = expert.to(tl.int64)
    row_ok = ids < numel
    tok = (ids // top_k).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + tok[:, None] * stride_xm + offs_k[None, :] * stride_xk
    g_ptrs = w_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk
    u_ptrs = g_ptrs + N * stride_wn
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            g = tl.load(g_ptrs, mask=n_ok[None, :], other=0.0)
            u = tl.load(u_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = offs_k < K - k0
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            g = tl.load(g_ptrs, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
            u = tl.load(u_ptrs, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        acc_g = tl.dot(a, g, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(a, u, acc_u, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_xk
        g_ptrs += BLOCK_K * stride_wk
        u_ptrs += BLOCK_K * stride_wk
    h = _gelu_tanh(acc_g) * acc_u
    h_ptrs = h_ptr + ids[:, None].to(tl.int64) * stride_hm + offs_n[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def moe_experts_down_fwd_kernel(
    h_ptr, w_ptr, out_ptr, topk_w_ptr, sorted_ids_ptr, expert_ids_ptr, ntpp_ptr, idx_ptr,
    numel, N, K, num_m_blocks, num_experts,
    stride_hm, stride_we, stride_wn, stride_wk, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr, MUL_WEIGHT: tl.constexpr, PRECISION: tl.constexpr,
    FUSED_ROUTE: tl.constexpr, ROUTE_N: tl.constexpr, ROUTE_E: tl.constexpr,
):
    pid_m, pid_n = _block_coords(num_m_blocks, N, BLOCK_N, GROUP_M)
    if FUSED_ROUTE:
        expert, ids, total = _fused_route(idx_ptr, numel, num_experts, pid_m, BLOCK_M, ROUTE_N, ROUTE_E)
    else:
        total = tl.load(ntpp_ptr)
    if pid_m * BLOCK_M >= total:
        return
    if not FUSED_ROUTE:
        expert = tl.load(expert_ids_ptr + pid_m)
        ids = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    expert = expert.to(tl.int64)
    row_ok = ids < numel
    rows = ids.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + rows[:, None] * stride_hm + offs_k[None, :]
    b_ptrs = w_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = offs_k < K - k0
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * stride_wk
    if MUL_WEIGHT:
        w = tl.load(topk_w_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        acc = acc * w[:, None]
    o_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def moe_experts_sum_fwd_kernel(
    rows_ptr, idx_ptr, topk_w_ptr, y_ptr, H, num_experts, stride_ym,
    TOP_K: tl.constexpr, BLOCK_H: tl.constexpr, APPLY_WEIGHT: tl.constexpr, ZERO_SKIPPED: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs < H
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        row = t * TOP_K + j
        e = tl.load(idx_ptr + row)
        valid = (e >= 0) & (e < num_experts)
        v = tl.load(rows_ptr + row * H + offs, mask=h_ok & valid, other=0.0).to(tl.float32)
        if APPLY_WEIGHT:
            v = tl.where(valid, v * tl.load(topk_w_ptr + row).to(tl.float32), 0.0)
        acc += v
        if ZERO_SKIPPED:
            skipped = (e < 0) | (e >= num_experts)
            tl.store(rows_ptr + row * H + offs, tl.zeros([BLOCK_H], dtype=tl.float32).to(
                rows_ptr.dtype.element_ty), mask=h_ok & skipped)
    tl.store(y_ptr + t * stride_ym + offs, acc.to(y_ptr.dtype.element_ty), mask=h_ok)


@functools.lru_cache(maxsize=None)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


FUSED_ROUTE_MAX = 128


class Route(NamedTuple):
    """Where the GEMMs find their rows: an alignment (``sorted_ids``...) or ``top_k_index`` itself."""

    top_k_index: torch.Tensor
    num_experts: int
    block_m: int
    num_m_blocks: int
    sorted_ids: torch.Tensor | None = None
    expert_ids: torch.Tensor | None = None
    ntpp: torch.Tensor | None = None

    @property
    def fused(self) -> bool:
        return self.sorted_ids is None


def make_route(top_k_index: torch.Tensor, num_experts: int, block_m: int, *,
               fused_max: int = FUSED_ROUTE_MAX) -> Route:
    """Decode sizes (``T*k <= fused_max``) compute the alignment inside the GEMMs (no extra launch);
    larger ones run ``moe_align_block_size``. ``top_k_index`` must be contiguous."""
    numel = top_k_index.numel()
    if numel <= fused_max:
        num_m_blocks = _cdiv(padded_length(numel, num_experts, block_m), block_m)
        return Route(top_k_index, num_experts, block_m, num_m_blocks)
    sorted_ids, expert_ids, ntpp = moe_align_block_size_fwd(top_k_index, num_experts, block_m)
    return Route(top_k_index, num_experts, block_m, expert_ids.numel(), sorted_ids, expert_ids, ntpp)


def _route_args(route: Route):
    idx = route.top_k_index
    if route.fused:
        return (idx, idx, idx, idx), dict(FUSED_ROUTE=True, ROUTE_N=max(16, next_power_of_2(idx.numel())),
                                          ROUTE_E=max(16, next_power_of_2(route.num_experts)))
    return (route.sorted_ids, route.expert_ids, route.ntpp, idx), dict(FUSED_ROUTE=False, ROUTE_N=16, ROUTE_E=16)


def launch_gate_up(x, gate_up_proj, h, route: Route, *, cfg: dict[str, int]) -> None:
    """Launch the gate/up GEMM (caller holds the device guard)."""
    ptrs, route_consts = _route_args(route)
    inter, hidden = gate_up_proj.shape[1] // 2, gate_up_proj.shape[2]
    top_k = route.top_k_index.shape[1]
    grid = (route.num_m_blocks * _cdiv(inter, cfg["BLOCK_N"]),)
    moe_experts_gate_up_fwd_kernel[grid](
        x, gate_up_proj, h, *ptrs,
        h.shape[0], top_k, inter, hidden, route.num_m_blocks, route.num_experts,
        x.stride(0), x.stride(1), gate_up_proj.stride(0), gate_up_proj.stride(1), gate_up_proj.stride(2),
        h.stride(0),
        BLOCK_M=route.block_m, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        EVEN_K=hidden % cfg["BLOCK_K"] == 0, PRECISION=_precision(x.dtype), **route_consts,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def launch_down(h, down_proj, rows, top_k_weights, route: Route, *, cfg: dict[str, int], mul_weight: bool) -> None:
    """Launch the down GEMM, routing weight applied in the epilogue when ``mul_weight`` (caller guards)."""
    ptrs, route_consts = _route_args(route)
    hidden, inter = down_proj.shape[1], down_proj.shape[2]
    grid = (route.num_m_blocks * _cdiv(hidden, cfg["BLOCK_N"]),)
    moe_experts_down_fwd_kernel[grid](
        h, down_proj, rows, top_k_weights, *ptrs,
        rows.shape[0], hidden, inter, route.num_m_blocks, route.num_experts,
        h.stride(0), down_proj.stride(0), down_proj.stride(1), down_proj.stride(2), rows.stride(0),
        BLOCK_M=route.block_m, BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        EVEN_K=inter % cfg["BLOCK_K"] == 0, MUL_WEIGHT=mul_weight, PRECISION=_precision(h.dtype),
        **route_consts, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def launch_sum(rows, top_k_index, top_k_weights, y, *, num_experts: int, apply_weight: bool) -> None:
    """Launch the reduction over the k slots of each token (caller holds the device guard)."""
    num_tokens, top_k = top_k_index.shape
    hidden = y.shape[1]
    block_h = min(1024, next_power_of_2(hidden))
    moe_experts_sum_fwd_kernel[(num_tokens, _cdiv(hidden, block_h))](
        rows, top_k_index, top_k_weights, y, hidden, num_experts, y.stride(0),
        TOP_K=top_k, BLOCK_H=block_h, APPLY_WEIGHT=apply_weight, ZERO_SKIPPED=apply_weight, num_warps=4,
    )


def moe_experts_fwd(
    x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor, down_proj: torch.Tensor, *,
    config: dict[str, Any], y: torch.Tensor, h: torch.Tensor, rows: torch.Tensor, return_expert_outputs: bool,
    fused_max: int = FUSED_ROUTE_MAX,
) -> None:
    """Launch routing, both GEMMs and the slot reduction into the given buffers (no checks).

    ``top_k_index`` / ``top_k_weights`` must be contiguous; ``y [T, H]``, ``h [T*k, I]`` and
    ``rows [T*k, H]`` (x's dtype, contiguous rows) are written; with ``return_expert_outputs`` the rows
    hold unweighted expert outputs (zeros for skipped slots), else weighted ones. ``fused_max`` selects
    the in-GEMM routing up to that many pairs (tests force either path).
    """
    num_experts = gate_up_proj.shape[0]
    with device_of(x):
        route = make_route(top_k_index, num_experts, config["BLOCK_M"], fused_max=fused_max)
        launch_gate_up(x, gate_up_proj, h, route, cfg=config["gate_up"])
        launch_down(h, down_proj, rows, top_k_weights, route, cfg=config["down"], mul_weight=not return_expert_outputs)
        launch_sum(rows, top_k_index, top_k_weights, y, num_experts=num_experts, apply_weight=return_expert_outputs)


def _check(x, top_k_index, top_k_weights, gate_up_proj, down_proj) -> None:
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got shape {tuple(x.shape)}")
    if gate_up_proj.dim() != 3 or gate_up_proj.shape[1] % 2:
        raise ValueError(f"gate_up_proj must be [E, 2I, H], got shape {tuple(gate_up_proj.shape)}")
    num_experts, two_inter, hidden = gate_up_proj.shape
    if x.shape[1] != hidden:
        raise ValueError(f"x has hidden size {x.shape[1]} but gate_up_proj expects {hidden}")
    if tuple(down_proj.shape) != (num_experts, hidden, two_inter // 2):
        raise ValueError(f"down_proj must be [E, H, I] = {(num_experts, hidden, two_inter // 2)}, "
                         f"got {tuple(down_proj.shape)}")
    if top_k_index.dim() != 2 or top_k_index.shape[0] != x.shape[0]:
        raise ValueError(f"top_k_index must be [T, k] with T = {x.shape[0]}, got {tuple(top_k_index.shape)}")
    if top_k_index.dtype.is_floating_point or top_k_index.dtype == torch.bool:
        raise ValueError(f"top_k_index must hold integers, got {top_k_index.dtype}")
    if tuple(top_k_weights.shape) != tuple(top_k_index.shape):
        raise ValueError(f"top_k_weights must match top_k_index's shape {tuple(top_k_index.shape)}, "
                         f"got {tuple(top_k_weights.shape)}")
    for name, t in (("gate_up_proj", gate_up_proj), ("down_proj", down_proj)):
        if t.dtype != x.dtype:
            raise ValueError(f"{name} dtype {t.dtype} must match x dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    for name, t in (("top_k_index", top_k_index), ("top_k_weights", top_k_weights)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def moe_experts(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    *,
    return_expert_outputs: bool = False,
):
    """Gemma 4 expert mixture (HF ``Gemma4TextExperts.forward``) with Triton grouped GEMMs.

    For token ``t`` and slot ``j`` with expert ``e = top_k_index[t, j]`` and weight
    ``w = top_k_weights[t, j]``: ``h = gelu_tanh(x_t @ gate_e.T) * (x_t @ up_e.T)``,
    ``y_t += w * (h @ down_e.T)``, where ``gate_e = gate_up_proj[e, :I]``, ``up_e = gate_up_proj[e, I:]``.

    Args:
        x: ``[T, H]`` hidden states, bfloat16, float16 or float32 (any strides). ``T`` may be 0.
        top_k_index: ``[T, k]`` integer expert ids (int64 from ``torch.topk``, or int32). Ids outside
            ``[0, E)`` (HF's "no expert" sentinel ``E``, negatives, anything larger) are never read
            out of bounds and contribute nothing (their ``expert_outputs`` rows are zeros).
        top_k_weights: ``[T, k]`` routing weights, float32 or x's dtype; applied in fp32.
        gate_up_proj: ``[E, 2I, H]``, x's dtype, HF's layout (gate rows ``[:I]``, then up rows), used in
            place (any strides; contiguous rows are fastest).
        down_proj: ``[E, H, I]``, x's dtype, used in place.
        return_expert_outputs: also return ``expert_outputs [T, k, H]`` (x's dtype): each chosen expert's
            output before its routing weight. Costs no extra pass (it is the buffer the reduction reads).

    Returns:
        ``y [T, H]`` in x's dtype, or ``(y, expert_outputs)``.

    Numerics: products accumulate in fp32 (exact fp32 dots for fp32 inputs, no tf32); ``h`` and the
    per-slot rows are rounded once to x's dtype; the sum over slots runs in fp32.

    Falls back to ``moe_experts_naive`` (logged once) when autograd needs gradients (inputs require
    grad with grad mode on), when Triton cannot launch on x's device, or for float64. Launch tiles come
    from ``configs.get_config`` (pinned by ``GEMMA4_FAST_MOE_CONFIG``). Raises ValueError on
    inconsistent shapes, dtypes or devices, naming the argument.
    """
    _check(x, top_k_index, top_k_weights, gate_up_proj, down_proj)
    kwargs = {"return_expert_outputs": return_expert_outputs}
    if needs_grad(x, top_k_weights, gate_up_proj, down_proj):
        log_once("moe-grad", "moe_experts: gradients requested; using the PyTorch reference (no Triton backward)")
        return moe_experts_naive(x, top_k_index, top_k_weights, gate_up_proj, down_proj, **kwargs)
    if x.dtype not in _SUPPORTED:
        log_once(f"moe-dtype-{x.dtype}", "moe_experts: dtype %s has no Triton path; using the PyTorch reference", x.dtype)
        return moe_experts_naive(x, top_k_index, top_k_weights, gate_up_proj, down_proj, **kwargs)
    if not can_launch(x):
        log_once(f"moe-device-{x.device}", "moe_experts: Triton cannot launch on %s; using the PyTorch reference",
                 x.device)
        return moe_experts_naive(x, top_k_index, top_k_weights, gate_up_proj, down_proj, **kwargs)
    num_tokens, top_k = top_k_index.shape
    num_experts, two_inter, hidden = gate_up_proj.shape
    y = torch.empty(num_tokens, hidden, dtype=x.dtype, device=x.device)
    rows = torch.empty(num_tokens * top_k, hidden, dtype=x.dtype, device=x.device)
    if num_tokens > 0 and top_k > 0:
        h = torch.empty(num_tokens * top_k, two_inter // 2, dtype=x.dtype, device=x.device)
        device_name = _device_name(x.device.index if x.device.index is not None else torch.cuda.current_device()) \
            if x.is_cuda else None
        config = get_config(num_tokens, top_k, num_experts, two_inter // 2, hidden, device_name,
                            element_size=x.element_size())
        moe_experts_fwd(x, top_k_index.contiguous(), top_k_weights.contiguous(), gate_up_proj, down_proj,
                        config=config, y=y, h=h, rows=rows, return_expert_outputs=return_expert_outputs)
    else:
        y.zero_()
        rows.zero_()
    if return_expert_outputs:
        return y, rows.view(num_tokens, top_k, hidden)
    return y
