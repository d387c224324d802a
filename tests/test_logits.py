"""The ``"logits"`` patch kind (``gemma4_fast.logits``): the final logit softcap in place on the top-level
Gemma 4 language models, and every case where HF's forward must run unchanged.

fp32 CPU comparisons against the unpatched HF model. Only the logits kind is patched here (the other kinds
off), so the torch backend must equal HF bit for bit and the Triton backend (interpreter) within 1e-5.
``@pytest.mark.cuda`` tests: bfloat16 three-way rule and the peak memory on a real-vocabulary model.
"""
from __future__ import annotations

import copy
import json
import threading

import pytest
import torch

from gemma4_fast import logits as logits_mod
from gemma4_fast import ops
from gemma4_fast.kernels.softcap import logit_softcap_naive
from gemma4_fast.logits import FastLogitsMixin, raw_logits_observers
from gemma4_fast.models import build_model, unified_available
from gemma4_fast.patch import is_patched, patch_model, unpatch_model
from _inputs import left_padded, three_way_excess, tiny_conditional_generation

CAP = 30.0
PRESETS = ["tiny-ple-kv-shared", "tiny-dense-k-eq-v", "tiny-moe"] + (["tiny-unified"] if unified_available() else [])


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _logits_only(model, backend="torch"):
    return patch_model(model, backend=backend, attention=False, moe=False, rms_norm=False, mlp=False)


def _pair(preset="tiny-dense-k-eq-v", backend="torch"):
    ref = build_model(preset)
    fast = copy.deepcopy(ref)
    _logits_only(fast, backend)
    return ref, fast


def _same(got, want, backend):
    if backend == "torch":
        assert torch.equal(got, want)
    else:
        assert _rel(got, want) <= 1e-5


@pytest.fixture
def calls(monkeypatch):
    """Spy on ``ops.logit_softcap``: one ``(in place, backend)`` entry per call."""
    seen = []
    real = ops.logit_softcap

    def spy(x, cap, *, out=None, backend="auto"):
        seen.append((out is x, backend))
        return real(x, cap, out=out, backend=backend)

    monkeypatch.setattr(ops, "logit_softcap", spy)
    return seen


def _ids(batch=3, seq=11):
    return left_padded(batch, seq, (0, 4, 7))


# --------------------------------------------------------------------------------------------
# Parity with HF
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("keep", [0, 2])
def test_causal_lm_matches_hf(preset, backend, keep, calls):
    ref, fast = _pair(preset, backend)
    ids, am = _ids()
    with torch.no_grad():
        want = ref(ids, attention_mask=am, logits_to_keep=keep).logits
        got = fast(ids, attention_mask=am, logits_to_keep=keep).logits
    assert calls == [(True, backend)]
    assert got.shape == want.shape == (3, keep or 11, 300)
    _same(got, want, backend)
    assert fast.config.final_logit_softcapping == CAP and not logits_mod._TRUE_CAP


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("keep", [0, 1])
def test_conditional_generation_matches_hf(backend, keep, calls):
    ref = tiny_conditional_generation("tiny-dense-k-eq-v")
    fast = copy.deepcopy(ref)
    report = _logits_only(fast, backend)
    assert report.counts()["logits"] == (1, 1)
    ids, am = _ids()
    with torch.no_grad():
        want = ref(ids, attention_mask=am, logits_to_keep=keep).logits
        got = fast(ids, attention_mask=am, logits_to_keep=keep).logits
    assert calls == [(True, backend)]
    _same(got, want, backend)
    assert fast.config.text_config.final_logit_softcapping == CAP


@pytest.mark.parametrize("dtype,backend", [(torch.bfloat16, "torch"), (torch.float16, "torch"),
                                           (torch.float16, "triton")])
