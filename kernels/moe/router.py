"""Gemma 4 router (HF ``Gemma4TextRouter.forward``): the input rows in one Triton pass, the rest as PyTorch ops.

HF's router runs seven elementwise passes over ``[T, H]`` before its ``[T, H] x [H, E]`` product (the fp32 upcast,
square, mean, scale, cast back, ``* scale``, ``* H ** -0.5``): on the 26B-A4B shape at 4k tokens about 0.15 ms per
layer, more than the product itself. ``router_norm`` computes those rows in one read and one write, with HF's
three roundings to the input dtype (after the norm, after ``* scale``, after ``* H ** -0.5``). The product, the
fp32 softmax, the top-k and the renormalisation stay HF's own ops, so the choice of experts follows HF's rules
(``torch.topk`` on the same probabilities). The only difference from HF's arithmetic is the order of the
mean-square sum (a Triton row reduction instead of torch's): the norm's rows can differ from HF's by one rounding
step in rare elements, which can move a token's k-th expert only where two probabilities nearly tie, as any
reordering of a bf16 model's arithmetic can. ``moe_router_naive`` is HF's routing op for op.

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
    """Route tokens to experts as HF's ``Gemma4TextRouter`` does, the input rows from ``router_norm``.

    ``h = router_norm(x, scale, eps)`` (HF's ``norm(x) * scale * H**-0.5``), ``probs = softmax(h @ proj_weight.T)``
    in fp32, top-k, renormalised to sum 1, times ``per_expert_scale[top_k_index]``: HF's ops after the norm.

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
    probs = F.softmax(F.linear(router_norm(x, scale, eps), proj_weight), dim=-1, dtype=torch.float32)
    top_k_weights, top_k_index = torch.topk(probs, k=top_k, dim=-1)
    top_k_weights = top_k_weights / top_k_weights.sum(dim=-1, keepdim=True)
    return probs, top_k_weights * per_expert_scale[top_k_index], top_k_index
