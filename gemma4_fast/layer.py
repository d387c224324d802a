"""Fast Gemma 4 decoder layer: HF ``Gemma4TextDecoderLayer.forward`` with the residual adds fused into the norms.

HF's layer runs ``hidden = residual + post_attention_layernorm(attn_out)`` then ``pre_feedforward_layernorm(hidden)``,
and ``residual + post_feedforward_layernorm(mlp_out)`` / ``residual + post_per_layer_input_norm(ple_out)``: a norm,
an add and often the next norm, each a pass over the residual stream. Here each such group is one
``ops.rms_norm_residual`` call (``kernels/rmsnorm``: the norm rounded to the sublayer's dtype before the add, the sum
rounded once, the next norm of the rounded sum: HF's arithmetic, in HF's order). Every submodule (attention, MLP,
router, experts, per-layer-input linears, every norm's parameters) is still the layer's own, called in HF's order,
so weights, ``state_dict`` keys and hook paths are unchanged.

The fused path runs only when it cannot be told apart from HF's: every norm it fuses is a fast RMSNorm
(``gemma4_fast.norm``) with a weight, no active seam (``hook_scale`` / ``hook_normalized``) and no PyTorch hook, and
there are no global module hooks. Otherwise (a hook on a norm, TransformerBridge's wrappers around the submodules)
the call runs HF's forward unchanged. In the MoE block (26B-A4B) the dense MLP, router and experts run as HF's
submodules; its tail (``post_feedforward_layernorm_1(mlp) + post_feedforward_layernorm_2(experts)``, the
post-feedforward norm and the residual add) is one ``ops.rms_norm_pair_residual`` pass.

Two more passes go: the closing ``hidden *= layer_scalar`` is applied by the last residual kernel (the rounded sum
times the scalar, rounded again: HF's two roundings), and on the Triton backends the per-layer-input gate
``act_fn(gate) * per_layer_input`` (E2B / E4B) runs on the fused tanh-GELU op of the MLP (one rounding instead of
two; ``"torch"`` keeps HF's expression bit for bit).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import ops
from .hooks import get_hook, global_module_hooks
from .mlp import gelu_tanh_unsupported
from .norm import FastRMSNormMixin


def _plain_norm(m: Any) -> bool:
    return (isinstance(m, FastRMSNormMixin) and m.with_scale and not m._forward_hooks and not m._forward_pre_hooks
            and get_hook(m, "scale") is None and get_hook(m, "normalized") is None)


class FastDecoderLayerMixin:
    """Forward of ``Gemma4TextDecoderLayer`` with fused residual norms; see the module docstring."""

    _g4f_backend = "auto"

    def _fusable(self) -> bool:
        names = ["post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"]
        if self.hidden_size_per_layer_input:
            names.append("post_per_layer_input_norm")
        if self.enable_moe_block:
            names += ["post_feedforward_layernorm_1", "post_feedforward_layernorm_2"]
        return not global_module_hooks() and all(_plain_norm(self._modules.get(n)) for n in names)

    def _residual(self, norm: nn.Module, x: torch.Tensor, residual: torch.Tensor, nxt: Any = None,
                  out_scale: torch.Tensor | None = None):
        return ops.rms_norm_residual(x, residual, norm.weight, norm.eps,
                                     next_weight=None if nxt is None else nxt.weight,
                                     next_eps=None if nxt is None else nxt.eps, out_scale=out_scale,
                                     backend=self._g4f_backend)

    def _layer_scalar(self, like: torch.Tensor) -> torch.Tensor | None:
        """The ``layer_scalar`` buffer when the last residual kernel can apply it (one element on ``like``'s
        device), else None (the layer multiplies afterwards, as HF does)."""
        s = getattr(self, "layer_scalar", None)
        if isinstance(s, torch.Tensor) and s.numel() == 1 and s.device == like.device and s.is_floating_point():
            return s
        return None

    def _per_layer_gate(self, hidden_states: torch.Tensor, per_layer_input: torch.Tensor) -> torch.Tensor:
        """HF's ``act_fn(per_layer_input_gate(h)) * per_layer_input``, the product on the fused tanh-GELU op
        when the backend and ``act_fn`` allow it (one pass instead of two; see ``gemma4_fast.mlp``)."""
        gate = self.per_layer_input_gate(hidden_states)
        if (self._g4f_backend == "torch" or gelu_tanh_unsupported(self.act_fn) is not None
                or gate.shape != per_layer_input.shape):
            return self.act_fn(gate) * per_layer_input
        return ops.gelu_mul(gate, per_layer_input, backend=self._g4f_backend)

    def forward(self, hidden_states: torch.Tensor, per_layer_input: torch.Tensor | None = None,
                shared_kv_states: Any = None, position_embeddings: Any = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.LongTensor | None = None,
                past_key_values: Any = None, **kwargs: Any) -> torch.Tensor:
        if not self._fusable():
            return super().forward(hidden_states, per_layer_input, shared_kv_states, position_embeddings,
                                   attention_mask, position_ids, past_key_values, **kwargs)
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(hidden_states=hidden_states, position_embeddings=position_embeddings,
                                          attention_mask=attention_mask, shared_kv_states=shared_kv_states,
                                          position_ids=position_ids, past_key_values=past_key_values, **kwargs)
        scalar = self._layer_scalar(hidden_states)
        if self.enable_moe_block:
            residual, hidden_states = self._residual(self.post_attention_layernorm, hidden_states, residual,
                                                     self.pre_feedforward_layernorm)
            hidden_states_1 = self.mlp(hidden_states)
            flat = residual.reshape(-1, residual.shape[-1])
            _, top_k_weights, top_k_index = self.router(flat)
            hidden_states_2 = self.experts(self.pre_feedforward_layernorm_2(flat), top_k_index, top_k_weights)
            n1, n2, n = self.post_feedforward_layernorm_1, self.post_feedforward_layernorm_2, \
                self.post_feedforward_layernorm
            hidden_states = ops.rms_norm_pair_residual(
                hidden_states_1, hidden_states_2.reshape(residual.shape), residual, n1.weight, n2.weight, n.weight,
                n1.eps, n2.eps, n.eps, out_scale=scalar, backend=self._g4f_backend)
            if scalar is None:
                hidden_states *= self.layer_scalar
            return hidden_states
        residual, hidden_states = self._residual(self.post_attention_layernorm, hidden_states, residual,
                                                 self.pre_feedforward_layernorm)
        hidden_states = self.mlp(hidden_states)
        ple = bool(self.hidden_size_per_layer_input)
        hidden_states = self._residual(self.post_feedforward_layernorm, hidden_states, residual,
                                       out_scale=None if ple else scalar)
        if ple:
            residual = hidden_states
            hidden_states = self._per_layer_gate(hidden_states, per_layer_input)
            hidden_states = self._residual(self.post_per_layer_input_norm, self.per_layer_projection(hidden_states),
                                           residual, out_scale=scalar)
        if scalar is None:
            hidden_states *= self.layer_scalar
        return hidden_states
