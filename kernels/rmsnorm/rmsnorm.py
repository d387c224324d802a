"""Fused Triton RMSNorm for Gemma 4: plain, with extras, and residual-add with the next pre-norm.

Semantics are those of ``naive.py`` (HF ``Gemma4RMSNorm``): fp32 math on the upcast rows,
``scale = (mean(x**2) + eps) ** -0.5`` (correctly rounded sqrt and division), ``y = (x * scale) * w``
cast to ``x.dtype``; no ``1 + w`` offset; ``weight=None`` is the ``with_scale=False`` norm.

Scope and limits:
  * one pass per row: the whole row sits in registers, so the width is limited to
    ``MAX_WIDTH`` (16384); Gemma 4 uses 256 to 5376. Wider rows fall back to the naive op (logged).
  * dtypes float16 / bfloat16 / float32 for ``x``, ``residual`` and the weights.
  * any leading shape; the last dim must have stride 1. Leading dims are merged where their
    strides allow; up to three remaining leading dims are indexed in the kernel (so per-head
    norms on ``[B, S, H, D]`` views, even transposed ones, run without a copy). Other layouts are
    copied once with a logged reason. Outputs are always contiguous.
  * forward only: when autograd needs gradients the public functions run the naive op (logged once).

Configs: ``rms_norm_configs`` names the candidates, ``default_config`` picks one from the width and
row count (overridden by a per-GPU JSON table in ``configs/`` when present), and the env var
``GEMMA4_FAST_RMSNORM_CONFIG`` pins one (JSON, e.g. '{"BLOCK_M": 4, "num_warps": 4}').
"""
from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import triton
import triton.language as tl

from .._common import (can_launch, device_of, interpret_mode, log_once, needs_grad, next_power_of_2, pinned_config,
                       sm_count)
from .naive import RMSNormOutput, rms_norm_naive, rms_norm_pair_residual_naive, rms_norm_residual_naive


