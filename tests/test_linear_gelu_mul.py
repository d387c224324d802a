"""The MLP's gate and up projections with the fused activation (``gemma4_fast.kernels.activation.linear_gelu_mul``)
and their routing in the fast MLP (``gemma4_fast.mlp``).

CPU: the naive op is HF's ``act_fn(gate_proj(x)) * up_proj(x)`` bit for bit; the public op's fallback, errors and
autograd path; which projections may be fused (plain linears, TransformerLens ``LinearBridge`` wrappers, hooks, bias,
foreign forwards); a patched model and a fast bridge route their MLPs and equal HF / the seed bridge, and a hook on a
projection keeps that layer's separate calls; every config of the Gluon kernel compiles for sm_90 and fits. GPU
(``cuda``): every config against a float64 reference by the three-way rule at odd shapes into NaN-filled outputs; the
op's dispatch; a patched E2B-sized model whose MLPs run the kernel.
"""
from __future__ import annotations

import logging
import os

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gemma4_fast import mlp as MLP
from gemma4_fast import ops
from gemma4_fast.kernels import _common
from gemma4_fast.kernels._compile_check import SHARED_LIMIT, run_without_interpreter
from gemma4_fast.kernels.activation import linear_gelu_mul, linear_gelu_mul_naive


def _hf_mlp_input(x, wg, wu):
    """What ``Gemma4TextMLP.forward`` hands ``down_proj``, through HF's own module."""
    from transformers.activations import ACT2FN

    gate, up = nn.Linear(wg.shape[1], wg.shape[0], bias=False), nn.Linear(wg.shape[1], wg.shape[0], bias=False)
    with torch.no_grad():
        gate.weight.copy_(wg)
        up.weight.copy_(wu)
    gate, up = gate.to(wg.dtype), up.to(wg.dtype)
    with torch.no_grad():
        return ACT2FN["gelu_pytorch_tanh"](gate(x)) * up(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_naive_is_hf_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 7, 24, generator=g) * 3).to(dtype)
    wg, wu = torch.randn(40, 24, generator=g).to(dtype), torch.randn(40, 24, generator=g).to(dtype)
    assert torch.equal(linear_gelu_mul_naive(x, wg, wu), _hf_mlp_input(x, wg, wu))


def test_cpu_op_falls_back_and_matches(caplog, monkeypatch):
    monkeypatch.setattr(_common, "_LOGGED", set())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 401, 16, generator=g)
    wg, wu = torch.randn(40, 16, generator=g), torch.randn(40, 16, generator=g)
    with caplog.at_level(logging.DEBUG, logger="gemma4_fast"):
        got = linear_gelu_mul(x, wg, wu)
    ref = linear_gelu_mul_naive(x.double(), wg.double(), wu.double())
    assert got.shape == (3, 401, 40) and got.dtype == torch.float32 and not torch.isnan(got).any()
    assert ((got.double() - ref).norm() / ref.norm()).item() <= 1e-4
    assert "does not run on an sm_90 GPU" in caplog.text
    assert torch.equal(ops.linear_gelu_mul(x, wg, wu, backend="torch"), _hf_mlp_input(x, wg, wu))


def test_errors_name_the_argument():
    x, w = torch.randn(4, 16), torch.randn(40, 16)
    with pytest.raises(ValueError, match="w_gate"):
        linear_gelu_mul(x, torch.randn(40, 15), w)
    with pytest.raises(ValueError, match="w_up"):
        linear_gelu_mul(x, w, torch.randn(39, 16))
    with pytest.raises(TypeError, match="x"):
        linear_gelu_mul(torch.ones(4, 16, dtype=torch.int64), w, w)
    with pytest.raises(TypeError, match="w_up"):
        linear_gelu_mul(x, w, None)


