"""``gemma4_fast.rotary``: the rotary tables of HF's default positions kept between calls, recomputed for any other
positions, after an in-place edit and after a changed setup; through a patched model and a TransformerBridge."""
from __future__ import annotations

import pytest
import torch
from transformer_lens.model_bridge import TransformerBridge
from transformers.cache_utils import DynamicCache
from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRotaryEmbedding

from gemma4_fast import boot_transformers, patch_model, unpatch_model
from gemma4_fast.models import build_model, offline_tokenizer


def _ids(n=13, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 250, (batch, n), generator=g)
    ids[:, 0] = 2
    return ids


@pytest.fixture
def computes(monkeypatch):
    """Counts the fast modules' table computations (the fast class defers to HF's forward on a miss)."""
    calls = []
    orig = Gemma4TextRotaryEmbedding.forward

    def spy(self, *args, **kwargs):
        if type(self) is not Gemma4TextRotaryEmbedding:
            calls.append(args[-1] if len(args) > 2 else kwargs.get("layer_type"))
        return orig(self, *args, **kwargs)
    monkeypatch.setattr(Gemma4TextRotaryEmbedding, "forward", spy)
    return calls


def _pair(name="tiny-ple-kv-shared"):
    ref = build_model(name)
    fast = build_model(name)
    report = patch_model(fast, backend="torch")
    assert report.counts()["rotary"] == (1, 1)
    return ref, fast


def test_tables_kept_for_default_positions_only(computes):
    ref, fast = _pair()
    n_types = len(set(fast.config.layer_types))
    with torch.no_grad():
        for i, n in enumerate((13, 13, 7, 13)):
            computes.clear()
            torch.testing.assert_close(fast(_ids(n)).logits, ref(_ids(n)).logits, rtol=1e-4, atol=1e-4)
            assert len(computes) == (n_types if i in (0, 2) else 0)
        for extra in ({"position_ids": torch.arange(13)[None] + 3}, {"attention_mask": torch.ones(2, 13)},
                      {"past_key_values": DynamicCache(config=fast.config)}):
            computes.clear()
            out = fast(_ids(13), **extra).logits
            assert len(computes) == n_types, extra
            want = ref(_ids(13), **{k: (DynamicCache(config=ref.config) if k == "past_key_values" else v)
                                    for k, v in extra.items()}).logits
            torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)


def test_an_in_place_edit_is_not_served_again(computes):
    ref, fast = _pair("tiny-moe")
    rot = fast.model.rotary_emb

    def zero_sin(module, args, out):
        out[1].mul_(0.0)
    with torch.no_grad():
        fast(_ids())
        handle = rot.register_forward_hook(zero_sin)
        edited = fast(_ids()).logits
        handle.remove()
        hf_handle = ref.model.rotary_emb.register_forward_hook(zero_sin)
        torch.testing.assert_close(edited, ref(_ids()).logits, rtol=1e-4, atol=1e-4)
        hf_handle.remove()
        computes.clear()
        torch.testing.assert_close(fast(_ids()).logits, ref(_ids()).logits, rtol=1e-4, atol=1e-4)
    assert len(computes) == len(set(fast.config.layer_types))


def test_changed_inverse_frequencies_recompute(computes):
    ref, fast = _pair("tiny-dense-k-eq-v")
    with torch.no_grad():
        fast(_ids())
        for model in (fast, ref):
            model.model.rotary_emb.sliding_attention_inv_freq.mul_(0.5)
        computes.clear()
        torch.testing.assert_close(fast(_ids()).logits, ref(_ids()).logits, rtol=1e-4, atol=1e-4)
    assert "sliding_attention" in computes


def test_unpatch_drops_the_kept_tensors():
    _, fast = _pair()
    with torch.no_grad():
        fast(_ids())
    assert "_g4f_rotary_tables" in fast.model.rotary_emb.__dict__ and "_g4f_positions_kept" in fast.__dict__
    unpatch_model(fast)
    assert "_g4f_rotary_tables" not in fast.model.rotary_emb.__dict__ and "_g4f_positions_kept" not in fast.__dict__
    assert type(fast.model.rotary_emb) is Gemma4TextRotaryEmbedding


def test_bridge_keeps_tables_and_its_hooks_still_edit(computes):
    tok = offline_tokenizer()
    name = "tiny-ple-kv-shared"
    fast = boot_transformers(name, hf_model=build_model(name), tokenizer=tok, device="cpu", fast_kernels=True,
                             fast_backend="torch")
    seed = TransformerBridge.boot_transformers(name, hf_model=build_model(name), tokenizer=tok, device="cpu")
    n_types = len(set(fast.original_model.config.layer_types))

    def halve_cos(t, hook):
        return t.mul_(0.5)
    hooks = [("rotary_emb.hook_cos", halve_cos)]
    with torch.no_grad():
        for _ in range(2):
            computes.clear()
            torch.testing.assert_close(fast(_ids()), seed(_ids()), rtol=1e-4, atol=1e-4)
        assert computes == []
        edited = fast.run_with_hooks(_ids(), fwd_hooks=hooks)
        torch.testing.assert_close(edited, seed.run_with_hooks(_ids(), fwd_hooks=hooks), rtol=1e-4, atol=1e-4)
        computes.clear()
        torch.testing.assert_close(fast(_ids()), seed(_ids()), rtol=1e-4, atol=1e-4)
    assert len(computes) == n_types
