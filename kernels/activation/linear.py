"""The Gemma 4 MLP's gate and up projections with the fused activation: ``linear_gelu_mul(x, w_gate, w_up) =
gelu_tanh(x @ w_gate^T) * (x @ w_up^T)``, one kernel on Hopper (``mlp_hopper.py``), else the two GEMMs and
``gelu_mul``.

Scope and limits:
  * On an sm_90 GPU with bf16 / fp16 operands, 16-byte aligned rows, at least ``MIN_ROWS`` rows and a hidden size up
    to ``MAX_K`` (E2B's; larger ones ran slower than cuBLAS or are not measured), the Gluon kernel
    accumulates both products of an output tile side by side and applies the activation to the accumulators: the
    ``gate`` and ``up`` outputs are never written. Rounding is the unfused path's (each product rounded to x's dtype,
    then ``gelu_tanh(g) * u`` in fp32, rounded once); only the GEMMs' summation order differs.
  * Otherwise (fewer rows, another GPU, other dtypes or layouts, a Triton without Gluon, ``OFF_ENV`` set to 0) it runs
    ``torch.nn.functional.linear`` twice and ``gelu_mul`` (the one-pass Triton activation, or HF's two ops where
    Triton cannot launch), each reason logged once. Under autograd it runs ``linear_gelu_mul_naive`` (HF's
    expression), which is differentiable.
  * No bias: Gemma 4's MLP projections have none.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

import torch

from .._common import can_launch, log_once, needs_grad
from .gelu_mul import gelu_mul
from .naive import gelu_mul_naive, linear_gelu_mul_naive

#: Fewest rows sent to the fused kernel (below it the GEMMs are weight-bandwidth bound and cuBLAS's small-M kernels
#: win; decode steps take the unfused path): the cooperative kernel ran 1.38-1.39x the unfused path at 1000 rows and
#: 0.97x at 512.
MIN_ROWS = 1000
#: ``GEMMA4_FAST_LINEAR_GELU_MUL=0`` sends every call to the unfused path (A/B runs; logged once).
OFF_ENV = "GEMMA4_FAST_LINEAR_GELU_MUL"
#: Largest hidden size sent to the fused kernel: measured 1.15-1.39x the unfused path at E2B's 1536, 0.92x at
#: 26B-A4B's 2816 (its 2112-wide dense MLP gives too few column tiles); between the two, not measured.
MAX_K = 1536


def _check(x: Any, w_gate: Any, w_up: Any) -> None:
    for name, t in (("x", x), ("w_gate", w_gate), ("w_up", w_up)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor")
    if w_gate.dim() != 2 or x.dim() < 1 or x.shape[-1] != w_gate.shape[1]:
        raise ValueError(f"x [..., K] and w_gate [N, K] disagree: x is {tuple(x.shape)}, w_gate "
                         f"{tuple(w_gate.shape)}")
    if tuple(w_up.shape) != tuple(w_gate.shape):
        raise ValueError(f"w_up must have w_gate's shape {tuple(w_gate.shape)}, got {tuple(w_up.shape)}")


def _hopper_reason(x2: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> Optional[str]:
    """Why the fused kernel does not take this call (None when it does)."""
    if os.environ.get(OFF_ENV, "").strip() == "0":
        return f"is turned off ({OFF_ENV}=0)"
    if x2.shape[0] < MIN_ROWS:
        return f"gets fewer than {MIN_ROWS} rows"
    if x2.shape[1] > MAX_K:
        return f"is not faster than cuBLAS above a hidden size of {MAX_K} (measured at 2816)"
    try:
        from . import mlp_hopper
    except ImportError as exc:
        return f"needs Gluon, which this Triton lacks ({exc})"
    return mlp_hopper.hopper_unsupported(x2, w_gate, w_up)


def linear_gelu_mul(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor) -> torch.Tensor:
    """The input of the Gemma 4 MLP's ``down_proj``: ``gelu_tanh(x @ w_gate^T) * (x @ w_up^T)``.

    Args:
        x: ``[..., K]`` the MLP input (``[batch, seq, hidden]``), any float dtype; the fused kernel needs bf16 / fp16
            on an sm_90 GPU, rows 16-byte aligned (it reshapes to ``[M, K]`` without a copy when it can, else copies
            once).
        w_gate: ``[N, K]`` ``gate_proj.weight`` in x's dtype and on x's device (N = intermediate size, K = hidden
            size); N a multiple of 8 for the fused kernel (its output rows must be 16-byte aligned).
        w_up: ``[N, K]`` ``up_proj.weight``, like ``w_gate``.

    Returns:
        ``[..., N]`` in x's dtype (the promoted dtype on the unfused path), a new contiguous tensor; see the module
        docstring for the rounding.

    Raises TypeError / ValueError naming the argument for non-float tensors or shapes that disagree.
    """
    _check(x, w_gate, w_up)
    if needs_grad(x, w_gate, w_up):
        log_once("grad-linear_gelu_mul", "linear_gelu_mul: gradients requested; using the autograd-capable naive op")
        return linear_gelu_mul_naive(x, w_gate, w_up)
    x2 = x.reshape(-1, x.shape[-1])
    why = _hopper_reason(x2, w_gate, w_up)
    if why is None:
        from .mlp_hopper import linear_gelu_mul_fwd, pick_config

        out = torch.empty(x2.shape[0], w_gate.shape[0], device=x.device, dtype=x.dtype)
        linear_gelu_mul_fwd(x2, w_gate, w_up, out, pick_config())
        return out.view(*x.shape[:-1], w_gate.shape[0])
    level = logging.INFO if why.startswith(("does not run", "needs")) and x.device.type == "cuda" else logging.DEBUG
    log_once(f"fallback-linear_gelu_mul:{why}", "linear_gelu_mul: the fused Hopper kernel %s; using two GEMMs and "
             "the fused activation", why, level=level)
    gate = torch.nn.functional.linear(x, w_gate)
    up = torch.nn.functional.linear(x, w_up)
    return gelu_mul(gate, up) if can_launch(gate) else gelu_mul_naive(gate, up)


__all__ = ["linear_gelu_mul", "MIN_ROWS", "MAX_K", "OFF_ENV"]
