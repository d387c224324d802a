"""Triton final logit softcap ``cap * tanh(x / cap)`` in one pass, in place or into another buffer.

Semantics are those of ``naive.py`` (HF ``Gemma4ForCausalLM.forward``'s three lines ``logits / cap``,
``tanh``, ``* cap``), computed in fp32 on the upcast input and rounded once to x's dtype. HF reads and writes
the logits three times and holds two logits-sized tensors at its peak; ``logit_softcap(x, cap, out=x)``
reads and writes them once and allocates nothing.

tanh in fp32 without overflow or cancellation: for ``|y| >= 0.375`` it is ``(1 - t) / (1 + t)`` with
``t = exp(-2|y|)`` (t in (0, 0.48], so it never overflows and ``1 - t`` loses at most about one bit; ``|y|``
of 1e4 or inf gives exactly 1), with y's sign; for ``|y| < 0.375`` the odd Taylor series of tanh through
``y**11`` (truncation error below 3e-8 relative), which keeps tiny logits accurate (and ``-0.0`` as ``-0.0``).

Scope and limits:
  * Elementwise on any shape; float16 / bfloat16 / float32. The kernel sees x (and out) as one flat array:
    both must be contiguous. Offsets are int64, so tensors of 2**31 elements and more (8192 x 262144 logits)
    are addressed correctly.
  * ``logit_softcap`` runs the reference ``logit_softcap_naive`` (logged once, with the reason) when autograd
    needs a gradient of x, when x or out is not contiguous, for other float dtypes (e.g. float64) and when x's
    device cannot launch Triton kernels (a CPU tensor without ``TRITON_INTERPRET=1``, or another device).

Configs: ``logit_softcap_configs`` names the candidates, ``default_config`` picks one from the element count,
and the env var ``GEMMA4_FAST_SOFTCAP_CONFIG`` pins one (JSON, e.g. '{"BLOCK": 4096, "num_warps": 4}').
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import triton
import triton.language as tl

from .._common import can_launch, device_of, interpret_mode, log_once, needs_grad, next_power_of_2, pinned_config
from .naive import logit_softcap_naive


CONFIG_ENV = "GEMMA4_FAST_SOFTCAP_CONFIG"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# --------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------

@triton.jit
def _tanh_f32(y):
    """tanh of an fp32 tile: series near zero, ``(1 - exp(-2|y|)) / (1 + exp(-2|y|))`` with y's sign elsewhere."""
    a = tl.abs(y)
    t = tl.exp(-2.0 * a)
    far = (1.0 - t) / (1.0 + t)
    far = tl.where(y < 0, -far, far)
    ys = tl.minimum(tl.maximum(y, -0.375), 0.375)  # y itself where the series is used; keeps inf out of it
    y2 = ys * ys
    poly = -0.008863235529902197 * y2 + 0.021869488536155203    # -1382/155925, 62/2835
    poly = poly * y2 - 0.05396825396825397                      # -17/315
    poly = poly * y2 + 0.13333333333333333                      # 2/15
    poly = poly * y2 - 0.3333333333333333                       # -1/3
    near = tl.where(a > 0, ys + ys * (y2 * poly), y)
    return tl.where(a < 0.375, near, far)


@triton.jit
def logit_softcap_fwd_kernel(X, Y, N, cap, BLOCK: tl.constexpr):
    """``Y[i] = cap * tanh(X[i] / cap)`` for ``i < N``, fp32 math, stored in Y's dtype.

    X and Y: contiguous, ``N`` elements (Y may be X: each element is read before it is written, by the same
    program). Grid: ``(cdiv(N, BLOCK),)``; program ``p`` covers ``[p * BLOCK, (p + 1) * BLOCK)`` with int64
    offsets.
    """
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    y = cap * _tanh_f32(x / cap)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------

def logit_softcap_configs() -> list[dict[str, int]]:
    """Candidate configs (what a tuning sweep tries): BLOCK of 1024 to 16384 elements per program and
    num_warps 4 / 8 / 16, keeping 8 to 64 elements per thread (one to eight 16-byte bf16 vectors)."""
    out = []
    for block in (1024, 2048, 4096, 8192, 16384):
        for nw in (4, 8, 16):
            if 8 <= block // (32 * nw) <= 64:
                out.append({"BLOCK": block, "num_warps": nw})
    return out


