"""Tests for ``gemma4_fast.kernels.moe``: alignment, grouped expert GEMMs, router, configs.

CPU: Triton interpreter at tiny odd sizes in fp32/fp16 (bf16 dots are wrong in the interpreter), one
pinned tile config. GPU (``cuda`` marker): the 26B-A4B shape (E=128, k=8, H=2816, I=704) in bf16 with
the three-way rule, fp32 and fp16, large alignments, every shipped config, CUDA-graph capture.
"""
from __future__ import annotations

import json
import logging

import pytest
import torch

from gemma4_fast.kernels import _common

from gemma4_fast.kernels.moe import (
    moe_align_block_size, moe_align_block_size_naive, moe_experts, moe_experts_naive, moe_router,
    moe_router_naive,
)
from gemma4_fast.kernels.moe import align as align_mod
from gemma4_fast.kernels.moe import configs as cfg_mod
from gemma4_fast.kernels.moe import experts as experts_mod

PIN = json.dumps({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 1})
E_BIG, K_BIG, H_BIG, I_BIG = 128, 8, 2816, 704


@pytest.fixture
def pin_small(monkeypatch):
    monkeypatch.setenv(cfg_mod.PIN_ENV, PIN)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _weights(num_experts, hidden, inter, dtype, device="cpu"):
    gu = torch.randn(num_experts, 2 * inter, hidden, device=device) * hidden ** -0.5
    dn = torch.randn(num_experts, hidden, inter, device=device) * inter ** -0.5
    return gu.to(dtype), dn.to(dtype)


def _routing(num_tokens, top_k, num_experts, device="cpu"):
    scores = torch.rand(num_tokens, num_experts, device=device)
    w, idx = scores.topk(top_k, dim=-1)
    return idx, (w + 0.1) / (w + 0.1).sum(-1, keepdim=True)


def _hf_experts(num_experts, hidden, inter, top_k, gu, dn):
    from transformers.models.gemma4.configuration_gemma4 import Gemma4TextConfig
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextExperts

    cfg = Gemma4TextConfig(hidden_size=hidden, moe_intermediate_size=inter, num_experts=num_experts,
                           top_k_experts=top_k, enable_moe_block=True, vocab_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, intermediate_size=32)
    cfg._experts_implementation = "eager"
    mod = Gemma4TextExperts(cfg).to(device=gu.device, dtype=gu.dtype)
    with torch.no_grad():
        mod.gate_up_proj.copy_(gu)
        mod.down_proj.copy_(dn)
    return mod, cfg


