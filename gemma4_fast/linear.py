"""Few-row projections of the fast Gemma 4 modules on the GEMV kernel.

With ``logits_to_keep=1`` transformers cuts the KV-shared layers of E2B / E4B to the last position, and every decode
step runs each projection on one row per sequence: there ``nn.Linear`` is a weight-streaming matrix-vector product,
where cuBLAS's small-M kernels reached about 55 % of the H100's memory bandwidth on Gemma 4's shapes. ``project``
calls ``ops.gemv`` instead when the linear is a plain ``nn.Linear`` nobody observes; otherwise it calls the module,
so hooks on the projection (TransformerLens wraps them in components with hook points) see every call as before.
"""
from __future__ import annotations

import torch
from torch import nn

from . import ops
from .hooks import global_module_hooks

#: Most rows sent to the GEMV kernel (``gemma4_fast.kernels.gemv.MAX_ROWS``).
MAX_ROWS = 4


def unobserved_linear(linear: nn.Module) -> bool:
    """Whether ``linear`` is a plain ``nn.Linear`` whose call nobody observes or redirects: no module hooks of any
    kind, no instance-level ``forward`` (accelerate's device hooks install one), no global module hooks."""
    return (type(linear) is nn.Linear and "forward" not in linear.__dict__
            and not (linear._forward_hooks or linear._forward_pre_hooks or linear._backward_hooks
                     or linear._backward_pre_hooks)
            and not global_module_hooks(backward=True))


def project(linear: nn.Module, x: torch.Tensor, backend: str) -> torch.Tensor:
    """``linear(x)``; on the GEMV kernel (``ops.gemv``) when ``x`` has at most ``MAX_ROWS`` rows, the backend is not
    ``"torch"`` and ``linear`` is unobserved. Same shapes and dtype as ``linear(x)``: x ``[..., K]`` -> ``[..., N]``."""
    k = x.shape[-1]
    if backend != "torch" and 0 < x.numel() <= MAX_ROWS * k and unobserved_linear(linear):
        return ops.gemv(x, linear.weight, linear.bias, backend=backend)
    return linear(x)
