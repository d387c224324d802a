"""Triton few-row linear: ``gemv_fwd_kernel`` / ``gemv_fwd`` / ``gemv``.

``y [M, N] = x [M, K] @ w [N, K]^T (+ b)`` for M <= ``MAX_ROWS``. Each program owns ``BLOCK_N`` output columns (rows
of w): it streams those rows of w once, ``BLOCK_K`` elements at a time, multiplies them by every row of x (x is
tiny and stays in L1/L2), keeps the elementwise products in an fp32 register tile ``[BLOCK_M, BLOCK_N, BLOCK_K]``
and reduces it once at the end; the bias is added in fp32 and the result rounded once to x's dtype. The kernel is
bound by reading w: ``N * K * itemsize`` bytes, which at these sizes is what a step costs.

Scope and limits:
  * float16 / bfloat16 / float32; x ``[..., K]`` with at most ``MAX_ROWS`` rows once flattened, w ``[N, K]`` with
    unit stride along K, bias ``[N]`` contiguous or None. Other inputs (more rows, other layouts, devices without
    Triton) take ``torch.nn.functional.linear`` (logged once); under autograd too (the naive op is differentiable).
  * The summation order differs from cuBLAS's (fp32 accumulation both): results agree to fp32 rounding before the
    final rounding to x's dtype.

Configs: ``gemv_configs`` names the candidates, ``default_config`` picks from N and K, and the env var
``GEMMA4_FAST_GEMV_CONFIG`` pins one (JSON, e.g. '{"BLOCK_N": 8, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3}').
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import triton
import triton.language as tl

from .._common import can_launch, device_of, interpret_mode, log_once, needs_grad, next_power_of_2, pinned_config
from .naive import gemv_naive

CONFIG_ENV = "GEMMA4_FAST_GEMV_CONFIG"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Most rows the kernel takes (a decode batch or the last positions); more rows are a GEMM for cuBLAS.
MAX_ROWS = 4


@triton.jit
def _gemv_step(acc, x_ptr, w_ptr, k0, rows, cols, ks, M, N, K):
    kmask = (k0 + ks) < K
    w = tl.load(w_ptr + k0, mask=(cols[:, None] < N) & kmask[None, :], other=0.0).to(tl.float32)
    x = tl.load(x_ptr + k0, mask=(rows[:, None] < M) & kmask[None, :], other=0.0).to(tl.float32)
    return acc + x[:, None, :] * w[None, :, :]


@triton.jit
def gemv_fwd_kernel(X, W, B, Y, M, N, K, stride_xm, stride_wn, stride_ym, HAS_BIAS: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WHILE_LOOP: tl.constexpr):
    """One program: output columns ``[pid * BLOCK_N, +BLOCK_N)`` of all ``M`` rows. ``X`` ``[M, K]`` (row stride
    ``stride_xm``), ``W`` ``[N, K]`` (row stride ``stride_wn``), ``B`` ``[N]`` (read when ``HAS_BIAS``), ``Y``
    ``[M, N]`` (row stride ``stride_ym``); unit stride along K and N. ``WHILE_LOOP`` (set under
    ``TRITON_INTERPRET``, whose ``range`` cannot take a runtime bound) walks K with a while loop; compiled kernels
    use a pipelined ``for``."""
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    w_ptr = W + cols.to(tl.int64)[:, None] * stride_wn + ks[None, :]
    x_ptr = X + rows[:, None] * stride_xm + ks[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K], dtype=tl.float32)
    if WHILE_LOOP:
        k0 = 0
        while k0 < K:
            acc = _gemv_step(acc, x_ptr, w_ptr, k0, rows, cols, ks, M, N, K)
            k0 += BLOCK_K
    else:
        for k0 in range(0, K, BLOCK_K):
            acc = _gemv_step(acc, x_ptr, w_ptr, k0, rows, cols, ks, M, N, K)
    y = tl.sum(acc, axis=2)
    if HAS_BIAS:
        y += tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rows[:, None] * stride_ym + cols[None, :], y.to(Y.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


def gemv_configs() -> list[dict[str, int]]:
    """Candidate configs (what a tuning sweep tries): 4 to 32 columns per program, 128 to 512 elements of K per
    step, 4 or 8 warps, 2 to 4 pipeline stages, keeping the register tile ``BLOCK_N * BLOCK_K`` (per row of x) at
    1024 to 8192 elements and at least four of them per thread."""
    out = []
    for bn in (4, 8, 16, 32):
        for bk in (128, 256, 512):
            for nw in (4, 8):
                for stages in (2, 3, 4):
                    if 1024 <= bn * bk <= 8192 and bn * bk >= 32 * nw * 4:
                        out.append({"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": nw, "num_stages": stages})
    return out


def default_config(n: int, k: int) -> dict[str, int]:
    """Heuristic: 256-element K steps, 4 warps, and the widest ``BLOCK_N`` of 4 / 8 / 16 that still gives at least
    two programs per multiprocessor of an H100 (264), so the weight streams through every SM; 3 pipeline stages."""
    bn = 16
    while bn > 4 and triton.cdiv(n, bn) < 264:
        bn //= 2
    return {"BLOCK_N": bn, "BLOCK_K": min(256, max(16, next_power_of_2(k))), "num_warps": 4, "num_stages": 3}


def pick_config(n: int, k: int) -> dict[str, int]:
    """The pinned config (env, merged over the default), else ``default_config``."""
    cfg = default_config(n, k)
    pinned = pinned_config(CONFIG_ENV)
    if pinned:
        cfg = {**cfg, **pinned}
        for key in ("BLOCK_N", "BLOCK_K"):
            if cfg[key] < 1 or cfg[key] & (cfg[key] - 1):
                raise ValueError(f"{CONFIG_ENV}: {key} must be a power of two, got {cfg[key]}")
    return cfg


def gemv_fwd(x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], y: torch.Tensor,
             cfg: dict[str, int]) -> None:
    """Launch ``gemv_fwd_kernel``: ``y [M, N] = x [M, K] @ w [N, K]^T (+ b)``; no validation (unit stride along K
    and N, M <= MAX_ROWS)."""
    m, k = x.shape
    n = w.shape[0]
    grid = (triton.cdiv(n, cfg["BLOCK_N"]),)
    with device_of(x):
        gemv_fwd_kernel[grid](x, w, b if b is not None else w, y, m, n, k, x.stride(0), w.stride(0), y.stride(0),
                              HAS_BIAS=b is not None, BLOCK_M=max(1, next_power_of_2(m)), BLOCK_N=cfg["BLOCK_N"],
                              BLOCK_K=cfg["BLOCK_K"], WHILE_LOOP=interpret_mode(), num_warps=cfg["num_warps"],
                              num_stages=cfg.get("num_stages", 3))


def _check(x: Any, weight: Any, bias: Any) -> None:
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor")
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x [..., K] and weight [N, K] disagree: x is {tuple(x.shape)}, weight "
                         f"{tuple(weight.shape)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"bias must be None or a tensor of shape ({weight.shape[0]},)")


def _fallback_reason(x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Optional[str]:
    if x2.shape[0] > MAX_ROWS:
        return f"more than {MAX_ROWS} rows"
    if x2.dtype not in SUPPORTED_DTYPES or weight.dtype != x2.dtype or (bias is not None and bias.dtype != x2.dtype):
        return "needs x, weight and bias of one float16 / bfloat16 / float32 dtype"
    if weight.device != x2.device or (bias is not None and bias.device != x2.device):
        return "needs every tensor on x's device"
    if not can_launch(x2):
        if x2.device.type == "cpu" and not interpret_mode():
            return "x is a CPU tensor and TRITON_INTERPRET=1 is not set"
        return f"x is on {x2.device}, where Triton kernels cannot launch"
    if x2.stride(-1) != 1 or weight.stride(1) != 1 or (bias is not None and not bias.is_contiguous()):
        return "needs unit stride along K (and a contiguous bias)"
    return None


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Few-row linear ``x @ weight^T + bias`` (``torch.nn.functional.linear``) streaming the weight once.

    Args:
        x: ``[..., K]`` with at most ``MAX_ROWS`` rows once flattened (``[batch, 1, hidden]`` of a decode step or of
            a layer cut to the last position), float16 / bfloat16 / float32.
        weight: ``[N, K]`` (an ``nn.Linear`` weight) in x's dtype, on x's device, unit stride along K.
        bias: ``[N]`` in x's dtype, contiguous, or None.

    Returns:
        ``[..., N]`` in x's dtype, a new tensor: fp32 accumulation, the bias added in fp32, rounded once.

    Falls back to ``gemv_naive`` (``torch.nn.functional.linear``), logged once per reason, when autograd needs a
    gradient, x has more rows than ``MAX_ROWS``, dtypes or devices differ or are unsupported, the device cannot
    launch Triton kernels, or a stride along K is not 1. Raises TypeError / ValueError naming the argument for
    non-float tensors, shapes that disagree or a bias of the wrong shape. Zero-size inputs return without a launch.
    """
    _check(x, weight, bias)
    if needs_grad(x, weight, bias):
        log_once("grad-gemv", "gemv: gradients requested; using the autograd-capable naive op")
        return gemv_naive(x, weight, bias)
    x2 = x.reshape(-1, x.shape[-1])
    why = _fallback_reason(x2, weight, bias)
    if why is not None:
        log_once(f"fallback-gemv:{why}", "gemv: %s; using torch.nn.functional.linear", why)
        return gemv_naive(x, weight, bias)
    y = torch.empty(x2.shape[0], weight.shape[0], device=x.device, dtype=x.dtype)
    if y.numel() and x2.shape[1]:
        gemv_fwd(x2, weight, bias, y, pick_config(weight.shape[0], weight.shape[1]))
    elif y.numel():
        y.copy_(bias.expand_as(y) if bias is not None else torch.zeros_like(y))
    return y.view(*x.shape[:-1], weight.shape[0])


__all__ = ["gemv", "gemv_fwd", "gemv_fwd_kernel", "gemv_configs", "default_config", "pick_config", "CONFIG_ENV",
           "MAX_ROWS"]
