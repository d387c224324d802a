"""The LM head with the final softcap (``gemma4_fast.kernels.softcap.linear_softcap``) and its routing in the fast
top-level models (``gemma4_fast.logits``).

CPU: the naive op is HF's LM head and three softcap ops bit for bit; the public op's fallbacks, errors and autograd
path; the routing of the LM head's ``nn.Linear`` (one call, restored afterwards, nested calls, the identity check);
every config of the Gluon kernel compiles for sm_90 and fits its shared memory. GPU (``cuda``): the kernel against a
float64 reference by the three-way rule at odd shapes, with and without bias, into NaN-filled outputs; the op's
dispatch; a model forward whose logits come from the fused kernel.
"""
from __future__ import annotations

import logging
import os

import pytest
import torch
from torch import nn

from gemma4_fast import ops
from gemma4_fast import logits as L
from gemma4_fast.kernels import _common
from gemma4_fast.kernels._compile_check import SHARED_LIMIT, run_without_interpreter
from gemma4_fast.kernels.softcap import linear_softcap, linear_softcap_naive
from gemma4_fast.kernels.softcap import linear as linear_mod

from _inputs import three_way_excess

CAP = 30.0


def _hf(x, w, b, cap=CAP):
    logits = nn.functional.linear(x, w, b)
    logits = logits / cap
    logits = torch.tanh(logits)
    return logits * cap


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_naive_is_hf_bit_for_bit(dtype, with_bias):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 7, 24, generator=g) * 3).to(dtype)
    w = torch.randn(50, 24, generator=g).to(dtype)
    b = torch.randn(50, generator=g).to(dtype) if with_bias else None
    assert torch.equal(linear_softcap_naive(x, w, b, CAP), _hf(x, w, b))


def test_cpu_op_falls_back_and_matches(caplog, monkeypatch):
    monkeypatch.setattr(_common, "_LOGGED", set())
    g = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(3, 600, 16, generator=g), torch.randn(40, 16, generator=g), torch.randn(40, generator=g)
    with caplog.at_level(logging.DEBUG, logger="gemma4_fast"):
        y = linear_softcap(x, w, b, CAP)
        y0 = linear_softcap(x, w, None, CAP)
    for got, bias in ((y, b.double()), (y0, None)):
        ref = linear_softcap_naive(x.double(), w.double(), bias, CAP)
        assert got.shape == (3, 600, 40) and got.dtype == torch.float32
        assert ((got.double() - ref).abs() <= 1e-4 * ref.abs().clamp_min(1)).all()
    assert "takes no bias" in caplog.text and "does not run on an sm_90 GPU" in caplog.text
    assert torch.equal(ops.linear_softcap(x, w, b, CAP, backend="torch"), _hf(x, w, b))


def test_errors_name_the_argument():
    x, w = torch.randn(4, 16), torch.randn(40, 16)
    with pytest.raises(ValueError, match="weight"):
        linear_softcap(x, torch.randn(40, 15), None, CAP)
    with pytest.raises(ValueError, match="bias"):
        linear_softcap(x, w, torch.randn(39), CAP)
    for cap in (0.0, -1.0, float("inf"), float("nan"), True):
        with pytest.raises(ValueError, match="cap"):
            linear_softcap(x, w, None, cap)
    with pytest.raises(TypeError, match="x"):
        linear_softcap(torch.ones(4, 16, dtype=torch.int64), w, None, CAP)


