"""gemma4_fast.graphs: per-layer prefill graphs, checked on the CPU by emulation (capture records the call, replay
re-runs it on the captured input buffers and copies into the captured outputs), so the plumbing (input copies,
output clones, KV-sharing republication, eligibility, eviction) is tested without a GPU. The CUDA variant runs real
graphs."""
from __future__ import annotations

import pytest
import torch

from gemma4_fast import (boot_transformers, disable_fast_kernels, disable_prefill_graphs, enable_prefill_graphs,
                         patch_model)
from gemma4_fast.graphs import PrefillGraphs, prefill_graphs
from gemma4_fast.models import build_model, offline_tokenizer


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setattr(PrefillGraphs, "emulate", True)


def _ids(seed, n=17, batch=2):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 260, (batch, n), generator=g)
    ids[:, 0] = 2
    return ids


def _graphed(name, device="cpu", backend="torch", **kw):
    """``(ref, model, graphs)``: an HF reference and a same-seed copy patched with prefill graphs enabled."""
    ref = build_model(name, device=device)
    model = build_model(name, device=device)
    patch_model(model, backend=backend)
    return ref, model, enable_prefill_graphs(model, **kw)


@pytest.mark.parametrize("name,keep", [("tiny-ple-kv-shared", 0), ("tiny-ple-kv-shared", 1), ("tiny-moe", 0)])
def test_patched_model_replays_every_layer_and_matches_eager(name, keep, emulated):
    """Per-layer graphs (``whole_model=False``). ``keep=1``: HF (>= 5.23) runs the KV-shared layers on the last
    position only; they read the keys/values the captured earlier layers republish."""
    ref, model, graphs = _graphed(name, whole_model=False)
    n_layers = model.config.num_hidden_layers
    with torch.no_grad():
        for call, seed in enumerate((0, 1, 2, 3)):
            ids = _ids(seed)
            out = model(ids, use_cache=False, logits_to_keep=keep).logits
            torch.testing.assert_close(out, ref(ids, use_cache=False, logits_to_keep=keep).logits, rtol=1e-4,
                                       atol=1e-4)
            assert graphs.replays == max(0, call) * n_layers
    disable_prefill_graphs(model)
    assert not any("forward" in layer.__dict__ for layer in model.model.layers)


def _graphed_bridge(name, device="cpu", backend="torch"):
    """``(bridge, ref, graphs)``: a TransformerBridge booted with fast kernels and prefill graphs, a same-seed fast
    bridge without graphs, and the bridge's ``PrefillGraphs``."""
    from transformer_lens.model_bridge import TransformerBridge

    tok = offline_tokenizer()
    bridge = TransformerBridge.boot_transformers(name, hf_model=build_model(name, device=device), tokenizer=tok,
                                                 device=device, fast_kernels=True, fast_backend=backend,
                                                 prefill_graphs=True)
    ref = boot_transformers(name, hf_model=build_model(name, device=device), tokenizer=tok, device=device,
                            fast_kernels=True, fast_backend=backend)
    return bridge, ref, prefill_graphs(bridge)


def test_a_replaced_weight_drops_the_graph(emulated):
    ref, model, graphs = _graphed("tiny-moe", whole_model=False)
    ids = _ids(0)
    with torch.no_grad():
        for _ in range(3):
            model(ids, use_cache=False)
        new = torch.nn.Parameter(torch.randn_like(model.model.layers[2].self_attn.o_proj.weight))
        model.model.layers[2].self_attn.o_proj.weight = new
        ref.model.layers[2].self_attn.o_proj.weight = torch.nn.Parameter(new.detach().clone())
        replays = graphs.replays
        out = model(ids, use_cache=False).logits
    torch.testing.assert_close(out, ref(ids, use_cache=False).logits, rtol=1e-4, atol=1e-4)
    assert graphs.replays == replays + model.config.num_hidden_layers - 1


