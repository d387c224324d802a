"""Attention kernels vs the PyTorch reference (fp64), HF's eager attention, and torch bf16 eager.

CPU tests run the Triton kernels through the interpreter (fp32 / fp16, tiny shapes, small pinned
tiles so several key blocks, band edges and the masked/unmasked split are exercised). GPU tests
(``-m cuda``) cover bf16 with the three-way rule, head_dim up to 512, long decode and a hypothesis
fuzz over shapes. Every output buffer is NaN-poisoned (the allocator is replaced) so an unwritten
element fails.
"""
from __future__ import annotations

import math

import pytest
import torch

from gemma4_fast.kernels import attention as A
from gemma4_fast.kernels._common import interpret_mode
from gemma4_fast.kernels.attention import api

CPU_TILES = {
    "GEMMA4_FAST_ATTN_CONFIG": '{"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}',
    "GEMMA4_FAST_ATTN_SPLIT_CONFIG": '{"BLOCK_N": 16, "num_warps": 4, "num_stages": 1}',
    "GEMMA4_FAST_ATTN_SCORES_CONFIG": '{"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_DK": 32, "num_warps": 4, "num_stages": 1}',
}


@pytest.fixture
def poison(monkeypatch):
    """NaN-fill every buffer the ops allocate."""
    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(api, "_new_empty", nan_empty)


@pytest.fixture
def cpu_kernels(monkeypatch, poison):
    if not interpret_mode():
        pytest.skip("CPU kernel tests need TRITON_INTERPRET=1 (set by conftest without a GPU)")
    for k, v in CPU_TILES.items():
        monkeypatch.setenv(k, v)


def make_inputs(B, Hq, Hkv, Sq, Sk, D, *, dtype=torch.float32, device="cpu", pad=None, kv_same=False,
                bshd=True, gen=None):
    """q/k/v as HF hands them (``.transpose(1, 2)`` views of ``[B, S, H, D]``), plus a padding mask.

    ``pad``: list of per-batch left-padding lengths (``>= Sk`` pads every key of that row).
    """
    def t(h, s):
        if bshd:
            return torch.randn(B, s, h, D, dtype=dtype, device=device, generator=gen).transpose(1, 2)
        return torch.randn(B, h, s, D, dtype=dtype, device=device, generator=gen)
    q, k = t(Hq, Sq), t(Hkv, Sk)
    v = k if kv_same else t(Hkv, Sk)
    kpm = None
    if pad is not None:
        kpm = torch.ones(B, Sk, dtype=torch.bool, device=device)
        for b, n in enumerate(pad):
            kpm[b, :min(n, Sk)] = False
    return q, k, v, kpm


def ref64(q, k, v, **kw):
    return A.attention_naive(q.double(), k.double(), v.double(), return_lse=True, **kw)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_lse(lse, rlse, tol):
    assert lse.dtype == torch.float32
    assert torch.equal(torch.isneginf(lse), torch.isneginf(rlse)), "empty-row pattern of lse differs"
    fin = torch.isfinite(rlse)
    assert not torch.isnan(lse).any()
    if fin.any():
        assert (lse[fin].double() - rlse[fin]).abs().max().item() <= tol


# (B, Hq, Hkv, Sq, Sk, D, window, softcap, causal, pad, kv_same)
CPU_CASES = [
    (1, 2, 1, 63, 63, 64, None, None, True, None, False),
    (1, 2, 2, 129, 129, 64, 1, None, True, None, False),
    (1, 4, 2, 129, 129, 64, 40, None, True, None, False),
    (2, 2, 1, 63, 63, 128, 200, 50.0, True, None, False),
    (2, 8, 1, 7, 70, 64, 17, None, True, [0, 30], False),
    (2, 2, 2, 63, 63, 64, None, None, True, [5, 80], True),
    (1, 2, 1, 37, 100, 64, 33, 50.0, True, [11], False),
    (1, 2, 2, 45, 45, 64, None, None, False, None, False),
    (2, 2, 1, 33, 50, 64, 9, None, False, [0, 20], False),
    (2, 8, 1, 1, 129, 64, None, None, True, [0, 40], False),
    (1, 8, 2, 1, 200, 128, 64, 50.0, True, None, False),
    (2, 2, 1, 3, 90, 64, 30, None, True, [0, 95], True),
]


