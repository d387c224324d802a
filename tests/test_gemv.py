"""Few-row linear (``gemma4_fast.kernels.gemv``) and its use for the projections of the fast modules
(``gemma4_fast.linear.project``).

CPU runs use Triton's interpreter (tiny odd sizes, float32 / float16): kernel against the naive op (HF's
``nn.Linear``) into NaN-filled outputs, every candidate config, fallbacks, errors, autograd; ``project`` routes only
plain unobserved ``nn.Linear`` calls of at most four rows; a patched tiny KV-shared model with ``logits_to_keep=1``
runs its cut layers on the kernel and matches the torch backend. Every config compiles for sm_80 and sm_90 and fits.
``cuda`` tests: bf16 / fp16 at Gemma 4's projection shapes by the three-way rule.
"""
from __future__ import annotations

import inspect
import json
import logging

import pytest
import torch
from torch import nn

from gemma4_fast import linear as glinear
from gemma4_fast import ops
from gemma4_fast.kernels._compile_check import compile_for_target
from gemma4_fast.kernels.gemv import MAX_ROWS, gemv, gemv_naive
from gemma4_fast.kernels.gemv.gemv import (CONFIG_ENV, default_config, gemv_configs, gemv_fwd, gemv_fwd_kernel,
                                           pick_config)

from _compile_tests import compile_fit_tests
from _inputs import three_way_excess


