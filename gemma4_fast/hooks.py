"""Hook seams of the fast modules: optional callbacks that receive (and may replace) internal tensors.

A fast module carries ``_g4f_hooks``: a dict from a seam name to a callable ``fn(tensor) -> tensor``.
Anything callable works (a TransformerLens ``HookPoint`` included). A seam is *active* when a
callable is set and, if it has a ``has_hooks()`` method (``HookPoint``), that method returns True.
Inactive seams cost nothing: the module never computes their tensors.

Seam names and shapes, per module:

- attention (``FastGemma4TextAttention``):
  ``rot_q`` ``[batch, pos, n_heads, d_head]`` (post-RoPE queries), ``rot_k``
  ``[batch, pos, n_kv_heads, d_head]`` (post-RoPE keys, before the cache update),
  ``scores`` ``[batch, n_heads, q_pos, k_pos]`` (pre-softmax, scaled, softcapped, masked with -inf),
  ``pattern`` ``[batch, n_heads, q_pos, k_pos]`` (probabilities). Edits to ``scores`` or ``pattern``
  change the layer output. A ``pattern_fn`` keyword argument (TransformerLens's pattern seam)
  acts as the ``pattern`` seam for that call.
- RMSNorm (``FastGemma4RMSNorm``): ``scale`` ``[..., 1]`` fp32 ``(mean(x²)+eps)^-0.5`` and
  ``normalized`` ``[..., d]`` (``x * scale``, before the weight); edits flow into the output.
- router (``FastGemma4TextRouter``): ``probs`` ``[tokens, n_experts]`` fp32, ``top_k_weights``
  ``[tokens, k]``, ``top_k_index`` ``[tokens, k]``; edits to the weights/indices flow into the experts.
- experts (``FastGemma4TextExperts``): ``expert_outputs`` ``[tokens, k, d_model]``, each chosen
  expert's output before its routing weight (observational).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

HookFn = Callable[[torch.Tensor], torch.Tensor]
ATTR = "_g4f_hooks"


def hook_active(fn: Optional[HookFn]) -> bool:
    """Whether ``fn`` should be fed: set and, for objects with ``has_hooks()``, hooked."""
    if fn is None:
        return False
    has = getattr(fn, "has_hooks", None)
    return bool(has()) if callable(has) else True


def get_hook(module: nn.Module, name: str) -> Optional[HookFn]:
    """The callable set on ``module`` for seam ``name`` if it is active, else None."""
    fns = module.__dict__.get(ATTR)
    if not fns:
        return None
    fn = fns.get(name)
    return fn if hook_active(fn) else None


def set_hooks(module: nn.Module, **fns: Optional[HookFn]) -> None:
    """Set (or with None, clear) seam callables on ``module``."""
    current = dict(module.__dict__.get(ATTR) or {})
    for name, fn in fns.items():
        if fn is None:
            current.pop(name, None)
        else:
            current[name] = fn
    module.__dict__[ATTR] = current


def clear_hooks(module: nn.Module) -> None:
    """Remove every seam callable from ``module``."""
    module.__dict__.pop(ATTR, None)
