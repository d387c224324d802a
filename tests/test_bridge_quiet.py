"""bridge_integration.quiet: blocks with no active inner hook run their layer's unwrapped twin.

Checked on the CPU (torch backend, fp32): the twin path skips the bridge's inner components, gives the same
numbers as the wrapped path, and any inner hook (forward, backward, global), a changed module tree or a
``stop_at_layer`` call sends the block back through the wrappers.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.model_bridge.generalized_components.linear import LinearBridge

from gemma4_fast import boot_transformers, disable_fast_kernels
from gemma4_fast.models import build_model, offline_tokenizer, unified_available
from gemma4_fast.presets import PRESETS, TINY_PRESETS


@pytest.fixture(scope="module")
def tok():
    return offline_tokenizer()


def _fast(name, tok):
    return boot_transformers(name, hf_model=build_model(name), tokenizer=tok, device="cpu", fast_kernels=True,
                             fast_backend="torch")


def _seed(name, tok):
    return TransformerBridge.boot_transformers(name, hf_model=build_model(name), tokenizer=tok, device="cpu")


@pytest.fixture
def wrapped_calls(monkeypatch):
    """The LinearBridge components (projections inside blocks) whose wrapper ran."""
    calls: list[nn.Module] = []
    original = LinearBridge.forward

    def counting(self, *args, **kwargs):
        calls.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LinearBridge, "forward", counting)
    return calls


def _ids(n=19, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 260, (2, n), generator=g)
    ids[:, 0] = 2
    return ids


def _force_wrapped(bridge):
    """A no-op hook inside every block: every block takes the wrapped path."""
    return [blk.ln1.hook_in.add_hook(lambda t, hook: t) for blk in bridge.blocks]


def _blocks_of(bridge, calls):
    """Indices of the blocks whose inner wrappers ran."""
    owner = {id(m): i for i, blk in enumerate(bridge.blocks) for m in blk.modules()}
    return sorted({owner[id(m)] for m in calls if id(m) in owner})


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_quiet_blocks_skip_wrappers_and_match_the_wrapped_path(name, tok, wrapped_calls):
    if PRESETS[name].unified and not unified_available():
        pytest.skip("this transformers has no gemma4_unified models")
    fast = _fast(name, tok)
    ids = _ids()
    with torch.no_grad():
        quiet = fast(ids)
        assert _blocks_of(fast, wrapped_calls) == []
        _force_wrapped(fast)
        wrapped = fast(ids)
        fast.reset_hooks()
    assert _blocks_of(fast, wrapped_calls) == list(range(len(fast.blocks)))
    torch.testing.assert_close(quiet, wrapped, rtol=0, atol=0)


def test_residual_hooks_stay_quiet_and_match_the_seed(tok, wrapped_calls):
    name = "tiny-ple-kv-shared"
    seed = _seed(name, tok)
    fast = _fast(name, tok)
    ids = _ids()

    def resid(n):
        return n.endswith("hook_resid_post") or n.endswith("hook_resid_pre")

    with torch.no_grad():
        ref_logits, ref = seed.run_with_cache(ids, names_filter=resid)
        wrapped_calls.clear()
        logits, cache = fast.run_with_cache(ids, names_filter=resid)
    assert _blocks_of(fast, wrapped_calls) == []
    assert len(cache.keys()) == 2 * len(fast.blocks)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
    for key in ref.keys():
        torch.testing.assert_close(cache[key], ref[key], rtol=1e-4, atol=1e-4 * ref[key].abs().max().item())

    def double(t, hook):
        return t * 2

    with torch.no_grad():
        edited = fast.run_with_hooks(ids, fwd_hooks=[("blocks.2.hook_resid_post", double)])
        expected = seed.run_with_hooks(ids, fwd_hooks=[("blocks.2.hook_resid_post", double)])
    torch.testing.assert_close(edited, expected, rtol=1e-4, atol=1e-4)


def test_an_inner_hook_wraps_only_its_block(tok, wrapped_calls):
    fast = _fast("tiny-moe", tok)
    ids = _ids()
    seen = []
    with torch.no_grad():
        fast.run_with_hooks(ids, fwd_hooks=[("blocks.3.attn.hook_z", lambda t, hook: seen.append(t.shape))])
    assert seen and _blocks_of(fast, wrapped_calls) == [3]
    wrapped_calls.clear()
    with torch.no_grad():
        fast(ids)
    assert _blocks_of(fast, wrapped_calls) == []


def test_backward_and_global_hooks_take_the_wrapped_path(tok, wrapped_calls):
    fast = _fast("tiny-dense-k-eq-v", tok)
    ids = _ids()
    grads = []
    fast.blocks[1].mlp.hook_out.add_hook(lambda g, hook: grads.append(g.shape), dir="bwd")
    fast(ids).sum().backward()
    assert grads and _blocks_of(fast, wrapped_calls) == [1]
    fast.reset_hooks(including_permanent=True)
    wrapped_calls.clear()
    handle = nn.modules.module.register_module_forward_hook(lambda m, a, o: None)
    try:
        with torch.no_grad():
            fast(ids)
    finally:
        handle.remove()
    assert _blocks_of(fast, wrapped_calls) == list(range(len(fast.blocks)))


def test_a_replaced_module_rebuilds_the_twin(tok):
    fast = _fast("tiny-dense-k-eq-v", tok)
    ids = _ids()
    with torch.no_grad():
        before = fast(ids)
        down = fast.blocks[2].mlp.original_component.down_proj
        old = down.original_component
        new = nn.Linear(old.in_features, old.out_features, bias=False)
        nn.init.normal_(new.weight, std=0.5)
        down._modules["_original_component"] = new
        after = fast(ids)
        _force_wrapped(fast)
        wrapped = fast(ids)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(after, wrapped, rtol=0, atol=0)


def test_stop_at_layer_and_disable(tok, wrapped_calls):
    name = "tiny-moe"
    seed = _seed(name, tok)
    fast = _fast(name, tok)
    ids = _ids()
    base = {type(b) for b in seed.blocks}
    with torch.no_grad():
        out = fast(ids, stop_at_layer=3)
        ref = seed(ids, stop_at_layer=3)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert _blocks_of(fast, wrapped_calls) == []
    disable_fast_kernels(fast)
    assert {type(b) for b in fast.blocks} == base
    with torch.no_grad():
        fast(ids)
    assert _blocks_of(fast, wrapped_calls) == list(range(len(fast.blocks)))


def test_gc_paused_during_bridge_calls_and_restored(tok):
    import gc

    fast = _fast("tiny-moe", tok)
    seen = []

    def probe(t, hook):
        seen.append(gc.isenabled())

    assert gc.isenabled()
    with torch.no_grad():
        fast.run_with_cache(_ids(), names_filter=lambda n: n == "blocks.1.hook_resid_post")
        fast.run_with_hooks(_ids(), fwd_hooks=[("blocks.1.hook_resid_post", probe)])
        fast.blocks[1].hook_out.add_hook(probe)
        fast(_ids())
        fast.reset_hooks()
    assert seen == [False, False] and gc.isenabled()
    disable_fast_kernels(fast)
    with torch.no_grad():
        fast.run_with_hooks(_ids(), fwd_hooks=[("blocks.1.hook_resid_post", probe)])
    assert seen == [False, False, True]
    assert not any(n in fast.__dict__ for n in ("forward", "run_with_cache", "run_with_hooks"))


@pytest.mark.parametrize("name", ["tiny-ple-kv-shared", "tiny-moe"])
def test_forward_without_a_requested_cache_builds_none(name, tok):
    """A plain forward / run_with_cache runs the HF model with use_cache=False (no DynamicCache, same logits); a call
    that asks for the cache keeps it."""
    fast, seed = _fast(name, tok), _seed(name, tok)
    seen = []
    fast.original_model.register_forward_pre_hook(lambda m, a, k: seen.append(k.get("use_cache")), with_kwargs=True)
    ids = _ids()
    with torch.no_grad():
        got = fast(ids)
        want = seed(ids)
        _, cache = fast.run_with_cache(ids, names_filter=lambda n: n == "blocks.1.hook_resid_post")
        logits, kv = fast(ids, return_type="logits_and_cache")
        fast(ids, use_cache=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    torch.testing.assert_close(logits, got, rtol=0, atol=0)
    assert seen[:2] == [False, False] and seen[2] is not False and seen[3] is True
    assert kv is not None and kv.get_seq_length() == ids.shape[1]
    disable_fast_kernels(fast)
    seen.clear()
    with torch.no_grad():
        fast(ids)
    assert seen == [None]


def test_norm_hook_edits_flow_and_observation_changes_nothing(tok):
    fast = _fast("tiny-dense-k-eq-v", tok)
    ids = _ids()
    with torch.no_grad():
        plain = fast(ids)
        observed, cache = fast.run_with_cache(ids, names_filter=lambda n: "hook_scale" in n or "hook_normalized" in n)
        doubled = fast.run_with_hooks(ids, fwd_hooks=[("blocks.2.ln2.hook_scale", lambda t, hook: t * 2)])
        halved = fast.run_with_hooks(ids, fwd_hooks=[("blocks.2.ln2.hook_normalized", lambda t, hook: t * 0.5)])
        zeroed = fast.run_with_hooks(ids, fwd_hooks=[("ln_final.hook_normalized", lambda t, hook: t * 0)])
    assert len(cache.keys()) > 0
    torch.testing.assert_close(observed, plain, rtol=0, atol=0)
    assert (doubled - plain).abs().max() > 1e-3
    torch.testing.assert_close(doubled, halved, rtol=1e-5, atol=1e-5)
    assert zeroed.abs().max() == 0


def test_backend_change_and_train_mode_rebuild_the_twin(tok):
    from gemma4_fast import patch_model

    fast = _fast("tiny-moe", tok)
    ids = _ids()
    with torch.no_grad():
        fast(ids)
    twin = fast.blocks[0].__dict__["_g4f_quiet"].twin
    attn = twin.self_attn
    assert attn._g4f_backend == "torch"
    patch_model(fast.original_model, backend="torch")
    with torch.no_grad():
        fast(ids)
    rebuilt = fast.blocks[0].__dict__["_g4f_quiet"].twin
    assert rebuilt is not twin
    fast.train()
    with torch.no_grad():
        fast(ids)
    assert fast.blocks[0].__dict__["_g4f_quiet"].twin.training
    fast.eval()


def test_a_copied_bridge_runs_its_own_model(tok):
    import copy

    fast = _fast("tiny-moe", tok)
    twin = copy.deepcopy(fast)
    assert twin.forward.__self__ is twin and twin.generate.__self__ is twin
    calls = []
    fast.blocks[0].hook_out.add_hook(lambda t, hook: calls.append(1))
    with torch.no_grad():
        out = twin(_ids())
        gen = twin.generate(_ids()[:1], max_new_tokens=3, verbose=False)
    assert calls == [] and out.shape[:2] == (2, 19) and gen.shape[-1] == 22


def test_all_quiet_gate_agrees_with_the_per_block_check(tok):
    """``all_quiet_gate`` (the whole-model graph's gate) answers as ``all(_plan_for(b) is not None ...)`` for every
    case that check distinguishes: no hook, a forward hook on an inner module or HookPoint, a global hook, a
    ``stop_at_layer`` block, a replaced module, a different plan (rebuilt by the per-block path), train mode; a
    backward hook is the one deliberate difference (the gate serves calls without autograd, where it cannot fire)."""
    from gemma4_fast.bridge_integration import quiet as Q

    bridge = _fast("tiny-ple-kv-shared", tok)
    blocks = list(bridge.blocks)
    gate = Q.all_quiet_gate(blocks)

    def per_block():
        return all(Q._plan_for(b) is not None for b in blocks)

    assert gate() and per_block()
    h = blocks[2].attn._modules["_original_component"].q_proj.register_forward_hook(lambda *a: None)
    assert not gate() and not per_block()
    h.remove()
    assert gate() and per_block()
    h = blocks[1].attn.hook_pattern.add_hook(lambda t, hook: t)
    assert not gate() and not per_block()
    blocks[1].attn.hook_pattern.remove_hooks()
    assert gate() and per_block()
    h = torch.nn.modules.module.register_module_forward_hook(lambda *a: None)
    assert not gate() and not per_block()
    h.remove()
    blocks[3]._stop_at_layer_idx = 3
    assert not gate() and not per_block()
    blocks[3]._stop_at_layer_idx = None
    blocks[0]._modules["_original_component"].__dict__["_start_at_layer_idx"] = 0
    assert not gate() and not per_block()
    del blocks[0]._modules["_original_component"].__dict__["_start_at_layer_idx"]
    assert gate() and per_block()
    layer = blocks[4]._modules["_original_component"]
    old = layer._modules["post_feedforward_layernorm"]
    layer._modules["post_feedforward_layernorm"] = nn.Identity()
    assert gate() == per_block()
    layer._modules["post_feedforward_layernorm"] = old
    assert gate() and per_block()
    bridge.train()
    assert gate() == per_block()
    bridge.eval()
    assert gate() and per_block()
    h = blocks[2].attn._modules["_original_component"].q_proj.register_full_backward_hook(lambda *a: None)
    assert gate() and not per_block()
    h.remove()
    assert gate() and per_block()
