"""bridge_integration.hook_memo: the memoised ``hook_dict`` / alias map behind ``run_with_cache``,
``run_with_hooks`` and ``hooks()`` on the fast path.

Every check runs a call twice on one tiny fast bridge (CPU, torch backend): through the memo, and through
TransformerLens's own method with the memo taken off the instance; outputs, cache keys (in order) and tensors,
the hooks added (hook point, direction, context level, in order), errors and warnings must be identical.
"""
from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
from transformer_lens.hook_points import HookPoint
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.model_bridge.bridge_core import build_alias_to_canonical_map

from gemma4_fast import boot_transformers, disable_fast_kernels
from gemma4_fast.bridge_integration import hook_memo
from gemma4_fast.models import build_model, offline_tokenizer

_OVERRIDES = ("_add_aliases_to_hooks", "hooks", hook_memo._MEMO)


@pytest.fixture(scope="module")
def bridge():
    b = boot_transformers("tiny-moe", hf_model=build_model("tiny-moe"), tokenizer=offline_tokenizer(), device="cpu",
                          fast_kernels=True, fast_backend="torch")
    assert b.fast_kernels_report().enabled
    assert all(name in b.__dict__ for name in _OVERRIDES), b.fast_kernels_report().notes
    return b


@pytest.fixture(scope="module")
def ids(bridge):
    return bridge.to_tokens("The cat sat on the mat, and then")


@contextlib.contextmanager
def _without_memo(bridge):
    saved = {name: bridge.__dict__.pop(name) for name in _OVERRIDES}
    try:
        yield
    finally:
        bridge.__dict__.update(saved)