@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: "B{}H{}-{}S{}x{}D{}w{}c{}{}p{}kv{}".format(*c))
def test_attention_cpu_fp32(cpu_kernels, case):
    B, Hq, Hkv, Sq, Sk, D, window, softcap, causal, pad, kv_same = case
    q, k, v, kpm = make_inputs(B, Hq, Hkv, Sq, Sk, D, pad=pad, kv_same=kv_same)
    kw = dict(window=window, softcap=softcap, causal=causal, key_padding_mask=kpm)
    o, lse = A.attention(q, k, v, return_lse=True, **kw)
    ro, rlse = ref64(q, k, v, **kw)
    assert o.shape == (B, Hq, Sq, D) and o.dtype == q.dtype
    assert o.transpose(1, 2).is_contiguous(), "o must view a [B, Sq, Hq, D]-contiguous buffer"
    assert not torch.isnan(o).any()
    assert rel(o, ro) <= 1e-4
    check_lse(lse, rlse, 1e-4)
    assert rel(o, A.attention_naive(q, k, v, **kw)) <= 1e-4
    o2 = A.attention(q, k, v, **kw)
    assert torch.equal(o2, o)


@pytest.mark.parametrize("tma", [0, 1])
def test_attention_cpu_dv_split(cpu_kernels, monkeypatch, tma):
    """Output columns split over programs (``BLOCK_DV``), including a ragged last chunk (D=48), with pointer loads
    and with tensor descriptors (zero-filled reads past the head dim, clipped writes)."""
    monkeypatch.setenv("GEMMA4_FAST_ATTN_CONFIG",
                       '{"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_DV": 32, "num_warps": 4, "num_stages": 1, "TMA": %d}' % tma)
    for D, kv_same in ((64, True), (48, False)):
        q, k, v, kpm = make_inputs(2, 4, 2, 40, 40, D, pad=[0, 12], kv_same=kv_same)
        kw = dict(window=13, softcap=50.0, key_padding_mask=kpm)
        o, lse = A.attention(q, k, v, return_lse=True, **kw)
        ro, rlse = ref64(q, k, v, **kw)
        assert rel(o, ro) <= 1e-4
        check_lse(lse, rlse, 1e-4)


@pytest.mark.parametrize("order", [0, 1])
def test_attention_cpu_launch_orders(cpu_kernels, monkeypatch, order):
    """Both launch orders (``HEADS_INNER``: every head's heaviest query block first, or one head after another)
    write every output, with and without the column split; the public op's default follows
    ``heads_inner_default``."""
    from gemma4_fast.kernels.attention import configs, fwd

    for dv in ("", ', "BLOCK_DV": 32'):
        monkeypatch.setenv("GEMMA4_FAST_ATTN_CONFIG", '{"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, '
                           '"num_stages": 1, "HEADS_INNER": %d%s}' % (order, dv))
        q, k, v, kpm = make_inputs(2, 6, 2, 37, 37, 64, pad=[0, 5])
        for kw in (dict(window=None, causal=True), dict(window=9, causal=True), dict(window=None, causal=False)):
            o, lse = A.attention(q, k, v, return_lse=True, key_padding_mask=kpm, **kw)
            ro, rlse = ref64(q, k, v, key_padding_mask=kpm, **kw)
            assert rel(o, ro) <= 1e-4
            check_lse(lse, rlse, 1e-4)
    seen = []
    real = fwd.attention_fwd
    monkeypatch.setattr(fwd, "attention_fwd", lambda *a, **kw: seen.append(kw["config"]["HEADS_INNER"]) or real(*a, **kw))
    monkeypatch.setenv("GEMMA4_FAST_ATTN_CONFIG", '{"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}')
    A.attention(q, k, v, window=None, causal=True)
    A.attention(q, k, v, window=9, causal=True)
    assert seen == [1, 0]
    assert configs.heads_inner_default(256, None, True, 4096) and not configs.heads_inner_default(512, None, True, 4096)
    assert not configs.heads_inner_default(256, None, True, 16384) and not configs.heads_inner_default(256, 512, True, 64)


TMA_CASES = [c for c in CPU_CASES if c[3] > 16]


@pytest.mark.parametrize("variant", ['"TMA": 1, "FOLD": 1', '"TMA": 1, "FOLD": 0', '"TMA": 0, "FOLD": 1'])
@pytest.mark.parametrize("case", TMA_CASES, ids=lambda c: "B{}H{}-{}S{}x{}D{}w{}c{}{}p{}kv{}".format(*c))
def test_attention_cpu_variants(cpu_kernels, monkeypatch, case, variant):
    """Kernel variants: the tensor-descriptor (copy engine) path and the pointer path, the scale fold on and off
    (inputs scaled along the sequence so the running max keeps moving)."""
    from gemma4_fast.kernels.attention import fwd
    made = []
    real = fwd.tma_descriptors
    monkeypatch.setattr(fwd, "tma_descriptors", lambda *a: made.append(real(*a)) or made[-1])
    monkeypatch.setenv("GEMMA4_FAST_ATTN_CONFIG", '{"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1, '
                       + variant + '}')
    B, Hq, Hkv, Sq, Sk, D, window, softcap, causal, pad, kv_same = case
    q, k, v, kpm = make_inputs(B, Hq, Hkv, Sq, Sk, D, pad=pad, kv_same=kv_same)
    q = q * torch.linspace(0.5, 3.0, Sq)[:, None]
    k = k * torch.linspace(0.2, 2.0, Sk)[:, None]
    kw = dict(window=window, softcap=softcap, causal=causal, key_padding_mask=kpm)
    o, lse = A.attention(q, k, v, return_lse=True, **kw)
    assert ('"TMA": 1' in variant) == bool(made) and all(d is not None for d in made)
    ro, rlse = ref64(q, k, v, **kw)
    assert not torch.isnan(o).any()
    assert rel(o, ro) <= 1e-4
    check_lse(lse, rlse, 1e-4)


