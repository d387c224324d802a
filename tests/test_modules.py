"""Fast Gemma 4 modules vs HF: RMSNorm, router, experts, attention (masks, seams), on the CPU.

Models are the tiny presets (``gemma4_fast.models.build_model``), fp32, ``backend="torch"`` unless a
test says otherwise. Padded positions are excluded from comparisons: HF's additive mask spreads a
fully masked query row uniformly, the ops give it zeros.
"""
from __future__ import annotations

import copy

import pytest
import torch

from gemma4_fast import hooks, ops
from gemma4_fast.kernels._common import interpret_mode
from gemma4_fast.attention import attention_core
from gemma4_fast.models import build_model
from gemma4_fast.modules import (FastGemma4RMSNorm, FastGemma4TextAttention, FastGemma4TextExperts,
                                 FastGemma4TextRouter)
from gemma4_fast.patch import patch_model
from _inputs import left_padded

from transformers import AttentionInterface
from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm, repeat_kv

RTOL = 1e-4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _inputs(batch: int, seq: int, pads=(0, 3, 6), seed: int = 1):
    return left_padded(batch, seq, pads, seed)


@pytest.fixture(scope="module")
def moe_pair():
    ref = build_model("tiny-moe")
    fast = copy.deepcopy(ref)
    patch_model(fast, backend="torch")
    return ref, fast


@pytest.fixture(scope="module")
def ple_pair():
    ref = build_model("tiny-ple-kv-shared")
    fast = copy.deepcopy(ref)
    patch_model(fast, backend="torch")
    return ref, fast


# ---------------------------------------------------------------------------------------------
# RMSNorm
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("with_scale", [True, False])
@pytest.mark.parametrize("shape", [(3, 7, 37), (2, 5, 3, 24)])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rmsnorm_matches_hf(with_scale, shape, backend):
    hf = Gemma4RMSNorm(shape[-1], eps=1e-6, with_scale=with_scale)
    if with_scale:
        torch.nn.init.normal_(hf.weight)
    fast = copy.deepcopy(hf)
    fast.__class__ = FastGemma4RMSNorm
    fast._g4f_backend = backend
    x = torch.randn(shape)
    with torch.no_grad():
        assert rel_err(fast(x), hf(x)) <= RTOL


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_rmsnorm_seams_shapes_and_edits(backend):
    if backend == "triton" and not interpret_mode():
        pytest.skip("the triton backend on CPU needs TRITON_INTERPRET=1")
    hf = Gemma4RMSNorm(29, eps=1e-6)
    torch.nn.init.normal_(hf.weight)
    fast = copy.deepcopy(hf)
    fast.__class__ = FastGemma4RMSNorm
    fast._g4f_backend = backend
    x = torch.randn(2, 5, 29)
    seen = {}

    def scale_hook(t):
        seen["scale"] = (t.shape, t.dtype)
        return t * 2

    def normalized_hook(t):
        seen["normalized"] = (t.shape, t.dtype)
        return t + 0.5

    hooks.set_hooks(fast, scale=scale_hook)
    assert rel_err(fast(x), 2 * hf(x)) <= RTOL
    assert seen["scale"] == (torch.Size([2, 5, 1]), torch.float32)
    hooks.set_hooks(fast, scale=None, normalized=normalized_hook)
    ref = (hf._norm(x.float()) + 0.5) * hf.weight.float()
    assert rel_err(fast(x), ref) <= RTOL
    assert seen["normalized"] == (torch.Size([2, 5, 29]), torch.float32)
    hooks.set_hooks(fast, scale=scale_hook, normalized=normalized_hook)
    assert rel_err(fast(x), (2 * hf._norm(x.float()) + 0.5) * hf.weight.float()) <= RTOL
    got = {}
    hooks.set_hooks(fast, scale=lambda t: got.setdefault("s", t), normalized=lambda t: got.setdefault("n", t))
    with torch.no_grad():  # the weight requires grad: with autograd on, the hooked path runs the naive op
        observed = fast(x)
        hooks.clear_hooks(fast)
        assert torch.equal(observed, fast(x)), "observing hooks must keep the unhooked output"
    assert torch.equal(got["n"], x.float() * got["s"]), "hook_normalized must be x.float() * hook_scale"
    assert rel_err(fast(x), hf(x)) <= RTOL