def test_unpatch_drops_the_graphs(emulated):
    from gemma4_fast import unpatch_model

    ref, model, graphs = _graphed("tiny-dense-k-eq-v", whole_model=False)
    _, whole, whole_graphs = _graphed("tiny-dense-k-eq-v")
    ids = _ids(0)
    with torch.no_grad():
        for _ in range(3):
            model(ids, use_cache=False)
            whole(ids, use_cache=False)
        assert graphs.entries and whole_graphs.model_entries
        unpatch_model(model)
        unpatch_model(whole)
        out = model(ids, use_cache=False).logits
        out_whole = whole(ids, use_cache=False).logits
    assert all(e.graph is None for e in graphs.entries.values())
    assert all(e.graph is None for e in whole_graphs.model_entries.values()) and whole_graphs.model_replays == 2
    torch.testing.assert_close(out_whole, ref(ids, use_cache=False).logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, ref(ids, use_cache=False).logits, rtol=1e-4, atol=1e-4)


def test_kept_outputs_are_not_overwritten_and_shapes_evict(emulated):
    _, model, graphs = _graphed("tiny-ple-kv-shared", max_signatures=1)
    kept = []
    handle = model.model.layers[3].register_forward_hook(lambda m, a, o: kept.append(o))
    with torch.no_grad():
        for seed in range(3):
            model(_ids(seed), use_cache=False)
        snapshot = [t.clone() for t in kept]
        model(_ids(9), use_cache=False)
    handle.remove()
    for t, s in zip(kept, snapshot):
        assert torch.equal(t, s)
    assert not torch.equal(kept[0], kept[1])
    before = len(graphs.entries)
    with torch.no_grad():
        model(_ids(0, n=11), use_cache=False)
    assert len(graphs.pools) == 1 and len(graphs.entries) <= before


