"""patch_model / unpatch_model on whole models, the PatchReport, and the transformers registration.

fp32 CPU comparisons against the unpatched HF model (eager): logits and every decoder layer's output at
the real (non-padded) positions, max relative error <= 1e-4.
"""
from __future__ import annotations

import copy

import pytest
import torch

from gemma4_fast.kernels import _common
from torch import nn

from gemma4_fast import hooks
from gemma4_fast.models import build_model, unified_available
from gemma4_fast.modules import fast_classes
from gemma4_fast.patch import PatchReport, is_patched, patch_model, unpatch_model
from gemma4_fast.registration import NAME, is_registered, register
from _inputs import left_padded, tiny_conditional_generation

RTOL = 1e-4


PRESETS = ["tiny-ple-kv-shared", "tiny-dense-k-eq-v", "tiny-moe"] + (["tiny-unified"] if unified_available() else [])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _inputs(batch: int, seq: int, pads=(0, 4, 7), seed: int = 1):
    return left_padded(batch, seq, pads, seed)


def _compare(ref_out, out, am):
    real = am.bool()
    assert rel_err(out.logits[real], ref_out.logits[real]) <= RTOL
    assert len(out.hidden_states) == len(ref_out.hidden_states)
    for i, (a, b) in enumerate(zip(out.hidden_states, ref_out.hidden_states)):
        assert rel_err(a[real], b[real]) <= RTOL, f"hidden state {i}"


@pytest.fixture(scope="module")
def models():
    return {p: build_model(p) for p in PRESETS}


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("batch,seq", [(1, 13), (3, 11)])
def test_forward_matches_hf(models, preset, batch, seq):
    ref = models[preset]
    fast = copy.deepcopy(ref)
    report = patch_model(fast, backend="torch")
    assert not report.left_on_hf and fast.config._attn_implementation == NAME
    ids, am = _inputs(batch, seq)
    with torch.no_grad():
        want = ref(ids, attention_mask=am, output_hidden_states=True)
        got = fast(ids, attention_mask=am, output_hidden_states=True)
    _compare(want, got, am)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_forward_with_4d_masks_from_other_implementations(models, impl):
    ref = models["tiny-ple-kv-shared"]
    fast = copy.deepcopy(ref)
    patch_model(fast, backend="torch")
    fast.config._attn_implementation = impl
    ids, am = _inputs(3, 12)
    with torch.no_grad():
        want = ref(ids, attention_mask=am, output_hidden_states=True)
        got = fast(ids, attention_mask=am, output_hidden_states=True)
    _compare(want, got, am)


def test_logits_to_keep(models):
    ref = models["tiny-ple-kv-shared"]
    fast = copy.deepcopy(ref)
    patch_model(fast, backend="torch")
    ids, am = _inputs(3, 12)
    with torch.no_grad():
        want = ref(ids, attention_mask=am, logits_to_keep=2).logits
        got = fast(ids, attention_mask=am, logits_to_keep=2).logits
    assert got.shape == want.shape == (3, 2, 300)
    assert rel_err(got, want) <= RTOL


def test_forward_triton_backend_interpreter(models):
    ref = models["tiny-dense-k-eq-v"]
    fast = copy.deepcopy(ref)
    report = patch_model(fast, backend="triton")
    assert not report.left_on_hf
    assert {m.backend for m in report.fast} == {"triton"}
    ids, am = _inputs(2, 9, pads=(0, 3))
    with torch.no_grad():
        want = ref(ids, attention_mask=am, output_hidden_states=True)
        got = fast(ids, attention_mask=am, output_hidden_states=True)
    _compare(want, got, am)