def test_attention_cpu_tma_fallback(cpu_kernels, monkeypatch):
    """A tensor the copy engine cannot address (odd row stride) falls back to pointer loads."""
    from gemma4_fast.kernels.attention import fwd
    monkeypatch.setenv("GEMMA4_FAST_ATTN_CONFIG",
                       '{"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1, "TMA": 1}')
    base = torch.randn(1, 2, 33, 41)[..., :40]
    assert fwd.tma_descriptors((base, [16, 64])) is None
    q = torch.randn(1, 2, 33, 40)
    o = A.attention(q, base, base, window=9)
    assert rel(o, ref64(q, base, base, window=9)[0]) <= 1e-4


SPLIT_CASES = [c for c in CPU_CASES if c[3] <= 16]


@pytest.mark.parametrize("keys_as_rows", [0, 1])
@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda c: "B{}H{}-{}S{}x{}D{}w{}c{}{}p{}kv{}".format(*c))
def test_attention_cpu_split_combine_chunks(cpu_kernels, monkeypatch, case, keys_as_rows):
    """Decode path with many one-block splits and the combine kernel split over output columns: the split kernel with
    a combine that reads every split in one step, and the keys-as-rows decode kernel (``KEYS_AS_ROWS``) with a combine
    that walks the splits four at a time (``COMBINE_S``)."""
    extra = ', "KEYS_AS_ROWS": 1, "COMBINE_S": 4' if keys_as_rows else ""
    monkeypatch.setenv("GEMMA4_FAST_ATTN_SPLIT_CONFIG", '{"BLOCK_N": 16, "num_warps": 4, "num_stages": 1, '
                       f'"MIN_BLOCKS": 1, "MAX_SPLITS": 512, "COMBINE_D": 32{extra}}}')
    B, Hq, Hkv, Sq, Sk, D, window, softcap, causal, pad, kv_same = case
    q, k, v, kpm = make_inputs(B, Hq, Hkv, Sq, Sk, D, pad=pad, kv_same=kv_same)
    kw = dict(window=window, softcap=softcap, causal=causal, key_padding_mask=kpm)
    o, lse = A.attention(q, k, v, return_lse=True, **kw)
    ro, rlse = ref64(q, k, v, **kw)
    assert not torch.isnan(o).any()
    assert rel(o, ro) <= 1e-4
    check_lse(lse, rlse, 1e-4)


def test_attention_cpu_fp16_three_way(cpu_kernels):
    q, k, v, kpm = make_inputs(1, 4, 2, 63, 63, 64, dtype=torch.float16, pad=[9])
    kw = dict(window=20, key_padding_mask=kpm)
    o = A.attention(q, k, v, **kw)
    ro, _ = ref64(q, k, v, **kw)
    eager = A.attention_naive(q, k, v, **kw)
    three_way(o, eager, ro)


def three_way(fast, torch_lp, ref):
    """Rule 4: ``|fast - ref| <= 2 |torch_lp - ref| + atol`` elementwise, atol = 2**-7 * max|ref| (two
    bf16 ulps of the largest value: a diffuse decode row's output is a sum of hundreds of bf16-rounded
    products, so an element can sit a few ulps off where eager happens to land close), and the
    same rule on the whole tensor's norm with a 2**-9 relative slack."""
    fast, torch_lp, ref = fast.double(), torch_lp.double(), ref.double()
    assert not torch.isnan(fast).any()
    atol = 2 ** -7 * ref.abs().max().item() + 1e-6
    bad = (fast - ref).abs() > 2 * (torch_lp - ref).abs() + atol
    assert not bad.any(), f"{bad.sum().item()} elements break the three-way rule; max err " \
                          f"{(fast - ref).abs().max().item():.3g} vs eager {(torch_lp - ref).abs().max().item():.3g}"
    assert (fast - ref).norm() <= 2 * (torch_lp - ref).norm() + 2 ** -9 * ref.norm() + 1e-9


