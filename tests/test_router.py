"""Tests for the router's input-row kernel (``gemma4_fast.kernels.moe.router_norm``) and the routing built on it.

CPU: Triton interpreter in fp32/fp16 (bf16 rounding is wrong in the interpreter) at odd widths, outputs NaN-filled
before the launch; the routing against HF's ``Gemma4TextRouter`` is in ``test_moe.py``. GPU (``cuda`` marker):
bf16 at the 26B-A4B width, against the naive op (three-way rule) and HF's routing. Compile-and-fit on sm_80/sm_90.
"""
from __future__ import annotations

import inspect
import json

import pytest
import torch

from gemma4_fast.kernels._compile_check import compile_for_target
from gemma4_fast.kernels.moe import moe_router, moe_router_naive, router_norm, router_norm_naive
from gemma4_fast.kernels.moe import router as router_mod
from _compile_tests import compile_fit_tests
from _inputs import three_way_excess

WIDTHS = (2816, 5376, 3840, 1536)


def _inputs(rows, width, dtype, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(rows, width, generator=g, device=device).mul_(3).to(dtype)
    scale = (torch.rand(width, generator=g, device=device) + 0.5).to(dtype)
    return x, scale


def _check(got, x, scale, atol=1e-3):
    want = router_norm_naive(x, scale, 1e-6)
    ref = router_norm_naive(x.double(), scale.double(), 1e-6)
    assert got.dtype == x.dtype and got.shape == x.shape and not torch.isnan(got).any()
    if x.dtype == torch.float32:
        assert ((got.double() - ref).abs().max() / ref.abs().max()).item() <= 1e-6
        return
    bad, err, _ = three_way_excess(got, ref, want, atol)
    assert not bad.any(), err.max().item()
    assert (got != want).float().mean().item() <= 0.01


@pytest.mark.parametrize("rows", [1, 7, 33])
@pytest.mark.parametrize("width", [37, 300, 2816])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_router_norm_matches_naive(rows, width, dtype):
    x, scale = _inputs(rows, width, dtype)
    y = torch.full(x.shape, float("nan"), dtype=dtype)
    router_mod.router_norm_fwd(x, scale, 1e-6, y, router_mod.pick_config(width))
    _check(y, x, scale)
    _check(router_norm(x, scale, 1e-6), x, scale)


def test_router_norm_strided_rows():
    x, scale = _inputs(9, 130, torch.float32)
    wide = torch.cat([x, x], dim=1)[:, :130]
    torch.testing.assert_close(router_norm(wide, scale), router_norm_naive(x, scale), rtol=1e-6, atol=1e-6)


def test_router_norm_pinned_config_errors_and_fallbacks(monkeypatch):
    x, scale = _inputs(9, 70, torch.float32)
    monkeypatch.setenv(router_mod.CONFIG_ENV, '{"BLOCK_M": 4, "num_warps": 1}')
    assert router_mod.pick_config(70) == {"BLOCK_M": 4, "num_warps": 1}
    torch.testing.assert_close(router_norm(x, scale), router_norm_naive(x, scale), rtol=1e-6, atol=1e-6)
    monkeypatch.setenv(router_mod.CONFIG_ENV, '{"BLOCK_M": 3}')
    with pytest.raises(ValueError, match="BLOCK_M"):
        router_mod.pick_config(70)
    monkeypatch.delenv(router_mod.CONFIG_ENV)
    with pytest.raises(ValueError, match="scale"):
        router_norm(x, scale[:-1])
    with pytest.raises(ValueError, match="x must be"):
        router_norm(x[None], scale)
    assert router_mod._kernel_unsupported(x, scale.double()) is not None
    assert torch.equal(router_norm(x, scale.double()), router_norm_naive(x, scale.double()))
    xg = x.clone().requires_grad_()
    out = router_norm(xg, scale)
    assert out.requires_grad and torch.equal(out, router_norm_naive(xg, scale))


def test_moe_router_uses_the_kernel_rows(monkeypatch):
    calls = []
    monkeypatch.setattr(router_mod, "router_norm", lambda *a, **k: calls.append(1) or router_norm_naive(*a, **k))
    x, scale = _inputs(11, 40, torch.float32)
    w = torch.randn(6, 40)
    pes = torch.rand(6) + 0.5
    got = moe_router(x, w, scale, pes, top_k=2)
    want = moe_router_naive(x, w, scale, pes, top_k=2)
    assert calls == [1]
    for g, n in zip(got, want):
        assert torch.equal(g, n)


# --------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows", [1, 4099])
def test_gpu_router_norm(dtype, rows):
    x, scale = _inputs(rows, 2816, dtype, device="cuda")
    y = torch.full(x.shape, float("nan"), dtype=dtype, device="cuda")
    router_mod.router_norm_fwd(x, scale, 1e-6, y, router_mod.pick_config(2816))
    _check(y, x, scale, atol=1e-3)


@pytest.mark.cuda
def test_gpu_router_matches_hf_routing():
    """26B-A4B width, bf16: the experts chosen equal HF's wherever the k-th choice is not a near-tie."""
    from test_moe import _check_routing, _hf_router

    mod, cfg = _hf_router(128, 2816, 8, torch.bfloat16, device="cuda")
    x, _ = _inputs(4099, 2816, torch.bfloat16, device="cuda")
    with torch.no_grad():
        want = mod(x)
        got = moe_router(x, mod.proj.weight, mod.scale, mod.per_expert_scale, top_k=8, eps=cfg.rms_norm_eps)
    _check_routing(got, want, 2e-2)


# --------------------------------------------------------------------------------------------
# Compile for sm_80 / sm_90 (subprocess without the interpreter)
# --------------------------------------------------------------------------------------------

def _compile_report(capability, candidates):
    kernel = router_mod.router_norm_fwd_kernel
    names = list(inspect.signature(kernel.fn).parameters)
    bad, checked = [], 0
    for dtype in ("bf16", "fp32"):
        sig = {"X": f"*{dtype}", "S": f"*{dtype}", "Y": f"*{dtype}", "n_rows": "i32", "D": "i32", "stride_x": "i64",
               "root": "fp32", "eps": "fp32", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
        for width in WIDTHS:
            cfgs = router_mod.router_norm_configs(width) if candidates else [router_mod.default_config(width)]
            for cfg in {json.dumps(c, sort_keys=True): c for c in cfgs}.values():
                checked += 1
                bn = router_mod.next_power_of_2(width)
                res = compile_for_target(kernel, {n: sig[n] for n in names}, {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": bn},
                                         capability=capability, num_warps=cfg["num_warps"], num_stages=1)
                if not res.fits:
                    bad.append([dtype, width, cfg, res.shared])
    return {"checked": checked, "bad": bad}


test_default_configs_compile_and_fit, test_candidate_configs_compile_and_fit = compile_fit_tests(__file__)