def test_patch_unpatch_restores_exactly(models):
    model = copy.deepcopy(models["tiny-moe"])
    ids, am = _inputs(3, 10)
    classes = {n: type(m) for n, m in model.named_modules()}
    sd = model.state_dict()
    ptrs = {k: v.data_ptr() for k, v in sd.items()}
    attn_before = model.config._attn_implementation
    with torch.no_grad():
        before = model(ids, attention_mask=am).logits
    report = patch_model(model, backend="torch")
    assert is_patched(model) and report.fast
    sd_patched = model.state_dict()
    assert list(sd_patched) == list(sd)
    assert all(sd_patched[k].data_ptr() == ptrs[k] for k in sd)
    assert sum(isinstance(m, fast_classes()) for m in model.modules()) == len(report.fast)
    with torch.no_grad():
        model(ids, attention_mask=am)
    hooks.set_hooks(model.model.layers[0].self_attn, pattern=lambda p: p)
    assert unpatch_model(model) == len(report.fast)
    assert not is_patched(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert model.config._attn_implementation == attn_before
    assert not any(k.startswith("_g4f") for m in model.modules() for k in m.__dict__)
    sd_after = model.state_dict()
    assert list(sd_after) == list(sd)
    assert all(sd_after[k].data_ptr() == ptrs[k] and torch.equal(sd_after[k], sd[k]) for k in sd)
    with torch.no_grad():
        after = model(ids, attention_mask=am).logits
    assert torch.equal(before, after)


def test_report_table_and_reasons(models, monkeypatch):
    model = copy.deepcopy(models["tiny-moe"]).double()
    report = patch_model(model, backend="auto")
    assert isinstance(report, PatchReport) and not report.left_on_hf
    assert {m.backend for m in report.fast} == {"torch"}
    assert all(m.reason == "dtype float64 unsupported by kernels: torch backend" for m in report.fast)
    text = str(report)
    assert "attention" in text and "experts" in text and "model" in text
    unpatch_model(model)

    report = patch_model(model, backend="triton")
    assert not report.fast and report.attn_implementation is None
    assert {m.reason for m in report.left_on_hf} == {"backend triton unavailable: dtype float64 unsupported by kernels"}
    assert "left on HF" in str(report)
    assert not is_patched(model)

    model = copy.deepcopy(models["tiny-moe"])
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    report = patch_model(model, backend="triton")
    assert {m.reason for m in report.left_on_hf} == {"backend triton unavailable: no CUDA"}
    report = patch_model(model, backend="auto", moe=False)
    kinds = {m.kind for m in report.left_on_hf}
    assert kinds == {"router", "experts"} and all(m.reason == "moe=False" for m in report.left_on_hf)
    assert all(m.backend == "torch" and m.reason == "no CUDA: torch backend" for m in report.fast)
    layer_rows = report.layers()
    assert set(layer_rows) == set(range(model.config.num_hidden_layers)) | {None}


def test_report_subclass_and_repatch(models):
    from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm

    class MyNorm(Gemma4RMSNorm):
        pass

    model = copy.deepcopy(models["tiny-dense-k-eq-v"])
    model.model.norm.__class__ = MyNorm
    report = patch_model(model, backend="torch")
    left = report.left_on_hf
    assert [m.name for m in left] == ["model.norm"] and "subclass MyNorm" in left[0].reason
    report2 = patch_model(model, backend="torch", attention=False)
    attn = [m for m in report2.modules if m.kind == "attention"]
    assert all(m.fast and "left as it was" in m.reason for m in attn)
    unpatch_model(model)
    assert type(model.model.norm) is MyNorm


def test_wrapped_modules_are_patched(models):
    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.add_module("_original_component", inner)

        def forward(self, *args, **kwargs):
            return self._modules["_original_component"](*args, **kwargs)

    ref = models["tiny-dense-k-eq-v"]
    model = copy.deepcopy(ref)
    for layer in model.model.layers:
        layer.self_attn = Wrapper(layer.self_attn)
        layer.input_layernorm = Wrapper(layer.input_layernorm)
    report = patch_model(model, backend="torch")
    assert not report.left_on_hf
    assert report.counts()["attention"] == (6, 6)
    ids, am = _inputs(2, 9)
    with torch.no_grad():
        want = ref(ids, attention_mask=am).logits
        got = model(ids, attention_mask=am).logits
    real = am.bool()
    assert rel_err(got[real], want[real]) <= RTOL


def test_conditional_generation_patches_text_only():
    ref = tiny_conditional_generation("tiny-dense-k-eq-v")
    model = copy.deepcopy(ref)
    vision_classes = [type(m) for m in model.model.vision_tower.modules()]
    report = patch_model(model, backend="torch")
    assert report.counts()["attention"] == (6, 6)
    assert all(m.name.startswith("model.language_model.") for m in report.modules if m.kind != "logits")
    assert [(m.name, m.fast) for m in report.modules if m.kind == "logits"] == [("", True)]
    assert [type(m) for m in model.model.vision_tower.modules()] == vision_classes
    assert model.config.get_text_config()._attn_implementation == NAME
    assert model.config.vision_config._attn_implementation == "eager"
    ids, am = _inputs(3, 10)
    with torch.no_grad():
        want = ref(ids, attention_mask=am).logits
        got = model(ids, attention_mask=am).logits
    real = am.bool()
    assert rel_err(got[real], want[real]) <= RTOL
    unpatch_model(model)
    assert model.config.get_text_config()._attn_implementation == "eager"


@pytest.mark.parametrize("preset", ["tiny-ple-kv-shared", "tiny-moe"])
def test_registration_attn_and_experts_implementation(models, preset, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    register()
    register()
    assert is_registered()
    ref = models[preset]
    model = build_model(preset, attn_implementation=NAME, experts_implementation=NAME)
    assert not is_patched(model) and model.config._attn_implementation == NAME
    ids, am = _inputs(3, 11)
    with torch.no_grad():
        want = ref(ids, attention_mask=am, output_hidden_states=True)
        got = model(ids, attention_mask=am, output_hidden_states=True)
        _compare(want, got, am)
        kept = model(ids, attention_mask=am, logits_to_keep=1).logits
        assert rel_err(kept[:, -1], want.logits[:, -1]) <= RTOL
        attns = model(ids, attention_mask=am, output_attentions=True).attentions
    assert len(attns) == model.config.num_hidden_layers and attns[0].shape == (3, 4, 11, 11)


def test_gradients_route_to_torch(models, caplog, monkeypatch):
    monkeypatch.setattr(_common, "_LOGGED", set())
    ref = models["tiny-moe"]
    fast = copy.deepcopy(ref)
    patch_model(fast, backend="triton")
    ids, am = _inputs(2, 9, pads=(0, 3))
    real = am.bool()
    grads = []
    with caplog.at_level("INFO", logger="gemma4_fast"):
        for model in (ref, fast):
            model.zero_grad()
            model(ids, attention_mask=am).logits[real].square().mean().backward()
            grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert "autograd needs gradients" in caplog.text
    assert grads[0].keys() == grads[1].keys()
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.2.experts.gate_up_proj",
                 "model.layers.1.router.proj.weight", "model.norm.weight"):
        assert rel_err(grads[1][name], grads[0][name]) <= 1e-3, name
    ref.zero_grad()
    fast.zero_grad()


def test_experts_function_falls_back_for_other_layouts(models, caplog, monkeypatch):
    from gemma4_fast.registration import gemma4_fast_experts

    monkeypatch.setattr(_common, "_LOGGED", set())
    experts = copy.deepcopy(models["tiny-moe"].model.layers[0].experts)
    experts.config = copy.deepcopy(experts.config)
    experts.config.hidden_activation = "silu"
    x = torch.randn(7, experts.hidden_dim)
    idx = torch.randint(0, experts.num_experts, (7, 2))
    w = torch.rand(7, 2)
    with torch.no_grad(), caplog.at_level("WARNING", logger="gemma4_fast"):
        out = gemma4_fast_experts(experts, x, idx, w)
        want = type(experts).forward.__wrapped__(experts, x, idx, w)
    assert torch.equal(out, want)
    assert "activation 'silu'" in caplog.text


def test_accelerate_dispatched_modules_run_the_fast_forward(models, monkeypatch):
    """``device_map`` models carry accelerate hooks that call the forward bound at dispatch time; the patch
    must re-point them, or the HF forward keeps running under a class that claims to be fast."""
    from accelerate.hooks import ModelHook, add_hook_to_module

    from gemma4_fast import ops

    ref = models["tiny-moe"]
    model = copy.deepcopy(ref)
    for m in model.modules():
        if type(m).__name__ in ("Gemma4TextExperts", "Gemma4TextAttention", "Gemma4RMSNorm"):
            add_hook_to_module(m, ModelHook())
    calls = []
    for name in ("moe_experts", "attention", "rms_norm"):
        monkeypatch.setattr(ops, name, lambda *a, _o=getattr(ops, name), _n=name, **k: (calls.append(_n),
                                                                                         _o(*a, **k))[1])
    ids = torch.randint(3, 300, (2, 11))
    with torch.no_grad():
        want = ref(ids).logits
        patch_model(model, backend="torch")
        got = model(ids).logits
        assert {"moe_experts", "attention", "rms_norm"} <= set(calls)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        unpatch_model(model)
        calls.clear()
        again = model(ids).logits
    assert calls == []
    torch.testing.assert_close(again, want, rtol=0, atol=0)


def test_unknown_backend_raises(models):
    with pytest.raises(ValueError, match="backend"):
        patch_model(copy.deepcopy(models["tiny-moe"]), backend="cuda")


# ---------------------------------------------------------------------------------------------
# GPU: bf16 three-way rule against an fp32 reference on real-model shapes (a few layers)
# ---------------------------------------------------------------------------------------------

def _three_way(fast, torch_bf16, ref, atol_frac=1e-3):
    err_fast = (fast.double() - ref.double()).abs().max().item()
    err_torch = (torch_bf16.double() - ref.double()).abs().max().item()
    atol = atol_frac * ref.double().abs().max().item()
    assert err_fast <= 2 * err_torch + atol, (err_fast, err_torch, atol)


@pytest.mark.cuda
@pytest.mark.parametrize("preset", PRESETS)
def test_cuda_fp32_tiny_forward(preset):
    ref = build_model(preset, device="cuda")
    fast = copy.deepcopy(ref)
    report = patch_model(fast, backend="triton")
    assert not report.left_on_hf and {m.backend for m in report.fast} == {"triton"}
    registered = build_model(preset, device="cuda", attn_implementation=NAME, experts_implementation=NAME)
    ids, am = _inputs(3, 37, pads=(0, 5, 19))
    ids, am = ids.cuda(), am.cuda()
    with torch.no_grad():
        want = ref(ids, attention_mask=am, output_hidden_states=True)
        _compare(want, fast(ids, attention_mask=am, output_hidden_states=True), am)
        _compare(want, registered(ids, attention_mask=am, output_hidden_states=True), am)


_S, _F = "sliding_attention", "full_attention"
_REAL_SHAPES = {
    "E2B": dict(num_hidden_layers=7, layer_types=[_S, _S, _S, _F, _S, _S, _F], num_kv_shared_layers=3),
    "26B-A4B": dict(num_hidden_layers=3, layer_types=[_S, _S, _F]),
    "31B": dict(num_hidden_layers=2, layer_types=[_S, _F]),
}


def _real_shape_model(preset: str, dtype: torch.dtype, device: str):
    from gemma4_fast.presets import Preset, get_preset

    p = get_preset(preset)
    return build_model(Preset(p.name, p.family, dict(p.text, **_REAL_SHAPES[preset])), dtype=dtype, device=device)


@pytest.mark.cuda
@pytest.mark.parametrize("preset", list(_REAL_SHAPES))
def test_cuda_bf16_three_way(preset):
    dev = "cuda"
    hf16 = _real_shape_model(preset, torch.bfloat16, dev)
    ref32 = copy.deepcopy(hf16).float()
    fast = copy.deepcopy(hf16)
    report = patch_model(fast, backend="triton")
    assert not report.left_on_hf, str(report)
    assert {m.backend for m in report.fast} == {"triton"}
    g = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(3, 262_000, (2, 1100), generator=g).to(dev)
    am = torch.ones_like(ids)
    am[1, :137] = 0
    ids = ids.masked_fill(am == 0, 0)
    real = am.bool()
    with torch.no_grad():
        want = ref32(ids, attention_mask=am, output_hidden_states=True)
        base = hf16(ids, attention_mask=am, output_hidden_states=True)
        got = fast(ids, attention_mask=am, output_hidden_states=True)
    _three_way(got.logits[real], base.logits[real], want.logits[real])
    for a, b, c in zip(got.hidden_states, base.hidden_states, want.hidden_states):
        _three_way(a[real], b[real], c[real])
