"""Registration of the ``gemma4_fast`` implementations with transformers' own extension points.

``register()`` (idempotent) adds, under the name ``"gemma4_fast"``:

- ``AttentionInterface``: ``gemma4_fast_attention`` — ``attn_implementation="gemma4_fast"`` runs the
  attention of any (unpatched) HF model on the project's attention ops.
- ``AttentionMaskInterface`` (``transformers.masking_utils``): ``gemma4_fast_mask`` — HF builds a
  cheap key-padding mask ``[B, 1, 1, L]`` bool (or None) instead of a ``[B, 1, Sq, Sk]`` one.
- ``ExpertsInterface`` (``transformers.integrations.moe``): ``gemma4_fast_experts`` —
  ``experts_implementation="gemma4_fast"`` runs Gemma-4-layout experts on the grouped expert op.

After ``register()``, ``Gemma4ForCausalLM`` (or ``from_pretrained``) with
``attn_implementation="gemma4_fast"`` gives HF's logits without patching; ``patch_model`` adds the
hook seams and the fast norms/router on top.
"""
from __future__ import annotations

import inspect
import logging
from typing import Callable, Optional

import torch

from . import ops
from .attention import attention_core, seam_hooks

NAME = "gemma4_fast"

_PLAIN_OVERLAYS = ("sliding_window_overlay.<locals>.inner_mask",)


def _plain_mask_function(fn: Callable) -> bool:
    """Whether ``fn`` is causal / bidirectional, optionally with HF's causal sliding window, and nothing else.

    Such a mask equals what the attention op derives from the layer (``is_causal``, ``sliding_window``)
    plus key padding, so the padding alone is enough. Anything else (image blocks, packed sequences,
    chunks, symmetric windows, user functions) is not plain.
    """
    from transformers import masking_utils as mu

    if fn is mu.causal_mask_function or fn is mu.bidirectional_mask_function:
        return True
    qual = getattr(fn, "__qualname__", "")
    if qual in _PLAIN_OVERLAYS:
        return True
    if qual == "and_masks.<locals>.and_mask":
        try:
            parts = inspect.getclosurevars(fn).nonlocals.get("mask_functions")
        except (TypeError, ValueError):
            return False
        return bool(parts) and all(_plain_mask_function(p) for p in parts)
    return False


def gemma4_fast_mask(batch_size: int, q_length: int, kv_length: int, q_offset=0, kv_offset=0,
                     mask_function: Optional[Callable] = None, attention_mask: Optional[torch.Tensor] = None,
                     **kwargs) -> Optional[torch.Tensor]:
    """Mask builder for ``AttentionMaskInterface``: key padding only, as the attention op wants it.

    Args (as HF's mask interface passes them):
        batch_size, q_length: the batch size and the number of queries.
        kv_length, kv_offset: the number of keys the cache will return and the absolute position of the
            first (``Cache.get_mask_sizes``).
        q_offset: absolute position of the first query (int, or a 0-d tensor for static caches).
        mask_function: HF's mask function of the layer type.
        attention_mask: ``[B, positions]`` bool, True = real token (already converted by HF), or None.
        kwargs: ``device``, ``use_vmap`` and HF's other extras.

    Returns:
        None when there is no padding and every key the cache returns is valid; else a bool
        ``[B, 1, 1, L]`` key padding mask over the keys as returned (column j = key j), where
        ``L = min(kv_length, q_offset + q_length - kv_offset)``: a static cache returns its whole
        buffer, and the mask's length tells the attention how many keys are valid. When the mask
        function is not plain causal/sliding (e.g. bidirectional image blocks), the full ``[B, 1, Sq,
        kv_length]`` bool mask of ``sdpa_mask`` instead (the attention then takes its slow path).
    """
    from transformers import masking_utils as mu

    mask_function = mask_function or mu.causal_mask_function
    device = kwargs.get("device", attention_mask.device if attention_mask is not None else "cpu")
    if kwargs.get("use_vmap") or not _plain_mask_function(mask_function):
        ops.log_once("mask-full", "gemma4_fast mask: the mask function is not plain causal/sliding; building "
                     "the full [B, 1, Sq, Sk] mask")
        return mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                            kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                            allow_is_causal_skip=False, allow_is_bidirectional_skip=False,
                            use_vmap=bool(kwargs.get("use_vmap")), device=device)
    kv_offset = int(kv_offset)
    n = min(int(kv_length), int(q_offset) + int(q_length) - kv_offset)
    if attention_mask is None:
        if n >= kv_length:
            return None
        return torch.ones(batch_size, 1, 1, n, dtype=torch.bool, device=device)
    pad = attention_mask[:, kv_offset: kv_offset + n].to(dtype=torch.bool)
    if pad.shape[-1] < n:
        pad = torch.nn.functional.pad(pad, (0, n - pad.shape[-1]), value=False)
    if n >= kv_length and bool(pad.all()):
        return None
    return pad[:, None, None, :]


