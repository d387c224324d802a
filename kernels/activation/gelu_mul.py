"""Fused Triton ``gelu_tanh(gate) * up`` for the Gemma 4 MLP (one read of gate and up, one write of h).

Semantics are those of ``naive.py`` (HF ``Gemma4TextMLP``: ``GELUTanh()(gate) * up``), computed in
fp32 on the upcast inputs and rounded once to the output dtype:
``h = g * sigmoid(2 * sqrt(2/pi) * (g + 0.044715 g^3)) * u``, which equals
``0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))) * u`` without the cancellation of ``1 + tanh`` at
large negative g. In bfloat16/float16 this skips torch's intermediate rounding of ``gelu(g)``, so it is
at least as close to the exact value as torch's two-kernel result.

Scope and limits:
  * ``gate`` and ``up`` of the same shape (any leading shape, any width), float16 / bfloat16 / float32
    (may differ; the output takes torch's promoted dtype, as ``gelu(g) * u`` does).
  * The last dim must have stride 1 and the leading dims must merge into one strided row dim (true for
    contiguous tensors and for column slices of a fused gate/up output); other layouts are copied once
    (logged). The output is always contiguous.
  * When both inputs are contiguous the kernel sees them as rows of ``BLOCK_N`` elements whenever the
    element count allows, so no lane is masked off at widths that are not a multiple of ``BLOCK_N``.
  * Forward only: when autograd needs gradients ``gelu_mul`` runs the naive op (logged once);
    ``gemma4_fast.ops.gelu_mul`` instead keeps this forward and recomputes the naive op for backward.

Configs: ``gelu_mul_configs`` names the candidates, ``default_config`` picks one from the width and
row count, and the env var ``GEMMA4_FAST_GELU_MUL_CONFIG`` pins one (JSON, e.g.
'{"BLOCK_M": 4, "BLOCK_N": 1024, "num_warps": 4}').
"""
from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from .._common import can_launch, device_of, log_once, needs_grad, next_power_of_2, pinned_config
from .naive import gelu_mul_naive


CONFIG_ENV = "GEMMA4_FAST_GELU_MUL_CONFIG"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# --------------------------------------------------------------------------------------------
# Kernel
# --------------------------------------------------------------------------------------------

@triton.jit
def _gelu_tanh(g):
    """tanh-approximated GELU of an fp32 tile, as ``g * sigmoid(2 * inner)``; the exponential only
    sees non-positive arguments, so it never overflows."""
    inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
    t = tl.exp(-2.0 * tl.abs(inner))
    s = 1.0 / (1.0 + t)
    return g * tl.where(inner >= 0, s, t * s)