# ---------------------------------------------------------------------------------------------
# Router and experts
# ---------------------------------------------------------------------------------------------

def test_router_and_experts_match_hf(moe_pair):
    ref, fast = moe_pair
    r_hf, r_fast = ref.model.layers[1].router, fast.model.layers[1].router
    e_hf, e_fast = ref.model.layers[1].experts, fast.model.layers[1].experts
    assert isinstance(r_fast, FastGemma4TextRouter) and isinstance(e_fast, FastGemma4TextExperts)
    x = torch.randn(19, ref.config.hidden_size)
    with torch.no_grad():
        p0, w0, i0 = r_hf(x)
        p1, w1, i1 = r_fast(x)
        assert torch.equal(i0, i1)
        assert rel_err(p1, p0) <= RTOL and rel_err(w1, w0) <= RTOL
        assert rel_err(e_fast(x, i0, w0), e_hf(x, i0, w0)) <= RTOL


def test_router_seams_flow_into_experts(moe_pair):
    ref, fast = moe_pair
    ids, am = _inputs(2, 9)
    layer = 2
    num_experts = ref.config.num_experts

    def edit_index(idx):
        return (idx + 1) % num_experts

    def edit_weights(w):
        return w * torch.tensor([1.5, 0.25])

    def hf_edit(module, args, out):
        probs, w, idx = out
        return probs, edit_weights(w), edit_index(idx)

    seen = {}

    def probs_hook(p):
        seen["probs"] = (p.shape, p.dtype)
        return p

    handle = ref.model.layers[layer].router.register_forward_hook(hf_edit)
    router = fast.model.layers[layer].router
    hooks.set_hooks(router, probs=probs_hook, top_k_weights=edit_weights, top_k_index=edit_index)
    try:
        with torch.no_grad():
            want = ref(ids, attention_mask=am).logits
            got = fast(ids, attention_mask=am).logits
    finally:
        handle.remove()
        hooks.clear_hooks(router)
    real = am.bool()
    assert rel_err(got[real], want[real]) <= RTOL
    assert seen["probs"] == (torch.Size([18, num_experts]), torch.float32)


def test_expert_outputs_seam(moe_pair):
    _, fast = moe_pair
    experts = fast.model.layers[0].experts
    x = torch.randn(11, fast.config.hidden_size)
    with torch.no_grad():
        _, w, idx = fast.model.layers[0].router(x)
        plain = experts(x, idx, w)
        seen = []
        hooks.set_hooks(experts, expert_outputs=lambda t: seen.append(t) or torch.zeros_like(t))
        out = experts(x, idx, w)
        hooks.clear_hooks(experts)
    assert seen[0].shape == (11, fast.config.top_k_experts, fast.config.hidden_size)
    assert torch.equal(out, plain), "expert_outputs is observational"
    assert rel_err((seen[0] * w[..., None].to(x.dtype)).sum(1), plain) <= RTOL


# ---------------------------------------------------------------------------------------------
# Attention: seams
# ---------------------------------------------------------------------------------------------

def _eager_with_edits(scores_edit=None, pattern_edit=None, layer=0):
    """An unfused eager attention function that applies the edits at ``layer`` (test reference)."""

    def fn(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kwargs):
        k = repeat_kv(key, module.num_key_value_groups)
        v = repeat_kv(value, module.num_key_value_groups)
        s = torch.matmul(query, k.transpose(2, 3)) * scaling
        if attention_mask is not None:
            s = s + attention_mask[..., : k.shape[-2]]
        if scores_edit is not None and module.layer_idx == layer:
            s = scores_edit(s)
        p = torch.softmax(s, dim=-1, dtype=torch.float32).to(query.dtype)
        if pattern_edit is not None and module.layer_idx == layer:
            p = pattern_edit(p)
        return torch.matmul(p, v).transpose(1, 2).contiguous(), p

    return fn


