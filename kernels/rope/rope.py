"""Fused Triton RoPE for Gemma 4: ``x * cos + rotate_half(x) * sin`` in one read and one write of x.

Semantics are those of ``naive.py`` (HF ``apply_rotary_pos_emb(x, cos, sin, unsqueeze_dim=2)``) with one
difference in rounding: the kernel computes in fp32 and rounds once to x's dtype, where HF rounds each
product and the sum in x's dtype. In float32 the two agree to about one ulp; in bfloat16/float16 the
kernel is at least as accurate as HF's arithmetic.

Scope and limits:
  * x ``[B, S, H, D]`` with last-dim stride 1 and any strides on B, S and H (q and k come straight from
    the per-head norms as views); cos/sin ``[B, S, D]`` or ``[1, S, D]`` (broadcast over the batch),
    last-dim stride 1. Other last-dim strides are copied once (logged). Outputs are contiguous.
  * D even and at most ``MAX_HEAD_DIM`` (1024; Gemma 4 uses 256 and 512); any S and H.
  * dtypes float16 / bfloat16 / float32; cos and sin must have x's dtype (HF casts them so).
  * no special case for partial RoPE: Gemma 4's "proportional" full-attention layers pass cos = 1 and
    sin = 0 on the non-rotated frequencies, which the general formula handles.
  * forward only: when autograd needs gradients the public functions run the naive op (logged once);
    ``gemma4_fast.ops.rope`` instead keeps this forward and recomputes the naive op for the backward.

Grid: (token blocks of ``BLOCK_S`` positions, batch, head groups of ``HEADS`` heads). A program loads
the ``[BLOCK_S, D]`` cos/sin tile once and rotates its heads with it; ``rope_qk`` runs the q heads and
the k heads in one launch (head groups of q first, then of k). ``rms_norm_rope`` runs the same kernel with
``NORM``: each head row is RMS-normalised and scaled first (the query/key norm fused into the rotation).

Configs: ``rope_configs`` names the candidates, ``default_config`` picks one from the head dim, the
token count (bucketed) and whether there is more than one head, and the env var ``GEMMA4_FAST_ROPE_CONFIG``
pins one (JSON, e.g. '{"BLOCK_S": 4, "HEADS": 2, "num_warps": 1}').
"""
from __future__ import annotations

import functools
import os
from typing import Any, Optional

import torch
import triton
import triton.language as tl

from .._common import can_launch, device_of, log_once, needs_grad, next_power_of_2, pinned_config
from .naive import rms_norm_rope_naive, rope_naive, rope_qk_naive


CONFIG_ENV = "GEMMA4_FAST_ROPE_CONFIG"
MAX_HEAD_DIM = 1024
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# --------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------

@triton.jit
def _rotate_heads(X, OUT, h0, H, b, rows, cols, mask, S, HALF, sxb, sxs, sxh, c1, c2, s1, s2, w1, w2, eps, DIM,
                  HEADS: tl.constexpr, NORM: tl.constexpr):
    """Rotate heads ``h0 .. h0 + HEADS - 1`` (those below H) of the ``[BLOCK_S]`` positions ``rows`` of
    batch ``b``; X is strided, OUT contiguous ``[B, S, H, 2 * HALF]``. With NORM each head row is first
    RMS-normalised over its DIM elements and scaled by (w1, w2), in fp32, and rounded to OUT's dtype (what
    the norm module returns), then rotated."""
    xrow = b.to(tl.int64) * sxb + rows.to(tl.int64) * sxs
    orow = (b.to(tl.int64) * S + rows.to(tl.int64)) * H
    for i in tl.static_range(HEADS):
        h = h0 + i
        m = mask & (h < H)
        xo = (xrow + h.to(tl.int64) * sxh)[:, None] + cols[None, :]
        x1 = tl.load(X + xo, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(X + xo + HALF, mask=m, other=0.0).to(tl.float32)
        if NORM:
            ms = tl.div_rn(tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1), DIM)
            inv = tl.div_rn(tl.full(ms.shape, 1.0, tl.float32), tl.sqrt_rn(ms + eps))
            x1 = (x1 * inv[:, None] * w1[None, :]).to(OUT.dtype.element_ty).to(tl.float32)
            x2 = (x2 * inv[:, None] * w2[None, :]).to(OUT.dtype.element_ty).to(tl.float32)
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
        oo = ((orow + h) * (2 * HALF))[:, None] + cols[None, :]
        tl.store(OUT + oo, y1.to(OUT.dtype.element_ty), mask=m)
        tl.store(OUT + oo + HALF, y2.to(OUT.dtype.element_ty), mask=m)


