"""Tests of ``gemma4_fast.kernels.rmsnorm``: Triton kernels vs ``naive.py`` vs HF ``Gemma4RMSNorm``.

CPU runs use Triton's interpreter (tiny sizes, float32/float16); ``@pytest.mark.cuda`` tests run the
real widths of Gemma 4 in bfloat16/float16/float32 on a GPU.
"""
from __future__ import annotations

import inspect
import json
import logging
import math

import pytest
import torch

from gemma4_fast.kernels import _common

from gemma4_fast.kernels._compile_check import compile_for_target
from gemma4_fast.kernels.rmsnorm import (RMSNormOutput, rms_norm, rms_norm_naive, rms_norm_pair_residual,
                                         rms_norm_pair_residual_naive, rms_norm_residual, rms_norm_residual_naive)
from gemma4_fast.kernels.rmsnorm import rmsnorm as rn
from gemma4_fast.kernels._common import next_power_of_2
from _compile_tests import compile_fit_tests
from _inputs import three_way_excess

GEMMA4_WIDTHS = (1536, 2560, 2816, 3840, 5376, 256, 512)


def _hf_norm(width, weight, eps=1e-6):
    from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm
    mod = Gemma4RMSNorm(width, eps=eps, with_scale=weight is not None)
    if weight is not None:
        mod.weight.data = weight.clone()
    return mod.to(weight.device if weight is not None else "cpu")


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _check(fast, ref64, lowp, *, dtype, rtol32=1e-5, atol=1e-5, flip=None, flip_frac=1e-3):
    """fp32: relative error <= rtol32; fp16/bf16: |fast - ref| <= 2 |lowp - ref| + atol elementwise.

    ``flip`` (a tensor like ``ref64``): the extra error one rounding flip of an intermediate cast
    causes (the residual op rounds the norm to x's dtype before the add, as HF does; an fp32 sum
    that lands within ~1e-7 of a rounding boundary can round either way). At most ``flip_frac`` of
    the elements may use it.
    """
    assert fast.dtype == dtype
    assert not torch.isnan(fast).any(), "NaN in the fast output"
    if dtype == torch.float32:
        assert _rel(fast, ref64) <= rtol32
        return
    bad, err, bound = three_way_excess(fast, ref64, lowp, atol)
    if flip is not None and bad.any():
        assert bad.double().mean().item() <= flip_frac, f"{bad.sum().item()} elements break the three-way rule"
        over = err[bad] - (bound[bad] + flip.double()[bad])
        assert (over <= 0).all(), f"an element is off by more than one rounding flip: {over.max().item():.3g}"
        return
    assert not bad.any(), f"{bad.sum().item()} elements break the three-way rule; max err {err.max().item():.3g}"


def _ulp(v, dtype):
    """One unit in the last place of ``dtype`` at the magnitude of ``v`` (float64)."""
    v = v.double().abs().clamp_min(torch.finfo(dtype).tiny)
    return torch.exp2(torch.floor(torch.log2(v))) * torch.finfo(dtype).eps


def _residual_flips(x, r, w, w2, eps=1e-6):
    """Per-element error allowed for one flip in the residual op's casts (see ``_check``):
    of ``out``: an ulp of the normed rows (x's dtype) plus an ulp of out; of the next norm: that
    change of out carried through ``scale2 * w2``, plus an ulp of the result."""
    out_dtype = torch.promote_types(r.dtype, x.dtype)
    h64 = rms_norm_naive(x.double(), w.double(), eps)
    out64 = r.double() + h64
    f_out = _ulp(h64, x.dtype) + _ulp(out64, out_dtype)
    if w2 is None:
        return (f_out,)
    nxt64 = rms_norm_naive(out64, w2.double(), eps)
    gain = (nxt64 / out64.where(out64 != 0, torch.ones_like(out64))).abs()
    return f_out, f_out * gain + _ulp(nxt64, out_dtype)


def _rand(*shape, dtype, device="cpu", scale=1.0):
    return (torch.randn(*shape, dtype=torch.float32, device=device) * scale + 0.1).to(dtype)


