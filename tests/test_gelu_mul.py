"""Tests of ``gemma4_fast.kernels.activation`` (fused ``gelu_tanh(gate) * up``), ``ops.gelu_mul`` and the
fast dense MLP (``gemma4_fast.mlp``), against ``naive.py`` and HF ``Gemma4TextMLP``.

CPU runs use Triton's interpreter (tiny odd sizes, float32/float16); ``@pytest.mark.cuda`` tests run the
real Gemma 4 intermediate widths in bfloat16/float16/float32 on a GPU.
"""
from __future__ import annotations

import copy
import inspect
import json
import logging

import pytest
import torch

from gemma4_fast import ops
from gemma4_fast.kernels._compile_check import compile_for_target
from gemma4_fast.kernels.activation import gelu_mul, gelu_mul_naive
from gemma4_fast.kernels.activation.gelu_mul import (CONFIG_ENV, default_config, gelu_mul_configs, gelu_mul_fwd,
                                                     gelu_mul_fwd_kernel, pick_config)
from gemma4_fast.models import build_model, text_config
from gemma4_fast.patch import patch_model, unpatch_model
from _compile_tests import compile_fit_tests
from _inputs import three_way_excess

GEMMA4_WIDTHS = (6144, 12288, 10240, 2112, 21504)


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _rand(*shape, dtype, device="cpu", scale=1.0):
    return (torch.randn(*shape, dtype=torch.float32) * scale).to(device=device, dtype=dtype)


def _check(fast, gate, up, *, atol=1e-6):
    """fp32: relative error <= 1e-6 against torch and float64; fp16/bf16: the three-way rule
    |fast - ref64| <= 2 |torch_lowp - ref64| + atol * max|ref64|, elementwise."""
    out_dtype = torch.promote_types(gate.dtype, up.dtype)
    assert fast.dtype == out_dtype and fast.shape == gate.shape and fast.is_contiguous()
    assert not torch.isnan(fast).any(), "NaN in the fast output"
    ref64 = gelu_mul_naive(gate.double(), up.double())
    lowp = gelu_mul_naive(gate, up)
    if out_dtype == torch.float32:
        assert _rel(fast, lowp) <= 1e-6
        assert _rel(fast, ref64) <= 1e-6
        return
    bad, err, _ = three_way_excess(fast, ref64, lowp, atol)
    assert not bad.any(), f"{bad.sum().item()} elements break the three-way rule; max err {err.max().item():.3g}"


