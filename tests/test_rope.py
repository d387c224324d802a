"""Tests of ``gemma4_fast.kernels.rope``: Triton RoPE vs ``naive.py`` vs HF ``apply_rotary_pos_emb``.

CPU runs use Triton's interpreter (tiny sizes, float32/float16); ``@pytest.mark.cuda`` tests run Gemma 4's
head dims (256 sliding, 512 full attention) with the real rotary tables in bfloat16/float16/float32.
"""
from __future__ import annotations

import copy
import importlib
import inspect
import json
import logging

import pytest
import torch

from gemma4_fast.kernels import _common
from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRotaryEmbedding, apply_rotary_pos_emb

from gemma4_fast import ops
from gemma4_fast.kernels._compile_check import compile_for_target
from gemma4_fast.kernels.rope import rope, rope_naive, rope_qk, rope_qk_naive, unsupported_reason
from gemma4_fast.models import text_config
from _compile_tests import compile_fit_tests
from _inputs import three_way_excess

rp = importlib.import_module("gemma4_fast.kernels.rope.rope")

GEMMA4_HEAD_DIMS = (256, 512)


def _hf(x, cos, sin):
    return apply_rotary_pos_emb(x, cos, sin, unsqueeze_dim=2)


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _check(fast, ref64, lowp, *, dtype, rtol32=1e-6, atol=1e-5):
    """fp32: relative error <= rtol32; fp16/bf16: |fast - ref| <= 2 |lowp - ref| + atol elementwise."""
    assert fast.dtype == dtype
    assert not torch.isnan(fast).any(), "NaN in the fast output"
    if dtype == torch.float32:
        assert _rel(fast, ref64) <= rtol32
        return
    bad, err, _ = three_way_excess(fast, ref64, lowp, atol)
    assert not bad.any(), f"{bad.sum().item()} elements break the three-way rule; max err {err.max().item():.3g}"


def _ref64(x, cos, sin):
    return rope_naive(x.double(), cos.double(), sin.double())


def _tables(preset, layer_type, batch, seq, dtype, device="cpu", offsets=None):
    """HF's rotary tables ``(cos, sin)`` for ``layer_type`` of ``preset``: ``[1, S, D]`` when ``offsets`` is
    None, else ``[B, S, D]`` with positions shifted per row (left padding)."""
    rot = Gemma4TextRotaryEmbedding(text_config(preset), device=device)
    if offsets is None:
        pos = torch.arange(seq, device=device)[None]
    else:
        pos = torch.arange(seq, device=device)[None] + torch.tensor(offsets, device=device)[:batch, None]
    return rot(torch.zeros(1, dtype=dtype, device=device), pos, layer_type)


def _rand(*shape, dtype, device="cpu", scale=1.0):
    return (torch.randn(*shape, dtype=torch.float32, device=device) * scale).to(dtype)


def _poisoned_run(x, cos, sin, cfg, k=None):
    out = torch.full(x.shape, float("nan"), dtype=x.dtype, device=x.device)
    out_k = None if k is None else torch.full(k.shape, float("nan"), dtype=k.dtype, device=k.device)
    rp.rope_fwd(x, k, cos, sin, out, out_k, cfg)
    return out if k is None else (out, out_k)