def _ref_logits(ref, fn, ids, am):
    AttentionInterface.register("g4f_test_eager_edit", fn)
    model = copy.deepcopy(ref)
    model.config._attn_implementation = "g4f_test_eager_edit"
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    AttentionMaskInterface.register("g4f_test_eager_edit", eager_mask)
    with torch.no_grad():
        return model(ids, attention_mask=am).logits


def _zero_head(p):
    p = p.clone()
    p[:, 1] = 0
    return p


def _halve_head(s):
    s = s.clone()
    s[:, 2] = s[:, 2] * 0.5
    return s


@pytest.mark.parametrize("seam", ["pattern", "scores", "pattern_fn"])
def test_attention_edits_match_eager(ple_pair, seam):
    ref, fast = ple_pair
    ids, am = _inputs(3, 11)
    layer = 0
    attn = fast.model.layers[layer].self_attn
    if seam == "scores":
        want = _ref_logits(ref, _eager_with_edits(scores_edit=_halve_head, layer=layer), ids, am)
        hooks.set_hooks(attn, scores=_halve_head)
    else:
        want = _ref_logits(ref, _eager_with_edits(pattern_edit=_zero_head, layer=layer), ids, am)
        if seam == "pattern":
            hooks.set_hooks(attn, pattern=_zero_head)
    handle = None
    if seam == "pattern_fn":
        handle = attn.register_forward_pre_hook(
            lambda m, args, kwargs: (args, {**kwargs, "pattern_fn": _zero_head}), with_kwargs=True)
    try:
        with torch.no_grad():
            got = fast(ids, attention_mask=am).logits
    finally:
        hooks.clear_hooks(attn)
        if handle is not None:
            handle.remove()
    real = am.bool()
    assert rel_err(got[real], want[real]) <= RTOL
    with torch.no_grad():
        plain = fast(ids, attention_mask=am).logits
    assert (plain[real] - got[real]).abs().max() > 1e-3, "the edit must change the output"


def test_attention_seam_shapes(ple_pair):
    _, fast = ple_pair
    ids, am = _inputs(2, 9)
    cfg = fast.config
    shapes = {}

    def rec(name):
        def fn(t):
            shapes.setdefault(name, []).append(tuple(t.shape))
            return t
        return fn

    attns = [fast.model.layers[i].self_attn for i in (0, 4, 9)]
    for a in attns:
        hooks.set_hooks(a, **{n: rec(f"{a.layer_idx}:{n}") for n in ("rot_q", "rot_k", "scores", "pattern")})
    try:
        with torch.no_grad():
            fast(ids, attention_mask=am)
    finally:
        for a in attns:
            hooks.clear_hooks(a)
    h = cfg.num_attention_heads
    d_local, d_global = attns[0].head_dim, fast.model.layers[4].self_attn.head_dim
    assert d_local != d_global
    assert shapes["0:rot_q"] == [(2, 9, h, d_local)]
    assert shapes["0:rot_k"] == [(2, 9, 1, d_local)]
    assert shapes["0:scores"] == [(2, h, 9, 9)] and shapes["0:pattern"] == [(2, h, 9, 9)]
    assert shapes["4:rot_q"] == [(2, 9, h, d_global)]
    assert "9:rot_k" not in shapes, "a KV-shared layer computes no keys"
    assert shapes["9:pattern"] == [(2, h, 9, 9)]


def test_no_seam_no_quadratic_tensor(ple_pair, monkeypatch):
    _, fast = ple_pair
    ids, am = _inputs(3, 10)

    def forbidden(*args, **kwargs):
        raise AssertionError("an O(S^2) op ran without an active seam")

    for name in ("attention_scores", "attention_pattern", "softmax_scores", "pattern_apply"):
        monkeypatch.setattr(ops, name, forbidden)
    from transformer_lens.hook_points import HookPoint
    idle = HookPoint()
    hooks.set_hooks(fast.model.layers[0].self_attn, scores=idle, pattern=idle)
    masks = []
    handle = fast.model.layers[0].self_attn.register_forward_pre_hook(
        lambda m, args, kwargs: masks.append(kwargs.get("attention_mask")), with_kwargs=True)
    try:
        with torch.no_grad():
            fast(ids, attention_mask=am)
    finally:
        handle.remove()
        hooks.clear_hooks(fast.model.layers[0].self_attn)
    assert masks[0].shape == (3, 1, 1, 10) and masks[0].dtype == torch.bool


