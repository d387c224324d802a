"""``gemma4_fast.prologue``: the scaled embeddings and the per-layer-input projection in one pass, against HF's
modules (bit-equal where the roundings are HF's), with the fallbacks (a hooked projection norm, inputs of another
shape), through a patched model and the ``rms_norm_residual`` kernel options they use (``x_scale``, a float
``out_scale``) under the interpreter."""
from __future__ import annotations

import pytest
import torch
from transformers.models.gemma4.modeling_gemma4 import Gemma4TextModel

from gemma4_fast import patch_model, unpatch_model
from gemma4_fast.kernels._common import interpret_mode
from gemma4_fast.kernels.rmsnorm import rms_norm_residual, rms_norm_residual_naive
from gemma4_fast.models import build_model


def _ids(n=13, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 250, (batch, n), generator=g)
    ids[:, 0] = 2
    return ids


def _pair(name="tiny-ple-kv-shared", dtype=torch.float32):
    ref = build_model(name, dtype)
    fast = build_model(name, dtype)
    report = patch_model(fast, backend="torch")
    return ref, fast, report


def test_report_counts_prologue_modules():
    _, _, report = _pair()
    fast, total = report.counts()["prologue"]
    assert (fast, total) == (3, 3)  # embed_tokens, embed_tokens_per_layer and the text model
    _, fast, report = _pair("tiny-moe")
    assert report.counts()["prologue"] == (1, 1)  # without per-layer inputs the text model is no candidate
    assert type(fast.model) is Gemma4TextModel and not report.left_on_hf


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_embeddings_and_projection_match_hf_exactly(dtype):
    ref, fast, _ = _pair(dtype=dtype)
    ids = _ids()
    with torch.no_grad():
        for name in ("embed_tokens", "embed_tokens_per_layer"):
            assert torch.equal(getattr(fast.model, name)(ids), getattr(ref.model, name)(ids))
        emb = ref.model.embed_tokens(ids)
        pli = ref.model.get_per_layer_inputs(ids, emb)
        want = Gemma4TextModel.project_per_layer_inputs(ref.model, emb, pli)
        got = fast.model.project_per_layer_inputs(emb, pli)
        assert torch.equal(got, want)
        torch.testing.assert_close(fast(ids).logits, ref(ids).logits, rtol=1e-4, atol=1e-4)


def test_scale_edit_and_fallbacks():
    ref, fast, _ = _pair()
    ids = _ids()
    with torch.no_grad():
        for m in (fast.model.embed_tokens_per_layer, ref.model.embed_tokens_per_layer):
            m.embed_scale.mul_(0.5)  # in place: a new version, read again
        assert torch.equal(fast.model.embed_tokens_per_layer(ids), ref.model.embed_tokens_per_layer(ids))
        emb = ref.model.embed_tokens(ids)
        pli = ref.model.get_per_layer_inputs(ids, emb)
        want = Gemma4TextModel.project_per_layer_inputs(ref.model, emb, pli)
        seen = []
        handle = fast.model.per_layer_projection_norm.register_forward_hook(lambda m, a, o: seen.append(o.shape))
        assert torch.equal(fast.model.project_per_layer_inputs(emb, pli), want)
        assert len(seen) == 1  # the hooked norm ran as a module
        handle.remove()
        assert torch.equal(fast.model.project_per_layer_inputs(emb, None),
                           Gemma4TextModel.project_per_layer_inputs(ref.model, emb, None))


def test_unpatch_restores_hf_classes():
    _, fast, _ = _pair()
    with torch.no_grad():
        fast.model.embed_tokens(_ids())
    assert "_g4f_embed_scale" in fast.model.embed_tokens.__dict__
    unpatch_model(fast)
    assert type(fast.model) is Gemma4TextModel and "_g4f_embed_scale" not in fast.model.embed_tokens.__dict__


@pytest.fixture
def cpu_kernels():
    if not interpret_mode():
        pytest.skip("CPU kernel tests need TRITON_INTERPRET=1 (set by conftest without a GPU)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_residual_norm_scales_kernel(cpu_kernels, dtype):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 7, 5, 24, generator=g) * 3).to(dtype)
    r = torch.randn(2, 7, 5, 24, generator=g).to(dtype)
    w = torch.randn(24, generator=g).to(dtype)
    for kw in (dict(x_scale=0.37, out_scale=2 ** -0.5), dict(x_scale=0.37), dict(out_scale=1.5)):
        got = rms_norm_residual(x, r, w, 1e-6, **kw)
        want = rms_norm_residual_naive(x, r, w, 1e-6, **kw)
        tol = 1e-5 if dtype == torch.float32 else 2e-3
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    with pytest.raises(TypeError, match="x_scale"):
        rms_norm_residual(x, r, w, 1e-6, x_scale=torch.tensor(0.5))


@pytest.mark.cuda
def test_prologue_gpu_bf16():
    """On the GPU the norm's row reduction may round differently from torch's: within one bf16 ulp; the embeddings
    exactly."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    ref = build_model("tiny-ple-kv-shared", torch.bfloat16, "cuda")
    fast = build_model("tiny-ple-kv-shared", torch.bfloat16, "cuda")
    patch_model(fast, backend="triton")
    ids = _ids(n=301).cuda()
    with torch.no_grad():
        emb = ref.model.embed_tokens(ids)
        assert torch.equal(fast.model.embed_tokens(ids), emb)
        pli = ref.model.get_per_layer_inputs(ids, emb)
        assert torch.equal(fast.model.get_per_layer_inputs(ids, emb), pli)
        want = Gemma4TextModel.project_per_layer_inputs(ref.model, emb, pli).float()
        got = fast.model.project_per_layer_inputs(emb, pli).float()
        assert ((got - want).abs() <= want.abs() * 2 ** -7 + 1e-6).all()