# --------------------------------------------------------------------------------------------
# CPU (interpreter)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(2, 13, 3, 24), (1, 37, 5, 40), (3, 5, 1, 20), (1, 1, 7, 2), (2, 19, 2, 36)])
def test_matches_naive_and_hf(dtype, shape):
    B, S, H, D = shape
    x = _rand(*shape, dtype=dtype, scale=3.0)
    cos, sin = _rand(B, S, D, dtype=dtype), _rand(B, S, D, dtype=dtype)
    y = rope(x, cos, sin)
    assert y.shape == x.shape and y.dtype == dtype and y.is_contiguous()
    ref64 = _ref64(x, cos, sin)
    _check(y, ref64, _hf(x, cos, sin), dtype=dtype)
    _check(y, ref64, rope_naive(x, cos, sin), dtype=dtype)
    if dtype == torch.float32:
        assert _rel(y, _hf(x, cos, sin)) <= 1e-6
    cfg = rp.pick_config(D, B * S)
    _check(_poisoned_run(x, cos, sin, cfg), ref64, _hf(x, cos, sin), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("preset", ["tiny-ple-kv-shared", "E2B"])
@pytest.mark.parametrize("layer_type", ["sliding_attention", "full_attention"])
def test_real_tables_both_layer_types(dtype, preset, layer_type):
    """HF's rotary module output: default RoPE (sliding) and proportional partial RoPE (full attention:
    cos = 1, sin = 0 on the non-rotated frequencies), broadcast ``[1, S, D]`` and per-row ``[B, S, D]``."""
    B, S, H = 2, 11, 3
    for offsets in (None, [0, 5]):
        cos, sin = _tables(preset, layer_type, B, S, dtype, offsets=offsets)
        D = cos.shape[-1]
        x = _rand(B, S, H, D, dtype=dtype, scale=2.0)
        y = rope(x, cos, sin)
        _check(y, _ref64(x, cos, sin), _hf(x, cos, sin), dtype=dtype)
        if layer_type == "full_attention":
            still = (sin == 0).all(dim=(0, 1)) & (cos == 1).all(dim=(0, 1))
            assert still.any()
            assert torch.equal(y[..., still], x[..., still])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_strided_views(dtype):
    """q as a view of a fused projection, a head-transposed view and a broadcast cos/sin batch."""
    B, S, H, D = 2, 9, 3, 24
    fused = _rand(B, S, (H + 2) * D, dtype=dtype, scale=2.0)
    q = fused[..., D: D + H * D].view(B, S, H, D)
    t = _rand(B, H, S, D, dtype=dtype).transpose(1, 2)
    cos, sin = _rand(1, S, D, dtype=dtype), _rand(1, S, D, dtype=dtype)
    for v in (q, t):
        assert not v.is_contiguous()
        _check(rope(v, cos, sin), _ref64(v, cos, sin), _hf(v, cos, sin), dtype=dtype)
    wide_cos = _rand(1, S, 2 * D, dtype=dtype)[..., ::2]
    assert wide_cos.stride(-1) == 2
    _check(rope(q, wide_cos, sin), _ref64(q, wide_cos, sin), _hf(q, wide_cos, sin), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hq,hk", [(3, 1), (4, 2), (1, 5)])
def test_rope_qk(dtype, hq, hk):
    B, S, D = 2, 7, 20
    q = _rand(B, S, hq, D, dtype=dtype, scale=2.0)
    k = _rand(B, S, hk + 1, D, dtype=dtype, scale=2.0)[:, :, 1:]
    cos, sin = _tables("tiny-moe", "sliding_attention", B, S, dtype, offsets=[0, 3])
    gq, gk = rope_qk(q, k, cos, sin)
    for got, t in ((gq, q), (gk, k)):
        assert got.is_contiguous() and got.shape == t.shape
        _check(got, _ref64(t, cos, sin), _hf(t, cos, sin), dtype=dtype)
    for heads in (1, 2, 4):
        pq, pk = _poisoned_run(q, cos, sin, {"BLOCK_S": 4, "HEADS": heads, "num_warps": 1}, k=k)
        assert torch.equal(pq, gq) and torch.equal(pk, gk)
    nq, nk = rope_qk_naive(q, k, cos, sin)
    assert torch.equal(nq, _hf(q, cos, sin)) and torch.equal(nk, _hf(k, cos, sin))


def test_every_candidate_config_poisoned():
    B, S, H, D = 2, 11, 3, 24
    x = _rand(B, S, H, D, dtype=torch.float32)
    cos, sin = _rand(1, S, D, dtype=torch.float32), _rand(1, S, D, dtype=torch.float32)
    ref = _hf(x, cos, sin)
    cfgs = rp.rope_configs(D)
    assert cfgs
    for cfg in cfgs:
        assert _rel(_poisoned_run(x, cos, sin, cfg), ref) <= 1e-6, cfg


def test_pinned_config(monkeypatch):
    monkeypatch.setenv(rp.CONFIG_ENV, json.dumps({"BLOCK_S": 2, "HEADS": 1, "num_warps": 1}))
    cfg = rp.pick_config(256, 10_000)
    assert (cfg["BLOCK_S"], cfg["HEADS"], cfg["num_warps"]) == (2, 1, 1)
    x = _rand(1, 5, 3, 24, dtype=torch.float32)
    cos, sin = _rand(1, 5, 24, dtype=torch.float32), _rand(1, 5, 24, dtype=torch.float32)
    assert _rel(rope(x, cos, sin), _hf(x, cos, sin)) <= 1e-6


def test_default_configs():
    for d in GEMMA4_HEAD_DIMS:
        for n in (1, 7, 4096, 1 << 20):
            for h in (1, 8):
                cfg = rp.default_config(d, n, h)
                assert cfg["BLOCK_S"] <= max(1, rp.token_bucket(n))
                assert 1 <= cfg["BLOCK_S"] * (d // 2) // (32 * cfg["num_warps"]) <= 32
                assert (cfg["HEADS"] == 1) == (h == 1)
            assert rp.pick_config(d, n, 1) == rp.default_config(d, rp.token_bucket(n), 1)
            assert rp.pick_config(d, n, 16) == rp.default_config(d, rp.token_bucket(n), 16)
    assert rp.token_bucket(3) == 16 and rp.token_bucket(5000) == 8192


def test_zero_sizes():
    cos, sin = torch.zeros(1, 0, 24), torch.zeros(1, 0, 24)
    assert rope(torch.zeros(2, 0, 3, 24), cos, sin).shape == (2, 0, 3, 24)
    cos, sin = _rand(1, 4, 24, dtype=torch.float32), _rand(1, 4, 24, dtype=torch.float32)
    q, k = _rand(1, 4, 0, 24, dtype=torch.float32), _rand(1, 4, 2, 24, dtype=torch.float32)
    gq, gk = rope_qk(q, k, cos, sin)
    assert gq.shape == q.shape and _rel(gk, _hf(k, cos, sin)) <= 1e-6


def test_errors(monkeypatch):
    x = torch.randn(1, 4, 2, 24)
    cos, sin = torch.randn(1, 4, 24), torch.randn(1, 4, 24)
    with pytest.raises(TypeError, match="x"):
        rope(x.double(), cos.double(), sin.double())
    with pytest.raises(ValueError, match="x must be 4-D"):
        rope(x[0], cos, sin)
    with pytest.raises(ValueError, match="x has head dim 23"):
        rope(x[..., :23], cos[..., :23], sin[..., :23])
    with pytest.raises(TypeError, match="cos has dtype"):
        rope(x, cos.half(), sin)
    with pytest.raises(ValueError, match="sin must have shape"):
        rope(x, cos, torch.randn(1, 5, 24))
    with pytest.raises(ValueError, match="cos must have shape"):
        rope(x, torch.randn(3, 4, 24), sin)
    with pytest.raises(ValueError, match="cos is on"):
        rope(x, cos.to("meta"), sin)
    with pytest.raises(TypeError, match="sin must be a torch.Tensor"):
        rope(x, cos, None)
    with pytest.raises(ValueError, match="k has shape"):
        rope_qk(x, torch.randn(1, 3, 2, 24), cos, sin)
    with pytest.raises(TypeError, match="k has dtype"):
        rope_qk(x, x.half(), cos, sin)
    assert "cos has dtype" in unsupported_reason(x, cos.half(), sin)
    assert unsupported_reason(x, cos, sin) is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="x is on cpu"):
        rope(x, cos, sin)
    with pytest.raises(RuntimeError, match="q is on cpu"):
        rope_qk(x, x, cos, sin)


def test_kernel_api_autograd_routes_to_naive(caplog):
    x = _rand(1, 5, 3, 24, dtype=torch.float32).requires_grad_()
    cos, sin = _rand(1, 5, 24, dtype=torch.float32), _rand(1, 5, 24, dtype=torch.float32)
    _common._LOGGED.clear()
    with caplog.at_level(logging.INFO, logger="gemma4_fast"):
        y = rope(x, cos, sin)
    assert "gradients requested" in caplog.text and y.requires_grad
    with torch.no_grad():
        assert not rope(x, cos, sin).requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ops_rope_backends(dtype, caplog):
    B, S, H, D = 2, 6, 3, 24
    x = _rand(B, S, H, D, dtype=dtype)
    cos, sin = _rand(1, S, D, dtype=dtype), _rand(1, S, D, dtype=dtype)
    assert torch.equal(ops.rope(x, cos, sin, backend="torch"), _hf(x, cos, sin))
    for backend in ("triton", "auto"):
        _check(ops.rope(x, cos, sin, backend=backend), _ref64(x, cos, sin), _hf(x, cos, sin), dtype=dtype)
    other = torch.float16 if dtype == torch.float32 else torch.float32
    _common._LOGGED.clear()
    with caplog.at_level(logging.INFO, logger="gemma4_fast"):
        out = ops.rope(x, cos.to(other), sin.to(other), backend="triton")
    assert "cos has dtype" in caplog.text
    assert torch.equal(out, _hf(x, cos.to(other), sin.to(other)))
    with pytest.raises(ValueError, match="backend"):
        ops.rope(x, cos, sin, backend="cuda")


def test_ops_rope_gradients_match_hf():
    """Triton forward, naive-recompute backward (``_NaiveBackward``) vs autograd through HF's call."""
    B, S, H, D = 2, 5, 3, 24
    x = _rand(B, S, H, D, dtype=torch.float32).requires_grad_()
    cos, sin = _tables("tiny-ple-kv-shared", "sliding_attention", B, S, torch.float32, offsets=[0, 2])
    cos, sin = cos.clone().requires_grad_(), sin.clone().requires_grad_()
    y = ops.rope(x, cos, sin, backend="triton")
    assert y.grad_fn is not None and "NaiveBackward" in type(y.grad_fn).__name__
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, cos, sin), g)
    x2, c2, s2 = (t.detach().clone().requires_grad_() for t in (x, cos, sin))
    want = torch.autograd.grad(_hf(x2, c2, s2), (x2, c2, s2), g)
    assert _rel(y.detach(), _hf(x2, c2, s2).detach()) <= 1e-6
    for a, b in zip(got, want):
        assert _rel(a, b) <= 1e-6