def gemma4_fast_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: Optional[torch.Tensor], dropout: float = 0.0,
                          scaling: Optional[float] = None, sliding_window: Optional[int] = None,
                          softcap: Optional[float] = None, **kwargs):
    """Attention function for ``AttentionInterface`` (``attn_implementation="gemma4_fast"``).

    Args:
        module: the calling attention module (reads ``is_causal``, ``_g4f_backend`` if set, seams).
        query: ``[B, Hq, Sq, D]``; key, value: ``[B, Hkv, Sk, D]`` as the cache returned them.
        attention_mask: what ``gemma4_fast_mask`` built (None / ``[B, 1, 1, L]``), a 2-D key padding
            mask, or any 4-D mask (slow path; see ``gemma4_fast.attention``).
        dropout: attention dropout probability (training only).
        scaling: score multiplier (None: ``D ** -0.5``).
        sliding_window: window W (key visible iff ``0 <= pos - j < W``) or None.
        softcap: logit softcap or None.
        kwargs: ``output_attentions`` (return the pattern), ``is_causal`` (overrides the module's),
            ``pattern_fn`` (a pattern seam for this call); others are ignored.

    Returns:
        ``(attn_output [B, Sq, Hq, D], attn_weights [B, Hq, Sq, Sk] or None)``.
    """
    pattern_fn = kwargs.pop("pattern_fn", None)
    causal = kwargs.pop("is_causal", None)
    if causal is None:
        causal = getattr(module, "is_causal", True)
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    scores_hook, pattern_hooks = seam_hooks(module, pattern_fn)
    out, weights = attention_core(
        query, key, value, attention_mask, scale=scale, window=sliding_window, softcap=softcap,
        causal=bool(causal), backend=getattr(module, "_g4f_backend", "auto"), scores_hook=scores_hook,
        pattern_hooks=pattern_hooks, want_weights=bool(kwargs.get("output_attentions", False)),
        dropout=float(dropout or 0.0))
    return out.transpose(1, 2), weights


def _experts_unsupported(module: torch.nn.Module) -> Optional[str]:
    """Why the grouped expert op cannot stand in for ``module`` (None when it can)."""
    flags = dict(has_gate=True, has_bias=False, is_transposed=False, is_concatenated=True,
                 has_post_expert_norm=False, _is_expert_parallel=False)
    for name, want in flags.items():
        if bool(getattr(module, name, want)) != want:
            return f"{name}={not want} layout"
    act = getattr(getattr(module, "config", None), "hidden_activation", None)
    if act != "gelu_pytorch_tanh":
        return f"activation {act!r} (the op implements gelu_pytorch_tanh)"
    gu, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not isinstance(gu, torch.Tensor) or not isinstance(down, torch.Tensor) or gu.dim() != 3 or down.dim() != 3:
        return "no 3-D gate_up_proj / down_proj parameters"
    return None


def _eager_experts_forward(module: torch.nn.Module) -> Callable:
    for cls in type(module).__mro__:
        fwd = cls.__dict__.get("forward")
        if fwd is not None and hasattr(fwd, "__wrapped__"):
            return fwd.__wrapped__
    raise RuntimeError(f"{type(module).__name__} has no eager experts forward to fall back to")


def gemma4_fast_experts(module: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                        top_k_weights: torch.Tensor) -> torch.Tensor:
    """Experts function for ``ExpertsInterface`` (``experts_implementation="gemma4_fast"``).

    Args:
        module: an experts module with Gemma 4's layout (``gate_up_proj [E, 2I, H]`` gate rows first,
            ``down_proj [E, H, I]``, gelu-tanh gating, no bias); other layouts fall back to the module's
            eager forward with a logged reason.
        hidden_states: ``[T, H]``; top_k_index: ``[T, k]`` int; top_k_weights: ``[T, k]``.

    Returns:
        ``[T, H]`` in hidden_states' dtype.
    """
    why = _experts_unsupported(module)
    if why is not None:
        ops.log_once(f"experts:{type(module).__name__}", f"gemma4_fast experts: {type(module).__name__} has "
                     f"{why}; running its eager forward", level=logging.WARNING)
        return _eager_experts_forward(module)(module, hidden_states, top_k_index, top_k_weights)
    return ops.moe_experts(hidden_states, top_k_index, top_k_weights, module.gate_up_proj, module.down_proj,
                           backend=getattr(module, "_g4f_backend", "auto"))


def register() -> None:
    """Register ``"gemma4_fast"`` in transformers' attention, mask and experts interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.integrations.moe import ExpertsInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, gemma4_fast_attention)
    AttentionMaskInterface.register(NAME, gemma4_fast_mask)
    ExpertsInterface.register(NAME, gemma4_fast_experts)


def is_registered() -> bool:
    """Whether ``register()`` has run (all three interfaces know ``"gemma4_fast"``)."""
    from transformers import AttentionInterface
    from transformers.integrations.moe import ExpertsInterface
    from transformers.masking_utils import AttentionMaskInterface

    return all(NAME in iface._global_mapping for iface in (AttentionInterface, AttentionMaskInterface,
                                                            ExpertsInterface))
