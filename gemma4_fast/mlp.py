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

When nothing can observe ``gate`` and ``up`` (``fused_projections``: bias-free ``nn.Linear`` projections with bf16 /
fp16 weights on a GPU, or TransformerLens ``LinearBridge`` wrappers of them, with no hook on either, no global module
hooks, no instance-level ``forward`` such as accelerate's) and autograd is off for them, the two projections and the
activation run as one op, ``gemma4_fast.ops.linear_gelu_mul`` (on Hopper, for at least 1000 rows and a hidden size up
to 1536, one kernel: ``gate`` and ``up`` are never written; elsewhere the same two GEMMs and ``gelu_mul``). A hook attached to either projection brings back the
separate calls.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from . import ops
from .hooks import global_module_hooks
from .kernels._common import needs_grad

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


def _on_gpu_half(weight: torch.Tensor) -> bool:
    return weight.device.type == "cuda" and weight.dtype in (torch.bfloat16, torch.float16)


_BRIDGE_LINEAR = ("transformer_lens.model_bridge.generalized_components.linear", "LinearBridge")
_BRIDGE_CHILDREN = {"hook_in", "hook_out", "_original_component"}


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _plain_linear(m: Optional[nn.Module]) -> Optional[nn.Linear]:
    """``m`` when it is an unhooked, bias-free ``nn.Linear`` with a bf16 / fp16 weight on a GPU and its class's own
    ``forward``, else None."""
    if type(m) is not nn.Linear or m.bias is not None or _hooked(m) or not _on_gpu_half(m.weight):
        return None
    if "forward" in m.__dict__ or "_hf_hook" in m.__dict__:
        return None
    return m


def _projection_linear(proj: nn.Module) -> Optional[nn.Linear]:
    """The ``nn.Linear`` computing ``proj``'s output when nothing can observe that output: ``proj`` itself (see
    ``_plain_linear``), or the linear inside an unhooked TransformerLens ``LinearBridge`` whose ``hook_in`` and
    ``hook_out`` hold no hooks; else None."""
    cls = type(proj)
    if cls is nn.Linear:
        return _plain_linear(proj)
    if (cls.__module__, cls.__name__) != _BRIDGE_LINEAR or proj._modules.keys() != _BRIDGE_CHILDREN:
        return None
    if _hooked(proj) or "forward" in proj.__dict__ or _hooked(proj._modules["hook_in"]) \
            or _hooked(proj._modules["hook_out"]):
        return None
    return _plain_linear(proj._modules["_original_component"])


def fused_projections(gate_proj: nn.Module, up_proj: nn.Module) -> Optional[tuple[nn.Linear, nn.Linear]]:
    """The ``(gate, up)`` linears when ``act_fn(gate_proj(x)) * up_proj(x)`` may run as one op (see the module
    docstring), else None."""
    gate = _projection_linear(gate_proj)
    up = _projection_linear(up_proj) if gate is not None else None
    if up is None or up.weight.shape != gate.weight.shape or global_module_hooks(backward=True):
        return None
    return gate, up


def _mark_bridge_called(proj: nn.Module) -> None:
    """What a TransformerLens ``LinearBridge`` call records (the projection-hook protocol: its suppressed
    ``hook_in`` consumed, its ``hook_out`` fired), for a projection that ran inside the fused op."""
    if type(proj) is not nn.Linear:
        object.__setattr__(proj, "_suppress_next_hook_in", False)
        object.__setattr__(proj, "_fired_hook_out", True)


class FastMLPMixin:
    """Forward of ``Gemma4TextMLP`` (and ``Gemma4UnifiedTextMLP``) with the fused activation; see the
    module docstring. Input ``x [..., hidden]`` -> ``[..., hidden]`` in the linears' dtype."""

    _g4f_backend = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend = self._g4f_backend
        if backend != "torch":
            why = gelu_tanh_unsupported(self.act_fn)
            if why is not None:
                ops.log_once("mlp:act", f"mlp: {why}; running HF's act_fn(gate) * up")
                backend = "torch"
        if backend != "torch":
            pair = fused_projections(self.gate_proj, self.up_proj)
            if pair is not None and not needs_grad(x, pair[0].weight, pair[1].weight):
                h = ops.linear_gelu_mul(x, pair[0].weight, pair[1].weight, backend=backend)
                _mark_bridge_called(self.gate_proj)
                _mark_bridge_called(self.up_proj)
                return self.down_proj(h)
        gate = self.gate_proj(x)
        up = self.up_proj(x)
        if backend == "torch":
            h = self.act_fn(gate) * up
        else:
            h = ops.gelu_mul(gate, up, backend=backend)
        return self.down_proj(h)