def test_attention_matches_hf_eager(cpu_kernels):
    """Against HF's ``eager_attention_forward`` with the additive mask built from masking_utils' functions."""
    from transformers.masking_utils import and_masks, padding_mask_function, sliding_window_causal_mask_function
    from transformers.models.gemma4.modeling_gemma4 import eager_attention_forward

    B, Hq, Hkv, S, D, W = 2, 4, 2, 45, 64, 13
    q, k, v, kpm = make_inputs(B, Hq, Hkv, S, S, D, bshd=False, pad=[0, 6])
    fn = and_masks(sliding_window_causal_mask_function(W), padding_mask_function(kpm))
    bi = torch.arange(B)[:, None, None, None]
    qi = torch.arange(S)[None, None, :, None]
    ki = torch.arange(S)[None, None, None, :]
    allowed = fn(bi, torch.zeros(()), qi, ki)
    mask = torch.zeros(B, 1, S, S).masked_fill(~allowed, torch.finfo(torch.float32).min)

    class Mod(torch.nn.Module):
        head_dim, num_key_value_groups = D, Hq // Hkv

    hf, _ = eager_attention_forward(Mod(), q, k, v, mask, scaling=1.0)
    o = A.attention(q, k, v, scale=1.0, window=W, key_padding_mask=kpm)
    rows = allowed.any(-1)[:, 0]
    assert rel(o.transpose(1, 2)[rows], hf[rows]) <= 1e-4


def test_scores_pattern_cpu(cpu_kernels):
    q, k, v, kpm = make_inputs(2, 4, 2, 37, 50, 64, pad=[0, 60])
    for window, softcap, causal in [(None, None, True), (11, 50.0, True), (7, None, False)]:
        kw = dict(window=window, softcap=softcap, causal=causal, key_padding_mask=kpm)
        s = A.attention_scores(q, k, **kw)
        rs = A.attention_scores_naive(q.double(), k.double(), **kw)
        assert torch.equal(torch.isneginf(s), torch.isneginf(rs))
        fin = torch.isfinite(rs)
        assert not torch.isnan(s).any()
        assert (s[fin].double() - rs[fin]).abs().max().item() <= 1e-4 * rs[fin].abs().max().item()
        p = A.attention_pattern(q, k, **kw)
        rp = A.attention_pattern_naive(q.double(), k.double(), **kw)
        assert not torch.isnan(p).any()
        assert (p.double() - rp).abs().max().item() <= 1e-5
        _, lse = A.attention(q, k, v, return_lse=True, **kw)
        assert torch.equal(A.attention_pattern(q, k, lse=lse, **kw), p)
        sums = p.sum(-1)
        nonempty = torch.isfinite(lse)
        assert torch.allclose(sums[nonempty], torch.ones_like(sums[nonempty]), atol=1e-5)
        assert (sums[~nonempty] == 0).all()
        o = A.pattern_apply(p, v)
        assert o.transpose(1, 2).is_contiguous()
        assert rel(o, A.attention_naive(q.double(), k.double(), v.double(), **kw)) <= 1e-4


def test_pattern_apply_and_softmax(poison):
    p = torch.rand(2, 8, 5, 9)
    v = torch.randn(2, 2, 9, 16)
    o = A.pattern_apply(p, v)
    assert o.transpose(1, 2).is_contiguous()
    assert rel(o, A.pattern_apply_naive(p, v)) <= 1e-6
    s = torch.randn(2, 3, 4, 6)
    s[0, 0, 1] = float("-inf")
    s[1, 2, 3, :2] = float("-inf")
    pr = A.softmax_scores(s)
    assert (pr[0, 0, 1] == 0).all()
    fin = torch.isfinite(s).any(-1)
    assert torch.allclose(pr[fin], torch.softmax(s, -1)[fin])
    assert A.softmax_scores(s.bfloat16()).dtype == torch.bfloat16


def test_gradients_route_to_naive(cpu_kernels):
    q, k, v, _ = make_inputs(1, 2, 1, 9, 9, 16, bshd=False)
    q.requires_grad_(True)
    o = A.attention(q, k, v, window=4)
    o.sum().backward()
    q2 = q.detach().clone().requires_grad_(True)
    A.attention_naive(q2, k, v, window=4).sum().backward()
    assert torch.allclose(q.grad, q2.grad)
    with torch.no_grad():
        assert rel(A.attention(q, k, v, window=4), o.detach()) <= 1e-5