def _case(m, n, k, dtype, bias, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(m, k, generator=g, device=device).to(dtype)
    w = (torch.randn(n, k, generator=g, device=device) * k ** -0.5).to(dtype)
    b = torch.randn(n, generator=g, device=device).to(dtype) if bias else None
    return x, w, b


def _close(got, x, w, b, tol):
    ref = nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.shape == ref.shape and not torch.isnan(got).any()
    assert ((got.double() - ref).abs() <= tol * (1 + ref.abs())).all()


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("n,k", [(1, 1), (37, 50), (9, 600)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_matches_naive_into_nan(m, n, k, dtype, tol, bias):
    x, w, b = _case(m, n, k, dtype, bias, seed=m * 1000 + n + k)
    y = torch.full((m, n), float("nan"), dtype=dtype)
    gemv_fwd(x, w, b, y, pick_config(n, k))
    _close(y, x, w, b, tol)
    _close(gemv(x, w, b), x, w, b, tol)


def test_every_candidate_config_covers_odd_sizes():
    x, w, b = _case(3, 45, 70, torch.float32, True)
    for cfg in gemv_configs():
        y = torch.full((3, 45), float("nan"))
        gemv_fwd(x, w, b, y, cfg)
        _close(y, x, w, b, 1e-5)


def test_leading_dims_and_strided_rows():
    x, w, b = _case(4, 33, 40, torch.float32, True)
    x3 = x.view(2, 2, 40)
    _close(gemv(x3, w, b).view(4, 33), x, w, b, 1e-5)
    wide = torch.randn(4, 64)
    xs = wide[:, 10:50]  # rows with stride 64
    _close(gemv(xs, w, None), xs, w, None, 1e-5)
    assert gemv(x[:0], w, b).shape == (0, 33)


def test_fallbacks_are_logged_and_correct(caplog):
    x, w, b = _case(5, 20, 30, torch.float32, True)
    with caplog.at_level(logging.INFO, logger="gemma4_fast"):
        many = gemv(x, w, b)
        half = gemv(x[:2].double(), w.double(), b.double())
        strided = gemv(x[:2], w.t().contiguous().t(), b)
    assert torch.equal(many, gemv_naive(x, w, b))
    assert torch.equal(half, gemv_naive(x[:2].double(), w.double(), b.double()))
    _close(strided, x[:2], w, b, 1e-5)
    for phrase in (f"more than {MAX_ROWS} rows", "one float16 / bfloat16 / float32 dtype", "unit stride"):
        assert phrase in caplog.text, phrase


def test_errors_name_the_argument():
    x, w = torch.randn(1, 8), torch.randn(5, 8)
    with pytest.raises(ValueError, match="weight"):
        gemv(x, torch.randn(5, 7))
    with pytest.raises(ValueError, match="bias"):
        gemv(x, w, torch.randn(4))
    with pytest.raises(TypeError, match="x"):
        gemv(torch.ones(1, 8, dtype=torch.int32), w)


def test_gradients_use_the_naive_op():
    x = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(gemv, (x, w, b))


def test_pinned_config(monkeypatch):
    monkeypatch.setenv(CONFIG_ENV, json.dumps({"BLOCK_N": 32, "BLOCK_K": 128}))
    assert pick_config(1000, 1000)["BLOCK_N"] == 32
    x, w, b = _case(2, 70, 90, torch.float32, False)
    _close(gemv(x, w, b), x, w, b, 1e-5)
    monkeypatch.setenv(CONFIG_ENV, json.dumps({"BLOCK_N": 12}))
    with pytest.raises(ValueError, match="power of two"):
        pick_config(100, 100)


def test_default_config_spreads_over_the_gpu():
    assert default_config(12288, 1536)["BLOCK_N"] == 16
    assert default_config(1536, 12288)["BLOCK_N"] == 4
    assert all(default_config(n, k)["BLOCK_K"] <= 256 for n, k in ((1, 1), (256, 1536), (262144, 1536)))


# ---------------------------------------------------------------------------------------------------------------
# project(): which calls go to the kernel
# ---------------------------------------------------------------------------------------------------------------

def test_project_routes_only_unobserved_few_row_calls(monkeypatch):
    calls = []
    real = ops.gemv
    monkeypatch.setattr(ops, "gemv", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    lin = nn.Linear(24, 10)
    x1, x5 = torch.randn(1, 1, 24), torch.randn(1, 5, 24)
    _close(glinear.project(lin, x1, "triton").view(1, 10), x1.view(1, 24), lin.weight, lin.bias, 1e-5)
    assert calls == [(1, 1, 24)]
    glinear.project(lin, x5, "triton")
    glinear.project(lin, x1, "torch")
    assert calls == [(1, 1, 24)]
    seen = []
    handle = lin.register_forward_hook(lambda m, a, o: seen.append(o.shape))
    glinear.project(lin, x1, "triton")
    handle.remove()
    assert seen == [(1, 1, 10)] and calls == [(1, 1, 24)]

    class Wrapped(nn.Linear):
        pass

    glinear.project(Wrapped(24, 10), x1, "triton")
    assert calls == [(1, 1, 24)]
    hooked = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: None)
    try:
        glinear.project(lin, x1, "triton")
    finally:
        hooked.remove()
    assert calls == [(1, 1, 24)]


def test_cut_layers_run_on_the_kernel_and_match_torch(monkeypatch):
    from _inputs import patched_copy

    from gemma4_fast.patch import patch_model

    ref, fast, _ = patched_copy("tiny-ple-kv-shared", backend="torch")
    patch_model(fast, backend="triton")
    calls = []
    real = ops.gemv
    monkeypatch.setattr(ops, "gemv", lambda *a, **k: calls.append(tuple(a[0].shape)) or real(*a, **k))
    ids = torch.randint(4, 200, (1, 11))
    with torch.no_grad():
        want = ref(ids, use_cache=False, logits_to_keep=1).logits
        got = fast(ids, use_cache=False, logits_to_keep=1).logits
    assert calls and all(int(torch.tensor(s[:-1]).prod()) <= MAX_ROWS for s in calls)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Compile and fit
# ---------------------------------------------------------------------------------------------------------------

def _compile_report(capability, candidates):
    names = list(inspect.signature(gemv_fwd_kernel.fn).parameters)
    shapes = [(1536, 12288), (12288, 1536), (256, 1536), (262144, 1536), (2048, 1536)]
    cfgs = gemv_configs() if candidates else [default_config(n, k) for n, k in shapes]
    uniq = {json.dumps(c, sort_keys=True): c for c in cfgs}
    bad, checked = [], 0
    for dtype in ("bf16", "fp32"):
        for block_m in (1, 4):
            for cfg in uniq.values():
                sig = {n: ("i32" if n in ("M", "N", "K") or n.startswith("stride") else f"*{dtype}") for n in names}
                ce = {"HAS_BIAS": True, "BLOCK_M": block_m, "BLOCK_N": cfg["BLOCK_N"], "BLOCK_K": cfg["BLOCK_K"],
                      "WHILE_LOOP": False}
                sig.update({n: "constexpr" for n in ce})
                checked += 1
                res = compile_for_target(gemv_fwd_kernel, sig, ce, capability=capability,
                                         num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                                         divisible=("X", "W", "B", "Y"))
                if not res.fits:
                    bad.append([dtype, block_m, cfg, res.shared])
    return {"checked": checked, "bad": bad}


test_default_configs_compile_and_fit, test_candidate_configs_compile_and_fit = compile_fit_tests(__file__)


# ---------------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(2048, 1536), (1536, 2048), (12288, 1536), (1536, 12288), (256, 1536), (1000, 999)])
@pytest.mark.parametrize("m", [1, 3])
def test_gpu_three_way(dtype, n, k, m):
    x, w, b = _case(m, n, k, dtype, m == 3, device="cuda", seed=n + k + m)
    ref = nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    low = nn.functional.linear(x, w, b)
    y = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
    gemv_fwd(x, w, b, y, pick_config(n, k))
    bad, err, bound = three_way_excess(y, ref, low, atol=1e-3)
    assert not bad.any(), (err.max().item(), bound.min().item())
    assert torch.equal(gemv(x, w, b), y)
