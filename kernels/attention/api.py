"""Public attention ops: validation, path choice, config choice, allocation, launch.

``attention`` (prefill / chunked prefill / decode), ``attention_scores``, ``attention_pattern``,
``pattern_apply`` and ``softmax_scores`` (the hook entry points). The kernels live in ``fwd.py`` and
``pattern.py``; the references in ``naive.py``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._common import can_launch, device_of, log_once, needs_grad, sm_count
from . import configs as _configs
from .naive import (attention_naive, attention_pattern_naive, attention_scores_naive, pattern_apply_naive,
                    softmax_scores as softmax_scores_naive)


MAX_HEAD_DIM = 512
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _new_empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocator of every output and scratch buffer (tests replace it with a NaN-filled one)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _mode(window, causal: bool) -> str:
    if window is not None:
        return "window"
    return "causal" if causal else "full"


def _unit_last(name: str, t: torch.Tensor) -> torch.Tensor:
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        log_once(f"copy-{name}", "attention: %s has a non-unit last stride; copying it contiguous", name)
        return t.contiguous()
    return t


def _validate(q, k, v, scale, window, softcap, key_padding_mask):
    """Check shapes / dtypes / options; returns normalised ``(q, k, v, scale, window, softcap, kpm)``."""
    for name, t in (("q", q), ("k", k)) + ((("v", v),) if v is not None else ()):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, H, S, D], got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t)}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype}, expected q's dtype {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, expected q's device {q.device}")
    B, Hq, Sq, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k must be [B={B}, Hkv, Sk, D={D}], got {tuple(k.shape)}")
    if v is not None and v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    Hkv, Sk = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"q heads ({Hq}) must be a multiple of k/v heads ({Hkv})")
    if Sq > Sk:
        raise ValueError(f"q has more positions ({Sq}) than k ({Sk}): queries sit at the end of the keys")
    if D > MAX_HEAD_DIM:
        raise ValueError(f"head_dim (q.shape[-1]) = {D} exceeds the supported maximum {MAX_HEAD_DIM}")
    if window is not None:
        window = int(window)
        if window < 1:
            raise ValueError(f"window must be None or >= 1, got {window}")
    if softcap is not None:
        softcap = float(softcap)
        if not softcap > 0:
            raise ValueError(f"softcap must be None or > 0, got {softcap}")
    scale = D ** -0.5 if scale is None else float(scale)
    kpm = key_padding_mask
    if kpm is not None:
        if kpm.shape != (B, Sk):
            raise ValueError(f"key_padding_mask must be [B={B}, Sk={Sk}], got {tuple(kpm.shape)}")
        if kpm.dtype != torch.bool:
            raise ValueError(f"key_padding_mask must be bool (True = real key), got {kpm.dtype}")
        if kpm.device != q.device:
            raise ValueError(f"key_padding_mask is on {kpm.device}, expected {q.device}")
    return q, k, v, scale, window, softcap, kpm


def _kpm_u8(kpm: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if kpm is None:
        return None
    if kpm.stride(-1) != 1:
        kpm = kpm.contiguous()
    return kpm.view(torch.uint8)


def _fast_ok(op: str, *tensors) -> bool:
    """Whether the Triton path applies; logs (once per reason) why not."""
    if needs_grad(*tensors):
        log_once(f"{op}-grad", "%s: inputs require grad; using the differentiable PyTorch reference", op)
        return False
    if not can_launch(tensors[0]):
        log_once(f"{op}-dev", "%s: no Triton backend for %s tensors; using the PyTorch reference", op,
                  tensors[0].device.type)
        return False
    if tensors[0].dtype not in _DTYPES:
        log_once(f"{op}-dtype", "%s: dtype %s has no kernel; using the PyTorch reference", op, tensors[0].dtype)
        return False
    return True


def use_split_path(groups: int, sq: int, head_dim: int) -> bool:
    """Decode / short query blocks: all query rows of a KV head fit one tile of the split kernel."""
    if sq > 16:
        return False
    from .fwd import split_rows
    return split_rows(groups, sq) * _configs.block_d(head_dim) <= 16384


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float] = None,
              window: Optional[int] = None, softcap: Optional[float] = None, causal: bool = True,
              key_padding_mask: Optional[torch.Tensor] = None, return_lse: bool = False,
              kv_lens: Optional[torch.Tensor] = None):
    """Fused attention for Gemma 4 (sliding window, softcap, GQA, head_dim <= 512) through Triton.

    Layout: HF hands q/k/v as ``.transpose(1, 2)`` views of ``[B, S, H, D]`` projections; any strides
    are accepted as long as the last (D) stride is 1 (otherwise the tensor is copied, logged once). No
    repeat_kv copy is made for GQA. ``k`` and ``v`` may be the same tensor (read once then).

    Args:
        q: ``[B, Hq, Sq, D]``, bf16 / fp16 / fp32. Query ``i`` has position ``Sk - Sq + i`` (queries
            at the end of the keys: prefill when Sq == Sk, chunked prefill or decode with a KV cache).
        k: ``[B, Hkv, Sk, D]``, q's dtype and device; Hq must be a multiple of Hkv (query head ``h``
            reads key head ``h // (Hq // Hkv)``); Sk >= Sq; D <= 512.
        v: ``[B, Hkv, Sk, D]``, same shape, dtype and device as k (may be k itself).
        scale: float multiplier of ``q @ k^T``; None means ``D ** -0.5`` (Gemma 4 passes 1.0).
        window: int >= 1 or None. With ``causal``, key ``j`` is visible to position ``p`` iff
            ``0 <= p - j < window`` (HF's sliding-window mask); key blocks outside the band are skipped,
            so the cost is O(Sq * window). Without ``causal``: ``|p - j| < window``.
        softcap: float > 0 or None: scores become ``softcap * tanh(s / softcap)`` after scaling and
            before masking; None is HF's no-softcap path.
        causal: bool; True (default) for the causal mask, False for bidirectional attention.
        key_padding_mask: ``[B, Sk]`` bool (True = real key), e.g. left padding from a 2-D attention
            mask; padded keys are never attended and a query row with no visible key returns zeros.
        return_lse: also return the log-sum-exp.
        kv_lens: ``[B]`` int32 on q's device, or None: the number of valid keys of each batch row in a
            preallocated buffer (``1 <= kv_lens[b] <= Sk``, filled from key 0); query ``i`` then has
            position ``kv_lens[b] - Sq + i`` and later keys are ignored. Read on the device (no host
            sync, so a CUDA graph can replay the call as the lengths grow). Only for the decode path
            (``Sq <= 16`` with few query rows per KV head); raises ``ValueError`` otherwise.

    Returns:
        ``o``: ``[B, Hq, Sq, D]`` in q's dtype, a view of a ``[B, Sq, Hq, D]``-contiguous buffer (so
        ``o.transpose(1, 2).reshape(B, Sq, Hq * D)`` is free); with ``return_lse``, ``(o, lse)`` where
        ``lse`` is ``[B, Hq, Sq]`` fp32, the natural-log sum-exp of the final (scaled, softcapped)
        scores over visible keys, ``-inf`` for rows with no visible key.

    Paths: ``Sq <= 16`` with few rows per KV head (decode) uses the split-key kernel (grid over key
    chunks x KV heads, GQA heads packed into rows, then a combine kernel; where the tuned config says
    ``KEYS_AS_ROWS``, e.g. head_dim 512 on the H100, its transposed form in ``decode.py``); everything else the
    prefill kernel. Inputs that need gradients, tensors without a Triton backend and other dtypes go to
    ``attention_naive`` (logged once per reason). Raises ``ValueError`` naming the argument for bad
    shapes, dtypes, head_dim > 512, window < 1 or softcap <= 0.
    """
    q, k, v, scale, window, softcap, kpm = _validate(q, k, v, scale, window, softcap, key_padding_mask)
    kv_lens = _validate_kv_lens(kv_lens, q, k)
    if not _fast_ok("attention", q, k, v):
        return attention_naive(q, k, v, scale=scale, window=window, softcap=softcap, causal=causal,
                               key_padding_mask=kpm, return_lse=return_lse, kv_lens=kv_lens)
    q, k, v = _unit_last("q", q), _unit_last("k", k), _unit_last("v", v)
    B, Hq, Sq, D = q.shape
    o_buf = _new_empty((B, Sq, Hq, D), q.dtype, q.device)
    o = o_buf.permute(0, 2, 1, 3)
    lse = _new_empty((B, Hq, Sq), torch.float32, q.device) if return_lse else None
    if o.numel() > 0:
        _launch(q, k, v, o, lse, _kpm_u8(kpm), scale, window, softcap, causal, kv_lens=kv_lens)
    elif lse is not None and lse.numel() > 0:
        lse.fill_(float("-inf"))
    return (o, lse) if return_lse else o


def _validate_kv_lens(kv_lens, q, k):
    if kv_lens is None:
        return None
    B, Hq, Sq, D = q.shape
    if not isinstance(kv_lens, torch.Tensor) or kv_lens.shape != (B,):
        raise ValueError(f"kv_lens must be a [B={B}] tensor, got "
                         f"{tuple(kv_lens.shape) if isinstance(kv_lens, torch.Tensor) else type(kv_lens)}")
    if kv_lens.dtype != torch.int32 or kv_lens.device != q.device:
        raise ValueError(f"kv_lens must be int32 on {q.device}, got {kv_lens.dtype} on {kv_lens.device}")
    if not use_split_path(Hq // k.shape[1], Sq, D):
        raise ValueError(f"kv_lens is only supported on the decode path (Sq <= 16 with few query rows per KV "
                         f"head); got Sq={Sq}, {Hq // k.shape[1]} query heads per KV head, head_dim {D}")
    return kv_lens.contiguous()


def _launch(q, k, v, o, lse, kpm, scale, window, softcap, causal, write_o: bool = True, kv_lens=None) -> None:
    from .fwd import attention_fwd, attention_split_fwd
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    mode = _mode(window, causal)
    with device_of(q):
        if write_o and use_split_path(Hq // Hkv, Sq, D):
            cfg = _configs.select_config("split", D, q.dtype, mode, Sk, q.device)
            attention_split_fwd(q, k, v, o, lse, kpm, scale=scale, window=window, softcap=softcap,
                                causal=causal, config=cfg, sm_count=sm_count(q.device), new_empty=_new_empty,
                                kv_lens=kv_lens)
        else:
            cfg = _configs.select_config("fwd", D, q.dtype, mode, Sk, q.device)
            if cfg.get("HOPPER"):
                if _try_hopper(q, k, v, o if write_o else None, lse, kpm, scale, window, softcap, causal, cfg):
                    return
                cfg = _configs.portable_config(D, q.element_size(), _configs.capability_of(q.device))
            cfg.setdefault("HEADS_INNER", int(_configs.heads_inner_default(D, window, causal, Sq)))
            attention_fwd(q, k, v, o if write_o else None, lse, kpm, scale=scale, window=window,
                          softcap=softcap, causal=causal, config=cfg, write_o=write_o)


def _try_hopper(q, k, v, o, lse, kpm, scale, window, softcap, causal, cfg) -> bool:
    """Run the Gluon sm_90 prefill kernel (``hopper.py``) when it takes the call; otherwise log why (once per
    reason) and return False so the caller runs the portable kernel."""
    try:
        from .hopper import attention_hopper_fwd, hopper_unsupported
    except ImportError:
        why = "needs Triton's Gluon Hopper API (Triton >= 3.6)"
    else:
        why = hopper_unsupported(q, k, v, o, window, softcap, causal, kpm)
        if why is None:
            attention_hopper_fwd(q, k, v, o, lse, scale=scale, window=window, config=cfg)
            return True
    log_once(f"attention-hopper-{why}", "attention: a head_dim-%d call %s; using the portable kernel", q.shape[3], why)
    return False


def attention_lse(q: torch.Tensor, k: torch.Tensor, *, scale: Optional[float] = None,
                  window: Optional[int] = None, softcap: Optional[float] = None, causal: bool = True,
                  key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Only the fp32 LSE ``[B, Hq, Sq]`` of :func:`attention` (no V reads, no output).

    Arguments as :func:`attention` without ``v``; used by :func:`attention_pattern`.
    """
    q, k, _, scale, window, softcap, kpm = _validate(q, k, None, scale, window, softcap, key_padding_mask)
    if not _fast_ok("attention_lse", q, k):
        s = attention_scores_naive(q, k, scale=scale, window=window, softcap=softcap, causal=causal,
                                   key_padding_mask=kpm)
        return torch.logsumexp(s.float(), dim=-1)
    q, k = _unit_last("q", q), _unit_last("k", k)
    B, Hq, Sq, _ = q.shape
    lse = _new_empty((B, Hq, Sq), torch.float32, q.device)
    if lse.numel() > 0:
        _launch(q, k, k, None, lse, _kpm_u8(kpm), scale, window, softcap, causal, write_o=False)
    return lse