@triton.jit
def gelu_mul_fwd_kernel(
    G, U, H,
    n_rows, N, sg, su,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``H[r, c] = gelu_tanh(G[r, c]) * U[r, c]`` on a ``[BLOCK_M, BLOCK_N]`` tile, fp32 math.

    G and U: rows of ``N`` elements at row strides ``sg`` / ``su`` (unit column stride); H is
    contiguous ``[n_rows, N]``. Grid: ``(cdiv(n_rows, BLOCK_M), cdiv(N, BLOCK_N))``.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < N)[None, :]
    g = tl.load(G + rows[:, None] * sg + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + rows[:, None] * su + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    h = _gelu_tanh(g) * u
    tl.store(H + rows[:, None] * N + cols[None, :], h.to(H.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------

def gelu_mul_configs(width: int) -> list[dict[str, int]]:
    """Candidate configs for rows of ``width`` elements (what a tuning sweep tries).

    Keys: BLOCK_N (columns per tile, at most the width's power of two), BLOCK_M (rows per tile) and
    num_warps; tiles of 1024 to 8192 elements with 4 to 64 elements per thread.
    """
    top = next_power_of_2(width)
    out = []
    for bn in (256, 512, 1024, 2048):
        if bn > max(top, 256):
            continue
        for tile in (1024, 2048, 4096, 8192):
            bm = max(1, tile // bn)
            for nw in (4, 8):
                per_thread = bm * bn // (32 * nw)
                if 4 <= per_thread <= 64:
                    out.append({"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": nw})
    uniq = {tuple(sorted(c.items())): c for c in out}
    return list(uniq.values())


def default_config(width: int, n_rows: int) -> dict[str, int]:
    """Heuristic config: 1024-wide column blocks (the width's power of two when narrower), enough rows
    for a 4096-element tile (fewer when there are fewer rows), 4 warps (32 elements, i.e. four 16-byte
    vectors of bf16, per thread and input). A memory-bound elementwise op: the tile only has to keep
    enough bytes in flight per multiprocessor."""
    bn = min(max(next_power_of_2(width), 16), 1024)
    bm = max(1, min(4096 // bn, next_power_of_2(n_rows)))
    nw = 4 if bm * bn >= 512 else 1
    return {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": nw}


def pick_config(width: int, n_rows: int) -> dict[str, int]:
    """The pinned config (env, merged over the default), else ``default_config``."""
    cfg = default_config(width, n_rows)
    pinned = pinned_config(CONFIG_ENV)
    if pinned:
        cfg = {**cfg, **pinned}
        for key in ("BLOCK_M", "BLOCK_N"):
            if cfg[key] < 1 or cfg[key] & (cfg[key] - 1):
                raise ValueError(f"{CONFIG_ENV}: {key} must be a power of two, got {cfg[key]}")
    return cfg


# --------------------------------------------------------------------------------------------
# Layout and launcher
# --------------------------------------------------------------------------------------------

def _rows_view(name: str, t: torch.Tensor) -> torch.Tensor:
    """``t`` as ``[rows, N]`` with unit column stride and one row stride, copying (logged) if needed."""
    N = t.shape[-1]
    if N > 1 and t.stride(-1) != 1:
        log_once(f"copy-last-{name}", "gelu_mul: %s has last-dim stride %d; copying to contiguous",
                  name, t.stride(-1))
        t = t.contiguous()
    try:
        return t.view(-1, N)
    except RuntimeError:
        log_once(f"copy-lead-{name}", "gelu_mul: leading dims of %s do not merge into one row stride; "
                  "copying to contiguous", name)
        return t.contiguous().view(-1, N)


def gelu_mul_fwd(gate: torch.Tensor, up: torch.Tensor, h: torch.Tensor, cfg: dict[str, int]) -> None:
    """Launch ``gelu_mul_fwd_kernel``: ``gate``/``up`` ``[..., N]`` into contiguous ``h`` of the same
    shape, with ``cfg`` (BLOCK_M, BLOCK_N, num_warps). No validation; non-empty inputs."""
    bn = cfg["BLOCK_N"]
    numel = h.numel()
    if gate.is_contiguous() and up.is_contiguous() and numel % bn == 0:
        g2, u2, width = gate.view(-1, bn), up.view(-1, bn), bn
    else:
        g2, u2, width = _rows_view("gate", gate), _rows_view("up", up), gate.shape[-1]
    n_rows = g2.shape[0]
    bm = cfg["BLOCK_M"]
    grid = (triton.cdiv(n_rows, bm), triton.cdiv(width, bn))
    with device_of(gate):
        gelu_mul_fwd_kernel[grid](g2, u2, h, n_rows, width, g2.stride(0), u2.stride(0),
                                  BLOCK_M=bm, BLOCK_N=bn, num_warps=cfg["num_warps"])


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

def _check_tensor(name: str, t: Any) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
    if t.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension")


def gelu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Fused ``gelu(gate, approximate="tanh") * up`` (HF ``Gemma4TextMLP``'s ``act_fn(g) * u``), one kernel.

    Args:
        gate: ``[..., N]`` float16 / bfloat16 / float32, CUDA (or CPU under ``TRITON_INTERPRET=1``);
            the ``gate_proj`` output. Any leading shape and width; last dim stride 1 and leading dims
            mergeable into one row stride, else copied once (logged).
        up: ``[..., N]``, the same shape as ``gate`` (no broadcasting) and on the same device; the
            ``up_proj`` output. Its dtype may differ from gate's.

    Returns:
        ``h``: gate's shape, contiguous, in ``torch.promote_types(gate.dtype, up.dtype)``; computed in
        fp32 and rounded once.

    Raises:
        TypeError / ValueError naming the argument for an unsupported type, dtype, shape or device mix;
        RuntimeError when gate's device cannot launch Triton kernels.

    When autograd needs gradients (grad mode on and gate or up requires grad) this runs
    ``gelu_mul_naive`` (logged once). Zero-element inputs return an empty output without a launch.
    """
    _check_tensor("gate", gate)
    _check_tensor("up", up)
    if up.shape != gate.shape:
        raise ValueError(f"up has shape {tuple(up.shape)}, gate has {tuple(gate.shape)}; they must match")
    if up.device != gate.device:
        raise ValueError(f"up is on {up.device} but gate is on {gate.device}")
    if needs_grad(gate, up):
        log_once("grad-gelu_mul", "gelu_mul: gradients requested; using the autograd-capable naive op")
        return gelu_mul_naive(gate, up)
    out_dtype = torch.promote_types(gate.dtype, up.dtype)
    h = torch.empty(gate.shape, dtype=out_dtype, device=gate.device)
    if h.numel() == 0:
        return h
    if not can_launch(gate):
        where = "TRITON_INTERPRET=1 is not set" if gate.device.type == "cpu" else "it is not a CUDA tensor"
        raise RuntimeError(f"gate is on {gate.device} and the Triton kernel cannot launch there ({where}); "
                           "use gelu_mul_naive for this device")
    N = gate.shape[-1]
    gelu_mul_fwd(gate, up, h, pick_config(N, h.numel() // N))
    return h


__all__ = ["gelu_mul", "gelu_mul_fwd", "gelu_mul_fwd_kernel", "gelu_mul_configs", "default_config",
           "pick_config", "CONFIG_ENV"]