def test_validation_errors():
    q = torch.randn(1, 2, 4, 16)
    k = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="head_dim"):
        A.attention(torch.randn(1, 1, 2, 520), torch.randn(1, 1, 2, 520), torch.randn(1, 1, 2, 520))
    with pytest.raises(ValueError, match="multiple"):
        A.attention(torch.randn(1, 3, 4, 16), torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16))
    with pytest.raises(ValueError, match="more positions"):
        A.attention(torch.randn(1, 2, 5, 16), k, k)
    with pytest.raises(ValueError, match="window"):
        A.attention(q, k, k, window=0)
    with pytest.raises(ValueError, match="key_padding_mask"):
        A.attention(q, k, k, key_padding_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="softcap"):
        A.attention(q, k, k, softcap=-1.0)
    with pytest.raises(ValueError, match="dtype"):
        A.attention(q, k.double(), k)


def test_split_plan():
    from gemma4_fast.kernels.attention.fwd import num_splits, split_rows
    assert split_rows(8, 1) == 16 and split_rows(16, 2) == 32
    ns, per = num_splits(131072, 32, 2, 132)
    assert ns * per >= 131072 and per % 32 == 0 and (ns - 1) * per < 131072
    for n_keys, bh_kv, pps in ((32768, 8, 1), (131072, 10, 1), (8192, 2, 1), (2048, 6, 4), (32768, 200, 1)):
        ns, per = num_splits(n_keys, 32, bh_kv, 132, max_splits=256, min_blocks=2, programs_per_sm=pps)
        assert ns * per >= n_keys and (ns - 1) * per < n_keys and per % 32 == 0
        assert ns * bh_kv <= max(pps * 132, bh_kv), (n_keys, bh_kv, ns)
    assert api.use_split_path(8, 1, 512) and not api.use_split_path(16, 4, 512)
    assert not api.use_split_path(1, 100, 64)


# ---------------------------------------------------------------- GPU

def gpu_case(B, Hq, Hkv, Sq, Sk, D, window=None, softcap=None, causal=True, pad=None, kv_same=False,
             scale=None, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v, kpm = make_inputs(B, Hq, Hkv, Sq, Sk, D, dtype=torch.bfloat16, device="cuda", pad=pad,
                               kv_same=kv_same, gen=g)
    kw = dict(scale=scale, window=window, softcap=softcap, causal=causal, key_padding_mask=kpm)
    o, lse = A.attention(q, k, v, return_lse=True, **kw)
    torch.cuda.synchronize()
    ro, rlse = ref64(q, k, v, **kw)
    eager = A.attention_naive(q, k, v, **kw)
    three_way(o, eager, ro)
    check_lse(lse, rlse, 2e-2)
    return q, k, v, kpm, kw


GPU_CASES = [
    (1, 16, 2, 1031, 1031, 512, None, None, True, None, False),
    (1, 16, 8, 1031, 1031, 256, 512, None, True, None, False),
    (2, 8, 1, 777, 777, 256, 1, None, True, [0, 100], False),
    (1, 16, 1, 1000, 1000, 128, None, 50.0, True, None, False),
    (2, 4, 2, 600, 1500, 64, 300, None, True, [0, 1600], False),
    (1, 8, 2, 517, 517, 512, 4096, None, True, [33], True),
    (1, 4, 4, 700, 700, 128, None, None, False, None, False),
    (1, 16, 2, 1, 70001, 512, None, None, True, None, False),
    (1, 16, 8, 1, 40000, 256, 1024, None, True, None, False),
    (3, 8, 1, 1, 5000, 256, None, 50.0, True, [0, 4000, 6000], True),
    (1, 16, 2, 16, 3000, 512, None, None, True, None, False),
    (1, 32, 2, 1, 2048, 128, None, None, True, None, False),
]


@pytest.mark.cuda
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "B{}H{}-{}S{}x{}D{}w{}c{}{}p{}kv{}".format(*c))
def test_attention_gpu_bf16(poison, case):
    B, Hq, Hkv, Sq, Sk, D, window, softcap, causal, pad, kv_same = case
    gpu_case(B, Hq, Hkv, Sq, Sk, D, window, softcap, causal, pad, kv_same,
             scale=1.0 if D == 512 and window is None else None)


@pytest.mark.cuda
@pytest.mark.parametrize("D", [64, 512])
def test_attention_gpu_fp32(poison, D):
    q, k, v, kpm = make_inputs(1, 4, 2, 301, 301, D, device="cuda", pad=[20])
    kw = dict(window=128, key_padding_mask=kpm)
    o, lse = A.attention(q, k, v, return_lse=True, **kw)
    ro, rlse = ref64(q, k, v, **kw)
    assert rel(o, ro) <= 1e-4
    check_lse(lse, rlse, 1e-4)


