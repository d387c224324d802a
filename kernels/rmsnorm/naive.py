"""Plain PyTorch reference for the Gemma 4 RMSNorm ops.

Mirrors ``transformers.models.gemma4.modeling_gemma4.Gemma4RMSNorm.forward`` (``_norm`` on the fp32
upcast, ``torch.pow(mean(x**2) + eps, -0.5)``, times ``weight.float()`` when ``with_scale``, cast back
with ``type_as``; no ``1 + weight`` offset) and the decoder layer's ``residual + norm(hidden_states)``
followed by the next pre-norm (``Gemma4TextDecoderLayer.forward``).

These functions define the semantics the Triton kernels in ``rmsnorm.py`` must reproduce and are
the autograd path: they are differentiable.
"""
from __future__ import annotations

from typing import NamedTuple

import torch


class RMSNormOutput(NamedTuple):
    """Result of ``rms_norm`` when an extra output is asked for.

    y: the normed rows, same shape and dtype as ``x``.
    scale: fp32 ``[..., 1]``, ``(mean(x**2) + eps) ** -0.5`` per row, or None when not asked.
    normalized: ``x_f32 * scale`` cast to ``x.dtype`` (the rows before the weight), or None.
    """

    y: torch.Tensor
    scale: torch.Tensor | None
    normalized: torch.Tensor | None


def rms_norm_naive(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6, *,
                   return_scale: bool = False, return_normalized: bool = False,
                   normalized_dtype: torch.dtype | None = None):
    """RMSNorm over the last dim of ``x``, exactly as HF ``Gemma4RMSNorm`` computes it.

    Args:
        x: ``[..., D]``, any float dtype.
        weight: ``[D]`` or None (``with_scale=False``).
        eps: added to the mean square before ``pow(., -0.5)``.
        return_scale: also return the fp32 ``[..., 1]`` per-row scale.
        return_normalized: also return ``x_f32 * scale`` cast to ``normalized_dtype`` (None: x's dtype).

    Returns:
        ``y`` alone, or ``RMSNormOutput(y, scale, normalized)`` when an extra is asked for.
    """
    xf = x.float()
    scale = torch.pow(xf.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    normed = xf * scale
    y = normed * weight.float() if weight is not None else normed
    y = y.type_as(x)
    if not (return_scale or return_normalized):
        return y
    return RMSNormOutput(y, scale if return_scale else None,
                         normed.to(normalized_dtype or x.dtype) if return_normalized else None)


def rms_norm_residual_naive(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                            eps: float = 1e-6, *, next_weight: torch.Tensor | None = None,
                            next_eps: float | None = None, out_scale: torch.Tensor | float | None = None,
                            x_scale: float | None = None):
    """``out = residual + rms_norm(x, weight)`` (HF order), optionally with the next pre-norm of ``out``.

    Args:
        x: ``[..., D]`` (the sublayer output, e.g. attention or MLP output).
        residual: ``[..., D]``, same shape as ``x``; the sum takes torch's promoted dtype of the two
            (the residual's dtype when both match), as ``residual + hidden_states`` does in HF.
        weight: ``[D]`` or None, the post-sublayer norm weight.
        eps: the post-norm epsilon.
        next_weight: ``[D]`` or None; when given also return ``rms_norm(out, next_weight, next_eps)``.
        next_eps: epsilon of the next norm (defaults to ``eps``).
        out_scale: None, a one-element tensor or a Python float: ``out`` is then multiplied by it in place (HF's
            ``hidden_states *= self.layer_scalar`` at the end of the decoder layer; with a float, the
            ``(projection + per_layer_inputs) * per_layer_input_scale`` of ``Gemma4TextModel
            .project_per_layer_inputs``), before the next norm.
        x_scale: None or a Python float multiplying x first, in x's dtype (that method's
            ``per_layer_model_projection(x) * per_layer_model_projection_scale``).

    Returns:
        ``out``, or ``(out, next_normed)`` when ``next_weight`` is given.
    """
    if x_scale is not None:
        x = x * x_scale
    out = residual + rms_norm_naive(x, weight, eps)
    if out_scale is not None:
        out = out.mul_(out_scale)
    if next_weight is None:
        return out
    return out, rms_norm_naive(out, next_weight, eps if next_eps is None else next_eps)


def rms_norm_pair_residual_naive(x1: torch.Tensor, x2: torch.Tensor, residual: torch.Tensor, w1: torch.Tensor,
                                 w2: torch.Tensor, weight: torch.Tensor, eps1: float = 1e-6, eps2: float = 1e-6,
                                 eps: float = 1e-6, *, out_scale: torch.Tensor | None = None):
    """The MoE decoder layer's tail as HF runs it (``Gemma4TextDecoderLayer.forward`` with ``enable_moe_block``):
    ``residual + rms_norm(rms_norm(x1, w1) + rms_norm(x2, w2), weight)``, then ``*= out_scale`` when given.

    Args:
        x1, x2: ``[..., D]`` the dense MLP and the experts' outputs; residual: ``[..., D]``.
        w1, w2, weight: ``[D]`` ``post_feedforward_layernorm_1`` / ``_2`` / ``post_feedforward_layernorm`` weights.
        eps1, eps2, eps: their epsilons. out_scale: None or a one-element tensor (``layer_scalar``).

    Returns:
        ``out`` in torch's promoted dtype of residual and the norms' output.
    """
    h = rms_norm_naive(x1, w1, eps1) + rms_norm_naive(x2, w2, eps2)
    out = residual + rms_norm_naive(h, weight, eps)
    return out.mul_(out_scale) if out_scale is not None else out
