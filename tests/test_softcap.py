"""Tests of ``gemma4_fast.kernels.softcap`` (the final logit softcap ``cap * tanh(x / cap)``) and
``ops.logit_softcap``, against ``naive.py`` (HF's three ops) and a float64 reference.

CPU runs use Triton's interpreter (tiny odd sizes, float32/float16); ``@pytest.mark.cuda`` tests run logits of
2048 x 32771 in bfloat16/float16/float32, every candidate config, and a tensor of more than 2**31 elements.
"""
from __future__ import annotations

import inspect
import json
import logging

import pytest
import torch

from gemma4_fast import ops
from gemma4_fast.kernels import _common
from gemma4_fast.kernels._compile_check import compile_for_target
from gemma4_fast.kernels.softcap import logit_softcap, logit_softcap_naive
from gemma4_fast.kernels.softcap import naive as softcap_naive_module
from gemma4_fast.kernels.softcap.softcap import (CONFIG_ENV, default_config, logit_softcap_configs,
                                                 logit_softcap_fwd, logit_softcap_fwd_kernel, pick_config)
from _compile_tests import compile_fit_tests
from _inputs import three_way_excess

CAP = 30.0


def _rand(*shape, dtype, device="cpu", scale=25.0):
    """Logit-like values: normal with standard deviation ``scale`` (a good share beyond the cap)."""
    return (torch.randn(*shape, dtype=torch.float32) * scale).to(device=device, dtype=dtype)


def _check(fast, x, cap=CAP, *, atol=1e-6):
    """fp32: elementwise relative error <= 1e-6 against float64; fp16/bf16: the three-way rule
    |fast - ref64| <= 2 |HF's three ops in x's dtype - ref64| + atol * max|ref64|, elementwise."""
    assert fast.dtype == x.dtype and fast.shape == x.shape
    assert not torch.isnan(fast).any(), "NaN in the fast output"
    ref64 = logit_softcap_naive(x.double(), cap)
    if x.dtype == torch.float32:
        err = (fast.double() - ref64).abs()
        assert (err <= 1e-6 * ref64.abs() + 1e-30).all(), f"max rel err {(err / ref64.abs()).max().item():.3g}"
        return
    lowp = logit_softcap_naive(x, cap)
    bad, err, _ = three_way_excess(fast, ref64, lowp, atol)
    assert not bad.any(), f"{bad.sum().item()} elements break the three-way rule; max err {err.max().item():.3g}"


def _poisoned_launch(x, cfg, cap=CAP):
    """Launch into a NaN-poisoned buffer with a NaN guard after it; returns the output, checks the guard."""
    n = x.numel()
    buf = torch.full((n + 64,), float("nan"), dtype=x.dtype, device=x.device)
    out = buf[:n].view(x.shape)
    before = x.clone()
    logit_softcap_fwd(x, out, cap, cfg)
    assert torch.isnan(buf[n:]).all(), "the kernel wrote past the end"
    assert torch.equal(x, before), "an out-of-place launch changed x"
    return out


# --------------------------------------------------------------------------------------------
# CPU (interpreter)
# --------------------------------------------------------------------------------------------

