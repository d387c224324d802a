"""Plain PyTorch reference for the final logit softcap ``cap * tanh(x / cap)``.

Mirrors the end of ``transformers.models.gemma4.modeling_gemma4.Gemma4ForCausalLM.forward``
(``logits = logits / self.config.final_logit_softcapping; logits = torch.tanh(logits);
logits = logits * self.config.final_logit_softcapping``) and the same three lines of
``Gemma4ForConditionalGeneration.forward`` (which reads the cap from ``config.get_text_config()``) and of the
``gemma4_unified`` classes: three out-of-place ops in x's dtype, so in bfloat16/float16 each result is rounded
three times, exactly as HF does.

``logit_softcap_naive(x, cap)`` is differentiable: it is the autograd path of the op. With ``out=`` it writes
the same numbers into ``out`` chunk by chunk (each element still goes through HF's three ops in x's dtype, so
the result is bit-identical to HF's), which keeps the extra memory at a few chunk-sized temporaries instead of
two logits-sized tensors; that is the ``"torch"`` backend of the in-place fast path.
"""
from __future__ import annotations

from typing import Optional

import torch

#: Elements per chunk of the ``out=`` path (16 Mi elements: 32 MiB of bf16 per temporary).
CHUNK = 1 << 24


def _softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    y = x / cap
    y = torch.tanh(y)
    return y * cap


def logit_softcap_naive(x: torch.Tensor, cap: float, *, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``cap * tanh(x / cap)`` as HF computes it (three ops in x's dtype).

    Args:
        x: any shape, any float dtype, any device (the LM-head logits, ``[batch, seq, vocab]`` in HF).
        cap: the softcap (``final_logit_softcapping``, 30.0 in Gemma 4), a Python number; not validated here.
        out: optional tensor of x's shape, dtype and device to write the result into; ``out=x`` is in place.
            ``out`` must be ``x`` itself or not overlap it. When x and out are both contiguous and autograd is
            not recording a gradient of x, the result is written chunk by chunk (``CHUNK`` elements); otherwise
            through one full-size temporary (``out.copy_(result)``, which autograd records).

    Returns:
        The result: a new tensor of x's shape and dtype, or ``out`` when given.
    """
    if out is None:
        return _softcap(x, cap)
    grad = torch.is_grad_enabled() and (x.requires_grad or out.requires_grad)
    if grad or not (x.is_contiguous() and out.is_contiguous()):
        out.copy_(_softcap(x, cap))
        return out
    xf, of = x.view(-1), out.view(-1)
    for start in range(0, xf.numel(), CHUNK):
        of[start:start + CHUNK].copy_(_softcap(xf[start:start + CHUNK], cap))
    return out


def linear_softcap_naive(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         cap: float) -> torch.Tensor:
    """The LM head then the final softcap as HF runs them: ``lm_head(x)`` (``torch.nn.functional.linear``, one
    rounding to x's dtype) then HF's three softcap ops in that dtype (``Gemma4ForCausalLM.forward``).

    Args:
        x: ``[..., K]`` hidden states after the final norm.
        weight: ``[N, K]`` (the LM head's weight; tied to the input embedding in Gemma 4).
        bias: ``[N]`` or None (TransformerBridge gives the LM head a zero bias).
        cap: ``final_logit_softcapping`` (30.0), a Python number; not validated here.

    Returns:
        ``[..., N]`` logits in x's dtype; differentiable.
    """
    return _softcap(torch.nn.functional.linear(x, weight, bias), cap)