def test_low_precision_torch_is_hf_and_triton_keeps_the_three_way_rule(dtype, backend):
    """bfloat16 on the Triton backend runs on the GPU only (the CPU interpreter truncates fp32 -> bf16 stores)."""
    ref = build_model("tiny-dense-k-eq-v", dtype=dtype)
    fast = copy.deepcopy(ref)
    _logits_only(fast, backend)
    raw = {}
    ref.lm_head.register_forward_hook(lambda m, a, o: raw.setdefault("logits", o.detach().clone()))
    ids, am = _ids()
    with torch.no_grad():
        want = ref(ids, attention_mask=am).logits
        got = fast(ids, attention_mask=am).logits
    if backend == "torch":
        assert torch.equal(got, want)
        return
    bad, err, _ = three_way_excess(got, logit_softcap_naive(raw["logits"].double(), CAP), want, 1e-6)
    assert not bad.any(), f"{bad.sum().item()} elements break the three-way rule; max err {err.max().item():.3g}"


# --------------------------------------------------------------------------------------------
# When HF's forward must run unchanged
# --------------------------------------------------------------------------------------------

def test_labels_give_hf_loss(calls):
    ref, fast = _pair()
    ids, am = _ids()
    with torch.no_grad():
        want = ref(ids, attention_mask=am, labels=ids)
        got = fast(ids, attention_mask=am, labels=ids)
        positional = fast(ids, am, None, None, None, ids)
    assert calls == []
    assert torch.equal(got.loss, want.loss) and torch.equal(got.logits, want.logits)
    assert torch.equal(positional.loss, want.loss)


def test_return_dict_false_gives_hf_tuples(calls):
    ref, fast = _pair()
    ids, am = _ids()
    with torch.no_grad():
        want = ref(ids, attention_mask=am).logits
        got = fast(ids, attention_mask=am, return_dict=False)
        explicit = fast(ids, attention_mask=am, return_dict=True)
    assert isinstance(got, tuple) and torch.equal(got[0], want)
    assert torch.equal(explicit.logits, want)
    assert calls == [(True, "torch")]


def test_lm_head_hook_sees_raw_logits_that_stay_raw(calls):
    ref, fast = _pair()
    ids, am = _ids()
    ref_raw, kept = {}, {}
    ref.lm_head.register_forward_hook(lambda m, a, o: ref_raw.setdefault("logits", o.detach().clone()))
    handle = fast.lm_head.register_forward_hook(lambda m, a, o: kept.setdefault("logits", o))
    with torch.no_grad():
        want = ref(ids, attention_mask=am).logits
        got = fast(ids, attention_mask=am).logits
    assert calls == []
    assert raw_logits_observers(fast) == "a hook on lm_head"
    assert torch.equal(kept["logits"], ref_raw["logits"]), "the hooked raw logits were modified"
    assert not torch.equal(kept["logits"], got)
    assert torch.equal(got, want)
    handle.remove()
    assert raw_logits_observers(fast) is None


def test_hooks_under_lm_head_and_global_hooks_keep_hf_path(calls):
    class Head(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    ref, fast = _pair()
    fast.lm_head = Head(fast.lm_head)
    ids, am = _ids()
    kept = {}
    handle = fast.lm_head.inner.register_forward_pre_hook(lambda m, a: kept.setdefault("in", a[0]))
    assert raw_logits_observers(fast) == "a hook on lm_head.inner"
    with torch.no_grad():
        want = ref(ids, attention_mask=am).logits
        assert torch.equal(fast(ids, attention_mask=am).logits, want)
    handle.remove()
    glob = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: None)
    try:
        assert raw_logits_observers(fast) == "global module hooks are set"
        with torch.no_grad():
            assert torch.equal(fast(ids, attention_mask=am).logits, want)
    finally:
        glob.remove()
    assert calls == []
    with torch.no_grad():
        assert torch.equal(fast(ids, attention_mask=am).logits, want)
    assert calls == [(True, "torch")]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradients_match_hf(backend, calls):
    ref, fast = _pair(backend=backend)
    ids, am = _ids(2, 9)
    w = torch.randn(2, 9, 300)
    grads = []
    for model in (ref, fast):
        model.zero_grad()
        out = model(ids, attention_mask=am).logits
        assert out.requires_grad
        (out * w).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert calls == [(False, "torch")]
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name
    for p in fast.parameters():
        p.requires_grad_(False)
    calls.clear()
    with torch.no_grad():
        want = ref(ids, attention_mask=am).logits
    got = fast(ids, attention_mask=am).logits
    assert calls == [(True, backend)] and not got.requires_grad
    _same(got, want, backend)