def test_gradients_use_the_naive_op():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 16, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(40, 16, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(40, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: linear_softcap(*t, CAP), (x, w, b))


# ---------------------------------------------------------------------------------------------------------------
# Routing of the LM head in the fast top-level models
# ---------------------------------------------------------------------------------------------------------------

def test_route_head_runs_once_and_restores():
    lin = nn.Linear(16, 40)
    x = torch.randn(3, 16)
    state: dict = {}
    with L._route_head(lin, CAP, "torch", state):
        assert L._head_linear_routed(lin)
        y1 = lin(x)
        assert "forward" not in lin.__dict__
        y2 = lin(x)
    assert torch.equal(y1, _hf(x, lin.weight, lin.bias)) and state["logits"] is y1
    assert torch.equal(y2, nn.functional.linear(x, lin.weight, lin.bias))
    assert "forward" not in lin.__dict__
    with L._route_head(lin, CAP, "torch", {}):
        pass
    assert "forward" not in lin.__dict__


def test_route_head_nested_calls_keep_their_own_results():
    lin = nn.Linear(16, 40)
    x_out, x_in = torch.randn(2, 16), torch.randn(3, 16)
    outer, inner = {}, {}
    with L._route_head(lin, CAP, "torch", outer):
        with L._route_head(lin, CAP, "torch", inner):
            y_in = lin(x_in)
        assert L._head_linear_routed(lin)
        y_out = lin(x_out)
    assert inner["logits"] is y_in and outer["logits"] is y_out
    assert torch.equal(y_in, _hf(x_in, lin.weight, lin.bias)) and torch.equal(y_out, _hf(x_out, lin.weight, lin.bias))
    assert "forward" not in lin.__dict__


def test_head_linear_skips_foreign_forwards_and_cpu(monkeypatch):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = nn.Linear(16, 40, bias=False)

    m = M()
    assert L._head_linear(m) is None
    monkeypatch.setattr(L, "_on_gpu_half", lambda w: True)
    assert L._head_linear(m) is m.lm_head
    m.lm_head.forward = lambda x: x
    assert L._head_linear(m) is None


@pytest.mark.parametrize("preset", ["tiny-ple-kv-shared", "tiny-moe"])
def test_patched_forward_routes_the_head_and_matches_hf(preset, monkeypatch):
    from _inputs import patched_copy

    hf, fast, _ = patched_copy(preset)
    monkeypatch.setattr(L, "_on_gpu_half", lambda w: True)
    calls = []
    real = ops.linear_softcap

    def spy(*a, **k):
        calls.append(a[0].shape)
        return real(*a, **k)

    monkeypatch.setattr(ops, "linear_softcap", spy)
    monkeypatch.setattr(L, "_routing_backend", lambda backend: "torch")
    ids = torch.randint(4, 200, (2, 9))
    with torch.no_grad():
        ref = hf(ids).logits
        got = fast(ids).logits
    assert calls, "the LM head was not routed"
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5)
    assert "forward" not in fast.lm_head.__dict__


def test_zero_bias_is_dropped_until_edited():
    lin = nn.Linear(16, 40)
    with torch.no_grad():
        lin.bias.zero_()
    assert L._effective_bias(lin.bias) is None
    with torch.no_grad():
        lin.bias[3] = 0.5
    assert L._effective_bias(lin.bias) is lin.bias
    assert L._effective_bias(None) is None


def test_routed_logits_that_are_not_returned_raise(monkeypatch):
    lin = nn.Linear(16, 40)
    state: dict = {}
    with L._route_head(lin, CAP, "torch", state):
        lin(torch.randn(2, 16))
    with pytest.raises(RuntimeError, match="cannot tell"):
        L._check_routed(state, torch.zeros(2, 40))


# ---------------------------------------------------------------------------------------------------------------
# Compile and fit (sm_90; the kernel is offered on Hopper only)
# ---------------------------------------------------------------------------------------------------------------

