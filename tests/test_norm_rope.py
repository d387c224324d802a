"""Tests of ``gemma4_fast.kernels.rope.rms_norm_rope`` (a query/key head norm fused into the RoPE pass) against
``rms_norm_rope_naive`` and HF's two modules (``Gemma4RMSNorm`` with scale, then ``apply_rotary_pos_emb``).

CPU runs use Triton's interpreter (tiny sizes, float32/float16); ``@pytest.mark.cuda`` tests run Gemma 4's head dims
with the real rotary tables in bfloat16/float16/float32. The compile-and-fit check of the fused variant
(``NORM=True``) for sm_80/sm_90 is part of ``tests/test_rope.py``'s report.
"""
from __future__ import annotations

import importlib
import logging

import pytest
import torch
from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm, Gemma4TextRotaryEmbedding, apply_rotary_pos_emb

from gemma4_fast import ops
from gemma4_fast.kernels.rmsnorm import rms_norm_naive
from gemma4_fast.kernels.rope import rms_norm_rope, rms_norm_rope_naive, rope_naive
from gemma4_fast.models import text_config
from _inputs import three_way_excess

rp = importlib.import_module("gemma4_fast.kernels.rope.rope")
EPS = 1e-6


def _hf(x, weight, cos, sin, eps=EPS):
    """HF's modules: the head norm with scale, then the rotation."""
    norm = Gemma4RMSNorm(x.shape[-1], eps=eps, with_scale=True).to(x.device)
    with torch.no_grad():
        norm.weight.copy_(weight)
    return apply_rotary_pos_emb(norm(x), cos, sin, unsqueeze_dim=2)


def _ref64(x, weight, cos, sin, eps=EPS):
    return rope_naive(rms_norm_naive(x.double(), weight.double(), eps), cos.double(), sin.double())


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _check(fast, x, weight, cos, sin):
    """fp32: relative error <= 1e-5 against fp64; fp16/bf16: the three-way rule against HF's modules."""
    assert fast.dtype == x.dtype and fast.shape == x.shape and fast.is_contiguous()
    assert not torch.isnan(fast).any(), "NaN in the fast output"
    ref64 = _ref64(x, weight, cos, sin)
    if x.dtype == torch.float32:
        assert _rel(fast, ref64) <= 1e-5
        return
    bad, err, _ = three_way_excess(fast, ref64, _hf(x, weight, cos, sin), 2 ** -9 * ref64.abs().max().item())
    assert not bad.any(), f"{bad.sum().item()} elements break the three-way rule; max err {err.max().item():.3g}"


def _rand(*shape, dtype, device="cpu", scale=1.0):
    return (torch.randn(*shape, dtype=torch.float32, device=device) * scale).to(dtype)


def _weight(d, device="cpu"):
    return torch.randn(d, device=device) * 0.3 + 1.0


def _poisoned(x, weight, cos, sin, cfg):
    out = torch.full(x.shape, float("nan"), dtype=x.dtype, device=x.device)
    rp.rope_fwd(x, None, cos, sin, out, None, cfg, norm_weight=weight, eps=EPS)
    return out


def _tables(layer_type, batch, seq, dtype, device="cpu", preset="E2B", offsets=None):
    rot = Gemma4TextRotaryEmbedding(text_config(preset), device=device)
    pos = torch.arange(seq, device=device)[None]
    if offsets is not None:
        pos = pos + torch.tensor(offsets, device=device)[:batch, None]
    return rot(torch.zeros(1, dtype=dtype, device=device), pos, layer_type)


# --------------------------------------------------------------------------------------------
# CPU (interpreter)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(2, 13, 3, 24), (1, 37, 5, 40), (3, 5, 1, 20), (1, 1, 7, 2), (2, 19, 2, 36)])
def test_matches_naive_and_hf(dtype, shape):
    B, S, H, D = shape
    x = _rand(*shape, dtype=dtype, scale=3.0)
    w = _weight(D)
    cos, sin = _rand(B, S, D, dtype=dtype), _rand(B, S, D, dtype=dtype)
    _check(rms_norm_rope(x, w, cos, sin, eps=EPS), x, w, cos, sin)
    _check(_poisoned(x, w, cos, sin, rp.pick_config(D, B * S)), x, w, cos, sin)
    naive = rms_norm_rope_naive(x, w, cos, sin, eps=EPS)
    assert torch.equal(naive, _hf(x, w, cos, sin))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layer_type", ["sliding_attention", "full_attention"])