CPU_SHAPES = [(3, 7, 97), (5, 33), (1, 1), (2, 3, 130), (4, 1024 + 7), (2, 2053)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", CPU_SHAPES)
def test_matches_naive_out_of_place_and_in_place(dtype, shape):
    x = _rand(*shape, dtype=dtype)
    _check(_poisoned_launch(x, default_config(x.numel())), x)
    out = logit_softcap(x, CAP)
    assert out.data_ptr() != x.data_ptr() and out.is_contiguous()
    _check(out, x)
    given = torch.full_like(x, float("nan"))
    assert logit_softcap(x, CAP, out=given) is given
    _check(given, x)
    y = x.clone()
    ptr = y.data_ptr()
    assert logit_softcap(y, CAP, out=y) is y and y.data_ptr() == ptr
    _check(y, x)
    assert torch.equal(y, out)


@pytest.mark.parametrize("cfg", logit_softcap_configs() + [{"BLOCK": 16, "num_warps": 1},
                                                          {"BLOCK": 128, "num_warps": 4}])
def test_every_config_covers_odd_sizes(cfg):
    x = _rand(3001, dtype=torch.float32)
    _check(_poisoned_launch(x, cfg), x)


def test_many_programs_cover_every_element(monkeypatch):
    """A pinned tiny block: 63 programs over 1001 elements, every element written once, nothing past the end (the
    int64 offset arithmetic ``pid * BLOCK + arange``, exercised with many program ids)."""
    monkeypatch.setenv(CONFIG_ENV, json.dumps({"BLOCK": 16, "num_warps": 1}))
    x = _rand(7, 143, dtype=torch.float32)
    assert pick_config(x.numel())["BLOCK"] == 16
    _check(_poisoned_launch(x, pick_config(x.numel())), x)
    y = x.clone()
    logit_softcap(y, CAP, out=y)
    _check(y, x)


def _offsets_report():
    """Compile the kernel for sm_90 with a 32-bit and a 64-bit element count (what Triton specializes to from
    2**31 elements on) and report any pointer offset that is not int64. Runs without the interpreter."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    found = {}
    for n_type in ("i32", "i64"):
        sig = {"X": "*bf16", "Y": "*bf16", "N": n_type, "cap": "fp32", "BLOCK": "constexpr"}
        src = ASTSource(fn=logit_softcap_fwd_kernel, signature=sig, constexprs={"BLOCK": 8192})
        out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": 1})
        addptr = [line.strip() for line in out.asm["ttir"].splitlines() if "tt.addptr" in line]
        found[n_type] = {"addptr": len(addptr), "not_i64": [a for a in addptr if "xi64>" not in a]}
    return found


def test_offsets_are_int64_in_the_compiled_kernel():
    from gemma4_fast.kernels._compile_check import run_without_interpreter

    rep = run_without_interpreter(__file__, "_offsets_report")
    for n_type, r in rep.items():
        assert r["addptr"] == 2 and r["not_i64"] == [], (n_type, r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_large_and_special_values(dtype):
    x = torch.tensor([1e4, -1e4, 6e4, -6e4, float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 1e-30, -1e-30,
                      30.0, -30.0, 11.25, -0.5, 5e-3])
    x = x.to(dtype)
    got = logit_softcap(x, CAP)
    want = logit_softcap_naive(x.double(), CAP)
    assert got[:6].tolist() == [CAP, -CAP, CAP, -CAP, CAP, -CAP]
    assert torch.isnan(got[6]) and not torch.isnan(got[:6]).any() and not torch.isnan(got[7:]).any()
    assert torch.equal(torch.signbit(got[7:9]), torch.tensor([False, True]))
    _check(got[7:], x[7:])
    assert torch.allclose(got[7:].double(), want[7:], rtol=1e-3 if dtype == torch.float16 else 1e-6, atol=0)


def test_dense_range_fp32_accuracy():
    """Both branches of the fp32 tanh (series below |y| = 0.375, exponential form above) over a dense range."""
    x = torch.cat([torch.linspace(-90.0, 90.0, 20011), torch.logspace(-38, 2, 4001), -torch.logspace(-38, 2, 4001)])
    _check(logit_softcap(x, CAP), x)
    _check(logit_softcap(x, 2.5), x, 2.5)


def test_fallbacks_are_logged_and_correct(caplog, monkeypatch):
    monkeypatch.setattr(_common, "_LOGGED", set())
    base = _rand(6, 37, dtype=torch.float32)
    with caplog.at_level(logging.INFO, logger="gemma4_fast"):
        t = base.t()
        _check(logit_softcap(t, CAP), t)
        assert "x is not contiguous" in caplog.text
        y = base.clone().t()
        logit_softcap(y, CAP, out=y)
        _check(y, base.t())
        strided = torch.empty(6, 74)[:, ::2]
        logit_softcap(base, CAP, out=strided)
        _check(strided, base)
        assert "out is not contiguous" in caplog.text
        d = base.double()
        assert torch.equal(logit_softcap(d, CAP), logit_softcap_naive(d, CAP))
        assert "dtype float64" in caplog.text
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert torch.equal(logit_softcap(base, CAP), logit_softcap_naive(base, CAP))
        assert "TRITON_INTERPRET=1 is not set" in caplog.text


def test_errors_name_the_argument():
    x = _rand(2, 5, dtype=torch.float32)
    with pytest.raises(TypeError, match="x"):
        logit_softcap([1.0], CAP)
    with pytest.raises(TypeError, match="x"):
        logit_softcap(x.to(torch.int32), CAP)
    for bad in ("30", True, torch.tensor(30.0), None):
        with pytest.raises(TypeError, match="cap"):
            logit_softcap(x, bad)
    for bad in (0.0, -30.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="cap"):
            logit_softcap(x, bad)
    with pytest.raises(TypeError, match="out"):
        logit_softcap(x, CAP, out=[0.0])
    for bad in (torch.empty(2, 6), torch.empty(2, 5, dtype=torch.float16), torch.empty(10)):
        with pytest.raises(ValueError, match="out"):
            logit_softcap(x, CAP, out=bad)
    buf = torch.zeros(20)
    with pytest.raises(ValueError, match="out"):
        logit_softcap(buf[:10].view(2, 5), CAP, out=buf[3:13].view(2, 5))
    alias = x.view(2, 5)
    assert logit_softcap(x, CAP, out=alias) is alias


def test_zero_elements():
    x = torch.empty(0, 7)
    assert logit_softcap(x, CAP).shape == (0, 7)
    assert logit_softcap(x, CAP, out=x) is x


def test_gradients_fall_back_to_the_naive_op(caplog, monkeypatch):
    monkeypatch.setattr(_common, "_LOGGED", set())
    w = torch.randn(4, 53)
    x = _rand(4, 53, dtype=torch.float32).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    with caplog.at_level(logging.INFO, logger="gemma4_fast"):
        out = logit_softcap(x, CAP)
    assert "gradients requested" in caplog.text
    assert out.requires_grad
    (out * w).sum().backward()
    (logit_softcap_naive(xr, CAP) * w).sum().backward()
    assert torch.equal(x.grad, xr.grad)
    expected = (1 - torch.tanh(xr.detach() / CAP) ** 2) * w
    assert torch.allclose(x.grad, expected, rtol=1e-5, atol=1e-6)

    x.grad = None
    h = x * 1.0
    assert logit_softcap(h, CAP, out=h) is h and h.requires_grad
    (h * w).sum().backward()
    assert torch.allclose(x.grad, xr.grad, rtol=1e-6, atol=0)
    with pytest.raises(RuntimeError, match="in-place"):
        logit_softcap(x, CAP, out=x)
    with torch.no_grad():
        y = x.clone()
        logit_softcap(y, CAP, out=y)
    _check(y, x.detach())


def test_pinned_config(monkeypatch):
    monkeypatch.setenv(CONFIG_ENV, json.dumps({"BLOCK": 64}))
    cfg = pick_config(10_000)
    assert cfg["BLOCK"] == 64 and "num_warps" in cfg
    x = _rand(3, 97, dtype=torch.float32)
    _check(logit_softcap(x, CAP), x)
    monkeypatch.setenv(CONFIG_ENV, json.dumps({"BLOCK": 96}))
    with pytest.raises(ValueError, match="BLOCK"):
        pick_config(100)
    monkeypatch.setenv(CONFIG_ENV, "not json")
    with pytest.raises(ValueError, match=CONFIG_ENV):
        pick_config(100)


def test_configs_are_sane():
    cands = logit_softcap_configs()
    assert cands and all(8 <= c["BLOCK"] // (32 * c["num_warps"]) <= 64 for c in cands)
    for numel in (1, 7, 128, 262144, 4096 * 262144, 8192 * 262144):
        cfg = default_config(numel)
        assert cfg["BLOCK"] & (cfg["BLOCK"] - 1) == 0 and 1 <= cfg["num_warps"] <= 8
        assert cfg["BLOCK"] // (32 * cfg["num_warps"]) >= 1
    assert default_config(4096 * 262144) == {"BLOCK": 8192, "num_warps": 8}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_ops_torch_backend_is_hf_bit_for_bit(dtype, monkeypatch):
    """The torch twin (HF's three ops), out-of-place and chunked into ``out`` (a tiny chunk size forces several
    chunks and a ragged last one), equals HF's expression bit for bit."""
    x = _rand(3, 5, 41, dtype=dtype)
    hf = torch.tanh(x / CAP) * CAP
    assert torch.equal(ops.logit_softcap(x, CAP, backend="torch"), hf)
    monkeypatch.setattr(softcap_naive_module, "CHUNK", 37)
    y = x.clone()
    assert ops.logit_softcap(y, CAP, out=y, backend="torch") is y
    assert torch.equal(y, hf)


def test_ops_triton_and_auto_backends():
    x = _rand(4, 77, dtype=torch.float32)
    for backend in ("triton", "auto"):
        y = x.clone()
        ops.logit_softcap(y, CAP, out=y, backend=backend)
        _check(y, x)
    assert ops.resolve("triton", "logit_softcap", x) == "triton"
    assert ops.resolve("triton", "logit_softcap", x.double()) == "torch"
    assert ops.resolve("triton", "logit_softcap", x.requires_grad_()) == "torch"


# --------------------------------------------------------------------------------------------
# Compile for sm_80 / sm_90 (subprocess without the interpreter)
# --------------------------------------------------------------------------------------------

def _compile_report(capability, candidates):
    names = list(inspect.signature(logit_softcap_fwd_kernel.fn).parameters)
    if candidates:
        cfgs = logit_softcap_configs()
    else:
        cfgs = [default_config(n) for n in (1, 100, 5000, 262144, 1 << 22, 2048 * 262144)]
    uniq = {json.dumps(c, sort_keys=True): c for c in cfgs}
    bad, checked = [], 0
    for dtype in ("bf16", "fp16", "fp32"):
        for n_type in ("i32", "i64"):
            sig = {"X": f"*{dtype}", "Y": f"*{dtype}", "N": n_type, "cap": "fp32", "BLOCK": "constexpr"}
            for cfg in uniq.values():
                checked += 1
                res = compile_for_target(logit_softcap_fwd_kernel, {n: sig[n] for n in names}, {"BLOCK": cfg["BLOCK"]},
                                         capability=capability, num_warps=cfg["num_warps"], num_stages=1,
                                         divisible=("X", "Y"))
                if not res.fits:
                    bad.append([dtype, n_type, cfg, res.shared])
    return {"checked": checked, "bad": bad}


test_default_configs_compile_and_fit, test_candidate_configs_compile_and_fit = compile_fit_tests(__file__)


# --------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------

GPU_SHAPE = (2048, 32771)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_logits_three_way(dtype):
    x = _rand(*GPU_SHAPE, dtype=dtype, device="cuda")
    _check(_poisoned_launch(x, default_config(x.numel())), x)
    y = x.clone()
    assert logit_softcap(y, CAP, out=y) is y
    _check(y, x)
    assert torch.equal(y, logit_softcap(x, CAP))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_every_candidate_config(dtype):
    x = _rand(301, 32771, dtype=dtype, device="cuda")
    for cfg in logit_softcap_configs() + [default_config(x.numel())]:
        _check(_poisoned_launch(x, cfg), x)


@pytest.mark.cuda
def test_gpu_special_values():
    x = torch.tensor([1e4, -1e4, float("inf"), float("-inf"), float("nan"), 0.0, -0.0], device="cuda")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        got = logit_softcap(x.to(dtype), CAP).float().cpu()
        assert got[:4].tolist() == [CAP, -CAP, CAP, -CAP] and torch.isnan(got[4])
        assert got[5].item() == 0.0 and torch.signbit(got[6])


@pytest.mark.cuda
def test_gpu_more_than_2_pow_31_elements_in_place():
    """8192 x 262144 logits hold 2**31 elements: a tensor just past that, softcapped in place, is correct at the
    start, around element 2**31 and at the ragged end (int64 offsets)."""
    n = (1 << 31) + 4099
    free, _ = torch.cuda.mem_get_info()
    if free < 3 * n * 2:
        pytest.skip(f"needs about {3 * n * 2 / 2**30:.0f} GiB of free GPU memory")
    x = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    x.normal_(0.0, 25.0)
    spots = [slice(0, 70_000), slice((1 << 31) - 70_000, (1 << 31) + 70_000), slice(n - 70_000, n)]
    before = [x[s].clone() for s in spots]
    logit_softcap(x, CAP, out=x)
    for s, b in zip(spots, before):
        _check(x[s], b)