def test_fresh_dynamic_cache_is_filled_and_later_steps_stay_eager(emulated):
    ref, model, graphs = _graphed("tiny-ple-kv-shared")
    n_layers = model.config.num_hidden_layers
    with torch.no_grad():
        for seed in range(3):
            ids = _ids(seed)
            out = model(ids, use_cache=True)
            expected = ref(ids, use_cache=True)
        assert graphs.replays == 2 * n_layers
        torch.testing.assert_close(out.logits, expected.logits, rtol=1e-4, atol=1e-4)
        got, want = out.past_key_values, expected.past_key_values
        assert len(got.layers) == len(want.layers)
        for a, b in zip(got.layers, want.layers):
            torch.testing.assert_close(a.keys, b.keys, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(a.values, b.values, rtol=1e-4, atol=1e-5)
        nxt = torch.full((2, 1), 7)
        step = model(nxt, past_key_values=got, use_cache=True).logits
        torch.testing.assert_close(step, ref(nxt, past_key_values=want, use_cache=True).logits, rtol=1e-4, atol=1e-4)
    assert graphs.replays == 2 * n_layers


def test_calls_that_may_need_gradients_stay_eager(emulated):
    _, model, graphs = _graphed("tiny-dense-k-eq-v")
    ids = _ids(0)
    for _ in range(3):
        model(ids, use_cache=False).logits.sum().backward()
    assert graphs.replays == 0


def test_bridge_quiet_blocks_replay(emulated):
    bridge, ref, graphs = _graphed_bridge("tiny-ple-kv-shared")
    assert graphs is not None

    def resid(n):
        return n.endswith("hook_resid_post")

    caches = []
    with torch.no_grad():
        for seed in range(3):
            ids = _ids(seed)
            logits, cache = bridge.run_with_cache(ids, names_filter=resid)
            ref_logits, ref_cache = ref.run_with_cache(ids, names_filter=resid)
            torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
            for key in ref_cache.keys():
                torch.testing.assert_close(cache[key], ref_cache[key], rtol=1e-4, atol=1e-4)
            caches.append((cache, ref_cache))
        assert graphs.replays == 2 * len(bridge.blocks)
        first, first_ref = caches[0]
        for key in first_ref.keys():
            torch.testing.assert_close(first[key], first_ref[key], rtol=1e-4, atol=1e-4)
        seen = []
        for _ in range(2):
            replays = graphs.replays
            bridge.run_with_hooks(_ids(1), fwd_hooks=[("blocks.6.attn.hook_pattern", lambda t, hook: seen.append(t))])
    assert len(seen) == 2 and graphs.replays == replays + len(bridge.blocks) - 1
    disable_fast_kernels(bridge)
    assert prefill_graphs(bridge) is None
    assert not any("_g4f_prefill_graphs" in b.__dict__ for b in bridge.blocks)


def test_input_copies_are_skipped_only_where_the_buffer_holds_the_argument(emulated):
    """Layer 1 is captured reading layer 0's output buffer and both share the ``scale`` argument's buffer: their
    copies are skipped while the arguments are the tensors the buffers hold. A stale tensor (layer 0 replayed
    since), an in-place edit and another tensor are copied."""
    torch.manual_seed(0)
    l0, l1 = torch.nn.Linear(6, 6), torch.nn.Linear(6, 6)
    graphs = PrefillGraphs()

    def run(layer, x, scale):
        return graphs(layer, lambda h, scale: layer(h) * scale, (x,), {"scale": scale})

    def eager(layer, x, scale):
        return layer(x) * scale

    with torch.no_grad():
        for _ in range(3):
            x, scale = torch.randn(2, 5, 6), torch.randn(6)
            y0 = run(l0, x, scale)
            y1 = run(l1, y0, scale)
            torch.testing.assert_close(y1, eager(l1, eager(l0, x, scale), scale))
        assert graphs.replays == 4 and graphs.copies_skipped == 2  # layer 1: y0 and scale in the third forward
        stale = y0
        x2 = torch.randn(2, 5, 6)
        fresh = run(l0, x2, scale)  # overwrites layer 0's output buffer, which layer 1 reads
        torch.testing.assert_close(run(l1, stale, scale), eager(l1, stale, scale))
        edited = run(l0, x2, scale)
        edited.mul_(3.0)
        torch.testing.assert_close(run(l1, edited, scale), eager(l1, edited, scale))
        torch.testing.assert_close(run(l1, fresh, scale * 2), eager(l1, fresh, scale * 2))
        skipped = graphs.copies_skipped
        y0 = run(l0, x2, scale)
        torch.testing.assert_close(run(l1, y0, scale), eager(l1, eager(l0, x2, scale), scale))
        assert graphs.copies_skipped == skipped + 3  # x2 (layer 0 holds it), y0 and scale (layer 1)


def test_views_of_one_base_share_one_captured_copy(emulated):
    """Each layer takes a slice of one ``[B, S, layers, D]`` tensor (like the per-layer inputs): one copy of the
    base per forward serves every layer; an edited base, a plain tensor in a view's place and a view of another
    layout are still copied."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(6, 6) for _ in range(3)]
    graphs = PrefillGraphs()

    def run(i, x, pli):
        return graphs(layers[i], lambda h, pli: layers[i](h) + pli, (x,), {"pli": pli})

    def forward(x, base, fn, edit=None):
        h = x
        for i in range(3):
            if edit is not None and i == edit:
                base.mul_(2.0)
            h = fn(i, h, base[:, :, i])
        return h

    def eager(i, x, pli):
        return layers[i](x) + pli

    with torch.no_grad():
        for _ in range(3):
            x, base = torch.randn(2, 5, 6), torch.randn(2, 5, 3, 6)
            torch.testing.assert_close(forward(x, base, run), forward(x, base.clone(), eager))
        skipped = graphs.copies_skipped
        x, base = torch.randn(2, 5, 6), torch.randn(2, 5, 3, 6)
        torch.testing.assert_close(forward(x, base, run), forward(x, base.clone(), eager))
        assert graphs.copies_skipped == skipped + 4  # the base for layers 1 and 2, the chained hidden states
        x, base = torch.randn(2, 5, 6), torch.randn(2, 5, 3, 6)
        want = forward(x, base.clone(), eager, edit=1)
        torch.testing.assert_close(forward(x, base, run, edit=1), want)
        plain = torch.randn(2, 5, 6)
        torch.testing.assert_close(run(1, x, plain), eager(1, x, plain))
        torch.testing.assert_close(run(2, x, base[:, :, 2]), eager(2, x, base[:, :, 2]))
        other = torch.randn(2, 5, 4, 6)[:, :, 3]  # a view of another layout: copied into the view buffer
        torch.testing.assert_close(run(2, x, other), eager(2, x, other))
        torch.testing.assert_close(run(2, x, base[:, :, 2]), eager(2, x, base[:, :, 2]))  # rewrites the base buffer
        torch.testing.assert_close(run(2, x, other), eager(2, x, other))  # so the same view is copied again


def test_bridge_forward_skips_chained_copies_and_respects_an_in_place_hook(emulated):
    """Through a TransformerBridge: after capture, every block after the first reads the previous block's
    captured output; a hook that edits the residual stream in place between blocks is still seen."""
    bridge, ref, _ = _graphed_bridge("tiny-moe")
    graphs = enable_prefill_graphs(bridge, whole_model=False)
    n = len(bridge.blocks)

    def double(t, hook):
        return t.mul_(2.0)

    with torch.no_grad():
        for seed in range(3):
            torch.testing.assert_close(bridge(_ids(seed)), ref(_ids(seed)), rtol=1e-4, atol=1e-4)
        assert graphs.replays == 2 * n and graphs.copies_skipped >= n - 1
        hooks = [("blocks.2.hook_resid_pre", double)]
        replays = graphs.replays
        out = bridge.run_with_hooks(_ids(4), fwd_hooks=hooks)
        torch.testing.assert_close(out, ref.run_with_hooks(_ids(4), fwd_hooks=hooks), rtol=1e-4, atol=1e-4)
        assert graphs.replays == replays + n
        assert not torch.allclose(out, ref(_ids(4)), rtol=1e-3, atol=1e-3)


@pytest.mark.cuda
def test_cuda_prefill_graphs_match_eager():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    name = "tiny-ple-kv-shared"
    ref, model, graphs = _graphed(name, device="cuda", backend="triton", whole_model=False)
    with torch.no_grad():
        for seed in range(4):
            ids = _ids(seed).cuda()
            for keep in (0, 1):
                torch.testing.assert_close(model(ids, use_cache=False, logits_to_keep=keep).logits,
                                           ref(ids, use_cache=False, logits_to_keep=keep).logits, rtol=1e-3, atol=1e-3)
    assert not any(e.failed for e in graphs.entries.values())
    n_layers, n_shared = model.config.num_hidden_layers, model.config.num_kv_shared_layers
    # 8 forwards; eager warm-ups: every layer in the first one, the KV-shared layers cut to one position once
    assert graphs.replays == 8 * n_layers - (n_layers + n_shared)


def test_decode_layer_graphs_leave_the_prefill_wrappers_in_place(emulated, monkeypatch):
    from gemma4_fast import decode, generate

    ref, model, graphs = _graphed("tiny-ple-kv-shared")
    monkeypatch.setattr(decode._LayerGraph, "emulate", True)
    handle = model.model.layers[2].register_forward_hook(lambda m, a, o: None)
    ids = _ids(0, n=9, batch=1)
    got = generate(model, ids, max_new_tokens=6)
    handle.remove()
    want = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                        pad_token_id=0)
    assert torch.equal(got, want)
    assert all(getattr(layer.__dict__.get("forward"), "_g4f_prefill", False) for layer in model.model.layers)
    with torch.no_grad():
        for seed in range(3):
            torch.testing.assert_close(model(_ids(seed), use_cache=False).logits,
                                       ref(_ids(seed), use_cache=False).logits, rtol=1e-4, atol=1e-4)
    assert graphs.model_replays > 0
    assert getattr(model.model.__dict__.get("forward"), "_g4f_prefill", False)


# ---------------------------------------------------------------------------------------------------------------
# Whole text-model graphs
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,keep", [("tiny-ple-kv-shared", 0), ("tiny-ple-kv-shared", 1), ("tiny-moe", 0),
                                       ("tiny-dense-k-eq-v", 1)])
def test_plain_forwards_replay_the_whole_text_model(name, keep, emulated):
    """A plain forward warms up, the next captures the text model whole, later ones replay it (new ids copied into
    the captured buffer); no layer graph is made, and logits equal HF's."""
    ref, model, graphs = _graphed(name)
    with torch.no_grad():
        for call, seed in enumerate((0, 1, 2, 3)):
            ids = _ids(seed)
            out = model(ids, use_cache=False, logits_to_keep=keep).logits
            torch.testing.assert_close(out, ref(ids, use_cache=False, logits_to_keep=keep).logits, rtol=1e-4,
                                       atol=1e-4)
            assert graphs.model_replays == call
    assert graphs.replays == 0 and not graphs.entries
    disable_prefill_graphs(model)
    assert "forward" not in model.model.__dict__
    assert not any("forward" in layer.__dict__ for layer in model.model.layers)


def test_whole_model_graph_only_for_plain_unhooked_calls(emulated):
    """Hooks on any module, an attention mask, a cache, hidden states, gradients: the call takes the per-layer path
    (and still equals HF); a later plain call replays the whole model again."""
    ref, model, graphs = _graphed("tiny-ple-kv-shared")
    ids = _ids(0)
    with torch.no_grad():
        for _ in range(3):
            model(ids, use_cache=False)
        assert graphs.model_replays == 2
        handle = model.model.layers[4].mlp.register_forward_hook(lambda m, a, o: None)
        hooked = model(ids, use_cache=False).logits
        handle.remove()
        masked = model(ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        cached = model(ids, use_cache=True).logits
        hidden = model(ids, use_cache=False, output_hidden_states=True).logits
        assert graphs.model_replays == 2
        want = ref(ids, use_cache=False).logits
        for got in (hooked, masked, cached, hidden):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        model(ids, use_cache=False)
        assert graphs.model_replays == 3
    model(ids, use_cache=False).logits.sum().backward()
    assert graphs.model_replays == 3


def test_whole_model_outputs_are_kept_and_replaced_weights_recapture(emulated):
    ref, model, graphs = _graphed("tiny-moe")
    with torch.no_grad():
        for seed in range(3):
            first = model.model(input_ids=_ids(0), use_cache=False).last_hidden_state
        snapshot = first.clone()
        model.model(input_ids=_ids(5), use_cache=False)
        assert torch.equal(first, snapshot) and graphs.model_replays == 3
        new = torch.nn.Parameter(torch.randn_like(model.model.layers[1].mlp.down_proj.weight))
        model.model.layers[1].mlp.down_proj.weight = new
        ref.model.layers[1].mlp.down_proj.weight = torch.nn.Parameter(new.detach().clone())
        hidden = model.model(input_ids=_ids(0), use_cache=False).last_hidden_state
        assert graphs.model_replays == 3 and not graphs.model_entries
        torch.testing.assert_close(hidden, ref.model(input_ids=_ids(0), use_cache=False).last_hidden_state,
                                   rtol=1e-4, atol=1e-4)
        for seed in range(3):
            out = model(_ids(seed), use_cache=False).logits
        assert graphs.model_replays == 5
        torch.testing.assert_close(out, ref(_ids(2), use_cache=False).logits, rtol=1e-4, atol=1e-4)
        moved = torch.randn_like(model.model.layers[0].self_attn.q_proj.weight)
        model.model.layers[0].self_attn.q_proj.weight.data = moved
        ref.model.layers[0].self_attn.q_proj.weight.data = moved.clone()
        out = model(_ids(2), use_cache=False).logits
        assert graphs.model_replays == 5
        torch.testing.assert_close(out, ref(_ids(2), use_cache=False).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.cuda
def test_cuda_whole_model_graph_matches_eager():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    ref, model, graphs = _graphed("tiny-ple-kv-shared", device="cuda", backend="triton")
    with torch.no_grad():
        for seed in range(4):
            ids = _ids(seed).cuda()
            for keep in (0, 1):
                got = model(ids, use_cache=False, logits_to_keep=keep).logits
                torch.testing.assert_close(got, ref(ids, use_cache=False, logits_to_keep=keep).logits, rtol=1e-3,
                                           atol=1e-3)
    assert not any(e.failed for e in graphs.model_entries.values())
    assert graphs.model_replays == 6 and graphs.replays == 0


def test_bridge_plain_forwards_replay_the_whole_text_model(emulated):
    """A TransformerBridge's plain forwards replay its text model whole (logits equal a fast bridge without graphs);
    a cache of residuals, a hook inside a block and ``stop_at_layer`` take the per-block path, still equal; disabling
    removes the wrapper."""
    bridge, ref, graphs = _graphed_bridge("tiny-ple-kv-shared")
    with torch.no_grad():
        for seed in range(4):
            torch.testing.assert_close(bridge(_ids(seed)), ref(_ids(seed)), rtol=1e-4, atol=1e-4)
        assert graphs.model_replays == 3 and graphs.replays == 0

        def resid(n):
            return n.endswith("hook_resid_post")

        logits, cache = bridge.run_with_cache(_ids(1), names_filter=resid)
        ref_logits, ref_cache = ref.run_with_cache(_ids(1), names_filter=resid)
        torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
        for key in ref_cache.keys():
            torch.testing.assert_close(cache[key], ref_cache[key], rtol=1e-4, atol=1e-4)
        seen = []
        out = bridge.run_with_hooks(_ids(1), fwd_hooks=[("blocks.3.attn.hook_pattern", lambda t, hook: seen.append(1))])
        torch.testing.assert_close(out, ref(_ids(1)), rtol=1e-4, atol=1e-4)
        stopped = bridge(_ids(1), stop_at_layer=2)
        torch.testing.assert_close(stopped, ref(_ids(1), stop_at_layer=2), rtol=1e-4, atol=1e-4)
        assert graphs.model_replays == 3 and seen == [1]
        torch.testing.assert_close(bridge(_ids(2)), ref(_ids(2)), rtol=1e-4, atol=1e-4)
        assert graphs.model_replays == 4
    disable_prefill_graphs(bridge)
    assert "forward" not in bridge.original_model.model.__dict__


@pytest.mark.cuda
def test_cuda_bridge_whole_model_graph_matches_eager():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    bridge, ref, graphs = _graphed_bridge("tiny-ple-kv-shared", device="cuda", backend="triton")
    with torch.no_grad():
        for seed in range(4):
            ids = _ids(seed).cuda()
            torch.testing.assert_close(bridge(ids), ref(ids), rtol=1e-3, atol=1e-3)
    assert graphs.model_replays == 3 and not any(e.failed for e in graphs.model_entries.values())


@pytest.mark.cuda
def test_cuda_e2b_slice_whole_model_graph_with_hopper_kernels_matches_eager():
    """Three bf16 E2B layers at 1100 tokens, full logits: the replayed text model (its MLPs on the fused gate / up
    kernel on sm_90, attention on the Gluon kernels) and the LM head equal the same patched model without graphs."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    ref = build_model("E2B", torch.bfloat16, "cuda", num_hidden_layers=3)
    model = build_model("E2B", torch.bfloat16, "cuda", num_hidden_layers=3)
    for m in (ref, model):
        patch_model(m, backend="triton")
    graphs = enable_prefill_graphs(model)
    ids = torch.randint(4, 260000, (1, 1100), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.no_grad():
        want = ref(ids, use_cache=False).logits.float()
        for _ in range(3):
            got = model(ids, use_cache=False).logits.float()
    assert graphs.model_replays == 2 and not any(e.failed for e in graphs.model_entries.values())
    assert ((got - want).norm() / want.norm()).item() <= 1e-3


def _order(monkeypatch):
    """A list that records, in order, every hook check of a whole-model call ("check") and every emulated replay."""
    from gemma4_fast.graphs import _Emulated

    seen: list[str] = []
    check, replay = PrefillGraphs._model_quiet, _Emulated.replay

    def checked(self, model):
        seen.append("check")
        return check(self, model)

    def replayed(self):
        seen.append("replay")
        return replay(self)
    monkeypatch.setattr(PrefillGraphs, "_model_quiet", checked)
    monkeypatch.setattr(_Emulated, "replay", replayed)
    return seen


def test_bridge_replay_launches_before_the_hook_check_while_no_hook_was_registered(emulated, monkeypatch):
    """Once a hook check passed and no hook was registered since, a plain forward launches its replay first and checks
    after; a call that registers hooks, and the plain call after it, check first; outputs equal a bridge without
    graphs throughout."""
    bridge, ref, graphs = _graphed_bridge("tiny-ple-kv-shared")
    seen = _order(monkeypatch)
    with torch.no_grad():
        for seed in range(3):
            torch.testing.assert_close(bridge(_ids(seed)), ref(_ids(seed)), rtol=1e-4, atol=1e-4)
        assert seen[-2:] == ["replay", "check"] and graphs.model_replays == 2
        seen.clear()
        torch.testing.assert_close(bridge(_ids(3)), ref(_ids(3)), rtol=1e-4, atol=1e-4)
        assert seen == ["replay", "check"] and graphs.model_replays == 3
        seen.clear()
        fired = []
        out = bridge.run_with_hooks(_ids(4), fwd_hooks=[("blocks.1.hook_resid_post", lambda t, hook: fired.append(1))])
        torch.testing.assert_close(out, ref(_ids(4)), rtol=1e-4, atol=1e-4)
        assert fired == [1] and seen[0] == "check" and graphs.model_replays == 3
        for expected in (["check", "replay"], ["replay", "check"]):
            seen.clear()
            torch.testing.assert_close(bridge(_ids(5)), ref(_ids(5)), rtol=1e-4, atol=1e-4)
            assert seen == expected
        seen.clear()
        torch.testing.assert_close(bridge(_ids(6), stop_at_layer=3), ref(_ids(6), stop_at_layer=3), rtol=1e-4,
                                   atol=1e-4)
        assert seen[0] == "check" and graphs.model_replays == 5
    assert graphs.early_dropped == 0


def test_a_hook_without_a_handle_drops_the_early_replay(emulated):
    """A hook put straight into a HookPoint's dict (no ``RemovableHandle``, so the stamp cannot see it) is found by
    the check after the launch: the replay's output is dropped and the call runs eagerly with the hook; later calls
    check first until the check passes again."""
    bridge, ref, graphs = _graphed_bridge("tiny-ple-kv-shared")

    def zero(module, args, output):
        return output * 0

    with torch.no_grad():
        for seed in range(3):
            bridge(_ids(seed))
        plain = ref(_ids(7))
        for b in (bridge, ref):
            b.blocks[1].mlp.hook_out._forward_hooks[-1] = zero
        got = [bridge(_ids(7))]
        assert graphs.early_dropped == 1 and graphs.model_replays == 2
        got.append(bridge(_ids(7)))
        assert graphs.early_dropped == 1 and graphs.model_replays == 2
        expected = ref(_ids(7))
        assert not torch.allclose(expected, plain)
        for g in got:
            torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-4)
        for b in (bridge, ref):
            del b.blocks[1].mlp.hook_out._forward_hooks[-1]
        for _ in range(2):
            torch.testing.assert_close(bridge(_ids(7)), plain, rtol=1e-4, atol=1e-4)
    assert graphs.early_dropped == 1 and graphs.model_replays == 4


def test_patched_model_hook_without_a_handle_drops_the_early_replay(emulated):
    """The same on a patched HF model (no bridge gate): a decoder-layer hook put into its dict is found after the
    launch and the call runs eagerly with it."""
    ref, model, graphs = _graphed("tiny-ple-kv-shared")
    ids = _ids(0)

    def halve(module, args, output):
        return (output[0] * 0.5,) + tuple(output[1:]) if isinstance(output, tuple) else output * 0.5

    with torch.no_grad():
        for _ in range(3):
            model(ids, use_cache=False)
        assert graphs.model_replays == 2
        for m in (model, ref):
            m.model.layers[2]._forward_hooks[-1] = halve
        got = model(ids, use_cache=False).logits
        assert graphs.early_dropped == 1 and graphs.model_replays == 2
        want = ref(ids, use_cache=False).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        for m in (model, ref):
            del m.model.layers[2]._forward_hooks[-1]
        assert not torch.allclose(want, ref(ids, use_cache=False).logits)
