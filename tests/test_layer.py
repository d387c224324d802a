"""gemma4_fast.layer: decoder layers with the residual adds fused into the norms (``ops.rms_norm_residual``).

CPU, fp32: the fused path runs when no hook is on the fused norms and matches HF's layer; a hook (module or
seam) on a norm, or a global hook, runs HF's forward so the hook sees what it sees in HF.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from gemma4_fast import ops, unpatch_model
from gemma4_fast.kernels._common import interpret_mode
from gemma4_fast.models import unified_available
from gemma4_fast.presets import PRESETS, TINY_PRESETS
from _inputs import patched_copy


def _ids(seed=0, batch=2, n=13):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (batch, n), generator=g)


@pytest.fixture
def fused_calls(monkeypatch):
    calls = []
    original = ops.rms_norm_residual

    def counting(*args, **kwargs):
        calls.append(kwargs.get("next_weight") is not None)
        return original(*args, **kwargs)

    monkeypatch.setattr(ops, "rms_norm_residual", counting)
    return calls


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_fused_layers_match_hf(name, fused_calls):
    if PRESETS[name].unified and not unified_available():
        pytest.skip("this transformers has no gemma4_unified models")
    ref, fast, report = patched_copy(name)
    ids = _ids()
    with torch.no_grad():
        got = fast(ids, use_cache=False).logits
        want = ref(ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    fused, total = report.counts()["residual"]
    if PRESETS[name].unified:
        assert total == 0 and fused_calls == []
    else:
        n = fast.config.num_hidden_layers
        assert fused == total == n
        moe = fast.config.enable_moe_block
        ple = bool(fast.config.hidden_size_per_layer_input)
        per_layer = 3 if ple else (1 if moe else 2)
        assert len(fused_calls) == n * per_layer + ple  # + the prologue's per-layer-input projection (no next norm)
        assert sum(fused_calls) == n
    unpatch_model(fast)
    assert type(fast.model.layers[0]) is type(ref.model.layers[0])


@pytest.mark.parametrize("name", ["tiny-ple-kv-shared", "tiny-moe"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_layer_scalar_and_ple_gate_fused(name, backend, monkeypatch):
    """Non-trivial ``layer_scalar`` buffers (random init leaves them at 1): the last residual kernel applies them
    (no separate multiply; the MoE tail's pair kernel on tiny-moe), and on the Triton backend the PLE gate runs on
    the fused tanh-GELU op; logits match HF."""
    if backend == "triton" and not interpret_mode():
        pytest.skip("the triton backend on CPU needs TRITON_INTERPRET=1")
    ref, fast, _ = patched_copy(name, backend=backend)
    for i, (a, b) in enumerate(zip(ref.model.layers, fast.model.layers)):
        a.layer_scalar.fill_(0.5 + 0.07 * i)
        b.layer_scalar.fill_(0.5 + 0.07 * i)
    scaled, gates = [], []
    original, pair, gm = ops.rms_norm_residual, ops.rms_norm_pair_residual, ops.gelu_mul
    monkeypatch.setattr(ops, "rms_norm_residual",
                        lambda *a, **k: scaled.append(k.get("out_scale") is not None) or original(*a, **k))
    monkeypatch.setattr(ops, "rms_norm_pair_residual",
                        lambda *a, **k: scaled.append(k.get("out_scale") is not None) or pair(*a, **k))
    monkeypatch.setattr(ops, "gelu_mul", lambda *a, **k: gates.append(a[0].shape[-1]) or gm(*a, **k))
    ids = _ids(n=11)
    with torch.no_grad():
        got = fast(ids, use_cache=False).logits
        want = ref(ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    n = fast.config.num_hidden_layers
    ple = fast.config.hidden_size_per_layer_input
    assert sum(scaled) == n + bool(ple)  # + the prologue's per-layer-input projection (a float out_scale)
    assert gates.count(ple) == (n if ple and backend == "triton" else 0)


def test_a_hook_on_a_norm_runs_hf_forward(fused_calls):
    ref, fast, _ = patched_copy("tiny-ple-kv-shared")
    seen, seen_ref = [], []
    fast.model.layers[3].post_attention_layernorm.register_forward_hook(lambda m, a, o: seen.append(o))
    ref.model.layers[3].post_attention_layernorm.register_forward_hook(lambda m, a, o: seen_ref.append(o))
    ids = _ids()
    with torch.no_grad():
        got = fast(ids, use_cache=False).logits
        want = ref(ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    torch.testing.assert_close(seen[0], seen_ref[0], rtol=1e-4, atol=1e-5)
    layers = fast.config.num_hidden_layers
    assert len(fused_calls) == 3 * (layers - 1) + 1  # + the prologue's per-layer-input projection
    fused_calls.clear()
    handle = nn.modules.module.register_module_forward_hook(lambda m, a, o: None)
    try:
        with torch.no_grad():
            fast(ids, use_cache=False)
    finally:
        handle.remove()
    assert fused_calls == []


def test_gradients_through_fused_layers_match_hf():
    ref, fast, _ = patched_copy("tiny-dense-k-eq-v")
    ids = _ids()
    fast(ids, use_cache=False).logits.square().mean().backward()
    ref(ids, use_cache=False).logits.square().mean().backward()
    for (name, p), q in zip(fast.named_parameters(), ref.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-6, msg=name)