@pytest.mark.cuda
@pytest.mark.parametrize("D,window", [(512, None), (256, 300)])
def test_scores_pattern_gpu(poison, D, window):
    q, k, v, kpm = make_inputs(1, 8, 2, 700, 1100, D, dtype=torch.bfloat16, device="cuda", pad=[50])
    kw = dict(scale=1.0, window=window, key_padding_mask=kpm)
    s = A.attention_scores(q, k, **kw)
    rs = A.attention_scores_naive(q.double(), k.double(), **kw)
    assert torch.equal(torch.isneginf(s), torch.isneginf(rs))
    eager = A.attention_scores_naive(q, k, **kw)
    three_way(s.masked_fill(torch.isneginf(s), 0), eager.masked_fill(torch.isneginf(rs), 0),
              rs.masked_fill(torch.isneginf(rs), 0))
    p = A.attention_pattern(q, k, **kw)
    rp = A.attention_pattern_naive(q.double(), k.double(), **kw)
    three_way(p, A.attention_pattern_naive(q, k, **kw), rp)
    o = A.pattern_apply(p, v)
    ro, _ = ref64(q, k, v, **kw)
    assert rel(o, ro) <= 2e-2


def _fuzz_one(B, G, Hkv, Sk, frac, D, window, pad, seed):
    Sq = max(1, math.ceil(frac * Sk))
    gpu_case(B, G * Hkv, Hkv, Sq, Sk, D, window, None, True, [0, pad][:B] if pad else None, False, seed=seed)


DECODE_PINS = {
    "split": {"BLOCK_N": 32, "num_warps": 8, "num_stages": 3, "KEYS_AS_ROWS": 0, "MIN_BLOCKS": 2, "MAX_SPLITS": 256,
              "PROGRAMS_PER_SM": 1, "COMBINE_D": 64},
    "keys_as_rows": {"BLOCK_N": 32, "num_warps": 4, "num_stages": 3, "KEYS_AS_ROWS": 1, "MIN_BLOCKS": 2,
                     "MAX_SPLITS": 256, "PROGRAMS_PER_SM": 1, "COMBINE_D": 128},
    "keys_as_rows_chunked": {"BLOCK_N": 32, "num_warps": 4, "num_stages": 3, "KEYS_AS_ROWS": 1, "MIN_BLOCKS": 1,
                             "MAX_SPLITS": 512, "COMBINE_D": 64, "COMBINE_S": 16, "PDL": 0},
}


@pytest.mark.cuda
@pytest.mark.parametrize("pin", list(DECODE_PINS))
@pytest.mark.parametrize("case", [
    (1, 16, 2, 1, 8191, 512, None, None, True, None, False),
    (2, 8, 1, 1, 3001, 256, 512, None, True, [0, 700], False),
    (1, 16, 2, 2, 2049, 512, None, 50.0, True, None, True),
    (3, 8, 1, 1, 33333, 512, None, None, True, [0, 40000, 17], False),
], ids=lambda c: "B{}H{}-{}S{}x{}D{}w{}c{}{}p{}kv{}".format(*c) if isinstance(c, tuple) else c)
def test_decode_kernels_gpu(poison, monkeypatch, case, pin):
    """Both decode kernels (pinned: the split kernel, the keys-as-rows kernel, the latter also with many splits, a
    chunked combine and plain launches) in bf16 against fp64 and torch eager by the three-way rule, whatever the
    tuned table picks."""
    import json
    monkeypatch.setenv("GEMMA4_FAST_ATTN_SPLIT_CONFIG", json.dumps(DECODE_PINS[pin]))
    gpu_case(*case)


@pytest.mark.cuda
@pytest.mark.parametrize("sk,window", [(2000, None), (5000, 512), (20000, None)])
def test_decode_pdl_gpu(monkeypatch, sk, window):
    """The split-key decode with the combine as a programmatic dependent launch (sm_90) gives the same bits as two
    plain launches, eagerly and replayed from a CUDA graph (the dependency is captured)."""
    from gemma4_fast.kernels.attention import fwd

    q, k, v, _ = make_inputs(1, 16, 2, 1, sk, 512, dtype=torch.bfloat16, device="cuda")
    run = lambda: A.attention(q, k, v, scale=1.0, window=window)  # noqa: E731
    with_pdl = run()
    monkeypatch.setenv(fwd.DECODE_PDL_ENV, "0")
    plain = run()
    monkeypatch.delenv(fwd.DECODE_PDL_ENV)
    assert torch.equal(with_pdl, plain)
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, run())


