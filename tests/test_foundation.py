"""Foundation: packaging, presets, offline builders, bridge boot parity, CLI demo."""
from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import torch

from gemma4_fast.models import build_model, count_parameters, offline_tokenizer, text_config, unified_available
from gemma4_fast.presets import PRESETS, REAL_PRESETS, TINY_PRESETS, get_preset

ROOT = Path(__file__).resolve().parents[1]


def _needs_unified(name: str):
    if PRESETS[name].unified and not unified_available():
        pytest.skip("this transformers has no gemma4_unified models (needs >= 5.23)")


@pytest.mark.slow
def test_installs_in_fresh_venv(tmp_path):
    """A non-editable install into a new venv imports under one namespace and ships no top-level `kernels`."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(ROOT)],
                   check=True, cwd=tmp_path)
    code = (
        "import importlib.util, gemma4_fast, gemma4_fast.kernels, gemma4_fast.bridge_integration\n"
        "import gemma4_fast.kernels.attention, gemma4_fast.kernels.moe, gemma4_fast.kernels.rmsnorm\n"
        "import gemma4_fast.kernels.rope, gemma4_fast.kernels.activation\n"
        "from gemma4_fast.kernels.attention import configs; assert configs\n"
        f"assert gemma4_fast.__file__.startswith({str(env_dir)!r}), gemma4_fast.__file__\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "origin = '' if spec is None else str(spec.origin or spec.submodule_search_locations)\n"
        "assert 'gemma4' not in origin and 'work/main' not in origin, origin\n"
        "print('ok')\n")
    out = subprocess.run([str(py), "-c", code], check=True, cwd=tmp_path, capture_output=True, text=True)
    assert out.stdout.strip() == "ok"
    site = next(env_dir.glob("lib/python*/site-packages"))
    assert not (site / "kernels").exists(), "a top-level `kernels` package was installed"
    assert (site / "gemma4_fast" / "kernels" / "__init__.py").exists()
    shipped = {p.relative_to(ROOT / "kernels") for p in (ROOT / "kernels").glob("*/configs/*.json")}
    installed = {p.relative_to(site / "gemma4_fast" / "kernels")
                 for p in (site / "gemma4_fast" / "kernels").glob("*/configs/*.json")}
    assert shipped and shipped == installed, "tuned config tables must ship in the wheel"


def test_import_kernels_does_not_resolve_to_project(tmp_path):
    code = ("import importlib.util; s = importlib.util.find_spec('kernels'); "
            "print('' if s is None else (s.origin or list(s.submodule_search_locations)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert str(ROOT / "kernels") not in out.stdout


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_tiny_presets_build(name):
    _needs_unified(name)
    model = build_model(name, seed=1)
    cfg = model.config
    assert cfg.num_hidden_layers == PRESETS[name].text["num_hidden_layers"]
    assert any(t == "sliding_attention" for t in cfg.layer_types) and cfg.layer_types[-1] == "full_attention"
    assert cfg.sliding_window < 16, "tiny windows must be smaller than test sequences"
    ids = torch.randint(4, 260, (2, 19))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 19, cfg.vocab_size) and torch.isfinite(logits).all()
    same = build_model(name, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), same.state_dict().values()))


@pytest.mark.parametrize("name", REAL_PRESETS)
def test_real_presets_config(name):
    _needs_unified(name)
    cfg = text_config(name)
    p = get_preset(name)
    assert cfg.hidden_size == p.text["hidden_size"]
    full = [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"]
    assert cfg.per_layer_config[full[0]].head_dim == 512


@pytest.mark.parametrize("name,expected", [("E2B", 5.1e9), ("26B-A4B", 25.2e9), ("31B", 30.7e9)])
def test_published_parameter_counts(name, expected):
    n = count_parameters(name)
    assert abs(n - expected) / expected < 0.03, f"{name}: {n / 1e9:.3f}B vs published {expected / 1e9}B"


def test_known_shapes():
    a4b = get_preset("26B-A4B").text
    assert (a4b["hidden_size"], a4b["num_hidden_layers"], a4b["num_attention_heads"]) == (2816, 30, 16)
    assert (a4b["num_key_value_heads"], a4b["num_global_key_value_heads"], a4b["attention_k_eq_v"]) == (8, 2, True)
    assert (a4b["num_experts"], a4b["top_k_experts"], a4b["moe_intermediate_size"], a4b["intermediate_size"]) == (
        128, 8, 704, 2112)
    assert a4b["sliding_window"] == 1024 and a4b["final_logit_softcapping"] == 30.0
    assert a4b["layer_types"].count("full_attention") == 5
    b31 = get_preset("31B").text
    assert b31["layer_types"].count("full_attention") == 10 and b31["intermediate_size"] == 21504
    e2b = get_preset("E2B").text
    assert e2b["num_kv_shared_layers"] == 20 and e2b["hidden_size_per_layer_input"] == 256
    assert [i for i, t in enumerate(e2b["layer_types"]) if t == "full_attention"] == list(range(4, 35, 5))


def test_offline_tokenizer(tmp_path):
    tok = offline_tokenizer(tmp_path / "tok")
    ids = tok("Hello, wörld").input_ids
    assert ids[0] == tok.bos_token_id == 2 and max(ids) < 300
    assert tok.decode(ids, skip_special_tokens=True) == "Hello, wörld"
    assert tok.name_or_path == str(tmp_path / "tok")


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_bridge_boots_offline_with_hf_parity(name):
    _needs_unified(name)
    import gemma4_fast  # noqa: F401  (registers the unified text adapter)
    from transformer_lens.model_bridge import TransformerBridge

    tok = offline_tokenizer()
    model = build_model(name)
    ids = tok(["A short prompt, with odd length!"], return_tensors="pt").input_ids
    with torch.no_grad():
        ref = model(ids).logits
    bridge = TransformerBridge.boot_transformers(name, hf_model=model, tokenizer=tok, device="cpu")
    with torch.no_grad():
        out = bridge(ids)
    rel = (out - ref).abs().max() / ref.abs().max()
    assert rel <= 1e-4


def test_cli_demo_runs_offline():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-m", "gemma4_fast", "demo", "--generate", "5"], capture_output=True,
                         text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    for field in ("model", "device", "path", "hooks", "next token", "wall time", "generate   : 5 tokens"):
        assert field in out.stdout
    assert "delegation" in out.stdout.lower()


def test_cli_demo_fast_kernels_true_without_cuda_is_a_clear_error():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-m", "gemma4_fast", "demo", "--fast-kernels", "true"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 2 and "fast_kernels=True but the fast path cannot run" in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_presets_lists_all():
    out = subprocess.run([sys.executable, "-m", "gemma4_fast", "presets"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for name in PRESETS:
        assert name in out.stdout
