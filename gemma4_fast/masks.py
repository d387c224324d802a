"""Skip HF's two mask builders when their result is known: every layer type's mask is None.

``Gemma4TextModel.forward`` calls ``create_causal_mask`` and ``create_sliding_window_causal_mask`` on every call
that does not hand it a ready mask mapping (a dict, as ``generate`` does). Without an attention mask, position ids
or a cache, each builder first checks HF's own ``arange`` position ids for packed sequences
(``find_packed_sequence_indices``: a device-to-host sync) and then asks the ``gemma4_fast`` mask function, which
returns None (no key padding: the attention takes causality and the window from the layer). Together ~2 ms of host
time per forward on the GPU machines, before the first layer, with the GPU idle.

``known_mask_mapping`` returns ``{"full_attention": None, "sliding_attention": None}`` (what the builders return)
for exactly these calls, so the top-level forward can pass it as ``attention_mask``:

- a ``Gemma4ForCausalLM`` whose text config uses the ``gemma4_fast`` attention implementation (patched);
- no ``attention_mask``, ``position_ids``, ``past_key_values`` or ``cache_position`` (HF then makes the positions
  ``arange(seq)``: one sequence per row, never packed) and at most one positional argument (``input_ids``);
- not inside ``torch.compile`` tracing.

Any other call (a padding mask, a cache, custom positions, multimodal classes) runs HF's builders unchanged.
``tests/test_masks.py`` checks on every tiny preset that HF's builders return None for both layer types in
exactly these calls (with and without the ``DynamicCache`` that ``use_cache=True`` creates).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from .registration import NAME

LAYER_TYPES = ("full_attention", "sliding_attention")
_FIXED = ("attention_mask", "position_ids", "past_key_values", "cache_position")


def known_mask_mapping(model: Any, args: tuple, kwargs: dict) -> Optional[dict]:
    """``{layer type: None}`` when HF's mask builders would return None for both layer types in this call of
    ``model`` (see the module docstring), else None."""
    if type(model).__name__ != "Gemma4ForCausalLM" or len(args) > 1:
        return None
    if getattr(model.config.get_text_config(), "_attn_implementation", None) != NAME:
        return None
    if any(kwargs.get(name) is not None for name in _FIXED):
        return None
    if torch.compiler.is_compiling():
        return None
    return dict.fromkeys(LAYER_TYPES)
