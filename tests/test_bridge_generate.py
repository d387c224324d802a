"""``bridge.generate`` with fast kernels on: ``gemma4_fast.generate`` under TransformerLens's API.

CPU, fp32, torch backend, tiny presets: greedy tokens equal the seed bridge's (TransformerLens's own loop) with
a reading hook attached, the hook sees the same values as often; EOS stopping and padding, string input and
return types follow TransformerLens; unsupported arguments go to TransformerLens's loop; the per-layer graph
mode's plumbing (emulated on the CPU) works through the bridge's block components. GPU: the real graphs.
"""
from __future__ import annotations

import logging

import pytest
import torch

from gemma4_fast import boot_transformers, disable_fast_kernels
from gemma4_fast.models import build_model, offline_tokenizer

PRESETS = ["tiny-ple-kv-shared", "tiny-moe"]


@pytest.fixture(scope="module")
def tok():
    return offline_tokenizer()


def _pair(name, tok, device="cpu", backend="torch"):
    from transformer_lens.model_bridge import TransformerBridge

    seed = TransformerBridge.boot_transformers(name, hf_model=build_model(name, device=device), tokenizer=tok,
                                               device=device)
    fast = boot_transformers(name, hf_model=build_model(name, device=device), tokenizer=tok, device=device,
                             fast_kernels=True, fast_backend=backend)
    return seed, fast


def _ids(n=23, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 260, (1, n), generator=g)
    ids[0, 0] = 2
    return ids.to(device)


def _run(bridge, ids, hook_name="blocks.1.hook_resid_post", **kw):
    seen = []

    def hook(t, hook):
        seen.append(t[:, -1].detach().clone())

    kw = {**dict(max_new_tokens=10, do_sample=False, stop_at_eos=False, verbose=False), **kw}
    with bridge.hooks(fwd_hooks=[(hook_name, hook)]):
        out = bridge.generate(ids, **kw)
    return out, seen


@pytest.mark.parametrize("name", PRESETS)
def test_greedy_with_hook_matches_seed(tok, name):
    seed, fast = _pair(name, tok)
    assert "generate" in fast.__dict__
    want, seen_seed = _run(seed, _ids())
    got, seen_fast = _run(fast, _ids())
    assert torch.equal(got, want)
    assert len(seen_fast) == len(seen_seed) == 10
    for a, b in zip(seen_fast, seen_seed):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_eos_and_string_input_match_seed(tok):
    seed, fast = _pair("tiny-moe", tok)
    free, _ = _run(seed, _ids(), max_new_tokens=12)
    eos = int(free[0, 23 + 3])
    want, _ = _run(seed, _ids(), max_new_tokens=12, stop_at_eos=True, eos_token_id=eos)
    got, _ = _run(fast, _ids(), max_new_tokens=12, stop_at_eos=True, eos_token_id=eos)
    assert torch.equal(got, want) and got.shape[1] < 23 + 12
    for rtype in ("input", "str", "tokens"):
        kw = dict(max_new_tokens=6, do_sample=False, stop_at_eos=False, verbose=False, return_type=rtype)
        a, b = seed.generate("Hello there", **kw), fast.generate("Hello there", **kw)
        assert type(a) is type(b)
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_unsupported_arguments_use_transformer_lens(tok, caplog):
    seed, fast = _pair("tiny-moe", tok)
    with caplog.at_level(logging.INFO, logger="gemma4_fast"):
        got = fast.generate(_ids(), max_new_tokens=4, do_sample=False, stop_at_eos=False, verbose=False,
                            return_input_tokens=True)
    want = seed.generate(_ids(), max_new_tokens=4, do_sample=False, stop_at_eos=False, verbose=False,
                         return_input_tokens=True)
    assert isinstance(got, tuple) and all(torch.equal(a, b) for a, b in zip(got, want))
    assert any("return_input_tokens=True" in r.getMessage() for r in caplog.records)
    disable_fast_kernels(fast)
    assert "generate" not in fast.__dict__


def test_sampling_is_reproducible(tok):
    _, fast = _pair("tiny-moe", tok)
    torch.manual_seed(7)
    a = fast.generate(_ids(), max_new_tokens=8, do_sample=True, top_k=20, temperature=0.8, stop_at_eos=False,
                      verbose=False)
    torch.manual_seed(7)
    b = fast.generate(_ids(), max_new_tokens=8, do_sample=True, top_k=20, temperature=0.8, stop_at_eos=False,
                      verbose=False)
    assert torch.equal(a, b) and a.shape == (1, 31)


@pytest.mark.parametrize("hook_name", ["blocks.1.hook_resid_post", "blocks.8.attn.hook_pattern",
                                       "hook_embed"])
def test_layer_mode_through_bridge_emulated(tok, monkeypatch, hook_name):
    from gemma4_fast import decode

    seed, fast = _pair("tiny-ple-kv-shared", tok)
    want, seen_seed = _run(seed, _ids(), hook_name=hook_name)
    monkeypatch.setattr(decode._LayerGraph, "emulate", True)
    got, seen_fast = _run(fast, _ids(), hook_name=hook_name)
    decoder = fast.original_model._g4f_decoder
    assert decoder.runners, "no layer was graphed"
    assert torch.equal(got, want)
    assert len(seen_fast) == len(seen_seed)
    for a, b in zip(seen_fast, seen_seed):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_wiring_hooks_left_by_a_full_cache_do_not_block_graphs(tok, monkeypatch):
    """A full ``run_with_cache`` leaves transformers' output-capturing hooks on every layer; they must not count
    as hooks that need eager layers."""
    from gemma4_fast import decode

    seed, fast = _pair("tiny-ple-kv-shared", tok)
    with torch.no_grad():
        fast.run_with_cache(_ids())
    monkeypatch.setattr(decode._LayerGraph, "emulate", True)
    want, _ = _run(seed, _ids())
    got, _ = _run(fast, _ids())
    assert torch.equal(got, want)
    assert len(fast.original_model._g4f_decoder.runners) == len(fast.original_model.model.layers) - 1


@pytest.mark.cuda
@pytest.mark.parametrize("name", PRESETS)
def test_cuda_bridge_generate_with_hook_matches_seed(tok, name):
    seed, fast = _pair(name, tok, device="cuda", backend="triton")
    want, seen_seed = _run(seed, _ids(device="cuda"), max_new_tokens=24)
    got, seen_fast = _run(fast, _ids(device="cuda"), max_new_tokens=24)
    decoder = fast.original_model._g4f_decoder
    assert decoder.runners and len(decoder.runners) == len(fast.original_model.model.layers) - 1
    assert torch.equal(got, want)
    assert len(seen_fast) == len(seen_seed) == 24
    for a, b in zip(seen_fast, seen_seed):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
    plain = fast.generate(_ids(device="cuda"), max_new_tokens=24, do_sample=False, stop_at_eos=False, verbose=False)
    assert torch.equal(plain, want) and decoder.graph is not None
