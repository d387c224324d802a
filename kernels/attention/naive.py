"""Plain PyTorch reference for Gemma 4 attention: mirrors ``eager_attention_forward``.

Mirrors ``transformers.models.gemma4.modeling_gemma4.eager_attention_forward`` (repeat_kv, scores
``q @ k^T * scaling``, optional ``softcap * tanh(s / softcap)``, fp32 softmax cast back to the query
dtype, ``p @ v``) together with the masks of ``transformers.masking_utils``
(``causal_mask_function``, ``sliding_window_overlay`` / ``sliding_window_causal_mask_function``,
``padding_mask_function``).

Conventions shared with the Triton versions (``gemma4_fast.kernels.attention``):

- q ``[B, Hq, Sq, D]``, k / v ``[B, Hkv, Sk, D]``, Hq a multiple of Hkv (GQA: query head ``h`` reads
  key/value head ``h // (Hq // Hkv)``).
- Queries sit at the end of the keys: query ``i`` has position ``Sk - Sq + i``.
- Key ``j`` is visible to query ``i`` (position ``p``) iff, with ``causal``, ``0 <= p - j`` and, with
  ``window=W``, ``p - j < W``; without ``causal`` every key is visible, or with ``window=W`` those with
  ``|p - j| < W``. ``key_padding_mask`` ``[B, Sk]`` (True = real key) hides padded keys.
- Masked scores are ``-inf``; masked probabilities are 0; a query row with no visible key gets an
  all-zero pattern, a zero output and ``lse = -inf`` (HF's additive ``finfo.min`` mask would instead
  spread such a row uniformly; the difference only concerns fully padded rows).
- Outputs ``o`` are ``[B, Hq, Sq, D]`` views of ``[B, Sq, Hq, D]``-contiguous buffers.

Everything here is differentiable and runs on any device and dtype (float64 included): the tests use
it as the high-precision reference by upcasting inputs.
"""
from __future__ import annotations

from typing import Optional

import torch


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[B, Hkv, S, D] -> [B, Hkv * n_rep, S, D]`` (HF ``repeat_kv``)."""
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def visible_mask(sq: int, sk: int, *, window: Optional[int] = None, causal: bool = True,
                 key_padding_mask: Optional[torch.Tensor] = None, kv_lens: Optional[torch.Tensor] = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean visibility ``[B or 1, 1, Sq, Sk]``: True where query ``i`` may attend key ``j``.

    Query ``i`` has position ``Sk - Sq + i`` (queries at the end of the keys); with ``kv_lens`` ``[B]``
    (valid keys per batch row) position ``kv_lens[b] - Sq + i``, and keys ``j >= kv_lens[b]`` are hidden.
    """
    if key_padding_mask is not None:
        device = key_padding_mask.device
    if kv_lens is not None:
        device = kv_lens.device
        end = kv_lens.to(torch.long)[:, None, None]
        pos = torch.arange(sq, device=device)[None, :, None] + (end - sq)
    else:
        end = sk
        pos = (torch.arange(sq, device=device) + (sk - sq))[None, :, None]
    j = torch.arange(sk, device=device)[None, None, :]
    diff = pos - j
    if causal:
        vis = diff >= 0
        if window is not None:
            vis = vis & (diff < window)
    elif window is not None:
        vis = diff.abs() < window
    else:
        vis = torch.ones_like(diff, dtype=torch.bool)
    vis = (vis & (j < end))[:, None]
    if key_padding_mask is not None:
        vis = vis & key_padding_mask.to(torch.bool)[:, None, None, :]
    return vis


def softmax_scores(scores: torch.Tensor) -> torch.Tensor:
    """Probabilities from (possibly hook-edited) scores ``[..., Sk]``.

    fp32 softmax over the last dim, cast back to ``scores.dtype``; rows whose scores are all ``-inf``
    give zeros (never NaN). Plain PyTorch; also the fast-path implementation (memory-bound, three
    passes over the scores).
    """
    s = scores.float()
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    e = torch.exp(s - m)
    denom = e.sum(dim=-1, keepdim=True)
    p = torch.where(denom > 0, e / torch.where(denom > 0, denom, torch.ones_like(denom)), torch.zeros_like(e))
    return p.to(scores.dtype)


def _as_bshd_view(o: torch.Tensor) -> torch.Tensor:
    """``[B, H, S, D]`` -> the same values as a view of a ``[B, S, H, D]``-contiguous buffer."""
    return o.transpose(1, 2).contiguous().transpose(1, 2)


def _check_window(window: Optional[int]) -> None:
    if window is not None and int(window) < 1:
        raise ValueError(f"window must be None or >= 1, got {window}")


