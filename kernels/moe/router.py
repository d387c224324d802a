"""Gemma 4 router (HF ``Gemma4TextRouter.forward``): the input rows in one Triton pass, the rest as PyTorch ops.

HF's router runs seven elementwise passes over ``[T, H]`` before its ``[T, H] x [H, E]`` product (the fp32 upcast,
square, mean, scale, cast back, ``* scale``, ``* H ** -0.5``): on the 26B-A4B shape at 4k tokens about 0.15 ms per
layer, more than the product itself; after it, ``torch.topk`` over 128 probabilities takes ~85 us per layer and the
softmax, sum, divide, gather and multiply five more launches. ``router_norm`` computes the input rows in one read
and one write, with HF's three roundings to the input dtype (after the norm, after ``* scale``, after
``* H ** -0.5``); the product stays cuBLAS's; ``router_topk`` does the fp32 softmax, the top-k (descending, ties to
the lowest expert id), the renormalisation and ``per_expert_scale`` in one pass. The differences from HF's
arithmetic are the orders of three sums (the mean square, the softmax's denominator, the top-k renormalisation):
the norm's rows can differ from HF's by one rounding step in rare elements and the probabilities by fp32 rounding,
which can move a token's k-th expert only where two probabilities nearly tie, as any reordering of a bf16 model's
arithmetic can. ``moe_router_naive`` is HF's routing op for op.

Configs: ``router_norm_configs`` names the candidates, ``default_config`` picks one from the width, and the env
var ``GEMMA4_FAST_ROUTER_NORM_CONFIG`` pins one (JSON, e.g. '{"BLOCK_M": 2, "num_warps": 4}').
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .._common import can_launch, device_of, log_once, needs_grad, next_power_of_2, pinned_config
from .naive import moe_router_naive, router_norm_naive

CONFIG_ENV = "GEMMA4_FAST_ROUTER_NORM_CONFIG"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Widest row the single-pass kernel takes (the whole row sits in registers).
MAX_WIDTH = 16384


@triton.jit
def router_norm_fwd_kernel(X, S, Y, n_rows, D, stride_x, root, eps,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``Y = round(round(round(x * (mean(x**2) + eps) ** -0.5) * S) * root)`` per row, fp32 math, each round to
    Y's dtype (X's). X: ``[n_rows, D]`` rows at ``stride_x`` (unit column stride); S: ``[D]``; Y contiguous.
    Grid: ``(cdiv(n_rows, BLOCK_M),)``; ``BLOCK_N >= D``."""
    pid = tl.program_id(0)
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < D
    mask = (rows < n_rows)[:, None] & cmask[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    ms = tl.div_rn(tl.sum(x * x, axis=1), D.to(tl.float32))
    inv = tl.div_rn(tl.full(ms.shape, 1.0, tl.float32), tl.sqrt_rn(ms + eps))
    s = tl.load(S + cols, mask=cmask, other=0.0).to(tl.float32)
    ty = Y.dtype.element_ty
    h = (x * inv[:, None]).to(ty).to(tl.float32)
    h = (h * s[None, :]).to(ty).to(tl.float32)
    tl.store(Y + rows[:, None] * D + cols[None, :], (h * root).to(ty), mask=mask)


@triton.jit
def router_topk_fwd_kernel(L, PES, P, W, I, n_rows, E,
                           K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """Per row of the router logits ``L [n_rows, E]``: ``P = softmax(L)`` (fp32), the ``K`` largest probabilities
    in descending order (ties: the lowest expert id), renormalised to sum 1 and times ``PES[index]``, into
    ``W [n_rows, K]`` fp32 and ``I [n_rows, K]`` int64. All contiguous. Grid ``(cdiv(n_rows, BLOCK_M),)``."""
    pid = tl.program_id(0)
    rows = (pid * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    rmask = rows < n_rows
    mask = rmask[:, None] & (cols < E)[None, :]
    logits = tl.load(L + rows[:, None] * E + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    logits = tl.where((cols < E)[None, :], logits, float("-inf"))  # rows past n_rows stay finite: no NaN lanes
    e = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    p = e / tl.sum(e, axis=1)[:, None]
    tl.store(P + rows[:, None] * E + cols[None, :], p, mask=mask)
    q = tl.where(mask, p, -1.0)
    slots = tl.arange(0, K_PAD)
    vals = tl.zeros([BLOCK_M, K_PAD], dtype=tl.float32)
    idxs = tl.zeros([BLOCK_M, K_PAD], dtype=tl.int32)
    for j in tl.static_range(K):
        v = tl.max(q, axis=1)
        i = tl.min(tl.where(q == v[:, None], cols[None, :], BLOCK_E), axis=1)
        vals = tl.where(slots[None, :] == j, v[:, None], vals)
        idxs = tl.where(slots[None, :] == j, i[:, None], idxs)
        q = tl.where(cols[None, :] == i[:, None], -2.0, q)
    kmask = rmask[:, None] & (slots < K)[None, :]
    w = vals / tl.sum(vals, axis=1)[:, None]
    w = w * tl.load(PES + idxs, mask=kmask, other=0.0).to(tl.float32)
    tl.store(W + rows[:, None] * K + slots[None, :], w, mask=kmask)
    tl.store(I + rows[:, None] * K + slots[None, :], idxs.to(tl.int64), mask=kmask)


def router_norm_configs(width: int) -> list[dict[str, int]]:
    """Candidate configs for rows of ``width``: BLOCK_M rows per program (tiles of 2048-16384 elements) and
    num_warps, 8-64 elements per thread."""
    bn = next_power_of_2(max(width, 16))
    out = []
    for tile in (2048, 4096, 8192, 16384):
        bm = max(1, tile // bn)
        for nw in (4, 8, 16):
            if 8 <= bm * bn // (32 * nw) <= 64:
                out.append({"BLOCK_M": bm, "num_warps": nw})
    uniq = {tuple(sorted(c.items())): c for c in out}
    return list(uniq.values())


def default_config(width: int) -> dict[str, int]:
    """One row per program up to 4096 columns (two at narrower widths so a tile holds >= 4096 elements), 8 warps
    for 2048+ columns: a memory-bound pass that only needs enough bytes in flight."""
    bn = next_power_of_2(max(width, 16))
    return {"BLOCK_M": max(1, 4096 // bn), "num_warps": 8 if bn >= 2048 else 4}


def pick_config(width: int) -> dict[str, int]:
    """The pinned config (env, merged over the default), else ``default_config``."""
    cfg = default_config(width)
    pinned = pinned_config(CONFIG_ENV)
    if pinned:
        cfg = {**cfg, **pinned}
        if cfg["BLOCK_M"] < 1 or cfg["BLOCK_M"] & (cfg["BLOCK_M"] - 1):
            raise ValueError(f"{CONFIG_ENV}: BLOCK_M must be a power of two, got {cfg['BLOCK_M']}")
    return cfg


def router_norm_fwd(x: torch.Tensor, scale: torch.Tensor, eps: float, y: torch.Tensor, cfg: dict[str, int]) -> None:
    """Launch ``router_norm_fwd_kernel``: ``x [T, H]`` (unit column stride) into contiguous ``y``. No validation."""
    n_rows, D = x.shape
    with device_of(x):
        router_norm_fwd_kernel[(triton.cdiv(n_rows, cfg["BLOCK_M"]),)](
            x, scale, y, n_rows, D, x.stride(0), float(D ** -0.5), float(eps),
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=next_power_of_2(max(D, 16)), num_warps=cfg["num_warps"])


#: Most experts the top-k kernel takes in one row (all of a row's logits sit in registers).
MAX_EXPERTS = 1024


def router_topk(logits: torch.Tensor, per_expert_scale: torch.Tensor, top_k: int):
    """HF's routing after the projection, in one pass: ``probs = softmax(logits)`` in fp32, the ``top_k`` largest,
    renormalised to sum 1, times ``per_expert_scale[index]``.

    Args:
        logits: ``[T, E]`` the router projection's output (any float dtype), contiguous rows.
        per_expert_scale: ``[E]`` (``router.per_expert_scale``), a dtype whose product with fp32 is fp32.
        top_k: ``1 <= top_k <= E``.

    Returns:
        ``(probs [T, E] fp32, top_k_weights [T, k] fp32, top_k_index [T, k] int64)``, the choices in descending
        probability. Differs from HF's ops only in the order of the softmax's and the renormalisation's sums (fp32
        rounding) and in ties, which take the lowest expert id (``torch.topk`` leaves that order unspecified).
    """
    T, E = logits.shape
    probs = torch.empty((T, E), dtype=torch.float32, device=logits.device)
    weights = torch.empty((T, top_k), dtype=torch.float32, device=logits.device)
    index = torch.empty((T, top_k), dtype=torch.int64, device=logits.device)
    if T:
        block_e = next_power_of_2(max(E, 16))
        block_m = max(1, min(16, 2048 // block_e))
        with device_of(logits):
            router_topk_fwd_kernel[(triton.cdiv(T, block_m),)](
                logits.contiguous(), per_expert_scale, probs, weights, index, T, E, K=top_k,
                K_PAD=next_power_of_2(top_k), BLOCK_M=block_m, BLOCK_E=block_e, num_warps=4)
    return probs, weights, index


def _kernel_unsupported(x: torch.Tensor, scale: torch.Tensor) -> str | None:
    """Why ``router_norm`` runs the naive op for these inputs (None when the kernel runs)."""
    if not can_launch(x):
        return f"x is on {x.device}, where Triton kernels cannot launch"
    if x.dtype not in SUPPORTED_DTYPES or scale.dtype != x.dtype:
        return f"x is {x.dtype} and scale {scale.dtype}; the kernel needs one of float16/bfloat16/float32 for both"
    if x.shape[-1] > MAX_WIDTH:
        return f"width {x.shape[-1]} exceeds the single-pass limit {MAX_WIDTH}"
    if needs_grad(x, scale):
        return "gradients requested"
    return None


def router_norm(x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """The router's input rows (HF's ``norm``, ``* scale``, ``* H ** -0.5``) in one pass.

    Args:
        x: ``[T, H]`` float16 / bfloat16 / float32 (the residual stream entering the MLP), CUDA or CPU under
            ``TRITON_INTERPRET=1``; unit column stride (else copied).
        scale: ``[H]`` (``router.scale``), x's dtype and device.
        eps: the norm's epsilon (``config.rms_norm_eps``).

    Returns:
        ``[T, H]`` contiguous, x's dtype: ``router_norm_naive(x, scale, eps)`` up to the order of the mean-square
        sum. Runs ``router_norm_naive`` (logged once) when the kernel cannot (other devices, mixed dtypes,
        autograd, rows wider than ``MAX_WIDTH``).

    Raises:
        ValueError naming the argument for a wrong shape.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got shape {tuple(x.shape)}")
    if scale.shape != (x.shape[1],):
        raise ValueError(f"scale must be [H] = [{x.shape[1]}], got {tuple(scale.shape)}")
    why = _kernel_unsupported(x, scale)
    if why is not None:
        log_once(f"router_norm:{why}", "router_norm: %s; using the naive op", why)
        return router_norm_naive(x, scale, eps)
    if x.shape[0] == 0:
        return router_norm_naive(x, scale, eps)
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    router_norm_fwd(x, scale, eps, y, pick_config(x.shape[1]))
    return y


def moe_router(
    x: torch.Tensor,
    proj_weight: torch.Tensor,
    scale: torch.Tensor,
    per_expert_scale: torch.Tensor,
    *,
    top_k: int,
    eps: float = 1e-6,
):
    """Route tokens to experts as HF's ``Gemma4TextRouter`` does: ``router_norm``, the projection, ``router_topk``.

    ``h = router_norm(x, scale, eps)`` (HF's ``norm(x) * scale * H**-0.5``), ``probs = softmax(h @ proj_weight.T)``
    in fp32, top-k, renormalised to sum 1, times ``per_expert_scale[top_k_index]`` (``router_topk``; HF's ops when
    the kernel cannot launch or E > ``MAX_EXPERTS``).

    Args:
        x: ``[T, H]`` hidden states (the residual stream entering the MLP), bf16/fp16/fp32.
        proj_weight: ``[E, H]`` router projection (``router.proj.weight``), x's dtype.
        scale: ``[H]`` (``router.scale``).
        per_expert_scale: ``[E]`` (``router.per_expert_scale``).
        top_k: experts per token, ``1 <= top_k <= E``.
        eps: RMSNorm epsilon (``config.rms_norm_eps``).

    Returns:
        ``(probs [T, E] float32, top_k_weights [T, k], top_k_index [T, k] int64)``. ``top_k_weights`` is
        float32 for bf16/fp16/fp32 parameters (fp32 probabilities times ``per_expert_scale`` promote
        to fp32), as HF produces. Under autograd the whole router is ``moe_router_naive``.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got shape {tuple(x.shape)}")
    if proj_weight.dim() != 2 or proj_weight.shape[1] != x.shape[1]:
        raise ValueError(f"proj_weight must be [E, H] with H = {x.shape[1]}, got {tuple(proj_weight.shape)}")
    if scale.shape != (x.shape[1],):
        raise ValueError(f"scale must be [H] = [{x.shape[1]}], got {tuple(scale.shape)}")
    if per_expert_scale.shape != (proj_weight.shape[0],):
        raise ValueError(f"per_expert_scale must be [E] = [{proj_weight.shape[0]}], got "
                         f"{tuple(per_expert_scale.shape)}")
    if not 1 <= top_k <= proj_weight.shape[0]:
        raise ValueError(f"top_k must be in [1, {proj_weight.shape[0]}], got {top_k}")
    if needs_grad(x, proj_weight, scale, per_expert_scale):
        return moe_router_naive(x, proj_weight, scale, per_expert_scale, top_k=top_k, eps=eps)
    logits = F.linear(router_norm(x, scale, eps), proj_weight)
    if (can_launch(logits) and proj_weight.shape[0] <= MAX_EXPERTS and per_expert_scale.is_floating_point()
            and per_expert_scale.dtype != torch.float64 and per_expert_scale.device == logits.device):
        return router_topk(logits, per_expert_scale, top_k)
    probs = F.softmax(logits, dim=-1, dtype=torch.float32)
    top_k_weights, top_k_index = torch.topk(probs, k=top_k, dim=-1)
    top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
    return probs, top_k_weights * per_expert_scale[top_k_index], top_k_index