@pytest.mark.cuda
def test_attention_gpu_fuzz(poison):
    """Random shapes / windows / padding (hypothesis when installed, else 20 seeded draws)."""
    try:
        from hypothesis import given, settings
        from hypothesis import strategies as st
    except ImportError:
        import random
        rng = random.Random(1234)
        for _ in range(20):
            _fuzz_one(rng.randint(1, 2), rng.choice([1, 2, 8, 16]), rng.randint(1, 2), rng.randint(1, 1500),
                      rng.random(), rng.choice([64, 128, 256, 512]), rng.choice([None, rng.randint(1, 1600)]),
                      rng.choice([0, rng.randint(1, 1600)]), rng.randint(0, 2 ** 16))
        return

    @settings(max_examples=20, deadline=None, derandomize=True)
    @given(B=st.integers(1, 2), G=st.sampled_from([1, 2, 8, 16]), Hkv=st.integers(1, 2), Sk=st.integers(1, 1500),
           frac=st.floats(0.0, 1.0), D=st.sampled_from([64, 128, 256, 512]),
           window=st.one_of(st.none(), st.integers(1, 1600)), pad=st.integers(0, 1600), seed=st.integers(0, 2 ** 16))
    def run(B, G, Hkv, Sk, frac, D, window, pad, seed):
        _fuzz_one(B, G, Hkv, Sk, frac, D, window, pad, seed)

    run()


HOPPER_CASES = [  # B, Hq, Hkv, Sq, Sk, D, window, kv_same, dtype
    (1, 16, 2, 1000, 1000, 512, None, False, torch.bfloat16),
    (1, 8, 1, 129, 129, 512, None, True, torch.bfloat16),
    (2, 4, 4, 63, 63, 512, None, False, torch.float16),
    (1, 16, 1, 7, 7, 512, None, False, torch.bfloat16),
    (1, 2, 1, 1, 1, 512, None, False, torch.bfloat16),
    (1, 8, 1, 100, 1001, 512, None, False, torch.bfloat16),
    (2, 4, 2, 300, 300, 512, 129, False, torch.bfloat16),
    (1, 4, 2, 200, 200, 512, 1, False, torch.bfloat16),
    (1, 4, 1, 333, 333, 512, 5000, True, torch.bfloat16),
    (1, 8, 1, 1000, 1000, 256, 512, False, torch.bfloat16),
    (1, 16, 2, 515, 515, 512, None, True, torch.bfloat16),
    (1, 16, 8, 777, 777, 256, None, False, torch.bfloat16),
    (2, 4, 2, 130, 1000, 256, None, False, torch.float16),
    (1, 2, 1, 1, 1, 256, None, False, torch.bfloat16),
]


def _need_hopper():
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("needs an sm_90 GPU")


@pytest.mark.cuda
@pytest.mark.parametrize("case", HOPPER_CASES, ids=lambda c: "B{}H{}-{}S{}x{}D{}w{}kv{}-{}".format(*c))
@pytest.mark.parametrize("cfg", [{"BLOCK_N": 32}, {"BLOCK_N": 32, "KV_BLOCK_N": 64, "KV_STAGES": 2},
                                 {"BLOCK_N": 64, "K_STAGES": 1, "V_STAGES": 1}, {"BLOCK_N": 64, "WS": 1},
                                 {"BLOCK_N": 64, "WS": 1, "K_STAGES": 3}],
                         ids=["n32", "kv64", "n64k1v1", "ws", "ws-k3"])
def test_hopper_kernel_gpu(case, cfg):
    """The Gluon kernels launched directly into NaN-filled outputs, against the fp64 reference by the three-way
    rule (odd lengths, one-query and one-key launches, chunked prefill, GQA 1-16, windows 1 / 129 / beyond the
    keys, K is V, batch 2, fp16); ``ws``: the warp-specialized kernels (head_dim 512 with K is V keeps the 64-key
    ring kernel)."""
    from gemma4_fast.kernels.attention import hopper as H
    _need_hopper()
    B, Hq, Hkv, Sq, Sk, D, window, kv_same, dtype = case
    if cfg.get("K_STAGES") == 3 and cfg.get("WS") and D != 256:
        pytest.skip("the head_dim-512 warp-specialized kernel has one config")
    if cfg["BLOCK_N"] == 64 and kv_same and not cfg.get("WS"):
        pytest.skip("a config for separate K and V")
    g = torch.Generator(device="cuda").manual_seed(Sq + Sk)
    q, k, v, _ = make_inputs(B, Hq, Hkv, Sq, Sk, D, dtype=dtype, device="cuda", kv_same=kv_same, gen=g)
    o = torch.full((B, Sq, Hq, D), float("nan"), dtype=dtype, device="cuda").permute(0, 2, 1, 3)
    lse = torch.full((B, Hq, Sq), float("nan"), device="cuda")
    assert H.hopper_unsupported(q, k, v, o, window, None, True, None) is None
    H.attention_hopper_fwd(q, k, v, o, lse, scale=D ** -0.5, window=window, config=cfg)
    ro, rlse = ref64(q, k, v, window=window)
    three_way(o, A.attention_naive(q, k, v, window=window), ro)
    check_lse(lse, rlse, 2e-2)