def attention_scores_naive(q: torch.Tensor, k: torch.Tensor, *, scale: Optional[float] = None,
                           window: Optional[int] = None, softcap: Optional[float] = None,
                           causal: bool = True, key_padding_mask: Optional[torch.Tensor] = None,
                           kv_lens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Scores ``[B, Hq, Sq, Sk]`` in q's dtype: ``q @ k^T * scale``, softcapped, masked with ``-inf``.

    Arguments as :func:`attention_naive`. Computed in q's dtype like HF's eager path.
    """
    _check_window(window)
    d = q.shape[-1]
    scale = d ** -0.5 if scale is None else float(scale)
    k = repeat_kv(k, q.shape[1] // k.shape[1])
    s = torch.matmul(q, k.transpose(2, 3)) * scale
    if softcap is not None:
        s = torch.tanh(s / float(softcap)) * float(softcap)
    vis = visible_mask(q.shape[2], k.shape[2], window=window, causal=causal,
                       key_padding_mask=key_padding_mask, kv_lens=kv_lens, device=q.device)
    return s.masked_fill(~vis, float("-inf"))


def attention_pattern_naive(q: torch.Tensor, k: torch.Tensor, *, scale: Optional[float] = None,
                            window: Optional[int] = None, softcap: Optional[float] = None,
                            causal: bool = True, key_padding_mask: Optional[torch.Tensor] = None,
                            lse: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Probabilities ``[B, Hq, Sq, Sk]`` in q's dtype (masked = 0, empty rows all 0).

    Without ``lse``: HF's fp32 softmax of the (q-dtype) scores. With ``lse`` ``[B, Hq, Sq]`` (natural
    log, fp32): ``exp(scores - lse)`` on visible keys, the rule the Triton pattern kernel applies.
    """
    s = attention_scores_naive(q, k, scale=scale, window=window, softcap=softcap, causal=causal,
                               key_padding_mask=key_padding_mask)
    if lse is None:
        return softmax_scores(s)
    sf = s.to(torch.promote_types(s.dtype, torch.float32))
    lse = lse.to(sf.dtype)[..., None]
    p = torch.exp(sf - torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse))
    return torch.where(torch.isneginf(sf), torch.zeros_like(p), p).to(q.dtype)


def pattern_apply_naive(pattern: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``pattern @ v`` with GQA: pattern ``[B, Hq, Sq, Sk]``, v ``[B, Hkv, Sk, D]`` -> ``[B, Hq, Sq, D]``.

    The result has v's dtype and is a view of a ``[B, Sq, Hq, D]``-contiguous buffer.
    """
    vr = repeat_kv(v, pattern.shape[1] // v.shape[1])
    return _as_bshd_view(torch.matmul(pattern.to(v.dtype), vr))


def attention_naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float] = None,
                    window: Optional[int] = None, softcap: Optional[float] = None, causal: bool = True,
                    key_padding_mask: Optional[torch.Tensor] = None, return_lse: bool = False,
                    kv_lens: Optional[torch.Tensor] = None):
    """Reference attention (HF ``eager_attention_forward`` plus masking_utils masks).

    Args:
        q: ``[B, Hq, Sq, D]``. k, v: ``[B, Hkv, Sk, D]`` (Hq a multiple of Hkv, Sk >= Sq), q's dtype.
        scale: multiplier of ``q @ k^T``; None means ``D ** -0.5``.
        window: sliding window W (key visible iff ``0 <= pos - j < W``), None for none.
        softcap: ``s = softcap * tanh(s / softcap)`` after scaling, None for none.
        causal: causal masking (queries at the end of the keys); False attends everything (or the
            symmetric band ``|pos - j| < W`` with a window).
        key_padding_mask: ``[B, Sk]`` bool, True = real key.
        return_lse: also return the fp32 natural-log sum-exp ``[B, Hq, Sq]`` (``-inf`` for empty rows).
        kv_lens: ``[B]`` int valid keys per batch row (a preallocated cache filled from the start); the
            queries sit at the end of those keys, later keys are hidden.

    Returns:
        ``o`` ``[B, Hq, Sq, D]`` (view of a ``[B, Sq, Hq, D]`` buffer), or ``(o, lse)``.
    """
    s = attention_scores_naive(q, k, scale=scale, window=window, softcap=softcap, causal=causal,
                               key_padding_mask=key_padding_mask, kv_lens=kv_lens)
    o = pattern_apply_naive(softmax_scores(s), v).to(q.dtype)
    if not return_lse:
        return o
    lse = torch.logsumexp(s.to(torch.promote_types(s.dtype, torch.float32)), dim=-1)
    return o, lse.to(torch.float32) if s.dtype != torch.float64 else lse