def _scores_common(op, q, k, scale, window, softcap, causal, kpm, lse):
    from .pattern import attention_scores_fwd
    q, k = _unit_last("q", q), _unit_last("k", k)
    B, Hq, Sq, D = q.shape
    Sk = k.shape[2]
    out = _new_empty((B, Hq, Sq, Sk), q.dtype, q.device)
    if out.numel() == 0:
        return out
    cfg = _configs.select_config("scores", D, q.dtype, _mode(window, causal), Sk, q.device)
    with device_of(q):
        attention_scores_fwd(q, k, out, lse, _kpm_u8(kpm), scale=scale, window=window, softcap=softcap,
                             causal=causal, config=cfg)
    return out


def attention_scores(q: torch.Tensor, k: torch.Tensor, *, scale: Optional[float] = None,
                     window: Optional[int] = None, softcap: Optional[float] = None, causal: bool = True,
                     key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention scores for the ``scores`` hook: ``[B, Hq, Sq, Sk]`` in q's dtype.

    Args: q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Sk, D]`` and the keyword options exactly as
    :func:`attention`. Returns the scores after scale and softcap, masked positions ``-inf``; for a
    window only the tiles meeting the band compute dot products, the rest are written as ``-inf``.
    Gradients / no backend: ``attention_scores_naive``.
    """
    q, k, _, scale, window, softcap, kpm = _validate(q, k, None, scale, window, softcap, key_padding_mask)
    if not _fast_ok("attention_scores", q, k):
        return attention_scores_naive(q, k, scale=scale, window=window, softcap=softcap, causal=causal,
                                      key_padding_mask=kpm)
    return _scores_common("attention_scores", q, k, scale, window, softcap, causal, kpm, None)


def attention_pattern(q: torch.Tensor, k: torch.Tensor, *, scale: Optional[float] = None,
                      window: Optional[int] = None, softcap: Optional[float] = None, causal: bool = True,
                      key_padding_mask: Optional[torch.Tensor] = None,
                      lse: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention probabilities for the ``pattern`` hook: ``[B, Hq, Sq, Sk]`` in q's dtype.

    Args: q ``[B, Hq, Sq, D]``, k ``[B, Hkv, Sk, D]`` and the keyword options as :func:`attention`;
    ``lse``: optional ``[B, Hq, Sq]`` fp32 natural-log sum-exp from ``attention(..., return_lse=True)``
    (computed by an LSE-only pass of the fast kernel when None). Each tile is written exactly as
    ``exp(s - lse)`` (rows sum to 1 over visible keys), masked entries and tiles outside the band 0,
    rows without a visible key all 0. Gradients / no backend: ``attention_pattern_naive``.
    """
    q, k, _, scale, window, softcap, kpm = _validate(q, k, None, scale, window, softcap, key_padding_mask)
    if not _fast_ok("attention_pattern", q, k):
        return attention_pattern_naive(q, k, scale=scale, window=window, softcap=softcap, causal=causal,
                                       key_padding_mask=kpm, lse=lse)
    if lse is None:
        lse = attention_lse(q, k, scale=scale, window=window, softcap=softcap, causal=causal,
                            key_padding_mask=kpm)
    else:
        B, Hq, Sq = q.shape[:3]
        if lse.shape != (B, Hq, Sq):
            raise ValueError(f"lse must be [B={B}, Hq={Hq}, Sq={Sq}], got {tuple(lse.shape)}")
        lse = lse.to(device=q.device, dtype=torch.float32).contiguous()
    return _scores_common("attention_pattern", q, k, scale, window, softcap, causal, kpm, lse)