def test_attention_module_runs_the_kernel(monkeypatch):
    """The fast attention module fuses the unobserved q/k norms into the RoPE pass (``rms_norm_rope``) per its
    backend and keeps the seams; a hook on a norm brings back the module call and the plain RoPE op."""
    from gemma4_fast import hooks
    from gemma4_fast.models import build_model
    from gemma4_fast.patch import patch_model

    rope_mod = importlib.import_module("gemma4_fast.kernels.rope")
    calls = []

    def counting(name, fn):
        def run(x, *args, **kwargs):
            calls.append((name, tuple(x.shape)))
            return fn(x, *args, **kwargs)
        return run

    monkeypatch.setattr(rope_mod, "rope", counting("rope", rp.rope))
    monkeypatch.setattr(rope_mod, "rms_norm_rope", counting("fused", rp.rms_norm_rope))
    ref = build_model("tiny-dense-k-eq-v")
    fast = copy.deepcopy(ref)
    patch_model(fast, backend="triton")
    attn = fast.model.layers[0].self_attn
    seen = {}
    hooks.set_hooks(attn, rot_q=lambda t: seen.setdefault("q", t.clone()),
                    rot_k=lambda t: seen.setdefault("k", t.clone()))
    ids = torch.randint(3, 300, (1, 6))
    with torch.no_grad():
        out = fast(ids).logits
        want = ref(ids).logits
    assert _rel(out, want) <= 1e-4
    n_layers = len(fast.model.layers)
    assert [c[0] for c in calls] == ["fused"] * (2 * n_layers)
    assert seen["q"].shape == (1, 6, attn.config.num_attention_heads, attn.head_dim)
    assert seen["k"].is_contiguous()
    normed = []
    handle = attn.q_norm.register_forward_hook(lambda m, a, o: normed.append(o.clone()))
    calls.clear()
    seen.clear()
    with torch.no_grad():
        again = fast(ids).logits
    handle.remove()
    assert _rel(again, out) <= 1e-5 and len(normed) == 1
    assert [c[0] for c in calls] == ["rope"] + ["fused"] * (2 * n_layers - 1)
    cos, sin = _tables("tiny-dense-k-eq-v", attn.layer_type, 1, 6, normed[0].dtype)
    torch.testing.assert_close(seen["q"], rp.rope(normed[0], cos, sin), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# Compile for sm_80 / sm_90 (subprocess without the interpreter)
# --------------------------------------------------------------------------------------------

def _signature(kernel):
    names = list(inspect.signature(kernel.fn).parameters)
    sig = {}
    for n in names:
        if n in ("X", "K", "COS", "SIN", "OX", "OK", "W"):
            sig[n] = "*bf16"
        elif n in ("S", "HX", "HK", "GX", "HALF"):
            sig[n] = "i32"
        elif n in ("eps", "DIM"):
            sig[n] = "fp32"
        elif n.startswith("s"):
            sig[n] = "i64"
    return names, sig


def _compile_report(capability, candidates):
    """Compile every config the wrapper can pick (or every candidate) at Gemma 4 head dims."""
    names, sig = _signature(rp.rope_fwd_kernel)
    pairs = []
    for d in GEMMA4_HEAD_DIMS:
        if candidates:
            pairs += [(d, c) for c in rp.rope_configs(d)]
        else:
            pairs += [(d, rp.default_config(d, n, h)) for n in (1, 7, 4096, 1 << 20) for h in (1, 8)]
    uniq = {json.dumps([d, c], sort_keys=True): (d, c) for d, c in pairs}
    bad = []
    for d, cfg in uniq.values():
        for has_k, norm in ((False, False), (True, False), (False, True)):
            cx = dict(HAS_K=has_k, HEADS=cfg["HEADS"], BLOCK_S=cfg["BLOCK_S"], BLOCK_H=d // 2, NORM=norm)
            full = {**sig, **{k: "constexpr" for k in cx}}
            res = compile_for_target(rp.rope_fwd_kernel, {n: full[n] for n in names}, cx,
                                     capability=capability, num_warps=cfg["num_warps"], num_stages=1)
            if not res.fits:
                bad.append([d, cfg, has_k, norm, res.shared])
    return {"checked": len(uniq), "bad": bad}


test_default_configs_compile_and_fit, test_candidate_configs_compile_and_fit = compile_fit_tests(__file__)


# --------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------

GPU_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("layer_type", ["sliding_attention", "full_attention"])
@pytest.mark.parametrize("heads", [8, 1, 3])
def test_gpu_real_tables_vs_hf(dtype, layer_type, heads):
    B, S = 2, 1037
    cos, sin = _tables("E2B", layer_type, B, S, dtype, device="cuda", offsets=[0, 17])
    D = cos.shape[-1]
    fused = _rand(B, S, (heads + 1) * D, dtype=dtype, device="cuda", scale=4.0)
    x = fused[..., D:].view(B, S, heads, D)
    y = rope(x, cos, sin)
    _check(y, _ref64(x, cos, sin), _hf(x, cos, sin), dtype=dtype)
    _check(_poisoned_run(x, cos, sin, rp.pick_config(D, B * S)), _ref64(x, cos, sin), _hf(x, cos, sin),
           dtype=dtype)
    cos1, sin1 = cos[:1], sin[:1]
    _check(rope(x, cos1, sin1), _ref64(x, cos1, sin1), _hf(x, cos1, sin1), dtype=dtype)
    if dtype == torch.float32:
        assert _rel(y, _hf(x, cos, sin)) <= 1e-6


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim,hq,hk", [(256, 8, 1), (512, 32, 4), (256, 16, 8)])
def test_gpu_rope_qk(dtype, head_dim, hq, hk):
    B, S = 3, 517
    layer = "full_attention" if head_dim == 512 else "sliding_attention"
    cos, sin = _tables("E2B", layer, B, S, dtype, device="cuda")
    q = _rand(B, S, hq, head_dim, dtype=dtype, device="cuda", scale=3.0)
    k = _rand(B, hk, S, head_dim, dtype=dtype, device="cuda", scale=3.0).transpose(1, 2)
    gq, gk = rope_qk(q, k, cos, sin)
    for got, t in ((gq, q), (gk, k)):
        _check(got, _ref64(t, cos, sin), _hf(t, cos, sin), dtype=dtype)
        assert (got != rope(t, cos, sin)).float().mean().item() <= 1e-3


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.parametrize("head_dim", GEMMA4_HEAD_DIMS)
def test_gpu_every_candidate_config_poisoned(head_dim):
    B, S, H = 2, 301, 3
    dtype = torch.bfloat16
    layer = "full_attention" if head_dim == 512 else "sliding_attention"
    cos, sin = _tables("E2B", layer, B, S, dtype, device="cuda", offsets=[0, 9])
    x = _rand(B, S, H, head_dim, dtype=dtype, device="cuda", scale=2.0)
    k = _rand(B, S, H + 2, head_dim, dtype=dtype, device="cuda", scale=2.0)
    want = [(_ref64(t, cos, sin), _hf(t, cos, sin)) for t in (x, k)]
    for cfg in rp.rope_configs(head_dim):
        got = _poisoned_run(x, cos, sin, cfg)
        _check(got, *want[0], dtype=dtype)
        for g, (r64, hf) in zip(_poisoned_run(x, cos, sin, cfg, k=k), want):
            _check(g, r64, hf, dtype=dtype)


@pytest.mark.cuda
def test_gpu_ops_grad_and_decode():
    B, S, H, D = 2, 33, 8, 256
    cos, sin = _tables("E2B", "sliding_attention", B, S, torch.bfloat16, device="cuda")
    x = _rand(B, S, H, D, dtype=torch.bfloat16, device="cuda").requires_grad_()
    y = ops.rope(x, cos, sin, backend="triton")
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, (x,), g)
    x2 = x.detach().clone().requires_grad_()
    (gx2,) = torch.autograd.grad(_hf(x2, cos, sin), (x2,), g)
    assert torch.equal(gx, gx2)
    xd = _rand(64, 1, H, D, dtype=torch.bfloat16, device="cuda")
    cd, sd = _tables("E2B", "sliding_attention", 64, 1, torch.bfloat16, device="cuda", offsets=list(range(64)))
    _check(rope(xd, cd, sd), _ref64(xd, cd, sd), _hf(xd, cd, sd), dtype=torch.bfloat16)


@pytest.mark.cuda
def test_gpu_int64_offsets():
    """More than 2**31 elements: offsets must be 64-bit."""
    S, H, D = (1 << 18) + 3, 16, 512
    x = torch.randn(1, S, H, D, dtype=torch.bfloat16, device="cuda")
    assert x.numel() > 2 ** 31
    cos, sin = _tables("E2B", "full_attention", 1, S, torch.bfloat16, device="cuda")
    y = rope(x, cos, sin)
    tail = slice(S - 5, S)
    _check(y[:, tail], _ref64(x[:, tail], cos[:, tail], sin[:, tail]), _hf(x[:, tail], cos[:, tail], sin[:, tail]),
           dtype=torch.bfloat16)
    head = slice(0, 5)
    _check(y[:, head], _ref64(x[:, head], cos[:, head], sin[:, head]), _hf(x[:, head], cos[:, head], sin[:, head]),
           dtype=torch.bfloat16)
