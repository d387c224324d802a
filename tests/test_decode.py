"""``gemma4_fast.generate``: preallocated-cache decode (CUDA-graph replay on the GPU) against HF ``generate``.

CPU: the attention kernel's device key lengths (``kv_lens``) under the Triton interpreter against the
reference cut per row; greedy generation of patched tiny models (torch backend; one preset on the Triton
backend under the interpreter) token for token equal to HF ``generate`` with left-padded batches; EOS
handling; sampling's distribution; the errors. GPU (``cuda``): graph replay equal to eager steps and to HF.
"""
from __future__ import annotations

import copy

import pytest
import torch

from gemma4_fast.decode import DecodeCache, Decoder, SamplingConfig, generate, pick_tokens
from gemma4_fast.kernels._common import interpret_mode
from gemma4_fast.kernels.attention import api, attention
from gemma4_fast.kernels.attention.naive import attention_naive
from gemma4_fast.models import build_model, unified_available
from gemma4_fast.patch import patch_model
from _inputs import left_padded, patched_copy, tiny_conditional_generation

PRESETS = ["tiny-ple-kv-shared", "tiny-dense-k-eq-v", "tiny-moe"] + (["tiny-unified"] if unified_available() else [])
SPLIT_TILE = '{"BLOCK_N": 16, "num_warps": 4, "num_stages": 1}'


def _prompt(batch: int = 3, seq: int = 9, pads=(0, 3, 6), seed: int = 5):
    return left_padded(batch, seq, pads, seed)


def _hf_generate(model, ids, am, new, **kw):
    kw = {**dict(max_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None), **kw}
    with torch.no_grad():
        return model.generate(ids, attention_mask=am, **kw)


@pytest.fixture(scope="module")
def models():
    return {p: build_model(p) for p in PRESETS}


@pytest.fixture(params=[SPLIT_TILE, SPLIT_TILE[:-1] + ', "KEYS_AS_ROWS": 1}'], ids=["split", "keys_as_rows"])
def split_kernel(monkeypatch, request):
    if not interpret_mode():
        pytest.skip("CPU kernel tests need TRITON_INTERPRET=1 (set by conftest without a GPU)")
    monkeypatch.setenv("GEMMA4_FAST_ATTN_SPLIT_CONFIG", request.param)
    monkeypatch.setattr(api, "_new_empty", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                      device=device))


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("sq", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kv_lens_kernel_matches_reference(split_kernel, window, sq, dtype):
    torch.manual_seed(0)
    B, Hq, Hkv, L, D = 3, 4, 2, 45, 24
    q, k, v = (torch.randn(B, h, s, D).to(dtype) for h, s in ((Hq, sq), (Hkv, L), (Hkv, L)))
    lens = torch.tensor([sq + 2, 19, L], dtype=torch.int32)
    kpm = torch.ones(B, L, dtype=torch.bool)
    kpm[1, :4] = False
    o, lse = attention(q, k, v, scale=0.3, window=window, softcap=20.0, key_padding_mask=kpm, kv_lens=lens,
                       return_lse=True)
    for b in range(B):
        n = int(lens[b])
        r, rl = attention_naive(q[b:b + 1].double(), k[b:b + 1, :, :n].double(), v[b:b + 1, :, :n].double(),
                                scale=0.3, window=window, softcap=20.0, key_padding_mask=kpm[b:b + 1, :n],
                                return_lse=True)
        tol = 1e-4 if dtype == torch.float32 else 2e-3
        torch.testing.assert_close(o[b:b + 1].double(), r, rtol=tol, atol=tol)
        torch.testing.assert_close(lse[b:b + 1].double(), rl, rtol=tol, atol=tol)
    naive = attention_naive(q.double(), k.double(), v.double(), scale=0.3, window=window, softcap=20.0,
                            key_padding_mask=kpm, kv_lens=lens)
    torch.testing.assert_close(o.double(), naive, rtol=2e-3, atol=2e-3)


def test_kv_lens_validation():
    q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 1, 10, 8)
    with pytest.raises(ValueError, match="kv_lens must be int32"):
        attention(q, k, k, kv_lens=torch.tensor([3]))
    with pytest.raises(ValueError, match=r"kv_lens must be a \[B=1\]"):
        attention(q, k, k, kv_lens=torch.tensor([3, 4], dtype=torch.int32))
    q_long = torch.randn(1, 2, 40, 8)
    k_long = torch.randn(1, 1, 40, 8)
    with pytest.raises(ValueError, match="only supported on the decode path"):
        attention(q_long, k_long, k_long, kv_lens=torch.tensor([40], dtype=torch.int32))


@pytest.mark.parametrize("preset", PRESETS)
def test_greedy_matches_hf(models, preset):
    ref = models[preset]
    fast = copy.deepcopy(ref)
    patch_model(fast, backend="torch")
    ids, am = _prompt()
    want = _hf_generate(ref, ids, am, 32)
    got = generate(fast, ids, am, max_new_tokens=32)
    assert got.shape == want.shape == (3, 9 + 32)
    assert torch.equal(got, want)
    again = generate(fast, ids[:, 2:], am[:, 2:], max_new_tokens=20)
    assert torch.equal(again, _hf_generate(ref, ids[:, 2:], am[:, 2:], 20))