def _poisoned_launch(gate, up, cfg):
    h = torch.full(gate.shape, float("nan"), dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    gelu_mul_fwd(gate, up, h, cfg)
    return h


# --------------------------------------------------------------------------------------------
# CPU (interpreter)
# --------------------------------------------------------------------------------------------

CPU_SHAPES = [(3, 7, 97), (5, 33), (1, 1), (2, 3, 130), (4, 1024 + 7)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", CPU_SHAPES)
def test_matches_naive_poisoned(dtype, shape):
    gate = _rand(*shape, dtype=dtype, scale=3.0)
    up = _rand(*shape, dtype=dtype)
    cfg = default_config(shape[-1], gate.numel() // shape[-1])
    _check(_poisoned_launch(gate, up, cfg), gate, up)
    _check(gelu_mul(gate, up), gate, up)


@pytest.mark.parametrize("cfg", gelu_mul_configs(300)[:6] + [{"BLOCK_M": 2, "BLOCK_N": 64, "num_warps": 1}])
def test_configs_poisoned_odd_rows(cfg):
    gate = _rand(7, 300, dtype=torch.float32, scale=2.0)
    up = _rand(7, 300, dtype=torch.float32)
    _check(_poisoned_launch(gate, up, cfg), gate, up)
    strided = _rand(7, 700, dtype=torch.float32)
    g, u = strided[:, :300], strided[:, 350:650]
    _check(_poisoned_launch(g, u, cfg), g, u)


def test_strided_and_noncontiguous_layouts(caplog):
    fused = _rand(2, 5, 2 * 97, dtype=torch.float32, scale=2.0)
    gate, up = fused[..., :97], fused[..., 97:]
    assert not gate.is_contiguous()
    _check(gelu_mul(gate, up), gate, up)
    t = _rand(97, 5, dtype=torch.float32).t()
    u = _rand(5, 97, dtype=torch.float32)
    with caplog.at_level(logging.INFO, logger="gemma4_fast"):
        _check(gelu_mul(t, u), t, u)
    perm = _rand(3, 4, 33, dtype=torch.float32).transpose(0, 1)
    _check(gelu_mul(perm, perm.contiguous()), perm, perm.contiguous())


def test_mixed_dtypes_promote():
    gate = _rand(3, 45, dtype=torch.float16, scale=2.0)
    up = _rand(3, 45, dtype=torch.float32)
    out = gelu_mul(gate, up)
    assert out.dtype == torch.float32 and not torch.isnan(out).any()
    assert _rel(out, gelu_mul_naive(gate.double(), up.double())) <= 1e-6
    assert _rel(out, gelu_mul_naive(gate.float(), up)) <= 1e-6


def test_special_values():
    g = torch.tensor([0.0, -0.0, 1.0, -1.0, 30.0, -30.0, 1e4, -1e4, float("inf"), float("nan"), 3e-40, -5.0, -12.0,
                      7.5, -3.25])
    u = torch.full_like(g, 1.5)
    got, want = gelu_mul(g, u), gelu_mul_naive(g, u)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    fin = ~torch.isnan(want)
    assert torch.allclose(got[fin], want[fin], rtol=1e-6, atol=1e-6)
    assert got[4].item() == 45.0 and got[8].item() == float("inf") and got[5].item() == 0.0


def test_pinned_config(monkeypatch):
    monkeypatch.setenv(CONFIG_ENV, json.dumps({"BLOCK_M": 2, "BLOCK_N": 32}))
    cfg = pick_config(97, 10)
    assert cfg["BLOCK_M"] == 2 and cfg["BLOCK_N"] == 32 and "num_warps" in cfg
    gate, up = _rand(11, 97, dtype=torch.float32), _rand(11, 97, dtype=torch.float32)
    _check(gelu_mul(gate, up), gate, up)
    monkeypatch.setenv(CONFIG_ENV, json.dumps({"BLOCK_N": 48}))
    with pytest.raises(ValueError, match="BLOCK_N"):
        pick_config(97, 10)


def test_default_configs_are_sane():
    for width in (*GEMMA4_WIDTHS, 1, 97, 300):
        for rows in (1, 7, 8192):
            cfg = default_config(width, rows)
            assert cfg["BLOCK_N"] & (cfg["BLOCK_N"] - 1) == 0 and cfg["BLOCK_M"] >= 1
            assert cfg["BLOCK_M"] * cfg["BLOCK_N"] <= 4096
    for width in GEMMA4_WIDTHS:
        assert gelu_mul_configs(width)


def test_errors_name_the_argument(monkeypatch):
    g = _rand(2, 5, dtype=torch.float32)
    with pytest.raises(ValueError, match="up"):
        gelu_mul(g, _rand(2, 6, dtype=torch.float32))
    with pytest.raises(TypeError, match="gate"):
        gelu_mul(g.to(torch.int32), g)
    with pytest.raises(TypeError, match="up"):
        gelu_mul(g, g.double())
    with pytest.raises(TypeError, match="gate"):
        gelu_mul([1.0], g)
    with pytest.raises(ValueError, match="gate"):
        gelu_mul(torch.tensor(1.0), torch.tensor(1.0))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="gelu_mul_naive"):
        gelu_mul(g, g)


def test_zero_elements():
    g = torch.empty(0, 7)
    assert gelu_mul(g, g).shape == (0, 7)
    g = torch.empty(3, 0)
    assert gelu_mul(g, g).shape == (3, 0)


def test_gradients_public_op_and_ops():
    gate = _rand(3, 37, dtype=torch.float32, scale=2.0).requires_grad_()
    up = _rand(3, 37, dtype=torch.float32).requires_grad_()
    gref, uref = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    w = torch.randn(3, 37)
    (gelu_mul_naive(gref, uref) * w).sum().backward()
    for fn in (lambda a, b: gelu_mul(a, b), lambda a, b: ops.gelu_mul(a, b, backend="triton")):
        gate.grad = up.grad = None
        out = fn(gate, up)
        assert out.requires_grad
        (out * w).sum().backward()
        assert _rel(gate.grad, gref.grad) <= 1e-6 and _rel(up.grad, uref.grad) <= 1e-6
    assert ops.resolve("triton", "gelu_mul", gate, up, differentiable=True) == "triton+grad"
    out = ops.gelu_mul(gate, up.detach(), backend="triton")
    assert type(out.grad_fn).__name__.startswith("_NaiveBackward")


def test_ops_torch_backend_is_hf_expression():
    from transformers.activations import ACT2FN
    gate, up = _rand(4, 51, dtype=torch.float16, scale=2.0), _rand(4, 51, dtype=torch.float16)
    assert torch.equal(ops.gelu_mul(gate, up, backend="torch"), ACT2FN["gelu_pytorch_tanh"](gate) * up)
    _check(ops.gelu_mul(gate, up, backend="triton"), gate, up)


# --------------------------------------------------------------------------------------------
# Fast MLP module
# --------------------------------------------------------------------------------------------

def _hf_mlp(preset="tiny-dense-k-eq-v", dtype=torch.float32, device="cpu", **overrides):
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextMLP
    cfg = text_config(preset)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(3)
    return Gemma4TextMLP(cfg, 0).to(device=device, dtype=dtype)


def _fast(mlp, backend):
    from gemma4_fast.modules import FastGemma4TextMLP
    fast = copy.deepcopy(mlp)
    fast.__class__ = FastGemma4TextMLP
    fast._g4f_backend = backend
    return fast


def _record_calls(mlp):
    seen = []
    mlp.gate_proj.register_forward_hook(lambda m, a, o: seen.append(("gate", o.detach().clone())))
    mlp.up_proj.register_forward_hook(lambda m, a, o: seen.append(("up", o.detach().clone())))
    mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(("down_in", a[0].detach().clone())))
    return seen


@pytest.mark.parametrize("backend", ["torch", "triton", "auto"])
def test_fast_mlp_matches_hf_and_keeps_submodule_calls(backend):
    hf = _hf_mlp()
    fast = _fast(hf, backend)
    x = _rand(2, 5, hf.hidden_size, dtype=torch.float32)
    seen = _record_calls(fast)
    with torch.no_grad():
        want, got = hf(x), fast(x)
    assert [name for name, _ in seen] == ["gate", "up", "down_in"]
    if backend == "torch":
        assert torch.equal(got, want)
    else:
        assert _rel(got, want) <= 1e-6
        assert _rel(seen[2][1], gelu_mul_naive(seen[0][1], seen[1][1])) <= 1e-6


def test_fast_mlp_gradients():
    hf = _hf_mlp()
    fast = _fast(hf, "triton")
    x = _rand(2, 3, hf.hidden_size, dtype=torch.float32).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    fast(x).square().sum().backward()
    hf(xr).square().sum().backward()
    assert _rel(x.grad, xr.grad) <= 1e-5
    assert _rel(fast.gate_proj.weight.grad, hf.gate_proj.weight.grad) <= 1e-5
    assert _rel(fast.up_proj.weight.grad, hf.up_proj.weight.grad) <= 1e-5


def test_fast_mlp_other_activation_runs_hf_expression():
    hf = _hf_mlp(hidden_activation="gelu_python_tanh")
    fast = _fast(hf, "triton")
    x = _rand(2, 4, hf.hidden_size, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(fast(x), hf(x))
    hooked = _fast(_hf_mlp(), "triton")
    hooked.act_fn.register_forward_hook(lambda m, a, o: o * 2)
    ref = _fast(_hf_mlp(), "torch")
    ref.act_fn.register_forward_hook(lambda m, a, o: o * 2)
    with torch.no_grad():
        assert torch.equal(hooked(x), ref(x))


def test_patch_model_reports_mlps():
    model = build_model("tiny-dense-k-eq-v")
    n_layers = model.config.get_text_config().num_hidden_layers
    report = patch_model(model, backend="triton")
    assert report.counts()["mlp"] == (n_layers, n_layers)
    assert "mlp" in str(report).splitlines()[1]
    unpatch_model(model)
    report = patch_model(model, backend="torch", mlp=False)
    mlps = [m for m in report.modules if m.kind == "mlp"]
    assert len(mlps) == n_layers and all(not m.fast and m.reason == "mlp=False" for m in mlps)
    unpatch_model(model)
    for layer in model.model.layers if hasattr(model.model, "layers") else model.model.language_model.layers:
        layer.mlp.act_fn = torch.nn.GELU()
    report = patch_model(model, backend="triton")
    assert all(not m.fast and "GELU" in m.reason for m in report.modules if m.kind == "mlp")
    unpatch_model(model)


# --------------------------------------------------------------------------------------------
# Compile for sm_80 / sm_90 (subprocess without the interpreter)
# --------------------------------------------------------------------------------------------

def _compile_report(capability, candidates):
    names = list(inspect.signature(gelu_mul_fwd_kernel.fn).parameters)
    bad, checked = [], 0
    for dtype in ("bf16", "fp32"):
        sig = {"G": f"*{dtype}", "U": f"*{dtype}", "H": f"*{dtype}", "n_rows": "i32", "N": "i32",
               "sg": "i64", "su": "i64", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
        cfgs = []
        for width in GEMMA4_WIDTHS + (97, 1):
            cfgs += gelu_mul_configs(width) if candidates else [default_config(width, r) for r in (1, 7, 8192)]
        uniq = {json.dumps(c, sort_keys=True): c for c in cfgs}
        for cfg in uniq.values():
            checked += 1
            res = compile_for_target(gelu_mul_fwd_kernel, {n: sig[n] for n in names},
                                     {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"]},
                                     capability=capability, num_warps=cfg["num_warps"], num_stages=1)
            if not res.fits:
                bad.append([dtype, cfg, res.shared])
    return {"checked": checked, "bad": bad}


test_default_configs_compile_and_fit, test_candidate_configs_compile_and_fit = compile_fit_tests(__file__)


# --------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("width", GEMMA4_WIDTHS + (97, 1000))
def test_gpu_real_widths_poisoned(dtype, width):
    rows = 1037
    gate = _rand(rows, width, dtype=dtype, device="cuda", scale=3.0)
    up = _rand(rows, width, dtype=dtype, device="cuda", scale=2.0)
    _check(_poisoned_launch(gate, up, default_config(width, rows)), gate, up)
    _check(gelu_mul(gate.view(1, rows, width), up.view(1, rows, width)).view(rows, width), gate, up)


@pytest.mark.cuda
@pytest.mark.parametrize("width", [2112, 6144, 97])
def test_gpu_every_candidate_config_poisoned(width):
    rows = 301
    fused = _rand(rows, 2 * width, dtype=torch.bfloat16, device="cuda", scale=3.0)
    gate, up = fused[:, :width], fused[:, width:]
    for cfg in gelu_mul_configs(width):
        _check(_poisoned_launch(gate, up, cfg), gate, up)
        _check(_poisoned_launch(gate.contiguous(), up.contiguous(), cfg), gate, up)


@pytest.mark.cuda
def test_gpu_fast_mlp_bf16_vs_hf():
    hf = _hf_mlp(dtype=torch.bfloat16, device="cuda")
    fast = _fast(hf, "triton")
    x = _rand(3, 129, hf.hidden_size, dtype=torch.bfloat16, device="cuda")
    seen = _record_calls(fast)
    with torch.no_grad():
        got = fast(x)
        ref64 = _hf_mlp(dtype=torch.float64, device="cuda")(x.double())
        want = hf(x)
    assert [n for n, _ in seen] == ["gate", "up", "down_in"]
    _check(seen[2][1], seen[0][1], seen[1][1])
    assert (got.double() - ref64).norm() <= 1.5 * (want.double() - ref64).norm() + 1e-3 * ref64.norm()
    assert torch.equal(_fast(hf, "torch")(x), want)


@pytest.mark.cuda
def test_gpu_large_and_autograd():
    gate = _rand(8192, 2112, dtype=torch.bfloat16, device="cuda", scale=3.0)
    up = _rand(8192, 2112, dtype=torch.bfloat16, device="cuda")
    _check(gelu_mul(gate, up), gate, up)
    g = gate[:64].clone().requires_grad_()
    u = up[:64].clone().requires_grad_()
    gr, ur = g.detach().clone().requires_grad_(), u.detach().clone().requires_grad_()
    ops.gelu_mul(g, u, backend="triton").float().sum().backward()
    gelu_mul_naive(gr, ur).float().sum().backward()
    assert torch.equal(g.grad, gr.grad) and torch.equal(u.grad, ur.grad)