def test_cap_none_runs_hf(calls):
    ref, fast = _pair()
    ref.config.final_logit_softcapping = fast.config.final_logit_softcapping = None
    ids, am = _ids()
    with torch.no_grad():
        assert torch.equal(fast(ids, attention_mask=am).logits, ref(ids, attention_mask=am).logits)
    assert calls == [] and fast.config.final_logit_softcapping is None


# --------------------------------------------------------------------------------------------
# The temporary config value
# --------------------------------------------------------------------------------------------

def test_config_restored_also_when_forward_raises():
    _, fast = _pair()
    ids, am = _ids()
    seen = []
    handle = fast.model.norm.register_forward_hook(lambda m, a, o: seen.append(fast.config.final_logit_softcapping))
    with torch.no_grad():
        fast(ids, attention_mask=am)
    assert seen == [None] and fast.config.final_logit_softcapping == CAP
    handle.remove()

    def boom(m, a, o):
        raise RuntimeError("boom")

    fast.model.norm.register_forward_hook(boom)
    with torch.no_grad(), pytest.raises(RuntimeError, match="boom"):
        fast(ids, attention_mask=am)
    assert fast.config.final_logit_softcapping == CAP and not logits_mod._TRUE_CAP


def test_nested_calls_see_the_real_cap():
    """A hook that runs the model again inside the in-place call (config reading None): the nested in-place call
    and a nested HF-path call (labels) both use the real cap."""
    ref, fast = _pair()
    ids, am = _ids()
    ids2 = ids[:2, :7]
    inner = {}

    def again(m, a, o):
        if not inner:
            inner["busy"] = True
            inner["plain"] = fast(ids2).logits
            inner["labels"] = fast(ids2, labels=ids2)
        return None

    fast.model.norm.register_forward_hook(again)
    with torch.no_grad():
        outer = fast(ids, attention_mask=am).logits
        want2 = ref(ids2, labels=ids2)
        assert torch.equal(outer, ref(ids, attention_mask=am).logits)
    assert torch.equal(inner["plain"], want2.logits)
    assert torch.equal(inner["labels"].logits, want2.logits) and torch.equal(inner["labels"].loss, want2.loss)
    assert fast.config.final_logit_softcapping == CAP and not logits_mod._TRUE_CAP


def test_calls_from_other_threads_wait_for_the_config_lock():
    ref, fast = _pair()
    ids, am = _ids()
    result = {}

    def run():
        with torch.no_grad():
            result["logits"] = fast(ids, attention_mask=am).logits

    lock = logits_mod._lock(fast.config.get_text_config())
    thread = threading.Thread(target=run)
    with lock:
        thread.start()
        thread.join(0.5)
        assert thread.is_alive(), "the call ran while another holder had the config's lock"
    thread.join(60)
    assert not thread.is_alive()
    with torch.no_grad():
        assert torch.equal(result["logits"], ref(ids, attention_mask=am).logits)


# --------------------------------------------------------------------------------------------
# Patch, report, unpatch
# --------------------------------------------------------------------------------------------