def test_real_tables_and_a_projection_view(dtype, layer_type):
    """HF's rotary tables (partial RoPE on full layers), per-row positions, q as a view of a wider projection."""
    B, S, H = 2, 11, 3
    cos, sin = _tables(layer_type, B, S, dtype, preset="tiny-ple-kv-shared", offsets=[0, 5])
    D = cos.shape[-1]
    fused = _rand(B, S, (H + 1) * D, dtype=dtype, scale=2.0)
    x = fused[..., D:].view(B, S, H, D)
    assert not x.is_contiguous()
    w = _weight(D)
    _check(rms_norm_rope(x, w, cos, sin, eps=EPS), x, w, cos, sin)
    _check(rms_norm_rope(x, w, cos[:1], sin[:1], eps=EPS), x, w, cos[:1], sin[:1])


def test_every_candidate_config_poisoned():
    B, S, H, D = 2, 7, 3, 20
    x = _rand(B, S, H, D, dtype=torch.float32, scale=2.0)
    w = _weight(D)
    cos, sin = _rand(1, S, D, dtype=torch.float32), _rand(1, S, D, dtype=torch.float32)
    for cfg in rp.rope_configs(D)[::7]:
        _check(_poisoned(x, w, cos, sin, cfg), x, w, cos, sin)


def test_errors_and_zero_sizes():
    x = _rand(1, 3, 2, 8, dtype=torch.float32)
    cos = sin = _rand(1, 3, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="weight must be \\[8\\]"):
        rms_norm_rope(x, torch.ones(6), cos, sin)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        rms_norm_rope(x, None, cos, sin)
    with pytest.raises(ValueError, match="4-D"):
        rms_norm_rope(x[0], torch.ones(8), cos, sin)
    with pytest.raises(TypeError, match="cos has dtype"):
        rms_norm_rope(x, torch.ones(8), cos.half(), sin)
    with pytest.raises(ValueError, match="k must be None"):
        rp.rope_fwd(x, x, cos, sin, torch.empty_like(x), torch.empty_like(x), rp.pick_config(8, 3),
                    norm_weight=torch.ones(8), eps=EPS)
    empty = rms_norm_rope(x[:, :0], torch.ones(8), cos[:, :0], sin[:, :0])
    assert empty.shape == (1, 0, 2, 8)


def test_autograd_routes_to_naive(caplog):
    x = _rand(1, 4, 2, 8, dtype=torch.float32).requires_grad_()
    w = _weight(8)
    cos = sin = _rand(1, 4, 8, dtype=torch.float32)
    with caplog.at_level(logging.INFO, logger="gemma4_fast"):
        y = rms_norm_rope(x, w, cos, sin, eps=EPS)
    assert y.requires_grad and any("rms_norm_rope" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ops_backends_and_gradients(dtype):
    """``"torch"``: HF's two modules bit for bit; ``"triton"``: the kernel, with gradients from the naive twin."""
    B, S, H, D = 2, 5, 3, 16
    x = _rand(B, S, H, D, dtype=dtype, scale=2.0)
    w = _weight(D)
    cos, sin = _rand(1, S, D, dtype=dtype), _rand(1, S, D, dtype=dtype)
    assert torch.equal(ops.rms_norm_rope(x, w, cos, sin, eps=EPS, backend="torch"), _hf(x, w, cos, sin))
    _check(ops.rms_norm_rope(x, w, cos, sin, eps=EPS, backend="triton"), x, w, cos, sin)
    if dtype != torch.float32:
        return
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = ops.rms_norm_rope(xg, wg, cos, sin, eps=EPS, backend="triton")
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (xg, wg), g)
    x2, w2 = x.clone().requires_grad_(), w.clone().requires_grad_()
    want = torch.autograd.grad(rms_norm_rope_naive(x2, w2, cos, sin, eps=EPS), (x2, w2), g)
    for a, b in zip(got, want):
        assert _rel(a, b) <= 1e-5


# --------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("layer_type", ["sliding_attention", "full_attention"])
@pytest.mark.parametrize("heads", [8, 1, 3])
def test_gpu_real_tables_vs_hf(dtype, layer_type, heads):
    B, S = 2, 1037
    cos, sin = _tables(layer_type, B, S, dtype, device="cuda", offsets=[0, 17])
    D = cos.shape[-1]
    fused = _rand(B, S, (heads + 1) * D, dtype=dtype, device="cuda", scale=4.0)
    x = fused[..., D:].view(B, S, heads, D)
    w = _weight(D, device="cuda")
    _check(rms_norm_rope(x, w, cos, sin, eps=EPS), x, w, cos, sin)
    _check(_poisoned(x, w, cos, sin, rp.pick_config(D, B * S)), x, w, cos, sin)
    unfused = rp.rope(ops.rms_norm(x, w, EPS, backend="triton"), cos, sin)
    fused = rms_norm_rope(x, w, cos, sin, eps=EPS)
    if dtype == torch.float32:  # the mean square's two half sums round differently from the norm kernel's one sum
        assert _rel(fused, unfused) <= 1e-6
    else:  # the norm output's rounding to x's dtype hides that difference almost everywhere
        assert (fused != unfused).float().mean().item() <= 1e-3
