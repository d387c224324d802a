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


#: Modules whose hook functions are wiring, not user hooks: TransformerLens's bridge (its block capture hooks
#: only store Python references or forward to HookPoints that are checked themselves), this package's shape
#: recorders, and transformers' output-capturing hooks (left installed after an ``output_attentions`` /
#: ``output_hidden_states`` call; they record only inside such a call).
WIRING = ("transformer_lens.model_bridge.", "gemma4_fast.", "transformers.utils.output_capturing")


def user_hooks(m: nn.Module, backward: bool = False) -> bool:
    """Whether ``m`` carries a hook a caller put there: any hook on a TransformerLens ``HookPoint``, else any forward
    (pre-)hook not defined in ``WIRING`` modules; with ``backward`` also any backward (pre-)hook."""
    if backward and (m._backward_hooks or m._backward_pre_hooks):
        return True
    hooks = list(m._forward_hooks.values()) + list(m._forward_pre_hooks.values())
    if not hooks:
        return False
    if type(m).__name__ == "HookPoint":
        return True
    return any(not (getattr(fn, "__module__", None) or "").startswith(WIRING) for fn in hooks)


def global_module_hooks(backward: bool = False) -> bool:
    """Whether global module hooks (``torch.nn.modules.module.register_module_forward_hook`` and friends) are set;
    with ``backward`` the global backward hooks count too."""
    mod = nn.modules.module
    if mod._global_forward_hooks or mod._global_forward_pre_hooks:
        return True
    return backward and bool(mod._global_backward_hooks or mod._global_backward_pre_hooks)