def pattern_apply(pattern: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``o = pattern @ v`` with GQA, after a hook edited the pattern.

    Args:
        pattern: ``[B, Hq, Sq, Sk]`` probabilities (any float dtype; cast to v's dtype).
        v: ``[B, Hkv, Sk, D]``, Hq a multiple of Hkv.

    Returns ``[B, Hq, Sq, D]`` in v's dtype, a view of a ``[B, Sq, Hq, D]``-contiguous buffer. Done by
    one batched torch matmul with the query heads of each KV group stacked along the rows (no repeat_kv
    copy), then one copy into the output layout. Gradients: ``pattern_apply_naive``.
    """
    from .pattern import pattern_apply_matmul
    if pattern.dim() != 4 or v.dim() != 4:
        raise ValueError(f"pattern must be [B, Hq, Sq, Sk] and v [B, Hkv, Sk, D], got {tuple(pattern.shape)} "
                         f"and {tuple(v.shape)}")
    B, Hq, Sq, Sk = pattern.shape
    if v.shape[0] != B or v.shape[2] != Sk or Hq % v.shape[1] != 0:
        raise ValueError(f"v must be [B={B}, Hkv | {Hq}, Sk={Sk}, D], got {tuple(v.shape)}")
    if needs_grad(pattern, v):
        log_once("pattern_apply-grad", "pattern_apply: inputs require grad; using the PyTorch reference")
        return pattern_apply_naive(pattern, v)
    out = _new_empty((B, Sq, Hq, v.shape[3]), v.dtype, v.device)
    return pattern_apply_matmul(pattern, v, out)


def softmax_scores(scores: torch.Tensor) -> torch.Tensor:
    """Probabilities from (possibly hook-edited) attention scores: fp32 softmax over the last dim.

    Args:
        scores: ``[..., Sk]`` (e.g. ``[B, Hq, Sq, Sk]`` from :func:`attention_scores`), bf16 / fp16 / fp32;
            masked entries ``-inf``. Any layout (a non-contiguous tensor is copied once, logged).

    Returns:
        a contiguous tensor of ``scores``' shape and dtype: ``exp(s - max) / sum`` per row in fp32, rounded
        once; rows whose scores are all ``-inf`` give zeros (never NaN). One Triton program per row
        (``softmax.py``); inputs that need gradients, other dtypes or devices without a Triton backend run
        ``naive.softmax_scores`` (logged once per reason).
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() < 1:
        raise ValueError(f"scores must be a tensor with a last (key) dim, got {type(scores).__name__}")
    if not _fast_ok("softmax_scores", scores):
        return softmax_scores_naive(scores)
    from .softmax import select_config, softmax_scores_fwd
    if not scores.is_contiguous():
        log_once("copy-softmax", "softmax_scores: scores are not contiguous; copying them")
        scores = scores.contiguous()
    out = _new_empty(tuple(scores.shape), scores.dtype, scores.device)
    if out.numel() > 0:
        with device_of(scores):
            softmax_scores_fwd(scores, out, select_config(scores.shape[-1]))
    return out


__all__ = ["attention", "attention_lse", "attention_scores", "attention_pattern", "pattern_apply",
           "softmax_scores", "use_split_path", "MAX_HEAD_DIM"]