def default_config(numel: int) -> dict[str, int]:
    """Heuristic config (not tuned on a GPU yet): 8192 elements and 8 warps per program (32 elements, four
    16-byte bf16 vectors, per thread) from 4 Mi elements up; below that 2048-element programs (or the element
    count's power of two, at least 128), so a decode step's few rows still spread over the multiprocessors."""
    if numel >= 1 << 22:
        return {"BLOCK": 8192, "num_warps": 8}
    block = max(128, min(2048, next_power_of_2(numel)))
    return {"BLOCK": block, "num_warps": max(1, min(4, block // 512))}


def pick_config(numel: int) -> dict[str, int]:
    """The pinned config (env, merged over the default), else ``default_config``."""
    cfg = default_config(numel)
    pinned = pinned_config(CONFIG_ENV)
    if pinned:
        cfg = {**cfg, **pinned}
        if cfg["BLOCK"] < 1 or cfg["BLOCK"] & (cfg["BLOCK"] - 1):
            raise ValueError(f"{CONFIG_ENV}: BLOCK must be a power of two, got {cfg['BLOCK']}")
    return cfg


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------

def logit_softcap_fwd(x: torch.Tensor, out: torch.Tensor, cap: float, cfg: dict[str, int]) -> None:
    """Launch ``logit_softcap_fwd_kernel`` on contiguous ``x`` into contiguous ``out`` (same numel; may be x)
    with ``cfg`` (BLOCK, num_warps). No validation; non-empty inputs."""
    n = x.numel()
    grid = (triton.cdiv(n, cfg["BLOCK"]),)
    with device_of(x):
        logit_softcap_fwd_kernel[grid](x, out, n, float(cap), BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"])


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def _span(t: torch.Tensor) -> tuple[int, int]:
    """First and one-past-last byte address ``t`` can touch (non-empty ``t``)."""
    lo = hi = t.data_ptr()
    for size, stride in zip(t.shape, t.stride()):
        reach = (size - 1) * stride * t.element_size()
        lo, hi = (lo + reach, hi) if reach < 0 else (lo, hi + reach)
    return lo, hi + t.element_size()


def _check(x: Any, cap: Any, out: Any) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x has dtype {x.dtype}; the softcap needs a floating-point tensor")
    if isinstance(cap, bool) or not isinstance(cap, (int, float)):
        raise TypeError(f"cap must be a Python int or float, got {type(cap).__name__}")
    if not (math.isfinite(cap) and cap > 0):
        raise ValueError(f"cap must be a finite number > 0, got {cap!r}")
    if out is None:
        return
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"out must match x's shape, dtype and device: out is {tuple(out.shape)} {out.dtype} on "
                         f"{out.device}, x is {tuple(x.shape)} {x.dtype} on {x.device}")
    if out is x or x.numel() == 0:
        return
    same = out.data_ptr() == x.data_ptr() and out.stride() == x.stride()
    if not same:
        (xl, xh), (ol, oh) = _span(x), _span(out)
        if out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() and xl < oh and ol < xh:
            raise ValueError("out overlaps x without being the same view of it; pass out=x for in place or a "
                             "separate buffer")


def _fallback_reason(x: torch.Tensor, out: Optional[torch.Tensor]) -> Optional[str]:
    if x.dtype not in SUPPORTED_DTYPES:
        return f"dtype {str(x.dtype).replace('torch.', '')} is not float16/bfloat16/float32"
    if not can_launch(x):
        if x.device.type == "cpu" and not interpret_mode():
            return "x is a CPU tensor and TRITON_INTERPRET=1 is not set"
        return f"x is on {x.device}, where Triton kernels cannot launch"
    if not x.is_contiguous():
        return "x is not contiguous"
    if out is not None and not out.is_contiguous():
        return "out is not contiguous"
    return None


def logit_softcap(x: torch.Tensor, cap: float, *, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Final logit softcap ``cap * tanh(x / cap)`` (HF Gemma 4's ``final_logit_softcapping``), one pass.

    Args:
        x: any shape (``[batch, seq, vocab]`` logits in the model), float16 / bfloat16 / float32 for the
            kernel; contiguous, on CUDA (or the CPU under ``TRITON_INTERPRET=1``). Tensors of 2**31 elements
            and more are supported (int64 offsets). Other float dtypes, devices and non-contiguous layouts run
            the reference (below); a non-float x raises TypeError.
        cap: the softcap, a Python int or float, finite and > 0 (30.0 for Gemma 4); else TypeError/ValueError.
        out: None (a new tensor is returned), ``x`` itself (in place: the main use, no allocation), or another
            tensor of x's shape, dtype and device that does not overlap x (ValueError for a partial overlap or
            a mismatch). The kernel needs it contiguous too.

    Returns:
        x's shape and dtype: ``out`` when given, else a new contiguous tensor. Computed in fp32 and rounded
        once to x's dtype (HF rounds three times in bfloat16/float16); large ``|x|`` (1e4, inf) gives
        exactly ``±cap``, NaN stays NaN.

    Falls back to ``logit_softcap_naive`` (HF's three ops in x's dtype; with ``out`` it writes chunk by chunk,
    so the in-place call still allocates only chunk-sized temporaries), logged once per reason, when:
    autograd needs a gradient (grad mode on and x or out requires grad; the result is then differentiable, and
    with ``out`` the copy into it is recorded by autograd, which refuses an in-place write into a leaf that
    requires grad), x's dtype is not float16/bfloat16/float32, x's device cannot launch Triton kernels, or x
    or out is not contiguous. Zero-element inputs return without a launch.
    """
    _check(x, cap, out)
    if needs_grad(x, out):
        log_once("grad-logit_softcap", "logit_softcap: gradients requested; using the autograd-capable naive op")
        return logit_softcap_naive(x, cap, out=out)
    why = _fallback_reason(x, out)
    if why is not None:
        log_once(f"fallback-logit_softcap:{why}", "logit_softcap: %s; using the naive op", why)
        return logit_softcap_naive(x, cap, out=out)
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.numel() == 0:
        return out
    logit_softcap_fwd(x, out, cap, pick_config(x.numel()))
    return out


__all__ = ["logit_softcap", "logit_softcap_fwd", "logit_softcap_fwd_kernel", "logit_softcap_configs",
           "default_config", "pick_config", "CONFIG_ENV"]
