"""TransformerLens's own Gemma 4 bridge integration checks (logit parity with HF, config from the text config,
conventional residual hook shapes, run_with_cache), rebuilt on local tiny models and run with the fast path.

Upstream runs them on hub fixtures of the three Gemma 4 families; here the tiny presets of the same families
are built offline, and the bridge runs on the fast modules (torch backend on the CPU, Triton on a GPU).
"""
from __future__ import annotations

import pytest
import torch

import gemma4_fast
from gemma4_fast.models import build_model, offline_tokenizer

FAMILIES = {"ple_kv_shared": "tiny-ple-kv-shared", "dense_k_eq_v": "tiny-dense-k-eq-v", "moe": "tiny-moe"}
IDS = torch.tensor([[2, 40, 41, 42, 43, 44, 45]])


@pytest.fixture(scope="module", params=list(FAMILIES), ids=list(FAMILIES))
def pair(request):
    """(fast bridge, the HF eager model with the same weights)."""
    name = FAMILIES[request.param]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = offline_tokenizer()
    hf = build_model(name, torch.float32, device)
    bridge = gemma4_fast.boot_transformers(name, hf_model=build_model(name, torch.float32, device), tokenizer=tok,
                                           device=device, fast_kernels=True,
                                           fast_backend="auto" if device == "cuda" else "torch")
    return bridge, hf


def test_text_only_logit_parity_vs_hf(pair):
    bridge, hf = pair
    ids = IDS.to(hf.device)
    with torch.no_grad():
        ref = hf(ids).logits
        out = bridge.forward(ids, return_type="logits")
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() < 1e-3


def test_config_from_text_config(pair):
    bridge, hf = pair
    assert bridge.cfg.n_layers == hf.config.num_hidden_layers
    assert getattr(bridge.cfg, "is_multimodal", False) is False
    assert bridge.fast_kernels_report().enabled


def test_resid_hooks_fire_with_conventional_shape(pair):
    bridge, hf = pair
    captured = {}

    def cap(tensor, hook):
        captured[hook.name] = tensor.detach()
        return tensor

    names = [n for n in bridge.hook_dict if n in ("blocks.0.hook_resid_pre", "blocks.0.hook_resid_post")]
    assert len(names) == 2
    with torch.no_grad():
        bridge.run_with_hooks(IDS.to(hf.device), fwd_hooks=[(n, cap) for n in names])
    assert len(captured) == 2, captured.keys()  # hook.name reports the canonical blocks.0.hook_in / hook_out
    for tensor in captured.values():
        assert tensor.shape == (IDS.shape[0], IDS.shape[1], bridge.cfg.d_model)


def test_run_with_cache_text_only(pair):
    bridge, hf = pair
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(IDS.to(hf.device))
    assert torch.isfinite(logits).all()
    assert len(cache) > 0 and "blocks.0.attn.hook_pattern" in cache