def test_conditional_generation_text_only():
    """``Gemma4ForConditionalGeneration``: only the language model is patched (the vision tower stays HF) and
    text-only generation equals HF's."""
    ref = tiny_conditional_generation("tiny-ple-kv-shared")
    model = copy.deepcopy(ref)
    patch_model(model, backend="torch")
    ids, am = _prompt()
    assert torch.equal(generate(model, ids, am, max_new_tokens=12), _hf_generate(ref, ids, am, 12))


def test_greedy_matches_hf_triton_interpreter(models, monkeypatch):
    if not interpret_mode():
        pytest.skip("needs TRITON_INTERPRET=1 (set by conftest without a GPU)")
    for key, val in {"GEMMA4_FAST_ATTN_SPLIT_CONFIG": SPLIT_TILE,
                     "GEMMA4_FAST_ATTN_CONFIG": '{"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}'
                     }.items():
        monkeypatch.setenv(key, val)
    ref = models["tiny-dense-k-eq-v"]
    fast = copy.deepcopy(ref)
    report = patch_model(fast, backend="triton")
    assert not report.left_on_hf, str(report)
    ids, am = _prompt(seq=7, pads=(0, 2, 4))
    assert torch.equal(generate(fast, ids, am, max_new_tokens=10), _hf_generate(ref, ids, am, 10))


def test_eos_ends_rows_like_hf(models):
    ref = models["tiny-moe"]
    fast = copy.deepcopy(ref)
    patch_model(fast, backend="torch")
    ids, am = _prompt()
    free = _hf_generate(ref, ids, am, 24)
    eos = int(free[1, 9 + 4])
    want = _hf_generate(ref, ids, am, 24, eos_token_id=eos, pad_token_id=1)
    got = generate(fast, ids, am, max_new_tokens=24, eos_token_id=eos, pad_token_id=1)
    assert torch.equal(got, want)
    assert (got[1, 9 + 5:] == 1).all()
    every = sorted({int(t) for t in free[:, 9 + 2]})
    want = _hf_generate(ref, ids, am, 24, eos_token_id=every, pad_token_id=1)
    got = generate(fast, ids, am, max_new_tokens=24, eos_token_id=every, pad_token_id=1)
    assert got.shape[1] < 9 + 24
    assert torch.equal(got, want)


def test_pick_tokens_distribution():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0, 1.5]]).repeat(20000, 1)
    greedy = pick_tokens(logits, SamplingConfig())
    assert (greedy == 0).all()
    assert (pick_tokens(logits, SamplingConfig(True, 1.0, top_k=1)) == 0).all()
    for temperature, top_k, top_p in ((1.0, None, None), (0.7, 3, None), (1.3, None, 0.8)):
        cfg = SamplingConfig(True, temperature, top_k, top_p)
        got = torch.bincount(pick_tokens(logits, cfg), minlength=6).double() / logits.shape[0]
        s = logits[0].double() / temperature
        if top_k is not None:
            s = s.masked_fill(s < torch.topk(s, top_k).values[-1], float("-inf"))
        if top_p is not None:
            p = s.softmax(-1)
            order = torch.argsort(p, descending=True)
            keep = torch.zeros(6, dtype=torch.bool)
            cum = 0.0
            for i in order.tolist():
                keep[i] = True
                cum += float(p[i])
                if cum >= top_p:
                    break
            s = s.masked_fill(~keep, float("-inf"))
        want = s.softmax(-1)
        assert (got[want == 0] == 0).all(), (got, want)
        assert (got - want).abs().max() < 0.015, (got, want)