def test_patch_report_unpatch_and_save(tmp_path):
    model = build_model("tiny-dense-k-eq-v")
    hf_cls = type(model)
    report = patch_model(model, backend="torch")
    entries = [m for m in report.modules if m.kind == "logits"]
    assert [(m.name, m.layer, m.fast, m.backend) for m in entries] == [("", None, True, "torch")]
    assert report.counts()["logits"] == (1, 1) and "logits 1/1" in str(report)
    assert type(model) is not hf_cls and isinstance(model, (hf_cls, FastLogitsMixin))
    assert type(model).__name__ == hf_cls.__name__ and type(model).__module__ == hf_cls.__module__
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == [hf_cls.__name__]
    again = patch_model(model, backend="torch", logits=False)
    assert [m.reason for m in again.modules if m.kind == "logits"] == ["logits=False in this call: left as it was"]
    unpatch_model(model)
    assert type(model) is hf_cls and not is_patched(model)
    assert not any(k.startswith("_g4f") for k in model.__dict__)

    report = patch_model(model, backend="torch", logits=False)
    assert [(m.fast, m.reason) for m in report.modules if m.kind == "logits"] == [(False, "logits=False")]
    assert type(model) is hf_cls
    unpatch_model(model)
    model.config.final_logit_softcapping = None
    report = patch_model(model, backend="torch")
    assert [m.reason for m in report.modules if m.kind == "logits"] == [
        "final_logit_softcapping is None: no softcap to apply"]
    assert type(model) is hf_cls
    unpatch_model(model)


def test_forward_signature_and_hf_generate(calls):
    import inspect

    ref, fast = _pair()
    assert inspect.signature(fast.forward) == inspect.signature(ref.forward)
    assert type(fast).forward.__doc__ == type(ref).forward.__doc__
    ids = torch.randint(3, 300, (2, 7), generator=torch.Generator().manual_seed(2))
    want = ref.generate(ids, max_new_tokens=6, do_sample=False)
    got = fast.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)
    assert calls and all(in_place for in_place, _ in calls)


def test_auto_and_triton_backend_choice(monkeypatch):
    model = build_model("tiny-dense-k-eq-v").double()
    report = _logits_only(model, "triton")
    assert [m.reason for m in report.modules if m.kind == "logits"] == [
        "backend triton unavailable: dtype float64 unsupported by kernels"]
    report = _logits_only(model, "auto")
    assert [(m.backend, m.reason) for m in report.modules if m.kind == "logits"] == [
        ("torch", "dtype float64 unsupported by kernels: torch backend")]
    ids, am = _ids()
    ref = build_model("tiny-dense-k-eq-v").double()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=am).logits, ref(ids, attention_mask=am).logits,
                                   rtol=0, atol=0, equal_nan=True)


# --------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------

def _e2b(dtype, layers=2):
    return build_model("E2B", dtype=dtype, device="cuda", num_hidden_layers=layers)


@pytest.mark.cuda
def test_cuda_bf16_real_vocab_three_way(monkeypatch):
    from gemma4_fast import logits as L

    monkeypatch.setattr(L, "_routing_backend", lambda backend: None)  # the fused LM head: test_linear_softcap.py
    ref = _e2b(torch.bfloat16)
    fast = copy.deepcopy(ref)
    report = _logits_only(fast, "triton")
    assert [m.backend for m in report.modules if m.kind == "logits"] == ["triton"]
    raw = {}
    ref.lm_head.register_forward_hook(lambda m, a, o: raw.setdefault("logits", o.detach().clone()))
    ids = torch.randint(3, 262_000, (2, 300), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        want = ref(ids).logits
        got = fast(ids).logits
    ref64 = logit_softcap_naive(raw["logits"].double(), CAP)
    bad, err, _ = three_way_excess(got, ref64, want, 1e-6)
    assert not bad.any(), f"{bad.sum().item()} elements break the three-way rule; max err {err.max().item():.3g}"


@pytest.mark.cuda
def test_cuda_peak_memory_saves_one_logits_tensor():
    ref = _e2b(torch.bfloat16)
    fast = copy.deepcopy(ref)
    _logits_only(fast, "triton")
    ids = torch.randint(3, 262_000, (1, 2048), generator=torch.Generator().manual_seed(0)).cuda()
    peaks = []
    for model in (ref, fast, ref, fast):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        with torch.no_grad():
            out = model(ids, use_cache=False)
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - start)
        logits_bytes = out.logits.numel() * out.logits.element_size()
        del out
    hf_peak, fast_peak = peaks[2], peaks[3]
    assert hf_peak - fast_peak >= 0.9 * logits_bytes, (hf_peak, fast_peak, logits_bytes)
