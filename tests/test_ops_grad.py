"""Triton forward with naive-recompute backward (``gemma4_fast.ops``): exact gradients, Triton forward."""
from __future__ import annotations

import pytest
import torch

from gemma4_fast import ops
from gemma4_fast.kernels._common import interpret_mode

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or interpret_mode()),
                                reason="needs CUDA or the Triton interpreter")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _grads(fn, *tensors):
    out = fn(*tensors)
    g = torch.randn_like(out)
    return out, torch.autograd.grad(out, [t for t in tensors if t.requires_grad], g)


def _check(fast_fn, naive_fn, *make):
    torch.manual_seed(0)
    base = [m() for m in make]
    a = [t.clone().requires_grad_(t.is_floating_point()) for t in base]
    b = [t.clone().requires_grad_(t.is_floating_point()) for t in base]
    torch.manual_seed(1)
    out_f, g_f = _grads(fast_fn, *a)
    torch.manual_seed(1)
    out_n, g_n = _grads(naive_fn, *b)
    torch.testing.assert_close(out_f, out_n, rtol=1e-4, atol=1e-5)
    for x, y in zip(g_f, g_n):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_rms_norm_grad(monkeypatch):
    seen = []
    monkeypatch.setattr(ops, "resolve", lambda *a, _r=ops.resolve, **k: seen.append(_r(*a, **k)) or seen[-1])
    _check(lambda x, w: ops.rms_norm(x, w, 1e-6, backend="triton"),
           lambda x, w: ops.rms_norm(x, w, 1e-6, backend="torch"),
           lambda: torch.randn(5, 37, device=DEV), lambda: torch.randn(37, device=DEV))
    assert seen[0] == "triton+grad"


def test_attention_grad():
    kw = dict(scale=0.3, window=4, softcap=None)
    _check(lambda q, k, v: ops.attention(q, k, v, backend="triton", **kw),
           lambda q, k, v: ops.attention(q, k, v, backend="torch", **kw),
           lambda: torch.randn(1, 4, 9, 16, device=DEV), lambda: torch.randn(1, 2, 9, 16, device=DEV),
           lambda: torch.randn(1, 2, 9, 16, device=DEV))


def test_moe_experts_grad():
    e, h, i, t, k = 5, 12, 10, 7, 2
    idx = torch.randint(0, e, (t, k), device=DEV)
    _check(lambda x, w, gu, d: ops.moe_experts(x, idx, w, gu, d, backend="triton"),
           lambda x, w, gu, d: ops.moe_experts(x, idx, w, gu, d, backend="torch"),
           lambda: torch.randn(t, h, device=DEV), lambda: torch.rand(t, k, device=DEV),
           lambda: torch.randn(e, 2 * i, h, device=DEV) * 0.3, lambda: torch.randn(e, h, i, device=DEV) * 0.3)
