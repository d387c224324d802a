"""A Gemma 4 bridge split across devices with the fast kernels.

``multigpu`` tests need two GPUs (skipped otherwise); the placement logic itself is checked on the CPU.
"""
from __future__ import annotations

import pytest
import torch

import gemma4_fast
from gemma4_fast.models import build_model, build_model_split, offline_tokenizer

NAME = "tiny-moe"


def _split_map(n_layers: int, devices: tuple) -> dict:
    half = n_layers // 2
    dmap = {"model.embed_tokens": devices[0], "model.rotary_emb": devices[0], "model.norm": devices[1],
            "lm_head": devices[0]}
    dmap.update({f"model.layers.{i}": devices[0] if i < half else devices[1] for i in range(n_layers)})
    return dmap


def test_split_builder_honours_the_map_on_cpu():
    dmap = _split_map(6, ("cpu", "cpu"))
    model = build_model_split(NAME, torch.float32, device_map=dmap)
    assert model.hf_device_map == dmap
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "tied weights stay tied"
    buffers = dict(model.named_buffers())
    ref = dict(build_model(NAME).named_buffers())
    for key, value in ref.items():
        torch.testing.assert_close(buffers[key], value, msg=key)
    with torch.no_grad():
        logits = model(torch.randint(4, 260, (1, 9))).logits
    assert torch.isfinite(logits).all()


def _one_gpu_logits(name, state, dtype, ids, tok):
    """Logits of the fast bridge on cuda:0 alone, with ``state`` (a CPU state dict) cast to ``dtype``."""
    from transformer_lens.model_bridge import TransformerBridge

    single = build_model(name, dtype, device="cuda:0")
    single.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()})
    bridge = TransformerBridge.boot_transformers(name, hf_model=single, tokenizer=tok)
    gemma4_fast.enable_fast_kernels(bridge, True)
    with torch.no_grad():
        return bridge(ids).float()


@pytest.mark.multigpu
@pytest.mark.parametrize("name,dtype", [("tiny-moe", torch.float32), ("tiny-dense-k-eq-v", torch.bfloat16)])
def test_split_fast_bridge_matches_one_gpu(name, dtype):
    """fp32: the split bridge equals one GPU to 1e-4. bf16: three-way rule against the fp32 one-GPU logits of the
    same weights, |split - ref32| <= 2 |one_gpu_bf16 - ref32| + 1e-2 |ref32|max."""
    tok = offline_tokenizer()
    model = build_model_split(name, dtype, device_map=_split_map(6, ("cuda:0", "cuda:1")))
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    bridge = gemma4_fast.boot_transformers(name, hf_model=model, tokenizer=tok, fast_kernels=True)
    report = bridge.fast_kernels_report()
    assert report.backend == "triton" and not report.patch.left_on_hf
    ids = torch.randint(4, 260, (2, 77), device="cuda:0")
    ids[:, 0] = 2
    torch.cuda.set_device(1)  # launches must follow the tensors, not the current device
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(ids)
    torch.cuda.set_device(0)
    for i in range(6):
        want = torch.device("cuda:0" if i < 3 else "cuda:1")
        assert cache[f"blocks.{i}.hook_resid_post"].device == want
        assert cache[f"blocks.{i}.attn.hook_pattern"].device == want
    split = logits.to("cuda:0").float()
    ref32 = _one_gpu_logits(name, state, torch.float32, ids, tok)
    if dtype == torch.float32:
        assert ((split - ref32).abs().max() / ref32.abs().max()).item() <= 1e-4
        return
    one = _one_gpu_logits(name, state, dtype, ids, tok)
    err_split = (split - ref32).abs().max()
    err_one = (one - ref32).abs().max()
    assert err_split <= 2 * err_one + 1e-2 * ref32.abs().max(), (err_split.item(), err_one.item())


@pytest.mark.multigpu
def test_n_devices_boot_from_local_checkpoint(tmp_path):
    from transformers import AutoModelForCausalLM

    tok = offline_tokenizer(tmp_path / "tok")
    build_model(NAME).save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    bridge = gemma4_fast.boot_transformers(str(tmp_path / "ckpt"), tokenizer=tok, n_devices=2,
                                           dtype=torch.float32, fast_kernels=True)
    assert bridge.fast_kernels_report().enabled
    devices = {p.device for p in bridge.original_model.parameters()}
    assert len(devices) == 2
    ref_model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32,
                                                     attn_implementation="eager",
                                                     experts_implementation="eager").to("cuda:0").eval()
    ids = torch.randint(4, 260, (1, 51), device="cuda:0")
    ids[:, 0] = 2
    with torch.no_grad():
        out = bridge(ids)
        ref = ref_model(ids).logits
        text = bridge.generate("Hello", max_new_tokens=5, do_sample=False, verbose=False)
    assert ((out.to(ref.device) - ref).abs().max() / ref.abs().max()).item() <= 1e-4
    assert isinstance(text, str)