def _gluon_compile_report() -> list:
    """Shared bytes of every config (bf16 / fp16) compiled for sm_90."""
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from gemma4_fast.kernels.softcap import lm_head_hopper as H

    out = []
    for cfg in H.linear_softcap_configs():
        for dtype, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
            x, w = torch.empty(300, 1536, dtype=dtype), torch.empty(1000, 1536, dtype=dtype)
            y = torch.empty(300, 1000, dtype=dtype)
            coop = bool(cfg.get("COOP"))
            descs = dict(a_desc=H._descriptor(x, [cfg["BLOCK_M"], cfg["BLOCK_K"]]),
                         b_desc=H._descriptor(w, [cfg["BLOCK_N"], cfg["BLOCK_K"]]),
                         c_desc=H._descriptor(y, [cfg["BLOCK_M"] // 2 if coop else cfg["BLOCK_M"], cfg["BLOCK_N"]]))
            ws = bool(cfg.get("WS")) or coop
            kernel = (H.linear_softcap_coop_fwd_kernel if coop else H.linear_softcap_ws_fwd_kernel if ws
                      else H.linear_softcap_fwd_kernel)
            options = {"num_warps": H.WS_NUM_WARPS, "maxnreg": H.WS_MAXNREG} if ws else {"num_warps": H.NUM_WARPS}
            sig = {}
            for arg in kernel.arg_names:
                if arg in descs:
                    sig[arg] = native_specialize_impl(BaseBackend, descs[arg], False, True, True)[0]
                else:
                    sig[arg] = "constexpr" if arg in cfg else "fp32" if arg in ("inv_cap", "cap") else "i32"
            src = GluonASTSource(fn=kernel, signature=sig,
                                 constexprs={(kernel.arg_names.index(k),): v for k, v in cfg.items()
                                             if k in kernel.arg_names})
            res = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
            out.append([cfg, name, int(res.metadata.shared)])
    return out


def test_every_config_compiles_for_sm90_and_fits():
    pytest.importorskip("triton.experimental.gluon")
    rep = run_without_interpreter(os.path.abspath(__file__), "_gluon_compile_report")
    assert len(rep) == 6
    assert sum(bool(c.get("WS")) for c, *_ in rep) == 2 and sum(bool(c.get("COOP")) for c, *_ in rep) == 2
    assert all(0 < shared <= SHARED_LIMIT[90] for *_, shared in rep), rep


# ---------------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------------

def _needs_hopper():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("needs an sm_90 GPU")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k", [(1000, 262040, 1536), (513, 1000, 200), (1, 2056, 64), (4096, 8192, 2816),
                                   (4200, 1032, 72)])
def test_gpu_kernel_three_way(dtype, m, n, k):
    _needs_hopper()
    from gemma4_fast.kernels.softcap import lm_head_hopper as H

    g = torch.Generator(device="cuda").manual_seed(m + n + k)
    x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
    w = (torch.randn(n, k, device="cuda", generator=g) * 4 * k ** -0.5).to(dtype)
    rows = torch.cat([torch.arange(min(m, 256)), torch.arange(min(m, max(256, m - 128)), m)]).cuda()
    ref = CAP * torch.tanh((x[rows].double() @ w.double().t()) / CAP)
    low = _hf(x[rows], w, None)
    for cfg in H.linear_softcap_configs():
        out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
        H.linear_softcap_fwd(x, w, out, CAP, cfg)
        assert not torch.isnan(out).any(), cfg
        bad, err, bound = three_way_excess(out[rows], ref, low, atol=2e-3)
        assert not bad.any(), (cfg, err.max().item(), bound.min().item())


@pytest.mark.cuda
def test_gpu_op_dispatch(caplog, monkeypatch):
    _needs_hopper()
    from gemma4_fast.kernels.softcap import lm_head_hopper as H

    monkeypatch.setattr(_common, "_LOGGED", set())
    launched = []
    real = H.linear_softcap_fwd
    monkeypatch.setattr(H, "linear_softcap_fwd", lambda *a, **k: launched.append(a[0].shape) or real(*a, **k))
    x = torch.randn(2, 300, 256, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1024, 256, device="cuda", dtype=torch.bfloat16) * 0.1
    y = linear_softcap(x, w, None, CAP)
    assert launched == [(600, 256)] and y.shape == (2, 300, 1024)
    bias = torch.randn(1024, device="cuda", dtype=torch.bfloat16)
    wide_x = torch.randn(600, 3072, device="cuda", dtype=torch.bfloat16)
    wide_w = torch.randn(1024, 3072, device="cuda", dtype=torch.bfloat16) * 0.05
    with caplog.at_level(logging.DEBUG, logger="gemma4_fast"):
        small = linear_softcap(x[:, :5], w, None, CAP)
        odd = linear_softcap(x, w[:1020], None, CAP)
        full = linear_softcap(x.float(), w.float(), None, CAP)
        biased = linear_softcap(x, w, bias, CAP)
        wide = linear_softcap(wide_x, wide_w, None, CAP)
    assert launched == [(600, 256)]
    for phrase in ("fewer than", "multiple of 8", "bf16 / fp16", "takes no bias", "hidden size of"):
        assert phrase in caplog.text, phrase
    for got, xx, ww, bb in ((small, x[:, :5], w, None), (odd, x, w[:1020], None), (full, x.float(), w.float(), None),
                            (biased, x, w, bias), (wide, wide_x, wide_w, None)):
        ref = linear_softcap_naive(xx.double(), ww.double(), None if bb is None else bb.double(), CAP)
        assert (got.double() - ref).abs().max() < 0.1


@pytest.mark.cuda
def test_gpu_model_logits_come_from_the_fused_kernel(monkeypatch):
    """A patched bf16 E2B (two layers, real vocabulary) computes its logits with the fused kernel; they follow the
    three-way rule against float64 of the LM head and softcap applied to the model's own final hidden states (HF's
    LM head and three bf16 ops are the low-precision baseline)."""
    _needs_hopper()
    import gemma4_fast
    from gemma4_fast.kernels.softcap import lm_head_hopper as H
    from gemma4_fast.models import build_model

    model = build_model("E2B", torch.bfloat16, "cuda", num_hidden_layers=2)
    gemma4_fast.patch_model(model, backend="triton")
    launched = []
    real = H.linear_softcap_fwd
    monkeypatch.setattr(H, "linear_softcap_fwd", lambda *a, **k: launched.append(1) or real(*a, **k))
    hidden = {}
    text_model = getattr(model.model, "language_model", model.model)
    text_model.norm.register_forward_hook(lambda m, a, o: hidden.setdefault("h", o.detach().clone()))
    ids = torch.randint(4, 260, (1, 700), device="cuda")
    with torch.no_grad():
        got = model(ids, use_cache=False).logits
    assert launched == [1]
    assert "forward" not in model.lm_head.__dict__
    h, w = hidden["h"][0, :64], model.lm_head.weight
    ref = CAP * torch.tanh((h.double() @ w.double().t()) / CAP)
    bad, err, bound = three_way_excess(got[0, :64], ref, _hf(h, w, None), atol=2e-3)
    assert not bad.any(), (err.max().item(), bound.min().item())


def test_bridge_routes_its_head_without_the_zero_bias(monkeypatch):
    """A fast TransformerBridge's plain forward sends its unembed's ``nn.Linear`` (which TransformerLens gives an
    all-zero bias) through ``ops.linear_softcap`` with no bias, and its logits equal the seed bridge's; a cache of
    ``hook_unembed`` keeps the unrouted raw logits."""
    from transformer_lens.model_bridge import TransformerBridge

    from gemma4_fast.bridge_integration import boot_transformers
    from gemma4_fast.models import build_model, offline_tokenizer

    tok = offline_tokenizer()
    seed = TransformerBridge.boot_transformers("tiny-ple-kv-shared", hf_model=build_model("tiny-ple-kv-shared"),
                                               tokenizer=tok, device="cpu")
    fast = boot_transformers("tiny-ple-kv-shared", hf_model=build_model("tiny-ple-kv-shared"), tokenizer=tok,
                             device="cpu", fast_kernels=True, fast_backend="torch")
    monkeypatch.setattr(L, "_on_gpu_half", lambda w: True)
    monkeypatch.setattr(L, "_routing_backend", lambda backend: "torch")
    calls = []
    real = ops.linear_softcap
    monkeypatch.setattr(ops, "linear_softcap", lambda x, w, b, cap, **k: calls.append(b) or real(x, w, b, cap, **k))
    ids = fast.to_tokens("The quick brown fox")
    with torch.no_grad():
        got, want = fast(ids), seed(ids)
        fast.run_with_cache(ids, names_filter="hook_unembed")
    assert calls == [None]
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5
