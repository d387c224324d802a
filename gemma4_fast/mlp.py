"""Fast Gemma 4 dense MLP: HF ``Gemma4TextMLP`` with ``act_fn(gate) * up`` fused into one op.

``FastGemma4TextMLP`` (and its unified twin) adds no parameter, buffer or submodule. Forward keeps HF's
submodule calls, in HF's order: ``self.gate_proj(x)``, ``self.up_proj(x)``, then
``self.down_proj(h)``, so hooks on those linears (TransformerLens: the gate output, the up output and
the down input) see the same tensors as on the HF module. Only ``h = act_fn(gate) * up`` changes: on the
``"triton"`` / ``"auto"`` backends it is ``gemma4_fast.ops.gelu_mul`` (one kernel, fp32 math, one
rounding; gradients by recomputing the naive op), on ``"torch"`` it is HF's own
``self.act_fn(gate) * up``, bit for bit.

The fused op only stands in for the tanh GELU of ``transformers.activations`` (``gelu_pytorch_tanh``,
the Gemma 4 default) when ``act_fn`` carries no forward hooks; any other activation, or a hooked one,
runs HF's expression (logged once).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from . import ops

GELU_TANH_NAMES = ("gelu_pytorch_tanh",)


def gelu_tanh_unsupported(act_fn: object) -> Optional[str]:
    """Why ``act_fn`` cannot be replaced by the fused tanh-GELU op (None when it can).

    It can when it is transformers' tanh-GELU module (``GELUTanh`` / ``PytorchGELUTanh``) running
    ``torch.nn.functional.gelu(., approximate="tanh")`` and has no forward (pre-)hooks.
    """
    if not isinstance(act_fn, nn.Module):
        return f"act_fn is {type(act_fn).__name__}, not a transformers activation module"
    cls = type(act_fn)
    if not (cls.__module__.startswith("transformers.activations") and "GELUTanh" in cls.__name__):
        return f"act_fn is {cls.__name__}, not the tanh GELU (gelu_pytorch_tanh)"
    fn = getattr(act_fn, "act", None)
    if fn is not None and not (isinstance(fn, functools.partial) and fn.func is F.gelu
                               and fn.keywords.get("approximate") == "tanh"):
        return f"act_fn {cls.__name__} does not run torch's tanh GELU (e.g. gelu_python_tanh)"
    if act_fn._forward_hooks or act_fn._forward_pre_hooks:
        return "act_fn has forward hooks"
    return None


class FastMLPMixin:
    """Forward of ``Gemma4TextMLP`` (and ``Gemma4UnifiedTextMLP``) with the fused activation; see the
    module docstring. Input ``x [..., hidden]`` -> ``[..., hidden]`` in the linears' dtype."""

    _g4f_backend = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.gate_proj(x)
        up = self.up_proj(x)
        backend = self._g4f_backend
        if backend != "torch":
            why = gelu_tanh_unsupported(self.act_fn)
            if why is not None:
                ops.log_once("mlp:act", f"mlp: {why}; running HF's act_fn(gate) * up")
                backend = "torch"
        if backend == "torch":
            h = self.act_fn(gate) * up
        else:
            h = ops.gelu_mul(gate, up, backend=backend)
        return self.down_proj(h)