# --------------------------------------------------------------------------------------------
# CPU (interpreter)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("width,rows", [(97, 1), (97, 37), (300, 3), (300, 130), (256, 70)])
@pytest.mark.parametrize("with_scale", [True, False])
def test_matches_naive_and_hf(dtype, width, rows, with_scale):
    x = _rand(rows, width, dtype=dtype, scale=3.0)
    w = _rand(width, dtype=dtype) if with_scale else None
    y = rms_norm(x, w)
    assert y.shape == x.shape and y.dtype == dtype and isinstance(y, torch.Tensor)
    ref64 = rms_norm_naive(x.double(), None if w is None else w.double())
    hf = _hf_norm(width, w)(x)
    naive = rms_norm_naive(x, w)
    _check(y, ref64, hf, dtype=dtype)
    _check(y, ref64, naive, dtype=dtype)
    if dtype == torch.float32:
        assert _rel(y, hf) <= 1e-5


def test_leading_shape_and_eps():
    x = _rand(2, 3, 5, 97, dtype=torch.float32)
    w = _rand(97, dtype=torch.float32)
    y = rms_norm(x, w, eps=1e-2)
    assert y.shape == x.shape
    assert _rel(y, rms_norm_naive(x.double(), w.double(), 1e-2)) <= 1e-5
    assert _rel(rms_norm(x[0, 0, 0], w), rms_norm_naive(x[0, 0, 0], w)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_extras(dtype):
    x = _rand(6, 5, 300, dtype=dtype, scale=2.0)
    w = _rand(300, dtype=dtype)
    out = rms_norm(x, w, return_scale=True, return_normalized=True)
    ref = rms_norm_naive(x, w, return_scale=True, return_normalized=True)
    assert isinstance(out, RMSNormOutput)
    assert out.scale.shape == (6, 5, 1) and out.scale.dtype == torch.float32
    assert out.normalized.shape == x.shape and out.normalized.dtype == dtype
    assert _rel(out.scale, ref.scale) <= 1e-6
    xf = x.double()
    scale64 = (xf.pow(2).mean(-1, keepdim=True) + 1e-6).pow(-0.5)
    _check(out.normalized, xf * scale64, ref.normalized, dtype=dtype)
    _check(out.y, rms_norm_naive(xf, w.double()), ref.y, dtype=dtype)
    only = rms_norm(x, w, return_scale=True)
    assert only.normalized is None and only.scale is not None
    only = rms_norm(x, None, return_normalized=True)
    assert only.scale is None and only.normalized is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fp32_normalized_rows(dtype):
    """``normalized_dtype=torch.float32``: the unrounded rows, bit-equal to ``x.float() * scale`` (TransformerLens's
    fp32 ``hook_normalized``), through strided leading dims too; a NaN-poisoned fp32 buffer is fully written."""
    x = _rand(4, 7, 2, 300, dtype=dtype, scale=2.0)[:, :, 1]
    w = _rand(300, dtype=dtype)
    out = rms_norm(x, w, return_scale=True, return_normalized=True, normalized_dtype=torch.float32)
    assert out.normalized.dtype == torch.float32 and out.normalized.shape == x.shape
    assert not torch.isnan(out.normalized).any()
    assert torch.equal(out.normalized, x.float() * out.scale)
    ref = rms_norm_naive(x, w, return_scale=True, return_normalized=True, normalized_dtype=torch.float32)
    assert ref.normalized.dtype == torch.float32
    assert _rel(out.normalized, ref.normalized) <= 1e-6
    assert torch.equal(out.y, rms_norm(x, w))
    with pytest.raises(TypeError, match="normalized_dtype"):
        rms_norm(x, w, return_normalized=True, normalized_dtype=torch.int32)
    xc = x.contiguous().view(-1, 300)
    y, scale = torch.empty_like(xc), torch.empty(xc.shape[0], 1)
    normed = torch.full(xc.shape, float("nan"))
    rn.rms_norm_fwd(xc, w, 1e-6, y, scale, normed, {"BLOCK_M": 4, "num_warps": 2})
    assert torch.equal(normed, xc.float() * scale)


def test_zero_rows_no_launch(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("launched on an empty input")
    monkeypatch.setattr(rn, "rms_norm_fwd", boom)
    monkeypatch.setattr(rn, "rms_norm_residual_fwd", boom)
    for shape in [(0, 97), (2, 0, 97)]:
        x = torch.randn(shape)
        w = torch.randn(97)
        assert rms_norm(x, w).shape == shape
        out = rms_norm(x, w, return_scale=True, return_normalized=True)
        assert out.y.shape == shape and out.scale.shape == (*shape[:-1], 1)
        o, n = rms_norm_residual(x, torch.randn(shape), w, next_weight=w)
        assert o.shape == shape and n.shape == shape


@pytest.mark.parametrize("cfg", [{"BLOCK_M": 1, "num_warps": 1}, {"BLOCK_M": 4, "num_warps": 2},
                                 {"BLOCK_M": 16, "num_warps": 4}])
def test_poisoned_outputs_fully_written(cfg):
    rows, width = 23, 97
    x = _rand(rows, width, dtype=torch.float32)
    w = _rand(width, dtype=torch.float32)
    y = torch.full_like(x, float("nan"))
    scale = torch.full((rows, 1), float("nan"))
    normed = torch.full_like(x, float("nan"))
    rn.rms_norm_fwd(x, w, 1e-6, y, scale, normed, cfg)
    ref = rms_norm_naive(x, w, return_scale=True, return_normalized=True)
    for got, want in zip((y, scale, normed), ref):
        assert not torch.isnan(got).any()
        assert _rel(got, want) <= 1e-5
    r = _rand(rows, width, dtype=torch.float32)
    out = torch.full_like(x, float("nan"))
    nxt = torch.full_like(x, float("nan"))
    rn.rms_norm_residual_fwd(x, r, w, 1e-6, out, w, 1e-5, nxt, cfg)
    ro, rnxt = rms_norm_residual_naive(x, r, w, 1e-6, next_weight=w, next_eps=1e-5)
    assert not torch.isnan(out).any() and not torch.isnan(nxt).any()
    assert _rel(out, ro) <= 1e-5 and _rel(nxt, rnxt) <= 1e-5


def test_nan_only_where_reference_has_it():
    x = _rand(9, 97, dtype=torch.float32)
    x[3, 5] = float("nan")
    y = rms_norm(x, _rand(97, dtype=torch.float32))
    assert torch.isnan(y[3]).all()
    assert not torch.isnan(y[torch.arange(9) != 3]).any()


def test_strided_views_no_copy(caplog):
    base = _rand(2, 5, 3, 64, dtype=torch.float32)          # [B, S, H, D]
    w = _rand(64, dtype=torch.float32)
    views = {
        "transposed [B,H,S,D]": base.transpose(1, 2),
        "head slice": base[:, :, 1:],
        "row slice of a wider tensor": _rand(11, 160, dtype=torch.float32)[:, 16:80],
        "strided leading dim": base[:, ::2],
    }
    with caplog.at_level(logging.INFO, logger="gemma4_fast"):
        for name, v in views.items():
            assert v.stride(-1) == 1 and not v.is_contiguous(), name
            assert _rel(rms_norm(v, w), rms_norm_naive(v, w)) <= 1e-5, name
            r = torch.randn_like(v)
            o, n = rms_norm_residual(v, r, w, next_weight=w)
            ro, rnx = rms_norm_residual_naive(v, r, w, next_weight=w)
            assert _rel(o, ro) <= 1e-5 and _rel(n, rnx) <= 1e-5, name
    assert "copying" not in caplog.text


def test_layouts_that_copy_are_logged(caplog):
    w = _rand(32, dtype=torch.float32)
    last_strided = _rand(6, 64, dtype=torch.float32)[:, ::2]
    many_lead = _rand(3, 4, 5, 6, 32, dtype=torch.float32).permute(3, 1, 0, 2, 4)[:, ::2]
    _common._LOGGED.clear()
    with caplog.at_level(logging.INFO, logger="gemma4_fast"):
        assert _rel(rms_norm(last_strided, w), rms_norm_naive(last_strided, w)) <= 1e-5
        assert "last-dim stride" in caplog.text
        assert _rel(rms_norm(many_lead, w), rms_norm_naive(many_lead, w)) <= 1e-5
        assert "more than 3 strides" in caplog.text


def test_lead_layout_merges():
    t = torch.empty(2, 5, 3, 64)
    assert rn._lead_layout(tuple(t.shape), tuple(t.stride())) == ([30], [[64]])
    v = t.transpose(1, 2)
    assert rn._lead_layout(tuple(v.shape), tuple(v.stride())) == ([2, 3, 5], [[960, 64, 192]])
    assert rn._lead_layout((1, 1, 64), (64, 64, 1)) == ([1], [[0]])


@pytest.mark.parametrize("dtype,rdtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                          (torch.float16, torch.float32)])
@pytest.mark.parametrize("with_next", [False, True])
@pytest.mark.parametrize("with_scale", [True, False])
def test_residual(dtype, rdtype, with_next, with_scale):
    rows, width = 29, 300
    x = _rand(rows, width, dtype=dtype, scale=4.0)
    r = _rand(rows, width, dtype=rdtype, scale=2.0)
    w = _rand(width, dtype=dtype) if with_scale else None
    w2 = _rand(width, dtype=dtype) if with_next else None
    got = rms_norm_residual(x, r, w, 1e-6, next_weight=w2, next_eps=1e-5)
    want = rms_norm_residual_naive(x, r, w, 1e-6, next_weight=w2, next_eps=1e-5)
    out_dtype = torch.promote_types(rdtype, dtype)
    hf_out = r + _hf_norm(width, w)(x)
    if not with_next:
        assert isinstance(got, torch.Tensor)
        got, want = (got,), (want,)
    else:
        assert isinstance(got, tuple) and len(got) == 2
    assert got[0].dtype == out_dtype
    if out_dtype == torch.float32:
        assert _rel(got[0], hf_out) <= 1e-5
    else:
        diff = (got[0].float() - hf_out.float()).abs()
        ulp = hf_out.float().abs() * 2 ** -10 + 1e-6
        assert (diff <= ulp).all()
    for g, n in zip(got, want):
        assert not torch.isnan(g).any()
        assert _rel(g, n) <= (1e-5 if out_dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("sdtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("with_next", [False, True])
def test_residual_out_scale(dtype, sdtype, with_next):
    """``out_scale`` (HF's closing ``hidden *= layer_scalar``): the rounded sum times the scalar, rounded again,
    bit-equal to the unscaled kernel output multiplied in place as HF does; the next norm sees the scaled rows."""
    rows, width = 37, 211
    x = _rand(rows, width, dtype=dtype, scale=4.0)
    r = _rand(rows, width, dtype=dtype, scale=2.0)
    w = _rand(width, dtype=dtype)
    w2 = _rand(width, dtype=dtype) if with_next else None
    s = torch.tensor([0.37], dtype=sdtype)
    got = rms_norm_residual(x, r, w, 1e-6, next_weight=w2, out_scale=s)
    want = rms_norm_residual_naive(x, r, w, 1e-6, next_weight=w2, out_scale=s)
    plain = rms_norm_residual(x, r, w, 1e-6)
    plain *= s
    if with_next:
        got, nxt = got
        want, want_next = want
        assert _rel(nxt, want_next) <= (1e-5 if dtype == torch.float32 else 2e-3)
        assert _rel(nxt, rms_norm_naive(got, w2, 1e-6)) <= (1e-5 if dtype == torch.float32 else 2e-3)
    assert got.dtype == dtype and not torch.isnan(got).any()
    assert torch.equal(got, plain)
    assert _rel(got, want) <= (1e-5 if dtype == torch.float32 else 2e-3)


def _pair_inputs(rows, width, dtype, rdtype=None, device="cpu"):
    x1 = _rand(rows, width, dtype=dtype, scale=3.0, device=device)
    x2 = _rand(rows, width, dtype=dtype, scale=5.0, device=device)
    r = _rand(rows, width, dtype=rdtype or dtype, scale=2.0, device=device)
    ws = [_rand(width, dtype=dtype, device=device) for _ in range(3)]
    return x1, x2, r, ws


@pytest.mark.parametrize("dtype,rdtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                          (torch.float16, torch.float32)])
@pytest.mark.parametrize("with_scale", [False, True])
@pytest.mark.parametrize("width", [37, 300])
def test_pair_residual(dtype, rdtype, with_scale, width):
    """The MoE tail vs its naive twin (HF's five ops) and vs HF's modules; output NaN-filled before the launch."""
    from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm

    rows = 29
    x1, x2, r, (w1, w2, w) = _pair_inputs(rows, width, dtype, rdtype)
    s = torch.tensor([0.61]) if with_scale else None
    out = torch.full((rows, width), float("nan"), dtype=torch.promote_types(rdtype, dtype))
    rn.rms_norm_pair_residual_fwd(x1, x2, r, w1, w2, w, 1e-6, 1e-5, 1e-6, out, s, rn.pair_config(width))
    want = rms_norm_pair_residual_naive(x1, x2, r, w1, w2, w, 1e-6, 1e-5, 1e-6, out_scale=s)
    got = rms_norm_pair_residual(x1, x2, r, w1, w2, w, 1e-6, 1e-5, 1e-6, out_scale=s)
    norms = []
    for weight, eps in ((w1, 1e-6), (w2, 1e-5), (w, 1e-6)):
        m = Gemma4RMSNorm(width, eps=eps).to(dtype)
        m.weight.data.copy_(weight)
        norms.append(m)
    with torch.no_grad():
        hf = r + norms[2](norms[0](x1) + norms[1](x2))
        if s is not None:
            hf *= s
    assert got.dtype == out.dtype == want.dtype == hf.dtype and not torch.isnan(out).any()
    assert torch.equal(got, out)
    tol = 1e-5 if dtype == torch.float32 else 4e-3
    assert _rel(got, want) <= tol and _rel(got, hf) <= tol


def test_pair_residual_errors_and_fallbacks():
    x1, x2, r, (w1, w2, w) = _pair_inputs(5, 24, torch.float32)
    with pytest.raises(ValueError, match="x2"):
        rms_norm_pair_residual(x1, x2[:4], r, w1, w2, w)
    with pytest.raises(TypeError, match="x2"):
        rms_norm_pair_residual(x1, x2.half(), r, w1, w2, w)
    with pytest.raises(ValueError, match="w2"):
        rms_norm_pair_residual(x1, x2, r, w1, None, w)
    with pytest.raises(ValueError, match="out_scale"):
        rms_norm_pair_residual(x1, x2, r, w1, w2, w, out_scale=torch.ones(3))
    xg = x1.clone().requires_grad_()
    got = rms_norm_pair_residual(xg, x2, r, w1, w2, w)
    assert got.requires_grad
    torch.testing.assert_close(got, rms_norm_pair_residual(x1, x2, r, w1, w2, w), rtol=1e-5, atol=1e-5)
    strided = torch.cat([x1, x1], dim=1)[:, :24]
    torch.testing.assert_close(rms_norm_pair_residual(strided, x2, r, w1, w2, w),
                               rms_norm_pair_residual_naive(x1, x2, r, w1, w2, w), rtol=1e-5, atol=1e-5)


def test_residual_out_scale_rejects_vectors():
    x = _rand(3, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match="out_scale"):
        rms_norm_residual(x, x, None, out_scale=torch.ones(2))


def test_autograd_routes_to_naive(caplog):
    x = _rand(7, 97, dtype=torch.float32).requires_grad_()
    w = _rand(97, dtype=torch.float32).requires_grad_()
    _common._LOGGED.clear()
    with caplog.at_level(logging.INFO, logger="gemma4_fast"):
        y = rms_norm(x, w)
    assert "gradients requested" in caplog.text
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), g)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    gx2, gw2 = torch.autograd.grad(_hf_norm(97, None)(x2) * w2, (x2, w2), g)
    assert _rel(gx, gx2) <= 1e-5 and _rel(gw, gw2) <= 1e-5
    r = _rand(7, 97, dtype=torch.float32).requires_grad_()
    o, n = rms_norm_residual(x, r, w, next_weight=w)
    go = torch.autograd.grad((o.sum() + n.sum()), (x, r, w))
    x3, r3, w3 = (t.detach().clone().requires_grad_() for t in (x, r, w))
    o3, n3 = rms_norm_residual_naive(x3, r3, w3, next_weight=w3)
    go3 = torch.autograd.grad((o3.sum() + n3.sum()), (x3, r3, w3))
    assert all(_rel(a, b) <= 1e-5 for a, b in zip(go, go3))
    with torch.no_grad():
        assert not rms_norm(x, w).requires_grad


def test_errors(monkeypatch):
    x = torch.randn(4, 97)
    with pytest.raises(TypeError, match="x"):
        rms_norm(torch.ones(4, 97, dtype=torch.int32))
    with pytest.raises(TypeError, match="x"):
        rms_norm(x.double())
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.randn(96))
    with pytest.raises(TypeError, match="weight"):
        rms_norm(x, torch.randn(97).double())
    with pytest.raises(ValueError, match="weight"):
        rms_norm(x, torch.randn(97, device="meta"))
    with pytest.raises(ValueError, match="residual"):
        rms_norm_residual(x, torch.randn(4, 96), None)
    with pytest.raises(TypeError, match="residual"):
        rms_norm_residual(x, torch.randn(4, 97).double(), None)
    with pytest.raises(ValueError, match="next_weight"):
        rms_norm_residual(x, x, None, next_weight=torch.randn(5))
    with pytest.raises(TypeError, match="x"):
        rms_norm(x.numpy())
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="x is on cpu"):
        rms_norm(x)
    with pytest.raises(RuntimeError, match="x is on cpu"):
        rms_norm_residual(x, x, None)


def test_pinned_config(monkeypatch):
    monkeypatch.setenv(rn.CONFIG_ENV, json.dumps({"BLOCK_M": 2, "num_warps": 1}))
    assert rn.pick_config(torch.empty(1), 97, 10)["BLOCK_M"] == 2
    x = _rand(11, 97, dtype=torch.float32)
    w = _rand(97, dtype=torch.float32)
    assert _rel(rms_norm(x, w), rms_norm_naive(x, w)) <= 1e-5


def test_interpreter_keeps_one_program_per_block():
    cfg = {"BLOCK_M": 1, "num_warps": 4, "NUM_STAGES": 2, "PROGRAMS_PER_SM": 4}
    assert rn._grid(torch.empty(1), 100, cfg) == (100, 100)


def _signature(kernel, dtype="bf16"):
    names = list(inspect.signature(kernel.fn).parameters)
    sig = {}
    for n in names:
        if n in ("SCALE", "NORMED"):  # NORMED: the fp32 rows of hook_normalized (the wider of its two dtypes)
            sig[n] = "*fp32"
        elif n in ("X", "R", "W", "W2", "Y", "OUT", "NEXT", "S_OUT", "X1", "X2", "W1"):
            sig[n] = f"*{dtype}"
        elif n in ("n_rows", "n_blocks", "nprog", "D", "N1", "N2"):
            sig[n] = "i32"
        elif n in ("sx0", "sx1", "sx2", "sr0", "sr1", "sr2"):
            sig[n] = "i64"
        elif n in ("eps", "eps2", "eps1", "s_in", "s_mul"):
            sig[n] = "fp32"
    return names, sig


def _compile_all(kernel, constexpr_sets, capability):
    """Compile each (constexprs, num_warps) for ``sm_<capability>``; return the ones that fail or don't fit."""
    names, sig = _signature(kernel)
    bad = []
    for cx, nw in constexpr_sets:
        full = dict(sig)
        for k in cx:
            full[k] = "constexpr"
        ordered = {n: full[n] for n in names}
        res = compile_for_target(kernel, ordered, cx, capability=capability, num_warps=nw,
                                 num_stages=cx.get("NUM_STAGES", 1))
        if not res.fits:
            bad.append([kernel.__name__, cx, nw, res.shared])
    return bad


def _shipped_configs():
    """Every config the wrapper can pick: the defaults at Gemma 4 widths and the tuned tables."""
    out = []
    for width in GEMMA4_WIDTHS:
        for rows in (1, 4096, 1 << 20):
            out.append((next_power_of_2(width), rn.default_config(width, rows)))
    for path in sorted(rn._CONFIG_DIR.glob("*.json")):
        for key, cfg in json.loads(path.read_text())["configs"].items():
            bn = int(key.split(":")[0])
            out.append((bn, {**rn.default_config(bn, 1), **cfg}))
    uniq = {json.dumps([bn, c], sort_keys=True): (bn, c) for bn, c in out}
    return list(uniq.values())


def _constexprs(bn, cfg, residual):
    persistent = cfg.get("PROGRAMS_PER_SM", 0) > 0
    base = dict(LEAD=3, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=bn, PERSISTENT=persistent,
                NUM_STAGES=cfg.get("NUM_STAGES", 1))
    if residual:
        return dict(HAS_W=True, HAS_NEXT=True, HAS_OUT_SCALE=True, HAS_IN_SCALE=True, HAS_OUT_MUL=True, **base)
    return dict(HAS_W=True, WRITE_SCALE=True, WRITE_NORMED=True, **base)


def _compile_report(capability, candidates):
    """Run in a subprocess without the interpreter (jitted kernels only compile there)."""
    if candidates:
        pairs = [(bn, c) for bn in sorted({next_power_of_2(w) for w in GEMMA4_WIDTHS})
                 for c in rn.rms_norm_configs(bn)]
    else:
        pairs = _shipped_configs()
    bad = []
    for bn, cfg in pairs:
        bad += _compile_all(rn.rms_norm_fwd_kernel, [(_constexprs(bn, cfg, False), cfg["num_warps"])], capability)
        bad += _compile_all(rn.rms_norm_residual_fwd_kernel, [(_constexprs(bn, cfg, True), cfg["num_warps"])],
                            capability)
    for width in GEMMA4_WIDTHS:
        cfg = rn.pair_config(width)
        cx = dict(HAS_OUT_SCALE=True, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=next_power_of_2(width))
        bad += _compile_all(rn.rms_norm_pair_residual_fwd_kernel, [(cx, cfg["num_warps"])], capability)
    return {"checked": len(pairs) + len(GEMMA4_WIDTHS), "bad": bad}


test_default_configs_compile_and_fit, test_candidate_configs_compile_and_fit = compile_fit_tests(__file__)


# --------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------

GPU_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("width", GEMMA4_WIDTHS)
@pytest.mark.parametrize("with_scale", [True, False])
def test_gpu_real_widths_vs_hf(dtype, width, with_scale):
    rows = 1037 if width > 512 else 4099
    x = _rand(rows, width, dtype=dtype, device="cuda", scale=5.0)
    w = _rand(width, dtype=dtype, device="cuda") if with_scale else None
    y = rms_norm(x, w)
    ref64 = rms_norm_naive(x.double(), None if w is None else w.double())
    hf = _hf_norm(width, w).to("cuda")(x)
    _check(y, ref64, hf, dtype=dtype)
    out = rms_norm(x, w, return_scale=True, return_normalized=True)
    ref = rms_norm_naive(x, w, return_scale=True, return_normalized=True)
    assert torch.equal(out.y, y)
    assert _rel(out.scale, ref.scale) <= 1e-6
    xf = x.double()
    _check(out.normalized, xf * (xf.pow(2).mean(-1, keepdim=True) + 1e-6).pow(-0.5), ref.normalized, dtype=dtype)
    f32 = rms_norm(x, w, return_scale=True, return_normalized=True, normalized_dtype=torch.float32)
    assert torch.equal(f32.y, y) and torch.equal(f32.normalized, x.float() * f32.scale)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("width", [2816, 1536, 5376, 256])
@pytest.mark.parametrize("with_next", [False, True])
def test_gpu_residual(dtype, width, with_next):
    rows = 2051
    x = _rand(rows, width, dtype=dtype, device="cuda", scale=8.0)
    r = _rand(rows, width, dtype=dtype, device="cuda", scale=4.0)
    w = _rand(width, dtype=dtype, device="cuda")
    w2 = _rand(width, dtype=dtype, device="cuda") if with_next else None
    got = rms_norm_residual(x, r, w, next_weight=w2)
    want = rms_norm_residual_naive(x, r, w, next_weight=w2)
    ref64 = rms_norm_residual_naive(x.double(), r.double(), w.double(),
                                    next_weight=None if w2 is None else w2.double())
    if not with_next:
        got, want, ref64 = (got,), (want,), (ref64,)
    hf_out = r + _hf_norm(width, w).to("cuda")(x)
    for g, n, f, fl in zip(got, want, ref64, _residual_flips(x, r, w, w2)):
        _check(g, f, n, dtype=dtype, atol=2e-5, flip=fl)
    if dtype == torch.float32:
        assert _rel(got[0], hf_out) <= 1e-6
    else:
        mismatch = (got[0] != hf_out).float().mean().item()
        assert mismatch <= 1e-3, mismatch


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("width", [2816, 1536])
def test_gpu_pair_residual(dtype, width):
    rows = 4097
    x1, x2, r, (w1, w2, w) = _pair_inputs(rows, width, dtype, device="cuda")
    s = torch.tensor([0.61], device="cuda", dtype=dtype)
    out = torch.full((rows, width), float("nan"), dtype=dtype, device="cuda")
    rn.rms_norm_pair_residual_fwd(x1, x2, r, w1, w2, w, 1e-6, 1e-6, 1e-6, out, s, rn.pair_config(width))
    want = rms_norm_pair_residual_naive(x1, x2, r, w1, w2, w, out_scale=s)
    ref64 = rms_norm_pair_residual_naive(x1.double(), x2.double(), r.double(), w1.double(), w2.double(), w.double(),
                                         out_scale=s.double())
    assert not torch.isnan(out).any()
    if dtype == torch.float32:
        assert _rel(out, ref64) <= 1e-5
    else:
        bad, err, _ = three_way_excess(out, ref64, want, 2e-3)
        assert not bad.any(), err.max().item()
        assert (out != want).float().mean().item() <= 0.02


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [256, 512])
def test_gpu_per_head_views(dtype, head_dim):
    B, S, H = 2, 333, 8
    qkv = _rand(B, S, 3 * H * head_dim, dtype=dtype, device="cuda", scale=3.0)
    q = qkv[..., : H * head_dim].view(B, S, H, head_dim)
    w = _rand(head_dim, dtype=dtype, device="cuda")
    for v in (q, q.transpose(1, 2)):
        assert not v.is_contiguous()
        _check(rms_norm(v, w), rms_norm_naive(v.double(), w.double()), rms_norm_naive(v, w), dtype=dtype)
        _check(rms_norm(v), rms_norm_naive(v.double()), rms_norm_naive(v), dtype=dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("width", GEMMA4_WIDTHS)
def test_gpu_every_candidate_config_poisoned(width):
    rows = 3001
    dtype = torch.bfloat16
    x = _rand(rows, width, dtype=dtype, device="cuda", scale=2.0)
    r = _rand(rows, width, dtype=dtype, device="cuda")
    w = _rand(width, dtype=dtype, device="cuda")
    ref = rms_norm_naive(x, w, return_scale=True, return_normalized=True)
    ref_o, ref_n = rms_norm_residual_naive(x, r, w, next_weight=w)
    for cfg in rn.rms_norm_configs(width):
        y, nm = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
        sc = torch.full((rows, 1), float("nan"), device="cuda")
        rn.rms_norm_fwd(x, w, 1e-6, y, sc, nm, cfg)
        o, n = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
        rn.rms_norm_residual_fwd(x, r, w, 1e-6, o, w, 1e-6, n, cfg)
        for got, want in ((y, ref.y), (sc, ref.scale), (nm, ref.normalized), (o, ref_o), (n, ref_n)):
            assert not torch.isnan(got).any(), cfg
            assert _rel(got, want) <= 1e-2, cfg
        assert (y != ref.y).float().mean().item() <= 1e-3, cfg


@pytest.mark.cuda
def test_gpu_zero_rows_and_large_rows():
    w = torch.randn(256, device="cuda", dtype=torch.bfloat16)
    assert rms_norm(torch.empty(0, 256, device="cuda", dtype=torch.bfloat16), w).shape == (0, 256)
    x = _rand(1 << 20, 256, dtype=torch.bfloat16, device="cuda")
    y = rms_norm(x, w)
    assert not torch.isnan(y).any()
    assert (y != rms_norm_naive(x, w)).float().mean().item() <= 1e-3
    assert math.isfinite(y.float().abs().max().item())