def test_output_attentions_matches_eager(ple_pair):
    ref, fast = ple_pair
    ids, am = _inputs(3, 10)
    with torch.no_grad():
        want = ref(ids, attention_mask=am, output_attentions=True).attentions
        got = fast(ids, attention_mask=am, output_attentions=True).attentions
    assert len(got) == len(want) == fast.config.num_hidden_layers
    real = am.bool()
    for g, w in zip(got, want):
        assert g.shape == w.shape
        assert rel_err(g.permute(0, 2, 1, 3)[real], w.permute(0, 2, 1, 3)[real]) <= RTOL


# ---------------------------------------------------------------------------------------------
# Attention: masks
# ---------------------------------------------------------------------------------------------

def _qkv(b=2, hq=4, hkv=2, sq=7, sk=7, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, sq, d, generator=g), torch.randn(b, hkv, sk, d, generator=g),
            torch.randn(b, hkv, sk, d, generator=g))


def _eager(q, k, v, keep):
    n = q.shape[1] // k.shape[1]
    s = torch.matmul(q, repeat_kv(k, n).transpose(2, 3)) * q.shape[-1] ** -0.5
    s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return torch.matmul(p, repeat_kv(v, n))


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("float_mask", [False, True])
def test_4d_causal_mask_takes_verified_fast_path(window, float_mask, monkeypatch):
    q, k, v = _qkv(sq=5, sk=9)
    kpm = torch.ones(2, 9, dtype=torch.bool)
    kpm[1, :3] = False
    pos = torch.arange(5) + 4
    diff = pos[:, None] - torch.arange(9)[None]
    vis = (diff >= 0) & ((diff < window) if window else True)
    keep = vis[None, None] & kpm[:, None, None, :]
    mask = torch.where(keep, 0.0, torch.finfo(torch.float32).min) if float_mask else keep
    calls = []
    real_attention = ops.attention
    monkeypatch.setattr(ops, "attention", lambda *a, **kw: calls.append(kw) or real_attention(*a, **kw))
    out, _ = attention_core(q, k, v, mask, scale=24 ** -0.5, window=window, softcap=None, causal=True,
                            backend="torch")
    assert calls and calls[0]["key_padding_mask"] is not None
    want = _eager(q, k, v, keep)
    assert rel_err(out[1, :, 1:], want[1, :, 1:]) <= RTOL and rel_err(out[0], want[0]) <= RTOL


def test_4d_block_mask_takes_explicit_path():
    q, k, v = _qkv(sq=8, sk=8)
    keep = torch.ones(8, 8).tril().bool()
    keep[2:5, 2:5] = True
    keep = keep[None, None].expand(2, 1, 8, 8)
    out, w = attention_core(q, k, v, keep, scale=24 ** -0.5, window=None, softcap=None, causal=True,
                            backend="torch", want_weights=True)
    assert rel_err(out, _eager(q, k, v, keep)) <= RTOL
    assert w.shape == (2, 4, 8, 8) and w[0, 0, 2, 4] > 0


def test_static_buffer_cut_by_kpm_length():
    q, k, v = _qkv(sq=3, sk=12)
    kpm = torch.ones(2, 1, 1, 8, dtype=torch.bool)
    kpm[0, ..., :2] = False
    out, _ = attention_core(q, k, v, kpm, scale=24 ** -0.5, window=4, softcap=None, causal=True, backend="torch")
    pos = torch.arange(3) + 5
    diff = pos[:, None] - torch.arange(8)[None]
    keep = ((diff >= 0) & (diff < 4))[None, None] & kpm[:, :, :, :8]
    assert rel_err(out, _eager(q, k[:, :, :8], v[:, :, :8], keep)) <= RTOL


def test_bad_mask_shape_raises():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="attention_mask"):
        attention_core(q, k, v, torch.ones(2, 7, 7, dtype=torch.bool), scale=1.0, window=None, softcap=None,
                       causal=True, backend="torch")


def test_fast_attention_class_flags():
    assert FastGemma4TextAttention.accepts_pattern_fn is True