@pytest.mark.cuda
def test_hopper_dispatch_gpu(poison, monkeypatch):
    """On sm_90 (with the H100 table) the public op sends a head_dim-512 causal bf16 prefill and a 9k-key head_dim-256
    causal one to the Hopper kernels, padded or softcapped calls to the portable one (same results either way)."""
    from gemma4_fast.kernels.attention import hopper as H
    _need_hopper()
    calls = []
    real = H.attention_hopper_fwd
    monkeypatch.setattr(H, "attention_hopper_fwd", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    gpu_case(1, 8, 1, 515, 515, 512, scale=1.0)
    assert calls == [1]
    gpu_case(1, 8, 1, 515, 515, 512, pad=[7], scale=1.0)
    gpu_case(1, 8, 1, 515, 515, 512, softcap=50.0, scale=1.0)
    assert calls == [1]
    from gemma4_fast.kernels.attention import configs, hopper_ws
    ws_calls = []
    real_ws = hopper_ws.attention_hopper_ws_fwd
    monkeypatch.setattr(hopper_ws, "attention_hopper_ws_fwd", lambda *a, **kw: ws_calls.append(1) or real_ws(*a, **kw))
    ws512_calls = []
    real_ws512 = hopper_ws.attention_hopper_ws512_fwd
    monkeypatch.setattr(hopper_ws, "attention_hopper_ws512_fwd",
                        lambda *a, **kw: ws512_calls.append(1) or real_ws512(*a, **kw))
    if configs.select_config("fwd", 512, torch.bfloat16, "causal", 515, torch.device("cuda")).get("WS"):
        gpu_case(1, 8, 1, 515, 515, 512, scale=1.0)
        gpu_case(1, 8, 1, 515, 515, 512, kv_same=True, scale=1.0)  # K is V: the 64-key ring kernel
        assert ws512_calls == [1] and calls == [1, 1, 1]
        calls.clear()
        calls.append(1)
    if configs.select_config("fwd", 256, torch.bfloat16, "causal", 9001, torch.device("cuda")).get("WS"):
        gpu_case(1, 2, 1, 9001, 9001, 256)  # head_dim 256, causal: the H100 table's warp-specialized entry
        gpu_case(1, 8, 1, 1000, 1000, 256, window=512)  # a sliding layer
        gpu_case(1, 8, 1, 1000, 1000, 256, window=512, pad=[7])  # padded: the portable kernel
        assert calls == [1, 1, 1] and ws_calls == [1, 1]


def test_hopper_config_policy_on_cpu(monkeypatch):
    """The H100 generator leads with the Hopper kernel at head_dim 512; a pinned config never carries it; the
    portable fallback config is the first non-Hopper candidate; CPU tensors are refused with a logged reason; ring
    depths are cut to shared memory."""
    from gemma4_fast.kernels.attention import configs, hopper
    assert configs.attention_fwd_configs(512, 2, 90)[0].get("HOPPER") == 1
    assert not any(c.get("HOPPER") for c in configs.attention_fwd_configs(512, 2, 80))
    assert not configs.portable_config(512, 2, 90).get("HOPPER")
    assert configs.attention_fwd_configs(256, 2, 90)[0].get("WS") == 1
    assert configs.attention_fwd_configs(512, 2, 90)[0].get("WS") == 1
    assert not any(c.get("HOPPER") for c in configs.attention_fwd_configs(256, 2, 80))
    assert not configs.portable_config(256, 2, 90).get("HOPPER")
    assert configs.portable_config(512, 2, 90) == configs.attention_fwd_configs(512, 2, 90)[1]
    monkeypatch.setenv(configs.ENV_FWD, CPU_TILES[configs.ENV_FWD])
    assert "HOPPER" not in configs.select_config("fwd", 512, torch.float16, "causal", 100, torch.device("cpu"))
    q = torch.randn(1, 2, 8, 512, dtype=torch.float16)
    assert not api._try_hopper(q, q[:, :1], q[:, :1], torch.empty_like(q), None, None, 1.0, None, None, True,
                               {"BLOCK_N": 32})
    assert hopper.hopper_unsupported(q, q, q, q, None, None, True, None) == "does not run on an sm_90 GPU"
    assert hopper._stages(512, 32, 2, 2) == 2 and hopper._stages(512, 64, 2, 2) == 1
    assert hopper._stages(512, 64, 3, 1) == 2 and hopper._stages(512, 32, 3, 1) == 3
