"""Fast Gemma 4 text attention: the HF module's steps with the attention itself on the project's ops.

``FastGemma4TextAttention`` subclasses HF's ``Gemma4TextAttention`` without adding parameters or
submodules: ``q_proj`` / ``q_norm`` / ``k_proj`` / ``k_norm`` / ``v_proj`` / ``v_norm`` / ``o_proj``
run as modules in HF's order, KV sharing and the cache update are HF's; RoPE (``ops.rope``: HF's
``apply_rotary_pos_emb`` on the torch backend) and the ``softmax(q k^T) v`` step go to
``gemma4_fast.ops`` (Triton or torch). A ``q_norm`` / ``k_norm`` that is a fast RMSNorm nobody observes (no
module hook of any kind, no active norm seam, no global module hooks) is fused into the RoPE pass
(``ops.rms_norm_rope``, same arithmetic); any hook on it brings back the module call.

Masks. The attention op takes causality, the sliding window and a key padding mask ``[B, Sk]``
(queries sit at the end of the keys). ``attention_core`` reads the mask it is given as follows:

- None: no padding.
- 2-D ``[B, L]`` (flash-attention style, True/1 = real key): the key padding mask, aligned to the
  end of the keys when longer; when shorter than the keys (static cache buffers), the keys are cut
  to the first L.
- 4-D bool ``[B, 1, 1, L]`` (what the ``gemma4_fast`` mask function builds): the key padding mask,
  column j = key j; keys beyond L are cut (static cache buffers). Read without any device sync.
- any other 4-D mask (bool keep-mask or float additive, ``[B|1, 1|H, Sq, Sk']``, ``Sk' >= Sk``, e.g.
  built for eager/sdpa): the slow path. The key padding mask is derived as "some query sees key j",
  the keys are cut to the valid length (from the static cache, else the last key any query sees),
  and the mask is checked to equal causal ∧ window ∧ padding; if it does the fast op runs, otherwise
  the attention runs on the explicit mask (scores, mask, softmax, pattern @ v). Logged once each.

Hook seams (``gemma4_fast.hooks``): ``rot_q``, ``rot_k``, ``scores``, ``pattern`` and the
``pattern_fn`` keyword (TransformerLens). Without an active seam (and without ``output_attentions``)
only the fused attention op runs and no ``[.., Sq, Sk]`` tensor exists.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from transformers.cache_utils import StaticLayer

from . import ops
from .hooks import get_hook, hook_active
from .norm import unobserved_norm
from .kernels.attention.naive import visible_mask

HookFn = Callable[[torch.Tensor], torch.Tensor]
#: Instance flag: attention weights reach the caller only through ``pattern_fn``; never return them for
#: ``output_attentions`` (set on a TransformerBridge layer's unwrapped twin, whose wrapper would have passed
#: ``pattern_fn``).
WEIGHTS_VIA_SEAM = "_g4f_weights_via_seam"


def _apply_hook(fn: Optional[HookFn], t: torch.Tensor) -> torch.Tensor:
    if fn is None:
        return t
    out = fn(t)
    return t if out is None else out


def _apply_hooks(fns: Sequence[HookFn], t: torch.Tensor) -> torch.Tensor:
    for fn in fns:
        t = _apply_hook(fn, t)
    return t


def _fast_flows(q, k, v, *, kpm, scale, window, softcap, causal, backend, scores_hook, pattern_hooks,
                want_weights, dropout):
    """Run the op flow the active seams need; returns ``(o [B,Hq,Sq,D], pattern or None)``."""
    kw = dict(scale=scale, window=window, softcap=softcap, causal=causal, key_padding_mask=kpm, backend=backend)
    if scores_hook is not None:
        s = _apply_hook(scores_hook, ops.attention_scores(q, k, **kw))
        p = _apply_hooks(pattern_hooks, ops.softmax_scores(s, backend=backend))
        if dropout > 0:
            p = nn.functional.dropout(p, p=dropout, training=True)
        return ops.pattern_apply(p, v, backend=backend), p
    if pattern_hooks or want_weights or dropout > 0:
        o, lse = ops.attention(q, k, v, return_lse=True, **kw)
        p = ops.attention_pattern(q, k, lse=lse, **kw)
        if pattern_hooks or dropout > 0:
            p = _apply_hooks(pattern_hooks, p)
            if dropout > 0:
                p = nn.functional.dropout(p, p=dropout, training=True)
            o = ops.pattern_apply(p, v, backend=backend)
        return o, p
    return ops.attention(q, k, v, **kw), None


def _explicit_flow(q, k, v, keep, additive, *, scale, softcap, backend, scores_hook, pattern_hooks, dropout):
    """Attention on an explicit mask (keep ``[B|1, 1|H, Sq, Sk]`` bool, optional float bias)."""
    s = ops.attention_scores(q, k, scale=scale, window=None, softcap=softcap, causal=False,
                             key_padding_mask=None, backend=backend)
    if additive is not None:
        s = s + additive.to(s.dtype)
    s = s.masked_fill(~keep, float("-inf"))
    s = _apply_hook(scores_hook, s)
    p = _apply_hooks(pattern_hooks, ops.softmax_scores(s, backend=backend))
    if dropout > 0:
        p = nn.functional.dropout(p, p=dropout, training=True)
    return ops.pattern_apply(p, v, backend=backend), p


def _cut_keys(k, v, n: int):
    return k[:, :, :n], v[:, :, :n]


def attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], *,
                   scale: float, window: Optional[int], softcap: Optional[float], causal: bool, backend: str,
                   scores_hook: Optional[HookFn] = None, pattern_hooks: Sequence[HookFn] = (),
                   want_weights: bool = False, dropout: float = 0.0,
                   valid_len_fn: Optional[Callable[[], Optional[int]]] = None,
                   kv_lens: Optional[torch.Tensor] = None):
    """Attention of one layer with mask handling, seams and backend dispatch.

    Args:
        q: ``[B, Hq, Sq, D]`` queries (post-RoPE), last dim contiguous.
        k, v: ``[B, Hkv, Sk_raw, D]`` keys/values as the cache returned them (a static cache returns its
            whole buffer; the valid prefix is found from the mask or ``valid_len_fn``).
        mask: None, 2-D ``[B, L]`` key padding, 4-D bool ``[B, 1, 1, L]`` key padding, or any 4-D
            keep/additive mask ``[B|1, 1|Hq, Sq, Sk']`` (slow path; see the module docstring).
        scale, window, softcap, causal: as the attention op (HF window semantics).
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` (``gemma4_fast.ops``).
        scores_hook: the active ``scores`` seam or None; edits change the output.
        pattern_hooks: active ``pattern`` seams, applied in order; edits change the output.
        want_weights: return the pattern (``output_attentions``).
        dropout: attention dropout probability (training); > 0 runs the pattern path.
        valid_len_fn: returns the number of valid keys of a prefix-filled static cache buffer (or None).
        kv_lens: ``[B]`` int32 valid keys per row of a preallocated buffer, read on the device (CUDA-graph
            decode, ``gemma4_fast.decode``); ``mask`` is then None or the 2-D ``[B, Sk]`` key padding mask
            and no seam, ``output_attentions`` or dropout may be active (``ValueError`` otherwise).

    Returns:
        ``(o, weights)``: o ``[B, Hq, Sq, D]`` (a view of a ``[B, Sq, Hq, D]`` buffer), weights the
        ``[B, Hq, Sq, Sk]`` pattern in q's dtype when ``want_weights``, else None.
    """
    kw = dict(scale=scale, window=window, softcap=softcap, causal=causal, backend=backend,
              scores_hook=scores_hook, pattern_hooks=tuple(pattern_hooks), want_weights=want_weights,
              dropout=dropout)
    sk = k.shape[-2]
    kpm = None
    if kv_lens is not None:
        if scores_hook is not None or pattern_hooks or want_weights or dropout > 0:
            raise ValueError("kv_lens (device key lengths of a preallocated decode cache) cannot be combined "
                             "with attention hooks, output_attentions or dropout")
        if mask is not None and (mask.dim() != 2 or mask.shape[-1] != sk):
            raise ValueError(f"with kv_lens the mask must be None or a [B, {sk}] key padding mask, got "
                             f"{tuple(mask.shape)}")
        kpm = None if mask is None else mask.to(device=q.device, dtype=torch.bool)
        return ops.attention(q, k, v, scale=scale, window=window, softcap=softcap, causal=causal,
                             key_padding_mask=kpm, backend=backend, kv_lens=kv_lens), None
    if mask is None:
        n = valid_len_fn() if (valid_len_fn is not None and sk > q.shape[-2]) else None
        if n is not None and n < sk:
            k, v = _cut_keys(k, v, n)
    elif mask.dim() == 2:
        kpm = mask.to(device=q.device, dtype=torch.bool)
        if kpm.shape[-1] < sk:
            k, v = _cut_keys(k, v, kpm.shape[-1])
        kpm = kpm[:, kpm.shape[-1] - k.shape[-2]:]
    elif mask.dim() == 4 and mask.dtype == torch.bool and mask.shape[1] == 1 and mask.shape[2] == 1:
        kpm = mask[:, 0, 0, :].to(q.device)
        if kpm.shape[-1] < sk:
            k, v = _cut_keys(k, v, kpm.shape[-1])
        kpm = kpm[:, : k.shape[-2]]
    elif mask.dim() == 4:
        return _slow_path(q, k, v, mask, valid_len_fn=valid_len_fn, **kw)
    else:
        raise ValueError("attention_mask must be None, 2-D [B, L] or 4-D [B, 1, Sq, Sk]; got shape "
                         f"{tuple(mask.shape)}")
    if kpm is not None and kpm.shape[0] != q.shape[0]:
        kpm = kpm.expand(q.shape[0], -1).contiguous()
    o, p = _fast_flows(q, k, v, kpm=kpm, **kw)
    return o, (p.to(q.dtype) if (want_weights and p is not None) else None)


def _slow_path(q, k, v, mask, *, scale, window, softcap, causal, backend, scores_hook, pattern_hooks,
               want_weights, dropout, valid_len_fn):
    """4-D mask: derive the key padding mask, verify causal ∧ window ∧ padding, else use the mask as is."""
    ops.log_once("attn-4d", "attention got a 4-D mask: deriving the key padding mask (slow path; use "
                 "attn_implementation='gemma4_fast' for a cheap mask)")
    sk = k.shape[-2]
    if mask.shape[-1] < sk:
        raise ValueError(f"attention_mask covers {mask.shape[-1]} keys but there are {sk}")
    mask = mask[..., :sk].to(q.device)
    additive = None
    if mask.dtype == torch.bool:
        keep = mask
        pure = True
    else:
        neg = mask <= torch.finfo(mask.dtype).min / 2
        keep = ~neg
        pure = bool(((mask == 0) | neg).all())
        if not pure:
            additive = mask.masked_fill(neg, 0)
    n = valid_len_fn() if valid_len_fn is not None else None
    if n is None:
        seen = keep.reshape(-1, sk).any(dim=0).nonzero()
        n = int(seen.max()) + 1 if seen.numel() else sk
    if n < sk:
        k, v = _cut_keys(k, v, n)
        keep = keep[..., :n]
        additive = None if additive is None else additive[..., :n]
    b, sq = q.shape[0], q.shape[2]
    kpm = keep.any(dim=2).any(dim=1).expand(b, -1).contiguous()
    kw = dict(scale=scale, softcap=softcap, backend=backend, scores_hook=scores_hook,
              pattern_hooks=tuple(pattern_hooks), dropout=dropout)
    if pure:
        full = keep.expand(b, keep.shape[1], sq, keep.shape[-1])
        vis = visible_mask(sq, keep.shape[-1], window=window, causal=causal, key_padding_mask=kpm)
        if torch.equal(vis.expand_as(full), full):
            o, p = _fast_flows(q, k, v, kpm=kpm, window=window, causal=causal, want_weights=want_weights, **kw)
            return o, (p.to(q.dtype) if (want_weights and p is not None) else None)
    ops.log_once("attn-explicit", "attention mask is not causal/window/padding (e.g. bidirectional image "
                 "blocks): attention runs on the explicit mask")
    o, p = _explicit_flow(q, k, v, keep, additive, **kw)
    return o, (p.to(q.dtype) if want_weights else None)


def _static_total(cache, layer_idx: Optional[int]) -> Optional[int]:
    """Tokens seen by a static cache layer (after its update), or None for other layer kinds."""
    layers = getattr(cache, "layers", None)
    if layer_idx is None or layers is None or layer_idx >= len(layers):
        return None
    layer = layers[layer_idx]
    if not isinstance(layer, StaticLayer):
        return None
    n = getattr(layer, "cumulative_length_int", None)
    if n is None:
        n = layer.cumulative_length
    return int(n)


def _kv_source_layer(config, layer_type: str) -> Optional[int]:
    """Index of the layer whose keys/values a KV-shared layer of ``layer_type`` reuses."""
    first_shared = config.num_hidden_layers - (getattr(config, "num_kv_shared_layers", 0) or 0)
    for i in range(first_shared - 1, -1, -1):
        if config.layer_types[i] == layer_type:
            return i
    return None


def seam_hooks(module: nn.Module, pattern_fn: Optional[HookFn] = None):
    """``(scores_hook, pattern_hooks)`` active on ``module`` (plus an active ``pattern_fn``)."""
    scores = get_hook(module, "scores")
    patterns = [fn for fn in (get_hook(module, "pattern"), pattern_fn) if fn is not None and hook_active(fn)]
    return scores, patterns


def _norm_rope(norm: nn.Module, x: torch.Tensor, cos, sin, backend: str) -> torch.Tensor:
    """``rope(norm(x))`` for a query/key head norm: one fused pass when ``norm`` is unobserved, else the module
    call then the RoPE op."""
    if unobserved_norm(norm):
        return ops.rms_norm_rope(x, norm.weight, cos, sin, eps=norm.eps, backend=backend)
    return ops.rope(norm(x), cos, sin, backend=backend)


class FastAttentionMixin:
    """Forward of the Gemma 4 text attention on ``gemma4_fast.ops``; mixed into HF's attention classes.

    Inputs/outputs are HF's: ``hidden_states [B, S, hidden]``, ``position_embeddings (cos, sin)``
    ``[B, S, head_dim]``, the layer's mask (see the module docstring), ``shared_kv_states`` (only
    ``[]`` get/set), ``past_key_values``; returns ``(out [B, S, hidden], weights or None)``; weights are
    ``[B, H, S, Sk]`` when ``output_attentions`` is requested. ``pattern_fn`` is accepted and popped.
    """

    accepts_pattern_fn = True
    _g4f_backend = "auto"

    def forward(self, hidden_states: torch.Tensor, position_embeddings, attention_mask, shared_kv_states,
                past_key_values=None, **kwargs):
        pattern_fn = kwargs.pop("pattern_fn", None)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        cos, sin = position_embeddings

        query_states = self.q_proj(hidden_states).view(hidden_shape)
        query_states = _norm_rope(self.q_norm, query_states, cos, sin, self._g4f_backend)
        query_states = _apply_hook(get_hook(self, "rot_q"), query_states)
        query_states = query_states.transpose(1, 2)

        if self.is_kv_shared_layer:
            key_states, value_states = shared_kv_states[self.layer_type]
            if key_states.device != query_states.device:
                key_states = key_states.to(query_states.device)
                value_states = value_states.to(query_states.device)
            cache_layer = _kv_source_layer(self.config, self.layer_type)
        else:
            key_states = self.k_proj(hidden_states).view(hidden_shape)
            value_states = self.v_proj(hidden_states).view(hidden_shape) if self.v_proj is not None else key_states

            key_states = _norm_rope(self.k_norm, key_states, cos, sin, self._g4f_backend)
            key_states = _apply_hook(get_hook(self, "rot_k"), key_states)
            key_states = key_states.transpose(1, 2)

            value_states = self.v_norm(value_states)
            value_states = value_states.transpose(1, 2)

            if past_key_values is not None:
                key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)
            cache_layer = self.layer_idx

        if self.store_full_length_kv:
            shared_kv_states[self.layer_type] = key_states, value_states

        scores_hook, pattern_hooks = seam_hooks(self, pattern_fn)
        if pattern_fn is not None or self.__dict__.get(WEIGHTS_VIA_SEAM):
            # TransformerLens's seam: the pattern reaches the bridge through ``pattern_fn`` (only when hooked);
            # returning it as well would make the bridge re-fire it post hoc as ``hook_attn_scores``. A bridge's
            # unwrapped twin (``bridge_integration.quiet``) is marked instead: it runs with no pattern hook.
            want = False
        else:
            want = kwargs.get("output_attentions")
            if want is None:
                want = getattr(self.config, "output_attentions", False)
        valid_len_fn = kv_lens = None
        if getattr(past_key_values, "is_gemma4_fast_decode_cache", False):
            attention_mask, kv_lens, start = past_key_values.attention_inputs(
                query_states.shape[-2], hooked=bool(scores_hook is not None or pattern_hooks or want),
                window=self.sliding_window)
            if start:
                key_states, value_states = key_states[:, :, start:], value_states[:, :, start:]
        elif past_key_values is not None:
            valid_len_fn = functools.partial(_static_total, past_key_values, cache_layer)

        attn_output, attn_weights = attention_core(
            query_states, key_states, value_states, attention_mask,
            scale=self.scaling, window=self.sliding_window,
            softcap=getattr(self.config, "attn_logit_softcapping", None), causal=self.is_causal,
            backend=self._g4f_backend, scores_hook=scores_hook, pattern_hooks=pattern_hooks,
            want_weights=bool(want), dropout=float(self.attention_dropout or 0.0) if self.training else 0.0,
            valid_len_fn=valid_len_fn, kv_lens=kv_lens,
        )
        attn_output = attn_output.transpose(1, 2).reshape(*input_shape, -1).contiguous()
        attn_output = self.o_proj(attn_output)
        return attn_output, attn_weights