def test_sampling_runs_and_is_reproducible(models):
    fast = copy.deepcopy(models["tiny-moe"])
    patch_model(fast, backend="torch")
    ids, am = _prompt()
    torch.manual_seed(3)
    a = generate(fast, ids, am, max_new_tokens=12, do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    torch.manual_seed(3)
    b = generate(fast, ids, am, max_new_tokens=12, do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    assert torch.equal(a, b) and a.shape == (3, 21)
    assert torch.equal(a[:, :9], ids)


def test_model_changes_drop_the_captured_state(models):
    """A dtype change (new parameter storage) or a re-patch must not reuse graphs, runners or the cache."""
    fast = copy.deepcopy(models["tiny-moe"])
    patch_model(fast, backend="torch")
    ids, am = _prompt()
    first = generate(fast, ids, am, max_new_tokens=6)
    decoder = fast._g4f_decoder
    cache = decoder.cache
    assert torch.equal(generate(fast, ids, am, max_new_tokens=6), first) and decoder.cache is cache
    fast.to(torch.float64)
    again = generate(fast, ids, am, max_new_tokens=6)
    assert decoder.cache is not cache and again.shape == first.shape
    assert all(b.dtype == torch.float64 for b in decoder.cache.keys.values())


def test_errors(models):
    ref = models["tiny-moe"]
    ids, am = _prompt()
    with pytest.raises(ValueError, match="patched with gemma4_fast.patch_model"):
        generate(copy.deepcopy(ref), ids, am)
    fast = copy.deepcopy(ref)
    patch_model(fast, backend="torch")
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(fast, ids, am, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        generate(fast, ids, am, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="cuda_graph=True"):
        generate(fast, ids, am, max_new_tokens=3, cuda_graph=True)
    cache = DecodeCache(1, 4, torch.device("cpu"))
    with pytest.raises(ValueError, match="holds 4 positions"):
        cache.update(torch.zeros(1, 1, 5, 2), torch.zeros(1, 1, 5, 2), 0)


def test_hooked_model_runs_eagerly(models):
    fast = copy.deepcopy(models["tiny-moe"])
    patch_model(fast, backend="torch")
    seen = []
    handle = fast.model.layers[1].register_forward_hook(lambda m, i, o: seen.append(
        (o if isinstance(o, torch.Tensor) else o[0]).shape[1]))
    ids, am = _prompt()
    out = generate(fast, ids, am, max_new_tokens=5)
    mode, why = Decoder(fast).mode("auto", torch.device("cuda"))
    handle.remove()
    assert seen == [9, 1, 1, 1, 1]
    assert mode == "layers" and "model.layers.1" in why
    assert Decoder(fast).mode("auto", torch.device("cuda")) == ("graph", "")
    assert Decoder(fast).mode("auto", torch.device("cpu"))[0] == "eager"
    assert torch.equal(out, generate(fast, ids, am, max_new_tokens=5))


def _recording_hooks(model, layers):
    seen = {i: [] for i in layers}
    handles = [model.model.layers[i].register_forward_hook(
        lambda m, a, o, _i=i: seen[_i].append((o if isinstance(o, torch.Tensor) else o[0])[:, -1].clone()))
        for i in layers]
    return seen, handles


@pytest.mark.parametrize("preset,hooked", [("tiny-ple-kv-shared", (1,)), ("tiny-ple-kv-shared", (8,)),
                                           ("tiny-ple-kv-shared", (0, 9)), ("tiny-moe", (3,))])
def test_layer_mode_plumbing_emulated(models, monkeypatch, preset, hooked):
    """Layer mode (hooks attached): unhooked layers replay 'graphs' (emulated on the CPU: static buffers,
    capture-time Python state), hooked ones run eagerly; tokens equal HF's, hooks see the eager values."""
    from gemma4_fast import decode

    ref = models[preset]
    fast = copy.deepcopy(ref)
    patch_model(fast, backend="torch")
    ids, am = _prompt()
    want = _hf_generate(ref, ids, am, 12)
    seen_eager, handles = _recording_hooks(fast, hooked)
    eager = generate(fast, ids, am, max_new_tokens=12, cuda_graph=False)
    for h in handles:
        h.remove()
    monkeypatch.setattr(decode._LayerGraph, "emulate", True)
    seen, handles = _recording_hooks(fast, hooked)
    got = generate(fast, ids, am, max_new_tokens=12)
    decoder = fast._g4f_decoder
    assert decoder.mode("auto", torch.device("cpu"))[0] == "layers"
    assert len(decoder.runners) == len(fast.model.layers) - len(hooked)
    assert all("forward" not in layer.__dict__ for layer in fast.model.layers)
    for h in handles:
        h.remove()
    assert torch.equal(eager, want) and torch.equal(got, want)
    for i in hooked:
        assert len(seen[i]) == len(seen_eager[i]) == 12
        for a, b in zip(seen[i], seen_eager[i]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("preset", ["tiny-ple-kv-shared", "tiny-moe", "tiny-dense-k-eq-v"])
def test_cuda_graph_matches_eager_and_hf(preset):
    ref, fast, report = patched_copy(preset, "cuda", "triton")
    assert not report.left_on_hf, str(report)
    ids, am = _prompt()
    ids, am = ids.cuda(), am.cuda()
    want = _hf_generate(ref, ids, am, 40)
    eager = generate(fast, ids, am, max_new_tokens=40, cuda_graph=False)
    graphed = generate(fast, ids, am, max_new_tokens=40, cuda_graph=True)
    decoder = fast._g4f_decoder
    assert decoder.graph is not None
    assert torch.equal(graphed, eager)
    assert torch.equal(graphed, want)
    graph = decoder.graph
    assert torch.equal(generate(fast, ids, am, max_new_tokens=40, cuda_graph=True), want)
    assert decoder.graph is graph


@pytest.mark.cuda
def test_cuda_graph_bf16_e2b_shapes_follow_eager():
    """bf16 on a 4-layer cut of E2B (head_dim 256/512, KV sharing off): the graph replays the eager steps."""
    model = build_model("E2B", torch.bfloat16, "cuda", num_hidden_layers=4)
    patch_model(model, backend="triton")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 260, (2, 300), generator=g).cuda()
    am = torch.ones_like(ids)
    am[1, :17] = 0
    eager = generate(model, ids, am, max_new_tokens=24, cuda_graph=False)
    graphed = generate(model, ids, am, max_new_tokens=24, cuda_graph=True)
    assert torch.equal(graphed, eager)