@triton.jit
def rope_fwd_kernel(
    X, K, COS, SIN, OX, OK, W,
    S, HX, HK, GX, HALF, eps, DIM,
    sxb, sxs, sxh, skb, sks, skh, scb, scs, ssb, sss,
    HAS_K: tl.constexpr, HEADS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, NORM: tl.constexpr,
):
    """OX = X * COS + rotate_half(X) * SIN (and OK from K when HAS_K), in fp32, rounded once.

    NORM (without HAS_K): X is first RMS-normalised per head row (``DIM = 2 * HALF`` as fp32, ``eps``) and
    scaled by W ``[2 * HALF]``, rounded to OX's dtype, as the norm module before the rotation returns it.

    X ``[B, S, HX, 2 * HALF]`` and K ``[B, S, HK, 2 * HALF]`` strided (last dim stride 1), COS/SIN
    ``[B, S, 2 * HALF]`` strided (batch stride 0 to broadcast), OX/OK contiguous. Program (i, b, g):
    positions ``i * BLOCK_S ...`` of batch b, head group g (of X while g < GX, else of K).
    """
    pid_s = tl.program_id(0)
    b = tl.program_id(1)
    g = tl.program_id(2)
    rows = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    cols = tl.arange(0, BLOCK_H)
    mask = (rows < S)[:, None] & (cols < HALF)[None, :]
    co = (b.to(tl.int64) * scb + rows.to(tl.int64) * scs)[:, None] + cols[None, :]
    so = (b.to(tl.int64) * ssb + rows.to(tl.int64) * sss)[:, None] + cols[None, :]
    c1 = tl.load(COS + co, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + co + HALF, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + so, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + so + HALF, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        w1 = tl.load(W + cols, mask=cols < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(W + HALF + cols, mask=cols < HALF, other=0.0).to(tl.float32)
    else:
        w1 = 1.0
        w2 = 1.0
    if HAS_K:
        if g < GX:
            _rotate_heads(X, OX, g * HEADS, HX, b, rows, cols, mask, S, HALF, sxb, sxs, sxh,
                          c1, c2, s1, s2, w1, w2, eps, DIM, HEADS, False)
        else:
            _rotate_heads(K, OK, (g - GX) * HEADS, HK, b, rows, cols, mask, S, HALF, skb, sks, skh,
                          c1, c2, s1, s2, w1, w2, eps, DIM, HEADS, False)
    else:
        _rotate_heads(X, OX, g * HEADS, HX, b, rows, cols, mask, S, HALF, sxb, sxs, sxh,
                      c1, c2, s1, s2, w1, w2, eps, DIM, HEADS, NORM)


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------

def token_bucket(n_tokens: int) -> int:
    """Token-count bucket used as a config key: a power of two, at least 16, at most 1 << 20."""
    return min(max(next_power_of_2(n_tokens), 16), 1 << 20)


def rope_configs(head_dim: int) -> list[dict[str, int]]:
    """Candidate configs for a head dim (what a tuning sweep tries).

    Keys: BLOCK_S (positions per program), HEADS (heads per program, sharing one cos/sin tile),
    num_warps. Candidates keep 8 or 16 fp32 elements of each of the six live ``[BLOCK_S, D/2]`` tiles
    (x halves, cos/sin halves) per thread.
    """
    bh = next_power_of_2(max(head_dim // 2, 1))
    out = []
    for bs in (1, 2, 4, 8, 16, 32, 64):
        for nw in (1, 2, 4, 8):
            per_thread = bs * bh // (32 * nw)
            if per_thread in (8, 16):
                for heads in (1, 2, 4, 8):
                    out.append({"BLOCK_S": bs, "HEADS": heads, "num_warps": nw})
    return out


def default_config(head_dim: int, n_tokens: int, n_heads: int = 8) -> dict[str, int]:
    """Heuristic config: one warp per program holding 8 fp32 elements of each ``[BLOCK_S, D/2]`` tile a thread
    (2 positions at head dim 256, 1 at 512; fewer when there are fewer tokens), one head per program for a single
    head (a key), else 2 heads (head dim <= 256) or 4 (512 and up) sharing the cos/sin tile. Many small programs keep
    more loads in flight: on an H100 (``bench/bench_rope.py``, E2B's query and key shapes at 4k and 8k tokens) these
    ran within 0-11 % of the best candidate, where 4-warp programs of 16 positions and 4 heads ran 13-68 % slower."""
    bh = next_power_of_2(max(head_dim // 2, 1))
    bs = max(1, min(256 // bh, next_power_of_2(max(n_tokens, 1))))
    heads = 1 if n_heads <= 1 else (2 if bh <= 128 else 4)
    return {"BLOCK_S": bs, "HEADS": heads, "num_warps": 1}


@functools.lru_cache(maxsize=256)
def _default_cached(head_dim: int, bucket: int, n_heads: int) -> dict[str, int]:
    return default_config(head_dim, bucket, n_heads)


def pick_config(head_dim: int, n_tokens: int, n_heads: int = 8) -> dict[str, int]:
    """Pinned config (env ``GEMMA4_FAST_ROPE_CONFIG``), else ``default_config`` at the token bucket (``n_heads``:
    the heads of the tensor rotated, of q for ``rope_qk``)."""
    if os.environ.get(CONFIG_ENV):
        return {**default_config(head_dim, n_tokens, n_heads), **pinned_config(CONFIG_ENV)}
    return dict(_default_cached(head_dim, token_bucket(n_tokens), min(max(n_heads, 1), 2)))


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------

def _last_dim_unit(name: str, t: torch.Tensor) -> torch.Tensor:
    if t.shape[-1] > 1 and t.stride(-1) != 1:
        log_once(f"copy-{name}", "rope: %s has last-dim stride %d; copying to contiguous", name, t.stride(-1))
        return t.contiguous()
    return t


def _table_strides(t: torch.Tensor) -> tuple[int, int]:
    """(batch, position) strides of cos/sin ``[B|1, S, D]``; batch stride 0 when broadcast."""
    return (0 if t.shape[0] == 1 else t.stride(0)), t.stride(1)


def rope_fwd(x: torch.Tensor, k: Optional[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor,
             out_x: torch.Tensor, out_k: Optional[torch.Tensor], cfg: dict[str, int], *,
             norm_weight: Optional[torch.Tensor] = None, eps: float = 0.0) -> None:
    """Launch ``rope_fwd_kernel``: x ``[B, S, Hx, D]`` (and k ``[B, S, Hk, D]``) into contiguous
    ``out_x`` (``out_k``) with cos/sin ``[B|1, S, D]``; with ``norm_weight`` ``[D]`` (k must be None) x's head
    rows are RMS-normalised (``eps``) and scaled first. No validation."""
    if norm_weight is not None and k is not None:
        raise ValueError("rope_fwd: norm_weight applies to x alone (k must be None)")
    B, S, HX, D = x.shape
    x, cos, sin = _last_dim_unit("x", x), _last_dim_unit("cos", cos), _last_dim_unit("sin", sin)
    heads = cfg["HEADS"]
    gx = triton.cdiv(HX, heads)
    if k is not None:
        k = _last_dim_unit("k", k)
        HK = k.shape[2]
        gk, sk = triton.cdiv(HK, heads), k.stride()[:3]
    else:
        HK, gk, sk = 0, 0, (0, 0, 0)
    scb, scs = _table_strides(cos)
    ssb, sss = _table_strides(sin)
    grid = (triton.cdiv(S, cfg["BLOCK_S"]), B, gx + gk)
    with device_of(x):
        rope_fwd_kernel[grid](
            x, k, cos, sin, out_x, out_k, norm_weight,
            S, HX, HK, gx, D // 2, float(eps), float(D),
            x.stride(0), x.stride(1), x.stride(2), sk[0], sk[1], sk[2], scb, scs, ssb, sss,
            HAS_K=k is not None, HEADS=heads, BLOCK_S=cfg["BLOCK_S"], BLOCK_H=next_power_of_2(D // 2),
            NORM=norm_weight is not None, num_warps=cfg["num_warps"])


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def _shape_reason(name: str, x: Any, cos: Any, sin: Any) -> Optional[tuple[type, str]]:
    """(exception type, message) when x/cos/sin cannot take the kernel, else None. Device-agnostic."""
    for n, t in ((name, x), ("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor):
            return TypeError, f"{n} must be a torch.Tensor, got {type(t).__name__}"
    if x.dtype not in SUPPORTED_DTYPES:
        return TypeError, f"{name} has dtype {x.dtype}; supported: float16, bfloat16, float32"
    if x.dim() != 4:
        return ValueError, f"{name} must be 4-D [B, S, H, D], got shape {tuple(x.shape)}"
    B, S, _, D = x.shape
    if D % 2 or D > MAX_HEAD_DIM:
        return ValueError, f"{name} has head dim {D}; the kernel needs an even head dim <= {MAX_HEAD_DIM}"
    for n, t in (("cos", cos), ("sin", sin)):
        if t.dtype != x.dtype:
            return TypeError, f"{n} has dtype {t.dtype} but {name} has {x.dtype}; they must match"
        if t.device != x.device:
            return ValueError, f"{n} is on {t.device} but {name} is on {x.device}"
        if t.dim() != 3 or t.shape[0] not in (1, B) or tuple(t.shape[1:]) != (S, D):
            return ValueError, (f"{n} must have shape [{B}, {S}, {D}] or [1, {S}, {D}] to match {name} "
                                f"{tuple(x.shape)}, got {tuple(t.shape)}")
    return None


def unsupported_reason(x: Any, cos: Any, sin: Any) -> Optional[str]:
    """Why ``rope(x, cos, sin)`` would reject these inputs (dtype, shape, device mix), or None."""
    bad = _shape_reason("x", x, cos, sin)
    return None if bad is None else bad[1]


def _validate(name: str, x: Any, cos: Any, sin: Any) -> None:
    bad = _shape_reason(name, x, cos, sin)
    if bad is not None:
        raise bad[0](bad[1])


def _check_launchable(name: str, x: torch.Tensor) -> None:
    if not can_launch(x):
        where = "TRITON_INTERPRET=1 is not set" if x.device.type == "cpu" else "it is not a CUDA tensor"
        raise RuntimeError(f"{name} is on {x.device} and the Triton kernel cannot launch there ({where}); "
                           "use rope_naive for this device")


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, equal to HF ``apply_rotary_pos_emb(x, cos, sin, unsqueeze_dim=2)``.

    ``y = x * cos + rotate_half(x) * sin`` with ``rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])``,
    cos/sin broadcast over the heads; computed in fp32 and rounded once to x's dtype (one read of x and
    of the cos/sin tile per program, one write of y).

    Args:
        x: ``[B, S, H, D]`` float16 / bfloat16 / float32, CUDA (or CPU under ``TRITON_INTERPRET=1``);
            D even and <= 1024; any H (odd counts included) and S. Last dim stride 1 (else copied,
            logged); the B, S and H strides are free (e.g. a view of a fused projection).
        cos: ``[B, S, D]`` or ``[1, S, D]`` (broadcast over the batch), x's dtype and device; the
            cosine table of HF's rotary embedding. Non-rotated frequencies carry cos = 1.
        sin: same shape, dtype and device as required of cos; the sine table (0 where not rotated).

    Returns:
        ``[B, S, H, D]`` contiguous, x's dtype.

    Raises:
        TypeError / ValueError naming the argument for an unsupported dtype, shape or device mix;
        RuntimeError when x's device cannot launch Triton kernels.

    When autograd needs gradients (grad mode on and x, cos or sin requires grad) this runs
    ``rope_naive`` (logged once). Zero-element inputs return empty outputs without a launch.
    """
    _validate("x", x, cos, sin)
    if needs_grad(x, cos, sin):
        log_once("grad-rope", "rope: gradients requested; using the autograd-capable naive op")
        return rope_naive(x, cos, sin)
    if x.numel() == 0:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _check_launchable("x", x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rope_fwd(x, None, cos, sin, out, None, pick_config(x.shape[-1], x.shape[0] * x.shape[1], x.shape[2]))
    return out


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
            sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE of queries and keys in one launch: ``(rope(q, cos, sin), rope(k, cos, sin))``.

    Args:
        q: ``[B, S, Hq, D]`` float16 / bfloat16 / float32 (layout rules of ``rope``'s x).
        k: ``[B, S, Hk, D]``, q's dtype, device, B, S and D; Hk may differ from Hq (GQA, odd counts).
        cos: ``[B, S, D]`` or ``[1, S, D]``, q's dtype and device.
        sin: same as cos.

    Returns:
        ``(q_rot [B, S, Hq, D], k_rot [B, S, Hk, D])``, contiguous, q's dtype.

    Raises:
        TypeError / ValueError naming the argument for an unsupported dtype, shape or device mix;
        RuntimeError when the device cannot launch Triton kernels.

    Runs ``rope_qk_naive`` when autograd needs gradients (logged once).
    """
    _validate("q", q, cos, sin)
    if not isinstance(k, torch.Tensor):
        raise TypeError(f"k must be a torch.Tensor, got {type(k).__name__}")
    if k.dtype != q.dtype:
        raise TypeError(f"k has dtype {k.dtype} but q has {q.dtype}; they must match")
    if k.dim() != 4 or (k.shape[0], k.shape[1], k.shape[3]) != (q.shape[0], q.shape[1], q.shape[3]):
        raise ValueError(f"k has shape {tuple(k.shape)}; it must be 4-D and match q {tuple(q.shape)} in B, S and D")
    _validate("k", k, cos, sin)
    if needs_grad(q, k, cos, sin):
        log_once("grad-rope_qk", "rope_qk: gradients requested; using the autograd-capable naive op")
        return rope_qk_naive(q, k, cos, sin)
    out_q = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    out_k = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if q.numel() == 0 and k.numel() == 0:
        return out_q, out_k
    _check_launchable("q", q)
    cfg = pick_config(q.shape[-1], q.shape[0] * q.shape[1], q.shape[2])
    if q.numel() == 0 or k.numel() == 0:
        if q.numel():
            rope_fwd(q, None, cos, sin, out_q, None, cfg)
        else:
            rope_fwd(k, None, cos, sin, out_k, None, cfg)
        return out_q, out_k
    rope_fwd(q, k, cos, sin, out_q, out_k, cfg)
    return out_q, out_k


def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                  eps: float = 1e-6) -> torch.Tensor:
    """Per-head RMSNorm then RoPE in one pass: ``rope(rms_norm(x, weight, eps), cos, sin)``.

    Gemma 4's query and key paths (``q_norm`` / ``k_norm``, HF ``Gemma4RMSNorm`` with scale, then
    ``apply_rotary_pos_emb``): each ``[D]`` head row is normalised in fp32 (``x * (mean(x**2) + eps) ** -0.5 *
    weight``), rounded to x's dtype as the norm module returns it, then rotated in fp32 and rounded once, so one
    read of x and one write replace the norm's write and the rotation's read.

    Args:
        x: ``[B, S, H, D]`` float16 / bfloat16 / float32 (layout rules of ``rope``'s x: last-dim stride 1, free
            B / S / H strides, e.g. the view of a projection output).
        weight: ``[D]`` norm scale (no ``1 + w`` offset), any float dtype, x's device.
        cos: ``[B, S, D]`` or ``[1, S, D]``, x's dtype and device.
        sin: same as cos.
        eps: added to the mean square.

    Returns:
        ``[B, S, H, D]`` contiguous, x's dtype.

    Raises:
        TypeError / ValueError naming the argument for an unsupported dtype, shape or device mix;
        RuntimeError when x's device cannot launch Triton kernels.

    When autograd needs gradients this runs ``rms_norm_rope_naive`` (logged once). The mean square sums the two
    halves of the row separately (the RMSNorm kernel sums the row at once): equal up to fp32 rounding.
    """
    _validate("x", x, cos, sin)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must be [{x.shape[-1]}] to match x's head dim, got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
    if needs_grad(x, weight, cos, sin):
        log_once("grad-rms_norm_rope", "rms_norm_rope: gradients requested; using the autograd-capable naive op")
        return rms_norm_rope_naive(x, weight, cos, sin, eps=eps)
    if x.numel() == 0:
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _check_launchable("x", x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    rope_fwd(x, None, cos, sin, out, None, pick_config(x.shape[-1], x.shape[0] * x.shape[1], x.shape[2]),
             norm_weight=weight.contiguous(), eps=eps)
    return out


__all__ = ["rope", "rope_qk", "rms_norm_rope", "rope_fwd", "rope_fwd_kernel", "rope_configs", "default_config", "pick_config",
           "token_bucket", "unsupported_reason", "CONFIG_ENV", "MAX_HEAD_DIM"]
