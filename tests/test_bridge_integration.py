"""bridge_integration: the fast_kernels flag, hook semantics with the fast modules, fallback.

CPU runs force the torch backend (the same fast modules on the plain-PyTorch ops); one tiny model also runs
on the Triton backend under the interpreter. GPU variants carry ``@pytest.mark.cuda``.
"""
from __future__ import annotations

import logging

import pytest
import torch

from gemma4_fast import FastKernelsUnavailable, boot_transformers, disable_fast_kernels, enable_fast_kernels
from gemma4_fast.models import build_model, offline_tokenizer, unified_available
from gemma4_fast.presets import PRESETS, TINY_PRESETS

PROMPTS = ["The cat sat on the mat, and then", "Hi"]


def _skip_unified(name):
    if PRESETS[name].unified and not unified_available():
        pytest.skip("this transformers has no gemma4_unified models")


@pytest.fixture(scope="module")
def tok():
    return offline_tokenizer()


def _pair(name, tok, backend="torch", dtype=torch.float32, device="cpu"):
    """(seed bridge, fast bridge) on two copies of the same random model."""
    from transformer_lens.model_bridge import TransformerBridge

    seed = TransformerBridge.boot_transformers(name, hf_model=build_model(name, dtype=dtype, device=device),
                                               tokenizer=tok, device=device)
    fast = boot_transformers(name, hf_model=build_model(name, dtype=dtype, device=device), tokenizer=tok,
                             device=device, fast_kernels=True, fast_backend=backend)
    return seed, fast


