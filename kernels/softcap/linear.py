"""The LM head with the final softcap: ``linear_softcap(x, weight, bias, cap) = cap * tanh((x @ weight^T + bias) /
cap)``, one kernel on Hopper (``lm_head_hopper.py``), else the LM head GEMM then the one-pass softcap in place.

Scope and limits:
  * On an sm_90 GPU with bf16 / fp16 operands, 16-byte aligned rows, at least ``MIN_ROWS`` rows, a hidden size of
    at most ``MAX_K`` and no bias, the Gluon kernel computes the GEMM and applies the softcap to its fp32
    accumulator before the only store: the raw logits are never written. ``tanh`` is the hardware approximation
    (relative error about 2**-11), rounded once to x's dtype.
  * Otherwise (fewer rows, a bias, a larger hidden size, another GPU, other dtypes or layouts, a Triton without
    Gluon) it runs ``torch.nn.functional.linear`` and then ``logit_softcap(..., out=logits)`` (the one-pass Triton
    softcap, or HF's three ops where Triton cannot launch), each reason logged once. Under autograd it runs
    ``linear_softcap_naive`` (HF's LM head and three ops), which is differentiable.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Optional

import torch

from .._common import log_once, needs_grad
from .naive import linear_softcap_naive
from .softcap import logit_softcap

#: Fewest rows sent to the fused kernel (512 rows measured 1.12x the unfused path on the H100, E2B's head, with
#: the one-tile kernel).
MIN_ROWS = 512
#: Largest hidden size sent to the fused kernel (measured up to 26B-A4B's 2816: the cooperative kernel ran at 1.16x
#: the unfused path there, 1.23-1.44x at E2B's 1536; larger hidden sizes are not measured).
MAX_K = 2816


def _check(x: Any, weight: Any, bias: Any, cap: Any) -> None:
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor")
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x [..., K] and weight [N, K] disagree: x is {tuple(x.shape)}, weight "
                         f"{tuple(weight.shape)}")
    if bias is not None and (not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"bias must be None or a tensor of shape ({weight.shape[0]},)")
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not (math.isfinite(cap) and cap > 0):
        raise ValueError(f"cap must be a finite number > 0, got {cap!r}")


def _hopper_reason(x2: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Optional[str]:
    """Why the fused kernel does not take this call (None when it does)."""
    if x2.shape[0] < MIN_ROWS:
        return f"gets fewer than {MIN_ROWS} rows"
    if bias is not None:
        return "takes no bias (with one it measured slower than cuBLAS's addmm)"
    if x2.shape[1] > MAX_K:
        return f"is not measured against cuBLAS above a hidden size of {MAX_K}"
    try:
        from . import lm_head_hopper
    except ImportError as exc:
        return f"needs Gluon, which this Triton lacks ({exc})"
    return lm_head_hopper.hopper_unsupported(x2, weight)


def linear_softcap(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], cap: float) -> torch.Tensor:
    """Logits of the LM head with the final softcap: ``cap * tanh((x @ weight^T + bias) / cap)``.

    Args:
        x: ``[..., K]`` hidden states (``[batch, seq, hidden]`` after the final norm), any float dtype; the fused
            kernel needs bf16 / fp16 on an sm_90 GPU, rows 16-byte aligned (it reshapes to ``[M, K]`` without a
            copy when it can, else copies once).
        weight: ``[N, K]`` in x's dtype and on x's device (N = vocabulary, K = hidden size); N a multiple of 8
            for the fused kernel (its output rows must be 16-byte aligned).
        bias: ``[N]`` or None; a bias sends the call to the unfused path (the model routing passes None for
            TransformerBridge's all-zero LM head bias).
        cap: ``final_logit_softcapping``, a finite number > 0 (30.0 in Gemma 4).

    Returns:
        ``[..., N]`` in x's dtype, a new contiguous tensor: computed in fp32 and rounded once on the fused path;
        the LM head's rounding then the softcap's on the fallback (see the module docstring).

    Raises TypeError / ValueError naming the argument for non-float tensors, shapes that disagree, a bias of
    the wrong shape, or a cap that is not a finite number > 0.
    """
    _check(x, weight, bias, cap)
    if needs_grad(x, weight, bias):
        log_once("grad-linear_softcap", "linear_softcap: gradients requested; using the autograd-capable naive op")
        return linear_softcap_naive(x, weight, bias, cap)
    x2 = x.reshape(-1, x.shape[-1])
    why = _hopper_reason(x2, weight, bias)
    if why is None:
        from .lm_head_hopper import linear_softcap_fwd, pick_config

        out = torch.empty(x2.shape[0], weight.shape[0], device=x.device, dtype=x.dtype)
        linear_softcap_fwd(x2, weight, out, float(cap), pick_config())
        return out.view(*x.shape[:-1], weight.shape[0])
    level = logging.INFO if why.startswith(("does not run", "needs")) and x.device.type == "cuda" else logging.DEBUG
    log_once(f"fallback-linear_softcap:{why}", "linear_softcap: the fused Hopper kernel %s; using the LM head GEMM "
             "and the one-pass softcap", why, level=level)
    logits = torch.nn.functional.linear(x, weight, bias)
    return logit_softcap(logits, cap, out=logits)


__all__ = ["linear_softcap", "MIN_ROWS"]
