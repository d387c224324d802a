"""HF ``generate`` on patched models: greedy and sampling, left-padded batches, dynamic and static caches.

CPU tests run fp32 with ``backend="torch"`` and require the generated tokens to equal HF's (eager)
token for token. The GPU test checks every decode step's logits against a full HF forward over the
generated sequence (teacher forcing).
"""
from __future__ import annotations

import copy

import pytest
import torch

from gemma4_fast.models import build_model, unified_available
from gemma4_fast.patch import patch_model, unpatch_model
from gemma4_fast.registration import NAME, register
from _inputs import left_padded, patched_copy

PRESETS = ["tiny-ple-kv-shared", "tiny-dense-k-eq-v", "tiny-moe"] + (["tiny-unified"] if unified_available() else [])
NEW_TOKENS = 32


def _prompt(batch: int = 3, seq: int = 9, pads=(0, 3, 6), seed: int = 5):
    return left_padded(batch, seq, pads, seed)


def _generate(model, ids, am, cache, **kw):
    kw = {**dict(max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=None), **kw}
    if cache == "static":
        kw["cache_implementation"] = "static"
    with torch.no_grad():
        return model.generate(ids, attention_mask=am, **kw)


@pytest.fixture(scope="module")
def models():
    return {p: build_model(p) for p in PRESETS}


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("preset", PRESETS)
def test_greedy_matches_hf(models, preset, cache):
    ref = models[preset]
    fast = copy.deepcopy(ref)
    patch_model(fast, backend="torch")
    ids, am = _prompt()
    want = _generate(ref, ids, am, cache)
    got = _generate(fast, ids, am, cache)
    assert got.shape == (3, 9 + NEW_TOKENS)
    assert torch.equal(got, want)


def test_sampling_matches_hf(models):
    ref = models["tiny-moe"]
    fast = copy.deepcopy(ref)
    patch_model(fast, backend="torch")
    ids, am = _prompt()
    torch.manual_seed(123)
    want = _generate(ref, ids, am, "dynamic", do_sample=True, top_k=50, temperature=0.9)
    torch.manual_seed(123)
    got = _generate(fast, ids, am, "dynamic", do_sample=True, top_k=50, temperature=0.9)
    assert torch.equal(got, want)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_registered_implementation(models, cache, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    register()
    ref = models["tiny-ple-kv-shared"]
    model = build_model("tiny-ple-kv-shared", attn_implementation=NAME)
    ids, am = _prompt()
    assert torch.equal(_generate(model, ids, am, cache), _generate(ref, ids, am, cache))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_greedy_with_4d_masks(models, impl, cache):
    ref = models["tiny-ple-kv-shared"]
    fast = copy.deepcopy(ref)
    patch_model(fast, backend="torch")
    fast.config._attn_implementation = impl
    ids, am = _prompt()
    assert torch.equal(_generate(fast, ids, am, cache), _generate(ref, ids, am, cache))


def test_greedy_after_unpatch(models):
    ref = models["tiny-dense-k-eq-v"]
    model = copy.deepcopy(ref)
    patch_model(model, backend="torch")
    unpatch_model(model)
    ids, am = _prompt()
    assert torch.equal(_generate(model, ids, am, "static"), _generate(ref, ids, am, "static"))


def test_greedy_triton_interpreter(models):
    ref = models["tiny-dense-k-eq-v"]
    fast = copy.deepcopy(ref)
    patch_model(fast, backend="triton")
    ids, am = _prompt(batch=2, seq=7, pads=(0, 2))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        assert torch.equal(fast.generate(ids, attention_mask=am, **kw), ref.generate(ids, attention_mask=am, **kw))


@pytest.mark.cuda
@pytest.mark.parametrize("cache,compile_", [
    ("dynamic", False), ("static", False),
    pytest.param("static", True, marks=pytest.mark.xfail(
        strict=False, reason="HF's auto-compile of static-cache decode through the patched modules is unverified")),
])
@pytest.mark.parametrize("preset", ["tiny-ple-kv-shared", "tiny-moe"])
def test_cuda_generate_step_logits(preset, cache, compile_):
    ref, fast, report = patched_copy(preset, "cuda", "triton")
    assert not report.left_on_hf, str(report)
    ids, am = _prompt()
    ids, am = ids.cuda(), am.cuda()
    out = _generate(fast, ids, am, cache, output_logits=True, return_dict_in_generate=True,
                    disable_compile=not compile_)
    seq = out.sequences
    full_am = torch.cat([am, torch.ones(3, NEW_TOKENS, dtype=am.dtype, device="cuda")], dim=1)
    pos = (full_am.long().cumsum(-1) - 1).masked_fill(full_am == 0, 0)
    with torch.no_grad():
        want = ref(seq, attention_mask=full_am, position_ids=pos).logits[:, ids.shape[1] - 1: -1]
    got = torch.stack(out.logits, dim=1)
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err <= 1e-3, err