def _rel(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_logits_and_hooks_match_seed(name, tok):
    _skip_unified(name)
    seed, fast = _pair(name, tok)
    assert fast.fast_kernels_report().enabled
    ids = fast.to_tokens(PROMPTS[0])
    with torch.no_grad():
        ref_logits, ref_cache = seed.run_with_cache(ids)
        logits, cache = fast.run_with_cache(ids)
    assert _rel(logits, ref_logits) <= 1e-4
    seed_names = set(seed.hook_dict)
    assert seed_names <= set(fast.hook_dict), sorted(seed_names - set(fast.hook_dict))[:5]
    for key in ref_cache.keys():
        assert key in cache, f"{key} fired in the seed bridge but not with fast kernels"
        assert cache[key].shape == ref_cache[key].shape, key
        if key.endswith("hook_attn_scores"):
            continue  # deliberate fix: true pre-softmax scores instead of the seed's copy of the pattern
        assert _rel(cache[key], ref_cache[key]) <= 1e-4, key


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_scores_are_true_pre_softmax(name, tok):
    _skip_unified(name)
    _, fast = _pair(name, tok)
    ids = fast.to_tokens(PROMPTS[0])
    with torch.no_grad():
        _, cache = fast.run_with_cache(ids, names_filter=lambda n: n.endswith(("hook_attn_scores", "hook_pattern")))
    for layer in range(fast.cfg.n_layers):
        scores = cache[f"blocks.{layer}.attn.hook_attn_scores"]
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
        assert torch.isneginf(scores).any(), "masked positions are -inf"
        torch.testing.assert_close(torch.softmax(scores.float(), -1), pattern.float(), rtol=1e-5, atol=1e-6)
        window = fast.original_model.config.sliding_window
        if fast.original_model.config.layer_types[layer] == "sliding_attention":
            s = scores.shape[-1]
            i = torch.arange(s)[:, None]
            j = torch.arange(s)[None, :]
            outside = (i - j >= window) | (j > i)
            assert torch.isneginf(scores[..., outside]).all()


@pytest.mark.parametrize("name", ["tiny-dense-k-eq-v", "tiny-moe"])
@pytest.mark.parametrize("target", ["hook_pattern", "hook_attn_scores"])
def test_pattern_and_score_edits_change_output(name, target, tok):
    _, fast = _pair(name, tok)
    ids = fast.to_tokens(PROMPTS[0])
    layer, head = 1, 2  # a sliding layer with its own v_proj in both presets
    with torch.no_grad():
        _, cache = fast.run_with_cache(ids)
    pattern = cache[f"blocks.{layer}.attn.hook_pattern"]
    z_name = f"blocks.{layer}.attn.hook_z"
    base_z = cache[z_name]

    def edit(t, hook):
        t = t.clone()
        if target == "hook_pattern":
            t[:, head] = 0.0
        else:
            t[:, head] = torch.where(torch.isneginf(t[:, head]), t[:, head], torch.zeros_like(t[:, head]))
        return t

    seen = {}

    def grab(t, hook):
        seen["z"] = t.detach().clone()
        return t

    with torch.no_grad():
        edited_logits = fast.run_with_hooks(ids, fwd_hooks=[(f"blocks.{layer}.attn.{target}", edit), (z_name, grab)])
        plain_logits = fast(ids)
    assert not torch.allclose(edited_logits, plain_logits), "an edit must change the output"
    z = seen["z"]
    other = [h for h in range(z.shape[2]) if h != head]
    torch.testing.assert_close(z[:, :, other], base_z[:, :, other], rtol=1e-5, atol=1e-6)
    v = cache[f"blocks.{layer}.attn.hook_v"].float()
    hf = fast.blocks[layer].attn.original_component
    v = hf.v_norm(v) if getattr(hf, "v_norm", None) is not None else v
    groups = z.shape[2] // v.shape[2]
    v_head = v[:, :, head // groups]
    if target == "hook_pattern":
        expected = torch.zeros_like(z[:, :, head])
    else:
        keep = ~torch.isneginf(cache[f"blocks.{layer}.attn.hook_attn_scores"][:, head])
        uniform = keep.float() / keep.float().sum(-1, keepdim=True)
        expected = torch.einsum("bqk,bkd->bqd", uniform, v_head)
    torch.testing.assert_close(z[:, :, head].float(), expected, rtol=1e-4, atol=1e-5)
    assert pattern.shape[1] == z.shape[2]


def test_no_pattern_allocated_without_hooks(tok, monkeypatch):
    """With nothing hooked on scores/pattern, the O(S²) entry points never run and no S×S buffer is allocated
    (Triton backend: the interpreter on the CPU)."""
    from gemma4_fast import ops
    from gemma4_fast.kernels._common import interpret_mode

    if not torch.cuda.is_available() and not interpret_mode():
        pytest.skip("needs CUDA or the Triton interpreter")
    _, fast = _pair("tiny-dense-k-eq-v", tok, backend="triton")
    calls = []
    for fn in ("attention_scores", "attention_pattern", "pattern_apply"):
        if hasattr(ops, fn):
            original = getattr(ops, fn)
            monkeypatch.setattr(ops, fn, lambda *a, _o=original, _n=fn, **k: (calls.append(_n), _o(*a, **k))[1])
    s = 131  # prime: an allocation that is a whole number of S×S matrices is a pattern/score buffer
    ids = torch.randint(4, 260, (1, s))
    from torch.profiler import ProfilerActivity, profile

    def square_allocations(names_filter):
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fast.run_with_cache(ids, names_filter=names_filter)
        return [e.cpu_memory_usage for e in prof.events()
                if e.cpu_memory_usage >= 2 * s * s and e.cpu_memory_usage % (s * s) == 0]

    assert square_allocations(lambda n: n.endswith("hook_resid_post")) == []
    assert calls == []
    assert square_allocations(lambda n: n.endswith("hook_pattern")), "the control run must allocate a pattern"
    assert "attention_pattern" in calls or "attention_scores" in calls


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_new_hooks(name, tok):
    _skip_unified(name)
    _, fast = _pair(name, tok)
    ids = fast.to_tokens(PROMPTS)
    b, s = ids.shape
    with torch.no_grad():
        _, cache = fast.run_with_cache(ids)
    cfg = fast.original_model.config
    for layer in range(cfg.num_hidden_layers):
        hd = fast.blocks[layer].attn.original_component.head_dim
        assert cache[f"blocks.{layer}.attn.hook_rot_q"].shape == (b, s, cfg.num_attention_heads, hd)
        for norm in ("ln1", "ln1_post", "ln2", "ln2_post"):
            scale = cache[f"blocks.{layer}.{norm}.hook_scale"]
            normalized = cache[f"blocks.{layer}.{norm}.hook_normalized"]
            x = cache[f"blocks.{layer}.{norm}.hook_in"].float()
            assert scale.shape == (b, s, 1) and scale.dtype == torch.float32
            torch.testing.assert_close(scale, (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(normalized.float(), x / scale, rtol=1e-5, atol=1e-6)
        assert f"blocks.{layer}.attn.q_norm.hook_scale" in cache
        if cfg.enable_moe_block if hasattr(cfg, "enable_moe_block") else False:
            k = cfg.top_k_experts
            assert cache[f"blocks.{layer}.router.hook_probs"].shape == (b, s, cfg.num_experts)
            assert cache[f"blocks.{layer}.router.hook_top_k_index"].shape == (b, s, k)
            assert cache[f"blocks.{layer}.router.hook_top_k_weights"].shape == (b, s, k)
            outs = cache[f"blocks.{layer}.experts.hook_expert_outputs"]
            assert outs.shape == (b, s, k, cfg.hidden_size)
            weighted = (outs.float() * cache[f"blocks.{layer}.router.hook_top_k_weights"][..., None].float()).sum(2)
            torch.testing.assert_close(weighted, cache[f"blocks.{layer}.experts.hook_out"].reshape(b, s, -1).float(),
                                       rtol=1e-4, atol=1e-5)
    assert cache["ln_final.hook_scale"].shape == (b, s, 1)


def test_activation_cache_tools(tok):
    _, fast = _pair("tiny-moe", tok)
    ids = fast.to_tokens(PROMPTS[0])
    with torch.no_grad():
        logits, cache = fast.run_with_cache(ids)
    n = fast.cfg.n_layers
    resid = cache.accumulated_resid(apply_ln=True)
    assert resid.shape[0] == n + 1
    torch.testing.assert_close(resid[-1], cache["ln_final.hook_normalized"], rtol=1e-4, atol=1e-5)
    stack = cache.apply_ln_to_stack(cache[f"blocks.{n - 1}.hook_resid_post"][None])
    torch.testing.assert_close(stack[0], cache["ln_final.hook_normalized"], rtol=1e-4, atol=1e-5)
    decomposed = cache.decompose_resid(apply_ln=True)
    assert decomposed.shape[-1] == fast.cfg.d_model
    heads = cache.stack_head_results(layer=n)
    assert heads.shape[0] == n * fast.cfg.n_heads
    for layer in range(n):
        per_head = cache[f"blocks.{layer}.attn.hook_result"] if f"blocks.{layer}.attn.hook_result" in cache else None
        if per_head is not None:
            torch.testing.assert_close(per_head.sum(-2), cache[f"blocks.{layer}.attn.hook_out"], rtol=1e-4, atol=1e-5)
    answer = ids[:, -1:]
    attrs = cache.logit_attrs(decomposed, tokens=answer[0, 0], pos_slice=-1)
    assert torch.isfinite(attrs).all()


def test_run_with_cache_options(tok):
    _, fast = _pair("tiny-ple-kv-shared", tok)
    ids = fast.to_tokens(PROMPTS[0])
    with torch.no_grad():
        _, cache = fast.run_with_cache(ids, names_filter="blocks.0.attn.hook_pattern")
        assert list(cache.keys()) == ["blocks.0.attn.hook_pattern"]
        _, cache = fast.run_with_cache(ids, remove_batch_dim=True)
        assert cache["blocks.0.hook_resid_post"].dim() == 2
        out = fast(ids, stop_at_layer=2)
        assert out.shape == (1, ids.shape[1], fast.cfg.d_model)
    assert fast.to_string(ids[0, 1:]) == PROMPTS[0]


def test_gradients_match_seed(tok):
    seed, fast = _pair("tiny-moe", tok)
    ids = fast.to_tokens(PROMPTS[0])
    grads = []
    for bridge in (seed, fast):
        bridge.zero_grad(set_to_none=True)
        seen = {}

        def bwd(grad, hook):
            seen["g"] = grad.detach().clone()

        loss = bridge.run_with_hooks(ids, return_type="loss", bwd_hooks=[("blocks.1.hook_resid_post", bwd)])
        loss.backward()
        grads.append((loss.detach(), seen["g"], bridge.blocks[0].attn.q.original_component.weight.grad.clone()))
    for ref, got in zip(grads[0], grads[1]):
        assert _rel(got, ref) <= 1e-4


def test_generate_matches_seed(tok):
    seed, fast = _pair("tiny-dense-k-eq-v", tok)
    for use_cache in (True, False):
        a = seed.generate(PROMPTS[0], max_new_tokens=12, do_sample=False, use_past_kv_cache=use_cache, verbose=False)
        b = fast.generate(PROMPTS[0], max_new_tokens=12, do_sample=False, use_past_kv_cache=use_cache, verbose=False)
        assert a == b
    a = seed.generate(PROMPTS, max_new_tokens=8, do_sample=False, verbose=False)
    b = fast.generate(PROMPTS, max_new_tokens=8, do_sample=False, verbose=False)
    assert a == b


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.slow)])
def test_unembed_hooks_see_raw_logits(backend, tok, monkeypatch):
    """A plain forward softcaps the logits in place; ``run_with_cache`` / ``run_with_hooks`` on the unembed's
    ``hook_out`` (alias ``hook_unembed``) get the raw pre-softcap logits, equal to the seed bridge's and never
    overwritten afterwards."""
    from gemma4_fast import ops

    in_place = []
    real = ops.logit_softcap

    def spy(x, cap, *, out=None, backend="auto"):
        in_place.append(out is x)
        return real(x, cap, out=out, backend=backend)

    monkeypatch.setattr(ops, "logit_softcap", spy)
    seed, fast = _pair("tiny-dense-k-eq-v", tok, backend=backend)
    assert fast.fast_kernels_report().patch.counts()["logits"] == (1, 1)
    assert {"unembed.hook_out", "hook_unembed"} <= set(fast.hook_dict)
    cap = fast.original_model.config.final_logit_softcapping
    ids = fast.to_tokens(PROMPTS[0])
    kept = {}

    def keep(t, hook):
        kept["raw"] = t

    with torch.no_grad():
        ref_logits, ref_cache = seed.run_with_cache(ids, names_filter=lambda n: "unembed" in n)
        logits, cache = fast.run_with_cache(ids, names_filter=lambda n: "unembed" in n)
        hooked = fast.run_with_hooks(ids, fwd_hooks=[("hook_unembed", keep)])
        assert in_place == []
        plain, seed_plain = fast(ids), seed(ids)
    assert in_place == [True]
    raw = cache["unembed.hook_out"]
    assert _rel(raw, ref_cache["unembed.hook_out"]) <= 1e-4
    assert _rel(kept["raw"], ref_cache["unembed.hook_out"]) <= 1e-4
    assert (raw - logits).abs().max() > 1e-2, "the cached logits must be the raw ones"
    torch.testing.assert_close(logits, cap * torch.tanh(raw / cap), rtol=1e-5, atol=1e-5)
    for got, want in ((logits, ref_logits), (hooked, seed_plain), (plain, seed_plain)):
        assert _rel(got, want) <= 1e-4


def test_auto_falls_back_on_cpu_with_reason(tok, caplog, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    with caplog.at_level(logging.WARNING, logger="gemma4_fast"):
        bridge = boot_transformers("tiny-moe", hf_model=build_model("tiny-moe"), tokenizer=tok, device="cpu",
                                   fast_kernels="auto")
    report = bridge.fast_kernels_report()
    assert not report.enabled and "CUDA" in report.reason
    assert any("HF delegation" in r.getMessage() for r in caplog.records)
    with pytest.raises(FastKernelsUnavailable, match="CUDA"):
        boot_transformers("tiny-moe", hf_model=build_model("tiny-moe"), tokenizer=tok, device="cpu",
                          fast_kernels=True)


def test_flag_on_transformer_bridge_and_toggle(tok):
    from transformer_lens.model_bridge import TransformerBridge

    plain = TransformerBridge.boot_transformers("tiny-moe", hf_model=build_model("tiny-moe"), tokenizer=tok,
                                                device="cpu")
    assert not hasattr(plain, "fast_kernels_report") or not plain.fast_kernels_report().enabled
    bridge = TransformerBridge.boot_transformers("tiny-moe", hf_model=build_model("tiny-moe"), tokenizer=tok,
                                                 device="cpu", fast_kernels=True, fast_backend="torch")
    assert bridge.fast_kernels_report().enabled
    ids = bridge.to_tokens(PROMPTS[0])
    with torch.no_grad():
        fast_logits = bridge(ids)
    n_hooks = len(bridge.hook_dict)
    disable_fast_kernels(bridge)
    assert len(bridge.hook_dict) < n_hooks and "blocks.0.ln1.hook_scale" not in bridge.hook_dict
    with torch.no_grad():
        seed_logits = bridge(ids)
        torch.testing.assert_close(seed_logits, plain(ids), rtol=0, atol=0)
    report = enable_fast_kernels(bridge, backend="torch")
    assert report.enabled and "blocks.0.ln1.hook_scale" in bridge.hook_dict
    with torch.no_grad():
        torch.testing.assert_close(bridge(ids), fast_logits, rtol=1e-6, atol=1e-6)


def test_non_gemma4_model(tok, caplog):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    cfg.architectures = ["LlamaForCausalLM"]
    with caplog.at_level(logging.WARNING, logger="gemma4_fast"):
        bridge = boot_transformers("tiny-llama", hf_model=LlamaForCausalLM(cfg).eval(), tokenizer=tok,
                                   device="cpu", fast_kernels="auto", fast_backend="torch")
    assert not bridge.fast_kernels_report().enabled
    assert "not a Gemma 4" in bridge.fast_kernels_report().reason
    with pytest.raises(FastKernelsUnavailable, match="not a Gemma 4"):
        enable_fast_kernels(bridge, True, backend="torch")


@pytest.mark.slow
def test_triton_backend_under_interpreter(tok, monkeypatch):
    """One tiny model end to end on the Triton kernels (CPU interpreter)."""
    from gemma4_fast.kernels._common import interpret_mode

    if torch.cuda.is_available() or not interpret_mode():
        pytest.skip("needs the CPU interpreter")
    seed, fast = _pair("tiny-dense-k-eq-v", tok, backend="triton")
    assert fast.fast_kernels_report().backend == "triton"
    ids = fast.to_tokens("Odd length prompt!")
    with torch.no_grad():
        ref_logits, ref_cache = seed.run_with_cache(ids)
        logits, cache = fast.run_with_cache(ids)
    assert _rel(logits, ref_logits) <= 1e-4
    assert _rel(cache["blocks.5.attn.hook_pattern"], ref_cache["blocks.5.attn.hook_pattern"]) <= 1e-4


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["E2B", "26B-A4B"])
def test_gpu_bf16_real_shapes(name, tok):
    """bf16 on the GPU, real layer shapes (4 layers): fast vs seed by the three-way rule against fp32."""
    from transformer_lens.model_bridge import TransformerBridge

    kw = dict(device="cuda", num_hidden_layers=4)
    ref32 = TransformerBridge.boot_transformers(name, hf_model=build_model(name, torch.float32, **kw), tokenizer=tok,
                                                device="cuda")
    seed16 = TransformerBridge.boot_transformers(name, hf_model=build_model(name, torch.bfloat16, **kw),
                                                 tokenizer=tok, device="cuda")
    fast16 = boot_transformers(name, hf_model=build_model(name, torch.bfloat16, **kw), tokenizer=tok, device="cuda",
                               fast_kernels=True)
    assert fast16.fast_kernels_report().backend == "triton"
    ids = torch.randint(4, 260, (2, 333), device="cuda")
    ids[:, 0] = 2
    with torch.no_grad():
        r, rc = ref32.run_with_cache(ids, names_filter=lambda n: n.endswith(("resid_post", "hook_pattern")))
        s, sc = seed16.run_with_cache(ids, names_filter=lambda n: n.endswith(("resid_post", "hook_pattern")))
        f, fc = fast16.run_with_cache(ids, names_filter=lambda n: n.endswith(("resid_post", "hook_pattern")))
    for key in list(rc.keys()) + ["logits"]:
        ref, base, got = (r, s, f) if key == "logits" else (rc[key], sc[key], fc[key])
        err_fast = (got.float() - ref.float()).abs().max()
        err_seed = (base.float() - ref.float()).abs().max()
        assert err_fast <= 2 * err_seed + 1e-2 * ref.float().abs().max(), (key, err_fast.item(), err_seed.item())