CONFIG_ENV = "GEMMA4_FAST_RMSNORM_CONFIG"
MAX_WIDTH = 16384
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CONFIG_DIR = Path(__file__).resolve().parent / "configs"
# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _row_offsets(rows, N1, N2, s0, s1, s2, LEAD: tl.constexpr):
    """Element offsets (int64) of ``rows`` in a tensor whose leading dims are (N0, N1, N2)."""
    if LEAD == 1:
        off = rows.to(tl.int64) * s0
    elif LEAD == 2:
        off = (rows // N1).to(tl.int64) * s0 + (rows % N1).to(tl.int64) * s1
    else:
        t = rows // N2
        off = ((t // N1).to(tl.int64) * s0 + (t % N1).to(tl.int64) * s1
               + (rows % N2).to(tl.int64) * s2)
    return off


@triton.jit
def _inv_rms(x, D, eps):
    """``(mean(x**2, axis=1) + eps) ** -0.5`` of an fp32 ``[BLOCK_M, BLOCK_N]`` tile (zero-padded)."""
    ms = tl.div_rn(tl.sum(x * x, axis=1), D.to(tl.float32))
    return tl.div_rn(tl.full(ms.shape, 1.0, tl.float32), tl.sqrt_rn(ms + eps))


@triton.jit
def _norm_block(blk, X, Y, SCALE, NORMED, w, cols, cmask, n_rows, D, N1, N2, sx0, sx1, sx2, eps,
                HAS_W: tl.constexpr, WRITE_SCALE: tl.constexpr, WRITE_NORMED: tl.constexpr,
                LEAD: tl.constexpr, BLOCK_M: tl.constexpr):
    rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n_rows
    mask = rmask[:, None] & cmask[None, :]
    xoff = _row_offsets(rows, N1, N2, sx0, sx1, sx2, LEAD)
    x = tl.load(X + xoff[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = _inv_rms(x, D, eps)
    normed = x * scale[:, None]
    if HAS_W:
        y = normed * w[None, :]
    else:
        y = normed
    yoff = rows.to(tl.int64) * D
    tl.store(Y + yoff[:, None] + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    if WRITE_SCALE:
        tl.store(SCALE + rows, scale, mask=rmask)
    if WRITE_NORMED:
        tl.store(NORMED + yoff[:, None] + cols[None, :], normed.to(NORMED.dtype.element_ty), mask=mask)


@triton.jit
def rms_norm_fwd_kernel(
    X, W, Y, SCALE, NORMED,
    n_rows, n_blocks, nprog, D, N1, N2, sx0, sx1, sx2, eps,
    HAS_W: tl.constexpr, WRITE_SCALE: tl.constexpr, WRITE_NORMED: tl.constexpr, LEAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PERSISTENT: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """Rows ``[BLOCK_M, D]`` of X -> Y (contiguous ``[n_rows, D]``), optional SCALE ``[n_rows]`` fp32
    and NORMED (contiguous, X's dtype). One row block per program, or with PERSISTENT program
    ``pid`` handles row blocks pid, pid + nprog, ... (the weight is loaded once per program)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < D
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    else:
        w = 1.0
    if PERSISTENT:
        for blk in tl.range(pid, n_blocks, nprog, num_stages=NUM_STAGES):
            _norm_block(blk, X, Y, SCALE, NORMED, w, cols, cmask, n_rows, D, N1, N2, sx0, sx1, sx2, eps,
                        HAS_W, WRITE_SCALE, WRITE_NORMED, LEAD, BLOCK_M)
    else:
        _norm_block(pid, X, Y, SCALE, NORMED, w, cols, cmask, n_rows, D, N1, N2, sx0, sx1, sx2, eps,
                    HAS_W, WRITE_SCALE, WRITE_NORMED, LEAD, BLOCK_M)


@triton.jit
def _residual_block(blk, X, R, OUT, NEXT, w, w2, s_out, s_in, s_mul, cols, cmask, n_rows, D, N1, N2,
                    sx0, sx1, sx2, sr0, sr1, sr2, eps, eps2,
                    HAS_W: tl.constexpr, HAS_NEXT: tl.constexpr, HAS_OUT_SCALE: tl.constexpr,
                    HAS_IN_SCALE: tl.constexpr, HAS_OUT_MUL: tl.constexpr, LEAD: tl.constexpr,
                    BLOCK_M: tl.constexpr):
    rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n_rows
    mask = rmask[:, None] & cmask[None, :]
    xoff = _row_offsets(rows, N1, N2, sx0, sx1, sx2, LEAD)
    roff = _row_offsets(rows, N1, N2, sr0, sr1, sr2, LEAD)
    x = tl.load(X + xoff[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    r = tl.load(R + roff[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_IN_SCALE:
        x = (x * s_in).to(X.dtype.element_ty).to(tl.float32)
    h = x * _inv_rms(x, D, eps)[:, None]
    if HAS_W:
        h = h * w[None, :]
    h = h.to(X.dtype.element_ty).to(tl.float32)
    out = (r + h).to(OUT.dtype.element_ty)
    if HAS_OUT_SCALE:
        out = (out.to(tl.float32) * s_out).to(OUT.dtype.element_ty)
    if HAS_OUT_MUL:
        out = (out.to(tl.float32) * s_mul).to(OUT.dtype.element_ty)
    ooff = rows.to(tl.int64) * D
    tl.store(OUT + ooff[:, None] + cols[None, :], out, mask=mask)
    if HAS_NEXT:
        o = out.to(tl.float32)
        nxt = (o * _inv_rms(o, D, eps2)[:, None]) * w2[None, :]
        tl.store(NEXT + ooff[:, None] + cols[None, :], nxt.to(NEXT.dtype.element_ty), mask=mask)


@triton.jit
def rms_norm_residual_fwd_kernel(
    X, R, W, W2, S_OUT, OUT, NEXT,
    n_rows, n_blocks, nprog, D, N1, N2, sx0, sx1, sx2, sr0, sr1, sr2, eps, eps2, s_in, s_mul,
    HAS_W: tl.constexpr, HAS_NEXT: tl.constexpr, HAS_OUT_SCALE: tl.constexpr, HAS_IN_SCALE: tl.constexpr,
    HAS_OUT_MUL: tl.constexpr, LEAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PERSISTENT: tl.constexpr, NUM_STAGES: tl.constexpr,
):
    """OUT = R + (rms_norm(X) * W cast to X's dtype), rounded to OUT's dtype; with ``HAS_OUT_SCALE`` that sum
    times the one-element ``S_OUT`` (fp32 product, rounded again: HF's ``hidden *= layer_scalar``); with
    ``HAS_IN_SCALE`` X is first multiplied by the scalar ``s_in`` and rounded to its dtype, with ``HAS_OUT_MUL`` OUT
    is multiplied by the scalar ``s_mul`` and rounded again (HF's ``linear(x) * s`` and ``(a + b) * s`` of the
    per-layer-input projection); optionally NEXT = rms_norm(OUT) * W2 in OUT's dtype. OUT and NEXT are contiguous
    ``[n_rows, D]``. Grid as in ``rms_norm_fwd_kernel``."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < D
    if HAS_W:
        w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    else:
        w = 1.0
    if HAS_NEXT:
        w2 = tl.load(W2 + cols, mask=cmask, other=0.0).to(tl.float32)
    else:
        w2 = 1.0
    if HAS_OUT_SCALE:
        s_out = tl.load(S_OUT).to(tl.float32)
    else:
        s_out = 1.0
    if PERSISTENT:
        for blk in tl.range(pid, n_blocks, nprog, num_stages=NUM_STAGES):
            _residual_block(blk, X, R, OUT, NEXT, w, w2, s_out, s_in, s_mul, cols, cmask, n_rows, D, N1, N2,
                            sx0, sx1, sx2, sr0, sr1, sr2, eps, eps2, HAS_W, HAS_NEXT, HAS_OUT_SCALE, HAS_IN_SCALE,
                            HAS_OUT_MUL, LEAD, BLOCK_M)
    else:
        _residual_block(pid, X, R, OUT, NEXT, w, w2, s_out, s_in, s_mul, cols, cmask, n_rows, D, N1, N2,
                        sx0, sx1, sx2, sr0, sr1, sr2, eps, eps2, HAS_W, HAS_NEXT, HAS_OUT_SCALE, HAS_IN_SCALE,
                        HAS_OUT_MUL, LEAD, BLOCK_M)


@triton.jit
def rms_norm_pair_residual_fwd_kernel(
    X1, X2, R, W1, W2, W, S_OUT, OUT, n_rows, D, eps1, eps2, eps,
    HAS_OUT_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The MoE decoder layer's tail: ``h = norm(X1) * W1 + norm(X2) * W2`` (each rounded to X1's dtype, the sum
    rounded again), ``OUT = R + norm(h) * W`` (the norm rounded to X1's dtype, the sum to OUT's), optionally times
    ``S_OUT`` (rounded again). All of X1, X2, R, OUT contiguous ``[n_rows, D]``. Grid ``(cdiv(n_rows, BLOCK_M),)``."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    cmask = cols < D
    mask = (rows < n_rows)[:, None] & cmask[None, :]
    off = rows.to(tl.int64)[:, None] * D + cols[None, :]
    ty = X1.dtype.element_ty
    w1 = tl.load(W1 + cols, mask=cmask, other=0.0).to(tl.float32)
    w2 = tl.load(W2 + cols, mask=cmask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    x1 = tl.load(X1 + off, mask=mask, other=0.0).to(tl.float32)
    a = (x1 * _inv_rms(x1, D, eps1)[:, None] * w1[None, :]).to(ty).to(tl.float32)
    x2 = tl.load(X2 + off, mask=mask, other=0.0).to(tl.float32)
    b = (x2 * _inv_rms(x2, D, eps2)[:, None] * w2[None, :]).to(ty).to(tl.float32)
    h = (a + b).to(ty).to(tl.float32)
    n = (h * _inv_rms(h, D, eps)[:, None] * w[None, :]).to(ty).to(tl.float32)
    r = tl.load(R + off, mask=mask, other=0.0).to(tl.float32)
    out = (r + n).to(OUT.dtype.element_ty)
    if HAS_OUT_SCALE:
        out = (out.to(tl.float32) * tl.load(S_OUT).to(tl.float32)).to(OUT.dtype.element_ty)
    tl.store(OUT + off, out, mask=mask)


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------

def row_bucket(n_rows: int) -> int:
    """Row-count bucket used as a config key: a power of two, at least 1024, at most 1 << 20."""
    return min(max(next_power_of_2(n_rows), 1024), 1 << 20)


def rms_norm_configs(width: int) -> list[dict[str, int]]:
    """Candidate configs for rows of ``width`` elements (what the tuning sweep tries).

    Keys: BLOCK_M (rows per program step), num_warps, NUM_STAGES (software-pipelining depth of
    the row loop), PROGRAMS_PER_SM (0: one program per row block; else a persistent grid of
    that many programs per multiprocessor, loading the weight once per program).
    """
    bn = next_power_of_2(width)

    def cfg(bm: int, nw: int, stages: int = 1, pps: int = 0) -> dict[str, int]:
        return {"BLOCK_M": bm, "num_warps": nw, "NUM_STAGES": stages, "PROGRAMS_PER_SM": pps}

    if bn >= 1024:
        out = [cfg(1, 4), cfg(1, 8), cfg(1, 16), cfg(2, 8), cfg(1, 8, 2, 4), cfg(1, 16, 2, 2)]
        return [c for c in out if c["BLOCK_M"] * bn // (32 * c["num_warps"]) <= 64]
    out = [cfg(4, 2), cfg(8, 4), cfg(16, 4), cfg(32, 4), cfg(32, 8), cfg(64, 8), cfg(16, 4, 2, 8)]
    return [c for c in out if 1 <= c["BLOCK_M"] * bn // (32 * c["num_warps"]) <= 64]


def default_config(width: int, n_rows: int) -> dict[str, int]:
    """Heuristic config. From width 1024 up: two rows per program and 8 warps (up to 64 elements per
    thread), the broad winner of the H100 sweep at widths 1536-5376 (one row with 16 warps, the
    first default, ran 10-25% slower at 32k-128k rows). Narrower rows: enough rows for a
    4096-element tile, 4 warps."""
    bn = next_power_of_2(width)
    if bn >= 1024:
        big = bn > 8192
        return {"BLOCK_M": 1 if big else 2, "num_warps": 16 if big else 8, "NUM_STAGES": 1, "PROGRAMS_PER_SM": 0}
    bm = max(1, min(64, 4096 // bn, next_power_of_2(n_rows)))
    return {"BLOCK_M": bm, "num_warps": 4, "NUM_STAGES": 1, "PROGRAMS_PER_SM": 0}


def pair_config(width: int) -> dict[str, int]:
    """Config of ``rms_norm_pair_residual_fwd_kernel`` (three rows of fp32 live at once): one row per program with
    8 warps up to 4096 columns (16 above), several rows for narrow widths; pinned by ``CONFIG_ENV`` as the others."""
    bn = next_power_of_2(width)
    cfg = {"BLOCK_M": max(1, 2048 // bn), "num_warps": 16 if bn > 4096 else (8 if bn >= 2048 else 4)}
    if os.environ.get(CONFIG_ENV):
        cfg.update({k: v for k, v in pinned_config(CONFIG_ENV).items() if k in cfg})
    return cfg


@functools.lru_cache(maxsize=8)
def _tuned_table(device_index: int) -> dict[str, dict[str, int]]:
    """The per-GPU table ``configs/<gpu-slug>.json`` ({"<BLOCK_N>:<row bucket>": config}), or {}."""
    name = torch.cuda.get_device_name(device_index)
    path = _CONFIG_DIR / ("-".join(name.lower().replace("/", " ").split()) + ".json")
    if not path.is_file():
        return {}
    return {k: {kk: int(vv) for kk, vv in v.items()} for k, v in json.loads(path.read_text())["configs"].items()}


def _table_lookup(table: dict[str, dict[str, int]], width: int, n_rows: int) -> dict[str, int] | None:
    """The entry for this width's BLOCK_N at the nearest row bucket (by log distance), or None."""
    bn = next_power_of_2(width)
    want = row_bucket(n_rows).bit_length()
    best = None
    for key, cfg in table.items():
        kbn, kb = (int(v) for v in key.split(":"))
        if kbn == bn and (best is None or abs(kb.bit_length() - want) < best[0]):
            best = (abs(kb.bit_length() - want), cfg)
    return None if best is None else best[1]


@functools.lru_cache(maxsize=256)
def _picked(device_index: int, width: int, bucket: int) -> dict[str, int]:
    base = default_config(width, bucket)
    hit = _table_lookup(_tuned_table(device_index), width, bucket) if device_index >= 0 else None
    return base if hit is None else {**base, **hit}


def pick_config(x: torch.Tensor, width: int, n_rows: int) -> dict[str, int]:
    """Pinned config (env), else the tuned table entry for this GPU, else ``default_config``."""
    if os.environ.get(CONFIG_ENV):
        return {**default_config(width, n_rows), **pinned_config(CONFIG_ENV)}
    if not x.is_cuda:
        return default_config(width, n_rows)
    return _picked(x.device.index or 0, width, row_bucket(n_rows))


def _grid(x: torch.Tensor, n_rows: int, cfg: dict[str, int]) -> tuple[int, int]:
    """(number of row blocks, number of programs). The persistent grid is GPU-only: Triton's
    interpreter cannot run a loop with run-time bounds (its scalars are 1-element arrays)."""
    n_blocks = (n_rows + cfg["BLOCK_M"] - 1) // cfg["BLOCK_M"]
    pps = cfg.get("PROGRAMS_PER_SM", 0)
    if pps <= 0 or interpret_mode():
        return n_blocks, n_blocks
    sms = sm_count(x.device)
    return n_blocks, max(1, min(n_blocks, pps * sms))


# --------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------

def _lead_layout(shape: tuple[int, ...], *strides: tuple[int, ...]):
    """Merge the leading dims of tensors of ``shape`` (last dim excluded) where every tensor's
    strides allow. Returns (sizes, per-tensor strides), leading dims outermost first, or None
    when more than three leading dims remain."""
    dims = [(shape[i], [s[i] for s in strides]) for i in range(len(shape) - 1) if shape[i] != 1]
    merged: list[tuple[int, list[int]]] = []
    for size, st in dims:
        if merged and all(ps == size * cs for ps, cs in zip(merged[-1][1], st)):
            merged[-1] = (merged[-1][0] * size, st)
        else:
            merged.append((size, st))
    if len(merged) > 3:
        return None
    if not merged:
        merged = [(1, [0] * len(strides))]
    return [m[0] for m in merged], [[m[1][k] for m in merged] for k in range(len(strides))]


def _prepare(named: dict[str, torch.Tensor]):
    """Copy tensors whose last dim is strided or whose leading dims cannot be indexed (logged);
    return the tensors, the leading sizes (N0, N1, N2) padded, the per-tensor strides and LEAD."""
    ts = dict(named)
    if all(t.is_contiguous() for t in ts.values()):
        D = next(iter(ts.values())).shape[-1]
        return ts, [next(iter(ts.values())).numel() // D, 1, 1], [[D, 0, 0] for _ in ts], 1
    for name, t in ts.items():
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            log_once(f"copy-last-{name}", "rms_norm: %s has last-dim stride %d; copying to contiguous",
                      name, t.stride(-1))
            ts[name] = t.contiguous()
    shape = tuple(next(iter(ts.values())).shape)
    lay = _lead_layout(shape, *(tuple(t.stride()) for t in ts.values()))
    if lay is None:
        log_once(f"copy-lead-{tuple(ts)}", "rms_norm: leading dims of %s need more than 3 strides; "
                  "copying to contiguous", "/".join(ts))
        ts = {k: t.contiguous() for k, t in ts.items()}
        lay = _lead_layout(shape, *(tuple(t.stride()) for t in ts.values()))
    sizes, strides = lay
    lead = len(sizes)
    sizes = sizes + [1] * (3 - lead)
    strides = [s + [0] * (3 - lead) for s in strides]
    return ts, sizes, strides, lead


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

def _launch_opts(cfg: dict[str, int], n_blocks: int, nprog: int) -> dict[str, int]:
    return {"BLOCK_M": cfg["BLOCK_M"], "NUM_STAGES": cfg.get("NUM_STAGES", 1), "num_warps": cfg["num_warps"],
            "PERSISTENT": nprog < n_blocks}


def rms_norm_fwd(x: torch.Tensor, weight: torch.Tensor | None, eps: float, y: torch.Tensor,
                 scale: torch.Tensor | None, normalized: torch.Tensor | None, cfg: dict[str, int]) -> None:
    """Launch ``rms_norm_fwd_kernel``: ``x [..., D]`` (last-dim stride 1) into contiguous ``y``
    (and ``scale [rows]`` fp32 / ``normalized`` contiguous when given). No validation."""
    D = x.shape[-1]
    n_rows = y.numel() // D
    ts, sizes, (sx,), lead = _prepare({"x": x})
    x = ts["x"]
    n_blocks, nprog = _grid(x, n_rows, cfg)
    with device_of(x):
        rms_norm_fwd_kernel[(nprog,)](
            x, weight, y, scale, normalized,
            n_rows, n_blocks, nprog, D, sizes[1], sizes[2], sx[0], sx[1], sx[2], float(eps),
            HAS_W=weight is not None, WRITE_SCALE=scale is not None, WRITE_NORMED=normalized is not None,
            LEAD=lead, BLOCK_N=next_power_of_2(D), **_launch_opts(cfg, n_blocks, nprog))


def rms_norm_residual_fwd(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float,
                          out: torch.Tensor, next_weight: torch.Tensor | None, next_eps: float,
                          next_out: torch.Tensor | None, cfg: dict[str, int],
                          out_scale: torch.Tensor | None = None, x_scale: float | None = None,
                          out_mul: float | None = None) -> None:
    """Launch ``rms_norm_residual_fwd_kernel`` into contiguous ``out`` (and ``next_out``); ``out_scale`` a
    one-element tensor on x's device or None; ``x_scale`` / ``out_mul`` Python floats or None. No validation."""
    D = x.shape[-1]
    n_rows = out.numel() // D
    ts, sizes, (sx, sr), lead = _prepare({"x": x, "residual": residual})
    x, residual = ts["x"], ts["residual"]
    n_blocks, nprog = _grid(x, n_rows, cfg)
    with device_of(x):
        rms_norm_residual_fwd_kernel[(nprog,)](
            x, residual, weight, next_weight, out_scale, out, next_out,
            n_rows, n_blocks, nprog, D, sizes[1], sizes[2], sx[0], sx[1], sx[2], sr[0], sr[1], sr[2],
            float(eps), float(next_eps), 1.0 if x_scale is None else float(x_scale),
            1.0 if out_mul is None else float(out_mul),
            HAS_W=weight is not None, HAS_NEXT=next_weight is not None, HAS_OUT_SCALE=out_scale is not None,
            HAS_IN_SCALE=x_scale is not None, HAS_OUT_MUL=out_mul is not None, LEAD=lead,
            BLOCK_N=next_power_of_2(D), **_launch_opts(cfg, n_blocks, nprog))


def rms_norm_pair_residual_fwd(x1: torch.Tensor, x2: torch.Tensor, residual: torch.Tensor, w1: torch.Tensor,
                               w2: torch.Tensor, weight: torch.Tensor, eps1: float, eps2: float, eps: float,
                               out: torch.Tensor, out_scale: torch.Tensor | None, cfg: dict[str, int]) -> None:
    """Launch ``rms_norm_pair_residual_fwd_kernel`` on contiguous ``x1, x2, residual`` into contiguous ``out``
    (``out_scale`` a one-element tensor or None). No validation."""
    D = x1.shape[-1]
    n_rows = out.numel() // D
    with device_of(x1):
        rms_norm_pair_residual_fwd_kernel[(triton.cdiv(n_rows, cfg["BLOCK_M"]),)](
            x1, x2, residual, w1, w2, weight, out_scale, out, n_rows, D, float(eps1), float(eps2), float(eps),
            HAS_OUT_SCALE=out_scale is not None, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=next_power_of_2(D),
            num_warps=cfg["num_warps"])


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def _check_tensor(name: str, t: Any, device: torch.device | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but x is on {device}")


def _check_weight(name: str, w: Any, width: int, device: torch.device) -> None:
    if w is None:
        return
    _check_tensor(name, w, device)
    if tuple(w.shape) != (width,):
        raise ValueError(f"{name} must have shape ({width},) to match x's last dim, got {tuple(w.shape)}")


def _check_launchable(x: torch.Tensor) -> None:
    if not can_launch(x):
        where = "TRITON_INTERPRET=1 is not set" if x.device.type == "cpu" else "it is not a CUDA tensor"
        raise RuntimeError(f"x is on {x.device} and the Triton kernel cannot launch there ({where}); "
                           "use rms_norm_naive for this device")


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None = None, eps: float = 1e-6, *,
             return_scale: bool = False, return_normalized: bool = False,
             normalized_dtype: torch.dtype | None = None):
    """Fused RMSNorm over the last dim, equal to HF ``Gemma4RMSNorm`` (one read of x, one write of y).

    Args:
        x: ``[..., D]`` float16 / bfloat16 / float32, CUDA (or CPU under ``TRITON_INTERPRET=1``).
            Any leading shape; the last dim should have stride 1 and leading dims may be strided
            (e.g. a ``[B, S, H, D]`` per-head view); other layouts are copied once (logged).
        weight: ``[D]`` float16 / bfloat16 / float32 on x's device, or None for the unscaled norm
            (``with_scale=False``: ``v_norm``, the router norm). Applied as ``w.float()`` with no offset.
        eps: added to ``mean(x_f32**2)`` before ``pow(., -0.5)``.
        return_scale: also return ``scale``, fp32 ``[..., 1]``, ``(mean(x**2) + eps) ** -0.5``.
        return_normalized: also return ``normalized``, ``x_f32 * scale`` cast to ``normalized_dtype``, same
            shape as x (the rows before the weight).
        normalized_dtype: dtype of ``normalized``: None (x's dtype) or a float dtype; ``torch.float32`` gives
            the unrounded rows (TransformerLens's fp32 ``hook_normalized``), bit-equal to ``x.float() * scale``.

    Returns:
        ``y`` (same shape and dtype as x, contiguous) when no extra is asked for, else
        ``RMSNormOutput(y, scale, normalized)`` with the unasked fields None. Extras are written
        only when asked for.

    Raises:
        TypeError / ValueError naming the argument for an unsupported dtype, shape or device mix;
        RuntimeError when x's device cannot launch Triton kernels.

    When autograd needs gradients (grad mode on and x or weight requires grad) this runs
    ``rms_norm_naive`` (logged once). Zero-element inputs return empty outputs without a launch.
    """
    _check_tensor("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the normalized last dim)")
    D = x.shape[-1]
    _check_weight("weight", weight, D, x.device)
    if normalized_dtype is not None and normalized_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"normalized_dtype must be None, float16, bfloat16 or float32, got {normalized_dtype}")
    if torch.is_grad_enabled() and needs_grad(x, weight):
        log_once("grad-rms_norm", "rms_norm: gradients requested; using the autograd-capable naive op")
        return rms_norm_naive(x, weight, eps, return_scale=return_scale, return_normalized=return_normalized,
                              normalized_dtype=normalized_dtype)
    if x.numel() == 0:
        return rms_norm_naive(x, weight, eps, return_scale=return_scale, return_normalized=return_normalized,
                              normalized_dtype=normalized_dtype)
    if D > MAX_WIDTH:
        log_once(f"wide-{D}", "rms_norm: width %d exceeds the single-pass limit %d; using the naive op",
                  D, MAX_WIDTH, level=logging.WARNING)
        return rms_norm_naive(x, weight, eps, return_scale=return_scale, return_normalized=return_normalized,
                              normalized_dtype=normalized_dtype)
    _check_launchable(x)
    n_rows = x.numel() // D
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    scale = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device) if return_scale else None
    ndt = x.dtype if normalized_dtype is None else normalized_dtype
    normalized = torch.empty(x.shape, dtype=ndt, device=x.device) if return_normalized else None
    rms_norm_fwd(x, weight, eps, y, scale, normalized, pick_config(x, D, n_rows))
    if not (return_scale or return_normalized):
        return y
    return RMSNormOutput(y, scale, normalized)


def rms_norm_residual(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None,
                      eps: float = 1e-6, *, next_weight: torch.Tensor | None = None,
                      next_eps: float | None = None, out_scale: torch.Tensor | float | None = None,
                      x_scale: float | None = None):
    """``out = residual + rms_norm(x, weight)`` in one pass, optionally with ``rms_norm(out, next_weight)``.

    The HF decoder-layer pattern ``hidden = residual + post_norm(h)`` followed by the next
    ``pre_norm(hidden)``: reads x and residual once, writes out (and the next normed rows).

    Args:
        x: ``[..., D]`` float16 / bfloat16 / float32 (the sublayer output), CUDA or interpreter CPU;
            leading dims may be strided, last dim stride 1 (else copied, logged).
        residual: same shape as x, any supported dtype, same device. ``out``'s dtype is torch's
            promotion of (residual, x) dtypes, as in HF's ``residual + hidden_states``: the norm is
            cast to x's dtype first, then added in fp32 and rounded once to ``out``'s dtype.
        weight: ``[D]`` or None, the norm applied to x (no ``1 + w`` offset).
        eps: that norm's epsilon.
        next_weight: ``[D]`` or None; when given, also compute the next pre-norm of ``out``.
        next_eps: the next norm's epsilon (defaults to ``eps``).
        out_scale: None, a one-element float tensor on x's device (HF's ``layer_scalar`` buffer) or a Python
            float: ``out`` is then the rounded sum times it, rounded again to ``out``'s dtype (HF's
            ``hidden *= layer_scalar`` after the add, or ``(a + b) * s``); ``next_normed`` is the norm of that
            scaled ``out``.
        x_scale: None or a Python float: x is first multiplied by it and rounded to its dtype (HF's
            ``linear(x) * s`` ahead of the per-layer-input projection norm).

    Returns:
        ``out`` (x's shape, contiguous) without ``next_weight``; ``(out, next_normed)`` with it,
        ``next_normed`` in ``out``'s dtype.

    Raises:
        TypeError / ValueError naming the argument for unsupported dtype, shape or device;
        RuntimeError when x's device cannot launch Triton kernels.

    Runs ``rms_norm_residual_naive`` when autograd needs gradients (logged once).
    """
    _check_tensor("x", x)
    _check_tensor("residual", residual, x.device)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the normalized last dim)")
    if residual.shape != x.shape:
        raise ValueError(f"residual has shape {tuple(residual.shape)}, x has {tuple(x.shape)}; they must match")
    D = x.shape[-1]
    _check_weight("weight", weight, D, x.device)
    _check_weight("next_weight", next_weight, D, x.device)
    out_mul = None
    if isinstance(out_scale, (int, float)) and not isinstance(out_scale, bool):
        out_mul, out_scale = float(out_scale), None
    elif out_scale is not None:
        _check_tensor("out_scale", out_scale, x.device)
        if out_scale.numel() != 1:
            raise ValueError(f"out_scale must hold one element, got shape {tuple(out_scale.shape)}")
    if x_scale is not None and (isinstance(x_scale, bool) or not isinstance(x_scale, (int, float))):
        raise TypeError(f"x_scale must be a Python float or None, got {type(x_scale).__name__}")
    next_eps = eps if next_eps is None else next_eps
    args = (x, residual, weight, eps)
    kw = dict(next_weight=next_weight, next_eps=next_eps, out_scale=out_scale if out_mul is None else out_mul,
              x_scale=x_scale)
    if torch.is_grad_enabled() and needs_grad(x, residual, weight, next_weight, out_scale):
        log_once("grad-rms_norm_residual", "rms_norm_residual: gradients requested; using the naive op")
        return rms_norm_residual_naive(*args, **kw)
    if x.numel() == 0:
        return rms_norm_residual_naive(*args, **kw)
    if D > MAX_WIDTH:
        log_once(f"wide-{D}", "rms_norm_residual: width %d exceeds the single-pass limit %d; using the "
                  "naive op", D, MAX_WIDTH, level=logging.WARNING)
        return rms_norm_residual_naive(*args, **kw)
    _check_launchable(x)
    out_dtype = torch.promote_types(residual.dtype, x.dtype)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    nxt = torch.empty_like(out) if next_weight is not None else None
    rms_norm_residual_fwd(x, residual, weight, eps, out, next_weight, next_eps, nxt,
                          pick_config(x, D, x.numel() // D), out_scale=out_scale, x_scale=x_scale, out_mul=out_mul)
    return out if nxt is None else (out, nxt)


def rms_norm_pair_residual(x1: torch.Tensor, x2: torch.Tensor, residual: torch.Tensor, w1: torch.Tensor,
                           w2: torch.Tensor, weight: torch.Tensor, eps1: float = 1e-6, eps2: float = 1e-6,
                           eps: float = 1e-6, *, out_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The tail of HF's MoE decoder layer in one pass: ``residual + norm(norm(x1) * w1 + norm(x2) * w2) * weight``.

    HF (``Gemma4TextDecoderLayer`` with ``enable_moe_block``): ``h1 = post_feedforward_layernorm_1(mlp_out)``,
    ``h2 = post_feedforward_layernorm_2(experts_out)``, ``h = h1 + h2``, ``residual + post_feedforward_layernorm(h)``
    and ``*= layer_scalar``: five passes over the residual stream, here one (each intermediate rounded to x1's dtype
    where HF rounds it).

    Args:
        x1: ``[..., D]`` float16 / bfloat16 / float32, the dense MLP output; CUDA or interpreter CPU.
        x2: same shape and dtype, the experts' output.
        residual: same shape, any supported dtype; ``out``'s dtype is torch's promotion of (residual, x1).
        w1, w2, weight: ``[D]`` the three norms' weights (no ``1 + w`` offset).
        eps1, eps2, eps: their epsilons.
        out_scale: None or a one-element float tensor (``layer_scalar``): ``out`` times it, rounded again.

    Returns:
        ``out``, x1's shape, contiguous. Runs ``rms_norm_pair_residual_naive`` under autograd, for empty inputs or
        rows wider than ``MAX_WIDTH`` (logged once); non-contiguous inputs are copied.

    Raises:
        TypeError / ValueError naming the argument for unsupported dtype, shape or device.
    """
    for name, t in (("x1", x1), ("x2", x2), ("residual", residual)):
        _check_tensor(name, t, x1.device)
        if t.shape != x1.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, x1 has {tuple(x1.shape)}; they must match")
    if x2.dtype != x1.dtype:
        raise TypeError(f"x2 is {x2.dtype} but x1 is {x1.dtype}; they must match")
    if x1.dim() == 0:
        raise ValueError("x1 must have at least one dimension (the normalized last dim)")
    D = x1.shape[-1]
    for name, w in (("w1", w1), ("w2", w2), ("weight", weight)):
        if w is None:
            raise ValueError(f"{name} is required (the MoE layer's norms carry weights)")
        _check_weight(name, w, D, x1.device)
    if out_scale is not None:
        _check_tensor("out_scale", out_scale, x1.device)
        if out_scale.numel() != 1:
            raise ValueError(f"out_scale must hold one element, got shape {tuple(out_scale.shape)}")
    args = (x1, x2, residual, w1, w2, weight, eps1, eps2, eps)
    if torch.is_grad_enabled() and needs_grad(x1, x2, residual, w1, w2, weight, out_scale):
        log_once("grad-rms_norm_pair_residual", "rms_norm_pair_residual: gradients requested; using the naive op")
        return rms_norm_pair_residual_naive(*args, out_scale=out_scale)
    if x1.numel() == 0 or D > MAX_WIDTH:
        if D > MAX_WIDTH:
            log_once(f"wide-pair-{D}", "rms_norm_pair_residual: width %d exceeds %d; using the naive op", D,
                     MAX_WIDTH, level=logging.WARNING)
        return rms_norm_pair_residual_naive(*args, out_scale=out_scale)
    _check_launchable(x1)
    x1, x2, residual = x1.contiguous(), x2.contiguous(), residual.contiguous()
    out = torch.empty(x1.shape, dtype=torch.promote_types(residual.dtype, x1.dtype), device=x1.device)
    rms_norm_pair_residual_fwd(x1, x2, residual, w1, w2, weight, eps1, eps2, eps, out, out_scale, pair_config(D))
    return out


__all__ = ["RMSNormOutput", "rms_norm", "rms_norm_residual", "rms_norm_pair_residual", "rms_norm_fwd",
           "rms_norm_residual_fwd", "rms_norm_pair_residual_fwd", "rms_norm_fwd_kernel",
           "rms_norm_residual_fwd_kernel", "rms_norm_pair_residual_fwd_kernel", "pair_config", "rms_norm_configs", "default_config",
           "pick_config", "row_bucket", "CONFIG_ENV"]
