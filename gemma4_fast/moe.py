"""Fast Gemma 4 mixture-of-experts modules: HF's router and experts on ``gemma4_fast.ops``.

``FastRouterMixin`` (HF ``Gemma4TextRouter``): ``hidden_states [T, H]`` ->
``(probs [T, E] fp32, top_k_weights [T, k], top_k_index [T, k])`` through the fused router op. When
its ``norm`` / ``proj`` submodules are observed (module hooks, active norm seams, or replaced by
wrappers) the HF forward runs instead so those submodules still run as modules. Seams ``probs``,
``top_k_weights``, ``top_k_index`` see (and may replace) the outputs; edits flow into the experts.

``FastExpertsMixin`` (HF ``Gemma4TextExperts``): ``(hidden_states [T, H], top_k_index [T, k],
top_k_weights [T, k]) -> [T, H]`` through the grouped expert op, gate_up ``[E, 2I, H]`` and down
``[E, H, I]`` used as HF stores them. Seam ``expert_outputs`` ``[T, k, H]`` is observational: the op
returns the per-slot outputs only when the seam is active.
"""
from __future__ import annotations

import torch
from torch import nn

from . import ops
from .hooks import get_hook


def _apply(fn, t: torch.Tensor) -> torch.Tensor:
    if fn is None:
        return t
    out = fn(t)
    return t if out is None else out


def _observed(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or getattr(m, "_forward_hooks_with_kwargs", None))


class FastRouterMixin:
    """Forward of ``Gemma4TextRouter`` on the router op; see the module docstring."""

    _g4f_backend = "auto"

    def _g4f_use_hf(self) -> bool:
        norm, proj = self.norm, self.proj
        if type(proj) is not nn.Linear or proj.bias is not None or _observed(proj) or _observed(norm):
            return True
        if getattr(norm, "with_scale", None) is not False or not hasattr(norm, "eps"):
            return True
        return get_hook(norm, "scale") is not None or get_hook(norm, "normalized") is not None

    def forward(self, hidden_states: torch.Tensor):
        if self._g4f_use_hf():
            probs, weights, index = super().forward(hidden_states)
        else:
            probs, weights, index = ops.moe_router(
                hidden_states, self.proj.weight, self.scale, self.per_expert_scale,
                top_k=self.config.top_k_experts, eps=self.norm.eps, backend=self._g4f_backend)
        probs = _apply(get_hook(self, "probs"), probs)
        weights = _apply(get_hook(self, "top_k_weights"), weights)
        index = _apply(get_hook(self, "top_k_index"), index)
        return probs, weights, index


class FastExpertsMixin:
    """Forward of ``Gemma4TextExperts`` on the grouped expert op; see the module docstring."""

    _g4f_backend = "auto"

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        hook = get_hook(self, "expert_outputs")
        if hook is None:
            return ops.moe_experts(hidden_states, top_k_index, top_k_weights, self.gate_up_proj, self.down_proj,
                                   backend=self._g4f_backend)
        out, expert_outputs = ops.moe_experts(hidden_states, top_k_index, top_k_weights, self.gate_up_proj,
                                              self.down_proj, return_expert_outputs=True,
                                              backend=self._g4f_backend)
        hook(expert_outputs)
        return out
