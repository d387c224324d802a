"""Fast Gemma 4 text-model prologue: the scaled embeddings and the per-layer-input (PLE) projection.

Before its first decoder layer, an E2B / E4B forward builds the per-layer inputs with five passes over a
``[batch, seq, layers, 256]`` tensor (147 MB at 8k tokens for E2B): the per-layer embedding times its scale (a
multiply by a 0-dim CUDA tensor, which torch runs on its slow strided elementwise path), the projection times
``hidden_size ** -0.5``, the projection norm, the sum with the embeddings and the product with ``2 ** -0.5``.
Measured on the H100 at 8k (``bench/profile_forward.py --mode hf``): 0.62 ms of the forward's 27.6 ms.

- ``FastScaledEmbeddingMixin`` (``Gemma4TextScaledWordEmbedding``): the embedding rows times the scale as a
  Python number (the value of HF's ``embed_scale.to(weight.dtype)``, read once per buffer version), in place on
  the fresh lookup: the same rounding, one vectorised pass.
- ``FastTextModelMixin`` (``Gemma4TextModel``): ``project_per_layer_inputs`` runs the projection module, then one
  pass of ``ops.rms_norm_residual`` with ``x_scale`` / ``out_scale``: ``(norm(proj * s1) + per_layer_inputs) * s2``
  with HF's roundings, when the projection norm is a fast RMSNorm nobody observes (no module hooks, no seam, no
  global hooks); otherwise HF's method.

Both keep every parameter, buffer and submodule of their HF class (a class swap, see ``gemma4_fast.patch``; kind
``"prologue"``); the projection ``Linear`` is still called as a module, so its hooks fire.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import ops
from .norm import unobserved_norm

_SCALE = "_g4f_embed_scale"


class FastScaledEmbeddingMixin:
    """Forward of ``Gemma4TextScaledWordEmbedding``: ``embedding(ids) * embed_scale.to(weight.dtype)``."""

    def _g4f_scale_value(self) -> Optional[float]:
        buf = self.embed_scale
        key = (id(buf), buf._version, buf.device, self.weight.dtype)
        hit = self.__dict__.get(_SCALE)
        if hit is not None and hit[0] == key:
            return hit[1]
        if buf.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        value = float(buf.to(self.weight.dtype).item())
        self.__dict__[_SCALE] = (key, value)
        return value

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        scale = self._g4f_scale_value()
        if scale is None:
            return super().forward(input_ids)
        out = F.embedding(input_ids, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                          self.scale_grad_by_freq, self.sparse)
        if torch.is_grad_enabled() and self.weight.requires_grad:
            return out * scale
        return out.mul_(scale)


class FastTextModelMixin:
    """``Gemma4TextModel`` whose ``project_per_layer_inputs`` fuses the scale, norm, sum and product (see the module
    docstring)."""

    _g4f_backend = "auto"

    def project_per_layer_inputs(self, inputs_embeds: torch.Tensor,
                                 per_layer_inputs: Optional[torch.Tensor] = None) -> torch.Tensor:
        norm = getattr(self, "per_layer_projection_norm", None)
        shape = (*inputs_embeds.shape[:-1], self.config.num_hidden_layers, self.hidden_size_per_layer_input)
        if (not isinstance(per_layer_inputs, torch.Tensor) or per_layer_inputs.shape != shape
                or norm is None or not unobserved_norm(norm)):
            return super().project_per_layer_inputs(inputs_embeds, per_layer_inputs)
        proj = self.per_layer_model_projection(inputs_embeds).reshape(shape)
        return ops.rms_norm_residual(proj, per_layer_inputs, norm.weight, norm.eps,
                                     x_scale=float(self.per_layer_model_projection_scale),
                                     out_scale=float(self.per_layer_input_scale), backend=self._g4f_backend)