def _record(bridge, monkeypatch, call):
    """(result or exception, warnings, hooks added, hooks left on the hook points, context level) of ``call()``."""
    added = []
    original = HookPoint.add_hook

    def spy(self, hook, dir="fwd", is_permanent=False, level=None, prepend=False, alias_names=None):
        added.append((self.name, dir, level, is_permanent, alias_names))
        return original(self, hook, dir=dir, is_permanent=is_permanent, level=level, prepend=prepend,
                        alias_names=alias_names)

    monkeypatch.setattr(HookPoint, "add_hook", spy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = call()
        except Exception as e:  # compared below
            out = e
    monkeypatch.setattr(HookPoint, "add_hook", original)
    live = sorted((hp.name, len(hp.fwd_hooks), len(hp.bwd_hooks)) for hp in bridge._hook_registry.values()
                  if hp.fwd_hooks or hp.bwd_hooks)
    return out, [(w.category, str(w.message)) for w in caught], added, live, bridge.context_level


def _same(a, b):
    if isinstance(a, Exception) or isinstance(b, Exception):
        assert type(a) is type(b) and str(a) == str(b), (a, b)
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, (tuple, list)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    elif isinstance(a, dict) or hasattr(a, "cache_dict"):
        da, db = (getattr(a, "cache_dict", a), getattr(b, "cache_dict", b))
        assert type(a) is type(b) and list(da) == list(db)
        for k in da:
            _same(da[k], db[k])
    else:
        assert a == b, (a, b)


def _check(bridge, monkeypatch, method, *args, **kwargs):
    """``bridge.<method>(...)`` through the memo equals TransformerLens's own method on the same bridge."""
    fast = _record(bridge, monkeypatch, lambda: getattr(bridge, method)(*args, **kwargs))
    bridge.reset_hooks(including_permanent=True)
    with _without_memo(bridge):
        own = getattr(type(bridge), method)
        ref = _record(bridge, monkeypatch, lambda: own(bridge, *args, **kwargs))
    _same(fast[0], ref[0])
    assert fast[1:] == ref[1:]
    bridge.reset_hooks(including_permanent=True)
    return fast


ALIAS = "blocks.0.hook_resid_post"


def test_alias_names_are_aliases(bridge):
    hp = bridge.hook_dict[ALIAS]
    assert hp.name != ALIAS and bridge.hook_dict[hp.name] is hp


@pytest.mark.parametrize("names_filter", [
    None, ALIAS, "blocks.0.hook_out", "blocks.1.hook_resid_pre", "hook_embed", [ALIAS, "blocks.0.hook_out"],
    ["blocks.1.attn.hook_pattern", "ln_final.hook_scale", "blocks.0.hook_mlp_out"], [],
    lambda n: n.endswith("hook_resid_post"), lambda n: "router" in n, "blocks.0.attn.hook_result",
    ["blocks.0.attn.hook_result", ALIAS], "no.such.hook", ["no.such.hook"], 7])
def test_run_with_cache_names_filter(bridge, ids, monkeypatch, names_filter):
    with torch.no_grad():
        _check(bridge, monkeypatch, "run_with_cache", ids, names_filter=names_filter)


@pytest.mark.parametrize("kwargs", [
    dict(remove_batch_dim=True), dict(stop_at_layer=1), dict(stop_at_layer=-1, names_filter=ALIAS),
    dict(start_at_layer=1, names_filter=lambda n: "resid" in n), dict(pos_slice=-1), dict(pos_slice=(0, 3)),
    dict(return_cache_object=False, remove_batch_dim=True), dict(reset_hooks_end=False, names_filter=ALIAS),
    dict(clear_contexts=True, names_filter=[ALIAS]), dict(device="cpu", names_filter="hook_embed"),
    dict(incl_bwd=True, stop_at_layer=1)])
def test_run_with_cache_options(bridge, ids, monkeypatch, kwargs):
    if "start_at_layer" in kwargs:
        with torch.no_grad():
            resid = bridge.run_with_cache(ids, names_filter="blocks.1.hook_resid_pre")[1]["blocks.1.hook_resid_pre"]
        ids = resid
    with torch.no_grad():
        _check(bridge, monkeypatch, "run_with_cache", ids, **kwargs)


def test_positional_arguments(bridge, ids, monkeypatch):
    seen = []
    with torch.no_grad():
        _check(bridge, monkeypatch, "run_with_cache", ids, True, False, [ALIAS, "hook_embed"])
        _check(bridge, monkeypatch, "run_with_cache", ids, False, True, ALIAS, 1)
        _check(bridge, monkeypatch, "run_with_hooks", ids, [(ALIAS, _grab(seen))], [])
        _check(bridge, monkeypatch, "run_with_hooks", ids, [[ALIAS, _grab(seen)]], names_filter=ALIAS)
    assert len(seen) == 2


def test_run_with_cache_gradients_and_compatibility_reads(bridge, ids, monkeypatch):
    _check(bridge, monkeypatch, "run_with_cache", ids, return_type="loss", incl_bwd=True,
           names_filter=[ALIAS, "blocks.1.hook_out"])
    bridge.zero_grad(set_to_none=True)
    monkeypatch.setattr(bridge, "compatibility_mode", True)
    with torch.no_grad():
        _check(bridge, monkeypatch, "run_with_cache", ids, names_filter=lambda n: n.endswith("hook_out"))
        _check(bridge, monkeypatch, "run_with_cache", ids, names_filter=[ALIAS])


def _grab(store):
    def hook(t, hook):
        store.append((hook.name, t.detach().clone()))
    return hook


@pytest.mark.parametrize("case", ["names", "filters", "bwd", "batch", "stop", "missing", "gated"])
def test_run_with_hooks(bridge, ids, monkeypatch, case):
    seen = []
    kwargs = {
        "names": dict(fwd_hooks=[(ALIAS, _grab(seen)), ("blocks.0.hook_out", _grab(seen)),
                                 ("hook_embed", _grab(seen))]),
        "filters": dict(fwd_hooks=[(lambda n: n.endswith("hook_resid_pre"), _grab(seen))]),
        "bwd": dict(fwd_hooks=[(ALIAS, _grab(seen))], bwd_hooks=[(ALIAS, _grab(seen))], return_type="loss"),
        "batch": dict(fwd_hooks=[(ALIAS, _grab(seen))], remove_batch_dim=True),
        "stop": dict(fwd_hooks=[(lambda n: "resid" in n, _grab(seen))], stop_at_layer=1),
        "missing": dict(fwd_hooks=[("no.such.hook", _grab(seen))]),
        "gated": dict(fwd_hooks=[("blocks.0.attn.hook_result", _grab(seen))]),
    }[case]
    with torch.enable_grad() if case == "bwd" else torch.no_grad():
        _check(bridge, monkeypatch, "run_with_hooks", ids, **kwargs)
    half = len(seen) // 2
    _same([t for _, t in seen[:half]], [t for _, t in seen[half:]])
    assert [n for n, _ in seen[:half]] == [n for n, _ in seen[half:]]
    bridge.zero_grad(set_to_none=True)


def test_hooks_context(bridge, ids, monkeypatch):
    seen = []

    def enter():
        with bridge.hooks(fwd_hooks=[(ALIAS, _grab(seen)), (lambda n: n == "ln_final.hook_scale", _grab(seen))]):
            with torch.no_grad():
                return bridge(ids)

    fast = _record(bridge, monkeypatch, enter)
    with _without_memo(bridge):
        def own():
            with TransformerBridge.hooks(bridge, fwd_hooks=[(ALIAS, _grab(seen)),
                                                            (lambda n: n == "ln_final.hook_scale", _grab(seen))]):
                with torch.no_grad():
                    return bridge(ids)
        ref = _record(bridge, monkeypatch, own)
    _same(fast[0], ref[0])
    assert fast[1:] == ref[1:] and len(seen) == 4
    _same(seen[:2], seen[2:])


def test_alias_map_memo():
    """The map memo against TransformerLens's function: full reads (None), reads of some keys, reads of none."""
    memo = hook_memo._Memo()
    a, b = HookPoint(), HookPoint()
    a.name, b.name = "x.a", "x.b"

    def check(d):
        want = build_alias_to_canonical_map(d)
        for keys in (None, frozenset(), frozenset({"alias", "x.b", "x.a", "absent"})):
            got = hook_memo._alias_map(memo, keys, d)
            if keys is None:
                assert got == want and got is not getattr(memo.map, "map", None)
            elif keys:
                assert {k: got.get(k) for k in keys} == {k: want.get(k) for k in keys}

    for d in ({"x.a": a, "x.b": b, "alias": a}, {"x.a": a, "x.b": b, "other": a}, {"x.a": a, "x.b": a, "alias": a},
              {"x.a": a, "alias": a, "x.b": a}):
        check(d)
        check(d)
    a.name = "renamed"
    check(d)
    assert memo.map is not None
    check({"x.a": b, "x": {"a": a}})
    assert memo.map is None
    check({"n": object(), "x.a": a})


def _memo_hook_dict(bridge):
    fast = bridge.hook_dict
    with _without_memo(bridge):
        ref = bridge.hook_dict
    assert list(fast) == list(ref) and all(fast[k] is ref[k] for k in ref)
    return fast


def test_memo_follows_the_registry(bridge, ids, monkeypatch):
    memo = bridge.__dict__[hook_memo._MEMO]
    first = _memo_hook_dict(bridge)
    keys = list(first)
    state = memo.aliases
    _memo_hook_dict(bridge)
    assert memo.aliases is state
    with torch.no_grad():
        bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_resid_post"))
        maps = memo.map
        bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_resid_post"))
    assert maps is not None and memo.map is maps and memo.aliases is state
    first[ALIAS] = None
    first.clear()
    assert _memo_hook_dict(bridge)[ALIAS] is not None
    bridge.clear_hook_registry()
    assert len(_memo_hook_dict(bridge)) < len(keys)
    assert memo.aliases is not state
    bridge._initialize_hook_registry()
    assert list(_memo_hook_dict(bridge)) == keys
    extra = HookPoint()
    bridge.blocks[0].hook_extra = extra
    bridge.clear_hook_registry()
    bridge._initialize_hook_registry()
    try:
        assert _memo_hook_dict(bridge)["blocks.0.hook_extra"] is extra
        with torch.no_grad():
            added = _check(bridge, monkeypatch, "run_with_cache", ids, names_filter="blocks.0.hook_extra")[2]
        assert [a[0] for a in added] == ["blocks.0.hook_extra"]
    finally:
        del bridge.blocks[0].hook_extra
        bridge.blocks[0].__dict__["_hook_registry"].pop("hook_extra", None)
        bridge.clear_hook_registry()
        bridge._initialize_hook_registry()
    assert list(_memo_hook_dict(bridge)) == keys
    registry = bridge._hook_registry
    swapped = HookPoint()
    try:
        registry["blocks.1.hook_out"] = swapped
        assert _memo_hook_dict(bridge)["blocks.1.hook_resid_post"] is swapped
        with torch.no_grad():
            bridge.run_with_cache(ids, names_filter=lambda n: False)
            items = list(registry.items())
            registry.clear()
            registry.update(("blocks.1.hook_g4f" if k == "blocks.1.hook_out" else k, v) for k, v in items)
            assert "blocks.1.hook_out" not in _memo_hook_dict(bridge)
            monkeypatch.setattr(bridge, "compatibility_mode", True)
            _check(bridge, monkeypatch, "run_with_cache", ids, names_filter=lambda n: n.startswith("blocks.1.hook_"))
            monkeypatch.setattr(bridge, "compatibility_mode", False)
    finally:
        bridge.clear_hook_registry()
        bridge._initialize_hook_registry()
    assert list(_memo_hook_dict(bridge)) == keys


def test_memo_follows_aliases_names_and_walks(bridge, ids, monkeypatch):
    _memo_hook_dict(bridge)
    monkeypatch.setitem(bridge.hook_aliases, "hook_g4f_extra", "blocks.1.hook_out")
    assert _memo_hook_dict(bridge)["hook_g4f_extra"] is bridge.blocks[1].hook_out
    monkeypatch.setattr(bridge, "hook_aliases", {**bridge.hook_aliases, "hook_g4f_other": "ln_final.hook_out"})
    assert "hook_g4f_other" in _memo_hook_dict(bridge)
    template = bridge.adapter.component_mapping["blocks"]
    monkeypatch.setitem(template.hook_aliases, "hook_g4f_template", "hook_out")
    assert _memo_hook_dict(bridge)["blocks.1.hook_g4f_template"] is bridge.blocks[1].hook_out
    block = bridge.blocks[0]
    monkeypatch.setattr(block, "hook_aliases", {**block.hook_aliases, "hook_g4f_block": "ln1.hook_out"})
    assert _memo_hook_dict(bridge)["blocks.0.hook_g4f_block"] is block.ln1.hook_out
    monkeypatch.undo()
    bridge.__dict__.pop("hook_aliases", None)
    assert not any("g4f" in k for k in _memo_hook_dict(bridge))
    # hook_pos_embed falls back through the attribute walk first: a module put where it looks is found.
    holder = torch.nn.Module()
    holder.hook_out = HookPoint()
    bridge.original_model.__dict__["pos_embed"] = holder
    try:
        assert _memo_hook_dict(bridge)["hook_pos_embed"] is holder.hook_out
    finally:
        del bridge.original_model.__dict__["pos_embed"]
    assert _memo_hook_dict(bridge)["hook_pos_embed"] is not holder.hook_out
    # A renamed hook point (no registry change) changes the alias map TransformerLens would build.
    hp = bridge.blocks[0].hook_out
    name = hp.name
    with torch.no_grad():
        bridge.run_with_cache(ids, names_filter=[ALIAS])
        try:
            hp.name = "renamed"
            _check(bridge, monkeypatch, "run_with_cache", ids, names_filter=["renamed", ALIAS])
            _check(bridge, monkeypatch, "run_with_cache", ids, names_filter="blocks.0.hook_out")
            monkeypatch.setattr(bridge, "compatibility_mode", True)
            _check(bridge, monkeypatch, "run_with_cache", ids, names_filter=lambda n: n.endswith("0.hook_out"))
        finally:
            hp.name = name


def test_deepcopy_and_disable(ids):
    b = boot_transformers("tiny-dense-k-eq-v", hf_model=build_model("tiny-dense-k-eq-v"),
                          tokenizer=offline_tokenizer(), device="cpu", fast_kernels=True, fast_backend="torch")
    before = {k: v for k, v in b.__dict__.items() if k not in _OVERRIDES}
    b.hook_dict
    twin = copy.deepcopy(b)
    assert twin.__dict__[hook_memo._MEMO].aliases is None
    assert twin.__dict__["_add_aliases_to_hooks"].__self__ is twin
    hd, ref = twin.hook_dict, b.hook_dict
    assert list(hd) == list(ref) and all(hd[k] is not ref[k] for k in hd)
    with torch.no_grad():
        torch.testing.assert_close(twin.run_with_cache(ids, names_filter=ALIAS)[1][ALIAS],
                                   b.run_with_cache(ids, names_filter=ALIAS)[1][ALIAS], rtol=0, atol=0)
    disable_fast_kernels(b)
    assert not any(name in b.__dict__ for name in (*_OVERRIDES, "run_with_cache", "run_with_hooks"))
    assert type(b) is TransformerBridge and set(b.__dict__) <= set(before)
    with torch.no_grad():
        logits, cache = b.run_with_cache(ids, names_filter=ALIAS)
    assert ALIAS in cache.keys() and "blocks.0.hook_out" in cache.keys()