def test_gradients_use_the_naive_op():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 16, generator=g, dtype=torch.float64, requires_grad=True)
    wg = torch.randn(12, 16, generator=g, dtype=torch.float64, requires_grad=True)
    wu = torch.randn(12, 16, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(linear_gelu_mul, (x, wg, wu))


# ---------------------------------------------------------------------------------------------------------------
# Which projections may be fused
# ---------------------------------------------------------------------------------------------------------------

def test_fused_projections_rules(monkeypatch):
    gate, up = nn.Linear(16, 40, bias=False), nn.Linear(16, 40, bias=False)
    assert MLP.fused_projections(gate, up) is None  # CPU fp32 weights
    monkeypatch.setattr(MLP, "_on_gpu_half", lambda w: True)
    assert MLP.fused_projections(gate, up) == (gate, up)
    assert MLP.fused_projections(gate, nn.Linear(16, 40)) is None  # a bias
    assert MLP.fused_projections(gate, nn.Linear(16, 41, bias=False)) is None  # shapes differ
    handle = up.register_forward_hook(lambda m, a, o: None)
    assert MLP.fused_projections(gate, up) is None
    handle.remove()
    up.forward = lambda x: x
    assert MLP.fused_projections(gate, up) is None
    del up.forward
    handle = nn.modules.module.register_module_forward_hook(lambda m, a, o: None)
    try:
        assert MLP.fused_projections(gate, up) is None
    finally:
        handle.remove()
    assert MLP.fused_projections(gate, up) == (gate, up)


def _tiny_bridges(backend="torch"):
    from transformer_lens.model_bridge import TransformerBridge

    from gemma4_fast.bridge_integration import boot_transformers
    from gemma4_fast.models import build_model, offline_tokenizer

    tok = offline_tokenizer()
    seed = TransformerBridge.boot_transformers("tiny-ple-kv-shared", hf_model=build_model("tiny-ple-kv-shared"),
                                               tokenizer=tok, device="cpu")
    fast = boot_transformers("tiny-ple-kv-shared", hf_model=build_model("tiny-ple-kv-shared"), tokenizer=tok,
                             device="cpu", fast_kernels=True, fast_backend=backend)
    return seed, fast


def test_bridge_linear_bridges_fuse_only_without_hooks(monkeypatch):
    _, fast = _tiny_bridges()
    monkeypatch.setattr(MLP, "_on_gpu_half", lambda w: True)
    mlp = fast.blocks[0].mlp.original_component
    pair = MLP.fused_projections(mlp.gate_proj, mlp.up_proj)
    assert pair == (mlp.gate_proj.original_component, mlp.up_proj.original_component)
    fast.blocks[0].mlp.gate.hook_out.add_hook(lambda t, hook: t)
    assert MLP.fused_projections(mlp.gate_proj, mlp.up_proj) is None
    fast.reset_hooks()
    fast.blocks[0].mlp.__getattr__("in").hook_in.add_hook(lambda t, hook: t)
    assert MLP.fused_projections(mlp.gate_proj, mlp.up_proj) is None
    fast.reset_hooks()
    assert MLP.fused_projections(mlp.gate_proj, mlp.up_proj) is not None


def _spy(monkeypatch):
    calls = []
    real = ops.linear_gelu_mul
    monkeypatch.setattr(ops, "linear_gelu_mul", lambda x, *a, **k: calls.append(tuple(x.shape)) or real(x, *a, **k))
    return calls


def _set_backend(model, backend):
    for m in model.modules():
        if isinstance(m, MLP.FastMLPMixin):
            m._g4f_backend = backend


@pytest.mark.parametrize("preset", ["tiny-ple-kv-shared", "tiny-moe"])
def test_patched_model_routes_its_mlps_and_matches_hf(preset, monkeypatch):
    """With the projections routable (weights treated as GPU half) a patched model's MLPs call
    ``ops.linear_gelu_mul`` once per layer; its logits equal HF's (the op's CPU path is the naive GEMMs and the
    interpreted or naive activation)."""
    from _inputs import patched_copy

    hf, fast, _ = patched_copy(preset)
    _set_backend(fast, "auto")
    monkeypatch.setattr(MLP, "_on_gpu_half", lambda w: True)
    calls = _spy(monkeypatch)
    ids = torch.randint(4, 200, (2, 9))
    with torch.no_grad():
        ref = hf(ids).logits
        got = fast(ids).logits
    n_mlp = sum(isinstance(m, MLP.FastMLPMixin) for m in fast.modules())
    assert len(calls) == n_mlp > 0
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_patched_model_keeps_separate_calls_under_grad(monkeypatch):
    from _inputs import patched_copy

    _, fast, _ = patched_copy("tiny-ple-kv-shared")
    _set_backend(fast, "auto")
    monkeypatch.setattr(MLP, "_on_gpu_half", lambda w: True)
    calls = _spy(monkeypatch)
    fast(torch.randint(4, 200, (1, 5))).logits.sum().backward()
    assert calls == []
    assert all(p.grad is not None for n, p in fast.named_parameters() if "gate_proj" in n)


def test_bridge_routes_unhooked_mlps_and_keeps_hooked_ones(monkeypatch):
    """A fast bridge (Triton backend, interpreted) fuses every MLP whose projections are unhooked: in quiet blocks (the
    unwrapped twin's plain linears) and in a block made non-quiet by an attention hook (through the unhooked
    ``LinearBridge`` wrappers, whose call records are kept); caching ``blocks.2.mlp.gate.hook_out`` keeps layer 2's
    separate calls. Logits and the cached gate output equal the seed bridge's."""
    seed, fast = _tiny_bridges("triton")
    monkeypatch.setattr(MLP, "_on_gpu_half", lambda w: True)
    calls = _spy(monkeypatch)
    ids = fast.to_tokens("The quick brown fox")
    n_layers = len(fast.blocks)
    names = ["blocks.1.hook_attn_out", "blocks.2.mlp.gate.hook_out"]
    with torch.no_grad():
        want, seed_cache = seed.run_with_cache(ids, names_filter=names)
        got = fast(ids)
        assert len(calls) == n_layers
        calls.clear()
        gate = fast.blocks[1].mlp.original_component.gate_proj
        object.__setattr__(gate, "_fired_hook_out", False)
        got_cached, cache = fast.run_with_cache(ids, names_filter=names)
    assert len(calls) == n_layers - 1
    assert gate._fired_hook_out and not gate._suppress_next_hook_in
    for out in (got, got_cached):
        assert ((out - want).abs().max() / want.abs().max()).item() <= 1e-4
    for key in names:
        assert torch.allclose(cache[key], seed_cache[key], rtol=1e-4, atol=1e-5), key


# ---------------------------------------------------------------------------------------------------------------
# Compile and fit (sm_90; the kernel is offered on Hopper only)
# ---------------------------------------------------------------------------------------------------------------

def _gluon_compile_report() -> list:
    """Shared bytes of every config (bf16 / fp16) compiled for sm_90."""
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from gemma4_fast.kernels.activation import mlp_hopper as H

    out = []
    for cfg in H.linear_gelu_mul_configs():
        coop, ws = bool(cfg.get("COOP")), bool(cfg.get("WS"))
        kernel = (H.linear_gelu_mul_coop_fwd_kernel if coop else H.linear_gelu_mul_ws_fwd_kernel if ws
                  else H.linear_gelu_mul_fwd_kernel)
        options = {"num_warps": H.WS_NUM_WARPS, "maxnreg": H.WS_MAXNREG} if coop or ws else {"num_warps": H.NUM_WARPS}
        consts = {k: v for k, v in cfg.items() if k in kernel.arg_names}
        for dtype, name in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
            x, w = torch.empty(300, 1536, dtype=dtype), torch.empty(1000, 1536, dtype=dtype)
            y = torch.empty(300, 1000, dtype=dtype)
            descs = dict(a_desc=H._descriptor(x, [cfg["BLOCK_M"], cfg["BLOCK_K"]]),
                         g_desc=H._descriptor(w, [cfg["BLOCK_N"], cfg["BLOCK_K"]]),
                         u_desc=H._descriptor(w, [cfg["BLOCK_N"], cfg["BLOCK_K"]]),
                         c_desc=H._descriptor(y, [cfg["BLOCK_M"] // 2 if coop else cfg["BLOCK_M"], cfg["BLOCK_N"]]))
            sig = {arg: native_specialize_impl(BaseBackend, descs[arg], False, True, True)[0] if arg in descs
                   else "constexpr" if arg in consts else "i32" for arg in kernel.arg_names}
            src = GluonASTSource(fn=kernel, signature=sig,
                                 constexprs={(kernel.arg_names.index(k),): v for k, v in consts.items()})
            res = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
            out.append([cfg, name, int(res.metadata.shared)])
    return out


def test_every_config_compiles_for_sm90_and_fits():
    """Each config (the cooperative, ping-pong and one-tile kernels) compiles for sm_90 and fits a block's shared
    memory."""
    pytest.importorskip("triton.experimental.gluon")
    rep = run_without_interpreter(os.path.abspath(__file__), "_gluon_compile_report")
    assert len(rep) == 6
    assert sum(bool(c.get("COOP")) for c, *_ in rep) == 2 and sum(bool(c.get("WS")) for c, *_ in rep) == 2
    assert all(0 < shared <= SHARED_LIMIT[90] for *_, shared in rep), rep


# ---------------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------------

def _needs_hopper():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("needs an sm_90 GPU")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,n,k", [(1000, 6144, 1536), (300, 2112, 2816), (257, 1000, 200), (4099, 12288, 1536),
                                   (64, 72, 24)])
def test_gpu_kernel_three_way(dtype, m, n, k):
    """Every config into a NaN-filled output against float64 of ``gelu_tanh(x Wg^T) * (x Wu^T)`` by the three-way
    rule over the tensor (its largest error at most twice that of HF's bf16 / fp16 expression plus ``atol``: the
    products are rounded before the multiply, on both paths, so elementwise bounds do not hold for the unfused path
    either), and against the unfused fast path (cuBLAS then ``gelu_mul``), whose rounding it shares: at most one
    unit in the last place of the largest output apart (a GEMM summation order that flips one rounding)."""
    _needs_hopper()
    from gemma4_fast.kernels.activation import gelu_mul
    from gemma4_fast.kernels.activation import mlp_hopper as H

    g = torch.Generator(device="cuda").manual_seed(m + n + k)
    x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
    wg = (torch.randn(n, k, device="cuda", generator=g) * 2 * k ** -0.5).to(dtype)
    wu = (torch.randn(n, k, device="cuda", generator=g) * 2 * k ** -0.5).to(dtype)
    ref = linear_gelu_mul_naive(x.double(), wg.double(), wu.double())
    low = linear_gelu_mul_naive(x, wg, wu)
    unfused = gelu_mul(F.linear(x, wg), F.linear(x, wu))
    for cfg in H.linear_gelu_mul_configs():
        out = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
        H.linear_gelu_mul_fwd(x, wg, wu, out, cfg)
        assert not torch.isnan(out).any(), cfg
        err = (out.double() - ref).abs().max().item()
        bound = 2 * (low.double() - ref).abs().max().item() + 1e-3 * ref.abs().max().item()
        assert err <= bound, (cfg, err, bound)
        ulp = 2.0 ** (-7 if dtype == torch.bfloat16 else -10) * ref.abs().max().item()
        assert (out.double() - unfused.double()).abs().max().item() <= ulp, cfg


@pytest.mark.cuda
def test_gpu_op_dispatch(caplog, monkeypatch):
    _needs_hopper()
    from gemma4_fast.kernels.activation import mlp_hopper as H

    monkeypatch.setattr(_common, "_LOGGED", set())
    launched = []
    real = H.linear_gelu_mul_fwd
    monkeypatch.setattr(H, "linear_gelu_mul_fwd", lambda *a, **k: launched.append(a[0].shape) or real(*a, **k))
    x = torch.randn(2, 520, 256, device="cuda", dtype=torch.bfloat16)
    wg = torch.randn(1024, 256, device="cuda", dtype=torch.bfloat16) * 0.1
    wu = torch.randn(1024, 256, device="cuda", dtype=torch.bfloat16) * 0.1
    y = linear_gelu_mul(x, wg, wu)
    assert launched == [(1040, 256)] and y.shape == (2, 520, 1024)
    xw = torch.randn(1, 1040, 2048, device="cuda", dtype=torch.bfloat16)
    wgw = torch.randn(1024, 2048, device="cuda", dtype=torch.bfloat16) * 0.05
    wuw = torch.randn(1024, 2048, device="cuda", dtype=torch.bfloat16) * 0.05
    with caplog.at_level(logging.DEBUG, logger="gemma4_fast"):
        small = linear_gelu_mul(x[:, :5], wg, wu)
        odd = linear_gelu_mul(x, wg[:1020], wu[:1020])
        full = linear_gelu_mul(x.float(), wg.float(), wu.float())
        wide = linear_gelu_mul(xw, wgw, wuw)
        monkeypatch.setenv("GEMMA4_FAST_LINEAR_GELU_MUL", "0")
        off = linear_gelu_mul(x, wg, wu)
    assert launched == [(1040, 256)]
    assert (off.double() - y.double()).abs().max() <= 2.0 ** -7 * y.abs().max()
    for phrase in ("fewer than", "multiple of 8", "bf16 / fp16", "hidden size", "turned off"):
        assert phrase in caplog.text, phrase
    for got, xx, a, b in ((y, x, wg, wu), (small, x[:, :5], wg, wu), (odd, x, wg[:1020], wu[:1020]),
                          (full, x.float(), wg.float(), wu.float()), (wide, xw, wgw, wuw)):
        ref = linear_gelu_mul_naive(xx.double(), a.double(), b.double())
        low = linear_gelu_mul_naive(xx, a, b).double()
        err, base = (got.double() - ref).abs().max(), (low - ref).abs().max()
        assert err <= 2 * base + 1e-3 * ref.abs().max(), (err, base)


@pytest.mark.cuda
def test_gpu_model_mlps_run_the_fused_kernel(monkeypatch):
    """A patched bf16 E2B (three layers) runs every MLP on the kernel at 1100 tokens. Its logits are checked by the
    three-way rule over the tensor against the same model in float32 (HF eager), with the patched model on the
    unfused path (cuBLAS then ``gelu_mul``) as the low-precision baseline: a random bf16 model amplifies rounding
    (both bf16 paths differ from float32 by far more than from each other), so HF's bf16 model is no reference."""
    _needs_hopper()
    import gemma4_fast
    from gemma4_fast.kernels.activation import linear as LIN
    from gemma4_fast.kernels.activation import mlp_hopper as H
    from gemma4_fast.models import build_model

    ref_model = build_model("E2B", torch.float32, "cuda", num_hidden_layers=3)
    model = build_model("E2B", torch.bfloat16, "cuda", num_hidden_layers=3)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in ref_model.state_dict().items()})
    gemma4_fast.patch_model(model, backend="triton")
    launched = []
    real = H.linear_gelu_mul_fwd
    monkeypatch.setattr(H, "linear_gelu_mul_fwd", lambda *a, **k: launched.append(1) or real(*a, **k))
    ids = torch.randint(4, 260, (1, 1100), device="cuda")
    with torch.no_grad():
        got = model(ids, use_cache=False).logits.double()
        assert len(launched) == 3
        monkeypatch.setattr(LIN, "MIN_ROWS", 10 ** 9)
        unfused = model(ids, use_cache=False).logits.double()
        assert len(launched) == 3
        want = ref_model(ids, use_cache=False).logits.double()
    err, base = (got - want).norm() / want.norm(), (unfused - want).norm() / want.norm()
    assert err <= 2 * base + 1e-3, (err.item(), base.item())
