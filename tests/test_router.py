"""Tests for the router kernels (``gemma4_fast.kernels.moe``: ``router_norm``, the input rows; ``router_topk``, the
softmax / top-k / renormalisation) and the routing built on them.

CPU: Triton interpreter in fp32/fp16 (bf16 rounding is wrong in the interpreter; bf16 logits only load) at odd
sizes, outputs NaN-filled before the launch; the routing against HF's ``Gemma4TextRouter`` is in ``test_moe.py``. GPU (``cuda`` marker):
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


def _topk_ref(logits, pes, k):
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    w, i = torch.topk(probs, k, dim=-1)
    return probs, (w / w.sum(-1, keepdim=True)) * pes[i], i


def _run_topk(logits, pes, k):
    """``router_topk_fwd_kernel`` into NaN / -1 filled outputs (an unwritten element fails the checks)."""
    T, E = logits.shape
    probs = torch.full((T, E), float("nan"), device=logits.device)
    weights = torch.full((T, k), float("nan"), device=logits.device)
    index = torch.full((T, k), -1, dtype=torch.int64, device=logits.device)
    be = router_mod.next_power_of_2(max(E, 16))
    bm = max(1, min(16, 2048 // be))
    router_mod.router_topk_fwd_kernel[((T + bm - 1) // bm,)](
        logits, pes, probs, weights, index, T, E, K=k, K_PAD=router_mod.next_power_of_2(k), BLOCK_M=bm, BLOCK_E=be)
    return probs, weights, index


def _same_choice(got, want):
    """The chosen experts carry HF's top-k probabilities in HF's order; ids equal wherever the row has no tie among
    its top k + 1 values (bf16 logits tie exactly, and ``torch.topk`` leaves the order of ties unspecified)."""
    probs, _, index = got
    k = index.shape[-1]
    assert torch.equal(want[0].gather(-1, index), want[0].gather(-1, want[2]))
    top = want[0].topk(min(k + 1, want[0].shape[-1]), dim=-1).values
    untied = (top[:, 1:] != top[:, :-1]).all(-1)
    assert torch.equal(index[untied], want[2][untied])


@pytest.mark.parametrize("T,E,k", [(1, 128, 8), (7, 10, 3), (33, 128, 8), (5, 37, 37), (19, 300, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_topk_matches_torch(T, E, k, dtype):
    g = torch.Generator().manual_seed(T * 1000 + E)
    logits = (torch.randn(T, E, generator=g) * 2).to(dtype)
    pes = (torch.rand(E, generator=g) + 0.5).to(dtype)
    got = _run_topk(logits, pes, k)
    want = _topk_ref(logits, pes, k)
    for name, t in zip(("probs", "weights"), got[:2]):
        assert not torch.isnan(t).any(), name
    assert (got[2] >= 0).all()
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-7)
    _same_choice(got, want)
    if dtype == torch.float32:
        assert torch.equal(got[2], want[2])
    w_ref = want[0].gather(-1, got[2])
    torch.testing.assert_close(got[1], w_ref / w_ref.sum(-1, keepdim=True) * pes[got[2]], rtol=1e-6, atol=1e-7)
    public = router_mod.router_topk(logits, pes, k)
    for a, b in zip(public, got):
        assert torch.equal(a, b)


def test_router_topk_ties_take_the_lowest_id():
    logits = torch.tensor([[0.0, 1.0, 1.0, 0.5, 1.0], [2.0, 2.0, 2.0, 2.0, 2.0]])
    _, w, i = _run_topk(logits, torch.ones(5), 3)
    assert i.tolist() == [[1, 2, 4], [0, 1, 2]]
    torch.testing.assert_close(w, torch.full((2, 3), 1 / 3))


def test_moe_router_uses_the_kernels(monkeypatch):
    calls = []
    monkeypatch.setattr(router_mod, "router_norm", lambda *a, **k: calls.append("norm") or router_norm_naive(*a, **k))
    topk = router_mod.router_topk
    monkeypatch.setattr(router_mod, "router_topk", lambda *a, **k: calls.append("topk") or topk(*a, **k))
    x, scale = _inputs(11, 40, torch.float32)
    w = torch.randn(6, 40)
    pes = torch.rand(6) + 0.5
    got = moe_router(x, w, scale, pes, top_k=2)
    want = moe_router_naive(x, w, scale, pes, top_k=2)
    assert calls == ["norm", "topk"]
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-7)
    assert torch.equal(got[2], want[2])
    torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-7)


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
def test_gpu_router_topk():
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(4099, 128, generator=g, device="cuda") * 2).bfloat16()
    pes = (torch.rand(128, generator=g, device="cuda") + 0.5).bfloat16()
    got = _run_topk(logits, pes, 8)
    want = _topk_ref(logits, pes, 8)
    assert not torch.isnan(got[0]).any() and not torch.isnan(got[1]).any()
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-7)
    _same_choice(got, want)
    w_ref = want[0].gather(-1, got[2])
    torch.testing.assert_close(got[1], w_ref / w_ref.sum(-1, keepdim=True) * pes[got[2]], rtol=1e-5, atol=1e-7)


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
    kernel = router_mod.router_topk_fwd_kernel
    names = list(inspect.signature(kernel.fn).parameters)
    sig = {"L": "*bf16", "PES": "*bf16", "P": "*fp32", "W": "*fp32", "I": "*i64", "n_rows": "i32", "E": "i32",
           "K": "constexpr", "K_PAD": "constexpr", "BLOCK_M": "constexpr", "BLOCK_E": "constexpr"}
    for E, k in ((128, 8), (1024, 8), (64, 64)):
        be = router_mod.next_power_of_2(E)
        checked += 1
        res = compile_for_target(kernel, {n: sig[n] for n in names},
                                 {"K": k, "K_PAD": router_mod.next_power_of_2(k), "BLOCK_M": max(1, min(16, 2048 // be)),
                                  "BLOCK_E": be}, capability=capability, num_warps=4, num_stages=1)
        if not res.fits:
            bad.append(["topk", E, k, res.shared])
    return {"checked": checked, "bad": bad}


test_default_configs_compile_and_fit, test_candidate_configs_compile_and_fit = compile_fit_tests(__file__)