def _run_poisoned(x, idx, w, gu, dn, *, return_expert_outputs, config=None, fused_max=None):
    """Call the launcher into NaN-filled buffers so an unwritten element shows up."""
    num_tokens, top_k = idx.shape
    num_experts, two_inter, hidden = gu.shape
    y = torch.full((num_tokens, hidden), float("nan"), dtype=x.dtype, device=x.device)
    h = torch.full((num_tokens * top_k, two_inter // 2), float("nan"), dtype=x.dtype, device=x.device)
    rows = torch.full((num_tokens * top_k, hidden), float("nan"), dtype=x.dtype, device=x.device)
    config = config or cfg_mod.get_config(num_tokens, top_k, num_experts, two_inter // 2, hidden, None)
    extra = {} if fused_max is None else {"fused_max": fused_max}
    experts_mod.moe_experts_fwd(x, idx.contiguous(), w.contiguous(), gu, dn, config=config, y=y, h=h, rows=rows,
                                return_expert_outputs=return_expert_outputs, **extra)
    return y, rows.view(num_tokens, top_k, hidden)


# ----------------------------------------------------------------------------------------- alignment


@pytest.mark.parametrize("num_tokens,top_k,num_experts,block_m", [
    (1, 8, 128, 16), (3, 2, 6, 16), (17, 8, 6, 16), (17, 1, 5, 32), (40, 3, 7, 4), (0, 2, 5, 16)])
@pytest.mark.parametrize("path", ["small", "large"])
def test_align_matches_naive(num_tokens, top_k, num_experts, block_m, path):
    idx = torch.randint(-2, num_experts + 3, (num_tokens, top_k))
    small_max = 1 << 20 if path == "small" else 0
    got = align_mod.moe_align_block_size_fwd(idx, num_experts, block_m, small_max=small_max, chunk=16)
    want = moe_align_block_size_naive(idx, num_experts, block_m)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_align_public_checks():
    idx = torch.randint(0, 6, (5, 2))
    assert all(torch.equal(a, b) for a, b in zip(moe_align_block_size(idx, 6, 16),
                                                  moe_align_block_size_naive(idx, 6, 16)))
    with pytest.raises(ValueError, match="top_k_index"):
        moe_align_block_size(idx.float(), 6, 16)
    with pytest.raises(ValueError, match="block_m"):
        moe_align_block_size(idx, 6, 0)


# ------------------------------------------------------------------------------------ experts (CPU)


@pytest.mark.parametrize("num_tokens", [0, 1, 3, 17])
@pytest.mark.parametrize("top_k", [1, 2, 8])
@pytest.mark.parametrize("route", ["fused", "sorted"])
def test_experts_fp32_vs_naive_and_hf(pin_small, num_tokens, top_k, route):
    num_experts, hidden, inter = 10, 37, 19
    gu, dn = _weights(num_experts, hidden, inter, torch.float32)
    x = torch.randn(num_tokens, hidden)
    idx, w = _routing(num_tokens, top_k, num_experts)
    ref = moe_experts_naive(x.double(), idx, w.double(), gu.double(), dn.double())
    mod, _ = _hf_experts(num_experts, hidden, inter, top_k, gu, dn)
    with torch.no_grad():
        hf = mod(x, idx, w)
    fused_max = 1 << 20 if route == "fused" else 0
    y, eo = _run_poisoned(x, idx, w, gu, dn, return_expert_outputs=False, fused_max=fused_max)
    assert not y.isnan().any()
    public = moe_experts(x, idx, w, gu, dn)
    assert public.shape == (num_tokens, hidden) and public.dtype == torch.float32
    if num_tokens:
        assert _rel(y, ref) <= 1e-4 and _rel(public, ref) <= 1e-4 and _rel(hf, ref) <= 1e-4
        assert _rel(public, hf) <= 1e-4
    y2, eo2 = _run_poisoned(x, idx, w, gu, dn, return_expert_outputs=True, fused_max=fused_max)
    ref2, ref_eo = moe_experts_naive(x.double(), idx, w.double(), gu.double(), dn.double(),
                                     return_expert_outputs=True)
    assert not y2.isnan().any() and not eo2.isnan().any()
    if num_tokens:
        assert _rel(y2, ref2) <= 1e-4 and _rel(eo2, ref_eo) <= 1e-4


@pytest.mark.parametrize("case", ["empty_experts", "one_expert", "sentinels", "duplicates"])
@pytest.mark.parametrize("route", ["fused", "sorted"])
def test_experts_edge_routing(pin_small, case, route):
    num_experts, hidden, inter, num_tokens, top_k = 7, 33, 21, 17, 3
    gu, dn = _weights(num_experts, hidden, inter, torch.float32)
    x = torch.randn(num_tokens, hidden)
    w = torch.rand(num_tokens, top_k) + 0.1
    if case == "empty_experts":
        idx = torch.stack([torch.tensor([0, 3, 5])[torch.randperm(3)] for _ in range(num_tokens)])
    elif case == "one_expert":
        idx = torch.full((num_tokens, 1), 4)
        w = w[:, :1]
    elif case == "duplicates":
        idx = torch.randint(0, 2, (num_tokens, top_k))
    else:
        idx = torch.randint(0, num_experts, (num_tokens, top_k))
        idx[::2, 0] = num_experts
        idx[1::3, 1] = -1
        idx[5, :] = num_experts + 4
    ref, ref_eo = moe_experts_naive(x.double(), idx, w.double(), gu.double(), dn.double(),
                                    return_expert_outputs=True)
    for return_eo in (False, True):
        y, eo = _run_poisoned(x, idx, w, gu, dn, return_expert_outputs=return_eo,
                              fused_max=1 << 20 if route == "fused" else 0)
        assert not y.isnan().any()
        assert _rel(y, ref) <= 1e-4
        if return_eo:
            assert not eo.isnan().any() and _rel(eo, ref_eo) <= 1e-4
    if case == "sentinels":
        assert torch.equal(moe_experts(x, idx, w, gu, dn)[5], torch.zeros(hidden))
    if case != "sentinels":
        mod, _ = _hf_experts(num_experts, hidden, inter, idx.shape[1], gu, dn)
        with torch.no_grad():
            assert _rel(mod(x, idx, w), ref) <= 1e-4


def test_experts_fp16_three_way(pin_small):
    num_experts, hidden, inter, num_tokens, top_k = 6, 40, 24, 17, 2
    gu, dn = _weights(num_experts, hidden, inter, torch.float16)
    x = torch.randn(num_tokens, hidden, dtype=torch.float16)
    idx, w = _routing(num_tokens, top_k, num_experts)
    ref = moe_experts_naive(x.double(), idx, w.double(), gu.double(), dn.double())
    torch_fp16 = moe_experts_naive(x, idx, w, gu, dn)
    y, _ = _run_poisoned(x, idx, w, gu, dn, return_expert_outputs=False)
    atol = 2.0 ** -10 * ref.abs().max().item()
    assert ((y.double() - ref).abs() <= 2 * (torch_fp16.double() - ref).abs() + atol).all()


def test_experts_weights_in_x_dtype_and_strides(pin_small):
    num_experts, hidden, inter, num_tokens, top_k = 5, 35, 17, 9, 2
    gu, dn = _weights(num_experts, hidden, inter, torch.float32)
    gu_t = gu.transpose(1, 2).contiguous().transpose(1, 2)
    x = torch.randn(hidden, num_tokens).t()
    idx, w = _routing(num_tokens, top_k, num_experts)
    idx = idx.int().t().contiguous().t()
    ref = moe_experts_naive(x.double(), idx.long(), w.double(), gu.double(), dn.double())
    assert _rel(moe_experts(x, idx, w, gu_t, dn), ref) <= 1e-4


def test_experts_grad_routes_to_naive(pin_small, caplog):
    num_experts, hidden, inter, num_tokens, top_k = 5, 24, 16, 6, 2
    gu, dn = _weights(num_experts, hidden, inter, torch.float32)
    x = torch.randn(num_tokens, hidden, requires_grad=True)
    idx, w = _routing(num_tokens, top_k, num_experts)
    _common._LOGGED.clear()
    with caplog.at_level(logging.INFO, logger="gemma4_fast"):
        y = moe_experts(x, idx, w, gu, dn)
    assert y.requires_grad and "gradients requested" in caplog.text
    y.square().sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    moe_experts_naive(x2, idx, w, gu, dn).square().sum().backward()
    assert torch.allclose(x.grad, x2.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert not moe_experts(x, idx, w, gu, dn).requires_grad


def test_experts_fallbacks_and_errors(pin_small, caplog, monkeypatch):
    num_experts, hidden, inter, num_tokens, top_k = 4, 20, 12, 3, 2
    gu, dn = _weights(num_experts, hidden, inter, torch.float64)
    x = torch.randn(num_tokens, hidden, dtype=torch.float64)
    idx, w = _routing(num_tokens, top_k, num_experts)
    _common._LOGGED.clear()
    with caplog.at_level(logging.INFO, logger="gemma4_fast"):
        y = moe_experts(x, idx, w, gu, dn)
    assert "float64" in caplog.text
    assert torch.allclose(y, moe_experts_naive(x, idx, w, gu, dn))
    monkeypatch.setattr(experts_mod, "can_launch", lambda t: False)
    with caplog.at_level(logging.INFO, logger="gemma4_fast"):
        moe_experts(x.float(), idx, w, gu.float(), dn.float())
    assert "cannot launch" in caplog.text
    xf, guf, dnf = x.float(), gu.float(), dn.float()
    with pytest.raises(ValueError, match="gate_up_proj"):
        moe_experts(xf, idx, w, guf[:, :-1], dnf)
    with pytest.raises(ValueError, match="down_proj"):
        moe_experts(xf, idx, w, guf, dnf[:, :, :-1])
    with pytest.raises(ValueError, match="top_k_weights"):
        moe_experts(xf, idx, w[:, :1], guf, dnf)
    with pytest.raises(ValueError, match="top_k_index"):
        moe_experts(xf, idx[:2], w[:2], guf, dnf)
    with pytest.raises(ValueError, match="down_proj dtype"):
        moe_experts(xf, idx, w, guf, dn)


# ----------------------------------------------------------------------------------------------- router


def _hf_router(num_experts, hidden, top_k, dtype, device="cpu"):
    from transformers.models.gemma4.configuration_gemma4 import Gemma4TextConfig
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRouter

    cfg = Gemma4TextConfig(hidden_size=hidden, moe_intermediate_size=16, num_experts=num_experts,
                           top_k_experts=top_k, enable_moe_block=True, vocab_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16, intermediate_size=32)
    mod = Gemma4TextRouter(cfg)
    with torch.no_grad():
        mod.proj.weight.normal_()
        mod.scale.uniform_(0.5, 1.5)
        mod.per_expert_scale.uniform_(0.5, 1.5)
    return mod.to(device=device, dtype=dtype), cfg


def _check_routing(got, want, rtol):
    """Kernel routing vs HF's: probabilities within ``rtol``; the set of chosen experts (and each one's weight) equal
    wherever the k-th and the next probability are further apart than the probabilities' own error (elsewhere a
    near-tie may flip; ties inside the top k may come in another order)."""
    probs, weights, index = got
    assert probs.dtype == torch.float32 and weights.dtype == torch.float32 and index.dtype == torch.int64
    assert probs.shape == want[0].shape and index.shape == want[2].shape
    torch.testing.assert_close(probs, want[0], rtol=rtol, atol=rtol * 1e-2)
    k = index.shape[-1]
    if probs.numel() == 0:
        return
    top = want[0].topk(min(k + 1, probs.shape[-1]), dim=-1).values
    gap = (top[:, k - 1] - top[:, k]) if top.shape[-1] > k else torch.full_like(top[:, 0], 1.0)
    clear = gap > 4 * rtol * top[:, 0]
    got_ids, got_order = index.sort(-1)
    want_ids, want_order = want[2].sort(-1)
    assert torch.equal(got_ids[clear], want_ids[clear])
    torch.testing.assert_close(weights.gather(-1, got_order)[clear], want[1].gather(-1, want_order)[clear],
                               rtol=rtol * 4, atol=rtol * 1e-2)


def _router_case(num_tokens, dtype):
    """``(HF router, config, x, HF's routing of x)`` for 10 experts, width 37, top 3."""
    mod, cfg = _hf_router(10, 37, 3, dtype)
    x = torch.randn(num_tokens, 37, dtype=dtype) * 3
    with torch.no_grad():
        want = mod(x)
    return mod, cfg, x, want


@pytest.mark.parametrize("num_tokens", [0, 1, 3, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_naive_is_hf(num_tokens, dtype):
    mod, cfg, x, want = _router_case(num_tokens, dtype)
    with torch.no_grad():
        naive = moe_router_naive(x, mod.proj.weight, mod.scale, mod.per_expert_scale, top_k=3,
                                 eps=cfg.rms_norm_eps)
    for n, w in zip(naive, want):
        assert n.dtype == w.dtype and torch.equal(n, w)


@pytest.mark.parametrize("num_tokens", [0, 1, 3, 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_router_matches_hf(num_tokens, dtype):
    mod, cfg, x, want = _router_case(num_tokens, dtype)
    with torch.no_grad():
        got = moe_router(x, mod.proj.weight, mod.scale, mod.per_expert_scale, top_k=3, eps=cfg.rms_norm_eps)
    _check_routing(got, want, 1e-5 if dtype == torch.float32 else 2e-3)
    with pytest.raises(ValueError, match="top_k"):
        moe_router(x, mod.proj.weight, mod.scale, mod.per_expert_scale, top_k=11)
    with pytest.raises(ValueError, match="scale"):
        moe_router(x, mod.proj.weight, mod.scale[:-1], mod.per_expert_scale, top_k=3)


# ---------------------------------------------------------------------------------------------- configs


def test_config_lookup(monkeypatch):
    monkeypatch.delenv(cfg_mod.PIN_ENV, raising=False)
    assert cfg_mod.get_config(1, 8, 128, 704, 2816, "no such gpu") == cfg_mod.default_config(1, 8, 128)
    monkeypatch.setenv(cfg_mod.PIN_ENV, PIN)
    pinned = cfg_mod.get_config(4096, 8, 128, 704, 2816, None)
    assert pinned["BLOCK_M"] == 16 and pinned["gate_up"]["BLOCK_K"] == 16 and pinned["down"]["num_stages"] == 1
    monkeypatch.setenv(cfg_mod.PIN_ENV, '{"BLOCK_N": 16}')
    with pytest.raises(ValueError, match="BLOCK_M"):
        cfg_mod.get_config(1, 8, 128, 704, 2816, None)
    monkeypatch.delenv(cfg_mod.PIN_ENV)
    h100 = cfg_mod.get_config(1, 8, 128, 704, 2816, "NVIDIA H100 80GB HBM3")
    assert h100 == cfg_mod.load_table(128, 704, 2816, "NVIDIA H100 80GB HBM3")[1]
    assert cfg_mod.get_config(3000, 8, 128, 704, 2816, "NVIDIA H100 80GB HBM3") == \
        cfg_mod.load_table(128, 704, 2816, "NVIDIA H100 80GB HBM3")[4096]
    wide = cfg_mod.get_config(1, 8, 128, 704, 2816, "NVIDIA H100 80GB HBM3", element_size=4)
    for g in ("gate_up", "down"):
        assert wide[g]["BLOCK_K"] == max(16, h100[g]["BLOCK_K"] // 2)
        assert {k: v for k, v in wide[g].items() if k != "BLOCK_K"} == \
            {k: v for k, v in h100[g].items() if k != "BLOCK_K"}
    for path in sorted(cfg_mod.CONFIG_DIR.glob("*.json")):
        doc = json.loads(path.read_text())
        table = cfg_mod.load_table(doc["E"], doc["I"], doc["H"], doc["device"])
        assert table and path.name == cfg_mod.table_name(doc["E"], doc["I"], doc["H"], doc["device"])
        for cfg in table.values():
            assert set(cfg) == {"BLOCK_M", "gate_up", "down"}
            assert all(set(cfg[g]) == set(cfg_mod.GEMM_KEYS) for g in ("gate_up", "down"))


_COMPILE_SCRIPT = """
import json
from concurrent.futures import ProcessPoolExecutor
from gemma4_fast.kernels._compile_check import SHARED_LIMIT
from gemma4_fast.kernels.moe import configs

def job(args):
    cfg, cap, hinted, fused, dtype = args
    shared = configs.compile_config(cfg, cap, hinted=hinted, fused_route=fused, dtype=dtype)
    return {"cfg": cfg, "cap": cap, "hinted": hinted, "fused": fused, "dtype": dtype, "shared": shared,
            "fits": all(v <= SHARED_LIMIT[cap] for v in shared.values())}

jobs = []
for cfg in configs.shipped_configs():
    jobs.append((cfg, 90, False, False, "bf16"))
    for cap in (80, 90):
        jobs += [(cfg, cap, True, False, "bf16"), (cfg, cap, True, False, "fp32")]
        if cfg["BLOCK_M"] <= 16:
            jobs.append((cfg, cap, True, True, "bf16"))
if __name__ == "__main__":
    with ProcessPoolExecutor(2) as pool:
        print(json.dumps(list(pool.map(job, jobs))))
"""


@pytest.mark.slow
def test_shipped_configs_compile_and_fit(tmp_path):
    """Every shipped config (tables + default rule) compiles for sm_80 and sm_90 and fits shared memory.

    Runs in a subprocess without ``TRITON_INTERPRET`` (interpreted kernels cannot be compiled): bf16 and
    fp32 (scaled config) as the GPU JIT specializes (hinted, loads pipelined), the fused-routing decode
    variant for ``BLOCK_M = 16``, and once through ``compile_for_target``.
    """
    import os
    import subprocess
    import sys
    import tempfile

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), "gemma4_fast_moe_compile_cache")
    script = tmp_path / "compile_moe_configs.py"
    script.write_text(_COMPILE_SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    cfgs = cfg_mod.shipped_configs()
    assert len(rows) == 5 * len(cfgs) + 2 * sum(c["BLOCK_M"] <= 16 for c in cfgs)
    bad = [r for r in rows if not r["fits"]]
    assert not bad, bad


# ------------------------------------------------------------------------------------------------- GPU


def _three_way(fast, torch_lp, ref, atol_frac=2.0 ** -8):
    ref = ref.double()
    atol = atol_frac * ref.abs().max().item()
    err_fast = (fast.double() - ref).abs()
    err_torch = (torch_lp.double() - ref).abs()
    bad = err_fast > 2 * err_torch + atol
    return int(bad.sum()), _rel(fast, ref), _rel(torch_lp, ref)


@pytest.mark.cuda
@pytest.mark.parametrize("num_tokens", [1, 16, 1000])
def test_gpu_bf16_real_shape_three_way(num_tokens):
    dev = "cuda"
    gu, dn = _weights(E_BIG, H_BIG, I_BIG, torch.bfloat16, dev)
    x = torch.randn(num_tokens, H_BIG, device=dev, dtype=torch.bfloat16)
    idx, w = _routing(num_tokens, K_BIG, E_BIG, dev)
    ref = moe_experts_naive(x.float(), idx, w, gu.float(), dn.float())
    mod, _ = _hf_experts(E_BIG, H_BIG, I_BIG, K_BIG, gu, dn)
    with torch.no_grad():
        hf = mod(x, idx, w)
    y, _ = _run_poisoned(x, idx, w, gu, dn, return_expert_outputs=False,
                         config=cfg_mod.get_config(num_tokens, K_BIG, E_BIG, I_BIG, H_BIG,
                                                   torch.cuda.get_device_name()))
    assert not y.isnan().any()
    bad, rel_fast, rel_hf = _three_way(y, hf, ref)
    assert bad == 0, (bad, rel_fast, rel_hf)
    public, eo = moe_experts(x, idx, w, gu, dn, return_expert_outputs=True)
    _, ref_eo = moe_experts_naive(x.float(), idx, w, gu.float(), dn.float(), return_expert_outputs=True)
    _, hf_eo = moe_experts_naive(x, idx, w, gu, dn, return_expert_outputs=True)
    assert _three_way(public, hf, ref)[0] == 0
    assert _three_way(eo, hf_eo, ref_eo)[0] == 0


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_tokens", [17, 1000])
def test_gpu_fp32_fp16_real_shape(dtype, num_tokens):
    dev = "cuda"
    gu, dn = _weights(E_BIG, H_BIG, I_BIG, dtype, dev)
    x = torch.randn(num_tokens, H_BIG, device=dev, dtype=dtype)
    idx, w = _routing(num_tokens, K_BIG, E_BIG, dev)
    idx[::7, 3] = E_BIG
    ref = moe_experts_naive(x.double(), idx, w.double(), gu.double(), dn.double())
    y, _ = _run_poisoned(x, idx, w, gu, dn, return_expert_outputs=False,
                         config=cfg_mod.get_config(num_tokens, K_BIG, E_BIG, I_BIG, H_BIG,
                                                   torch.cuda.get_device_name(), element_size=x.element_size()))
    assert not y.isnan().any()
    assert torch.equal(y, moe_experts(x, idx, w, gu, dn))
    if dtype == torch.float32:
        assert _rel(y, ref) <= 1e-4
    else:
        assert _three_way(y, moe_experts_naive(x, idx, w, gu, dn), ref, 2.0 ** -10)[0] == 0


@pytest.mark.cuda
@pytest.mark.parametrize("config", cfg_mod.shipped_configs(), ids=lambda c: json.dumps(c, sort_keys=True))
def test_gpu_every_shipped_config(config):
    dev = "cuda"
    gu, dn = _weights(E_BIG, H_BIG, I_BIG, torch.bfloat16, dev)
    for num_tokens in (9, 300):
        x = torch.randn(num_tokens, H_BIG, device=dev, dtype=torch.bfloat16)
        idx, w = _routing(num_tokens, K_BIG, E_BIG, dev)
        idx[:, 0] = 5
        ref = moe_experts_naive(x.float(), idx, w, gu.float(), dn.float())
        torch_bf16 = moe_experts_naive(x, idx, w, gu, dn)
        for return_eo in (False, True):
            y, _ = _run_poisoned(x, idx, w, gu, dn, return_expert_outputs=return_eo, config=config)
            assert not y.isnan().any()
            assert _three_way(y, torch_bf16, ref)[0] == 0


@pytest.mark.cuda
@pytest.mark.parametrize("num_tokens,block_m", [(1, 16), (16, 16), (33, 64), (4096, 64), (16384, 128)])
def test_gpu_align_matches_naive(num_tokens, block_m):
    idx, _ = _routing(num_tokens, K_BIG, E_BIG, "cuda")
    idx[::5, 2] = E_BIG
    got = moe_align_block_size(idx, E_BIG, block_m)
    want = moe_align_block_size_naive(idx, E_BIG, block_m)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.cuda
@pytest.mark.parametrize("num_tokens", [1, 64])
def test_gpu_cuda_graph_capture(num_tokens):
    dev = "cuda"
    gu, dn = _weights(E_BIG, H_BIG, I_BIG, torch.bfloat16, dev)
    x = torch.randn(num_tokens, H_BIG, device=dev, dtype=torch.bfloat16)
    idx, w = _routing(num_tokens, K_BIG, E_BIG, dev)
    eager = moe_experts(x, idx, w, gu, dn)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = moe_experts(x, idx, w, gu, dn)
    x.copy_(torch.randn_like(x))
    new_idx, _ = _routing(num_tokens, K_BIG, E_BIG, dev)
    idx.copy_(new_idx)
    graph.replay()
    assert torch.equal(out, moe_experts(x, idx, w, gu, dn))
    assert not torch.equal(out, eager)
