"""Fast Gemma 4 RMSNorm: HF ``Gemma4RMSNorm`` semantics on ``gemma4_fast.ops.rms_norm``.

Same parameters (``weight`` when ``with_scale``), same attributes (``eps``, ``with_scale``); forward
maps ``[..., d]`` to ``[..., d]`` in the input dtype with fp32 math and no ``1 + w`` offset.

Seams (``gemma4_fast.hooks``): ``scale`` ``[..., 1]`` fp32 and ``normalized`` ``[..., d]`` fp32. When
either is active the kernel supplies the per-row scale (and, for ``normalized``, the fp32 rows
``x_f32 * scale`` in the same pass, unless a ``scale`` hook edited the scale) and the rest runs in torch with
HookedTransformer's order: ``y = hook_normalized(x_f32 * hook_scale(scale)) * w``, cast to x's dtype. A hook that
returns its input unchanged (observes) keeps the kernel's ``y``, which is the same arithmetic in the same order.
"""
from __future__ import annotations

import torch
from torch import nn

from . import ops
from .hooks import get_hook, global_module_hooks


def _apply(fn, t: torch.Tensor) -> torch.Tensor:
    if fn is None:
        return t
    out = fn(t)
    return t if out is None else out


class FastRMSNormMixin:
    """Forward of ``Gemma4RMSNorm`` (and its unified twin) on the RMSNorm op; see the module docstring."""

    _g4f_backend = "auto"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        weight = self.weight if self.with_scale else None
        hook_scale = get_hook(self, "scale")
        hook_normalized = get_hook(self, "normalized")
        if hook_scale is None and hook_normalized is None:
            return ops.rms_norm(hidden_states, weight, self.eps, backend=self._g4f_backend)
        res = ops.rms_norm(hidden_states, weight, self.eps, return_scale=True,
                           return_normalized=hook_normalized is not None, normalized_dtype=torch.float32,
                           backend=self._g4f_backend)
        scale = _apply(hook_scale, res.scale)
        if hook_normalized is None and scale is res.scale:
            return res.y
        # the kernel's fp32 rows equal x.float() * scale bit for bit; an edited scale is applied in torch
        normed = res.normalized if scale is res.scale else hidden_states.float() * scale
        normalized = _apply(hook_normalized, normed)
        if normalized is normed and scale is res.scale:
            return res.y  # observed, not edited: the kernel computed (x * scale) * w in this order already
        out = normalized * weight.float() if weight is not None else normalized
        return out.type_as(hidden_states)


def unobserved_norm(norm: nn.Module) -> bool:
    """Whether ``norm`` is a fast RMSNorm with scale whose call nobody observes (no module hooks of any kind, no
    active ``scale`` / ``normalized`` seam, no global module hooks): a caller may then fuse it into a neighbouring
    pass (the attention's q/k norms into RoPE, ``ops.rms_norm_rope``; the per-layer-input projection norm into
    ``ops.rms_norm_residual``, ``gemma4_fast.prologue``) instead of calling the module."""
    return (isinstance(norm, FastRMSNormMixin) and norm.with_scale
            and not (norm._forward_hooks or norm._forward_pre_hooks or norm._backward_hooks
                     or norm._backward_pre_hooks)
            and get_hook(norm, "scale") is None and get_hook(norm, "normalized") is None
            and not global_module_hooks(backward=True))
