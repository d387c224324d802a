"""CPU checks of bench/floors.py: the analytic visible-pair count against HF's own mask functions, and the
meta-device FLOP count against FlopCounterMode on a real CPU forward of tiny presets (eager attention and
HF's eager experts loop)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

from gemma4_fast.models import build_model
from gemma4_fast.presets import get_preset

FLOORS_PY = Path(__file__).resolve().parents[1] / "bench" / "floors.py"


def _floors():
    if "bench_floors" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_floors", FLOORS_PY)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["bench_floors"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["bench_floors"]


@pytest.mark.parametrize("window", [None, 1, 3, 5, 16])
def test_visible_pairs_match_hf_mask(window: int | None) -> None:
    mask_fn = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
    for sk in range(1, 14):
        for sq in range(1, sk + 1):
            q_idx = torch.arange(sk - sq, sk)[:, None]
            kv_idx = torch.arange(sk)[None, :]
            assert _floors().visible_pairs(sq, sk, window) == int(mask_fn(0, 0, q_idx, kv_idx).sum())


@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-ple-kv-shared"])
@pytest.mark.parametrize("logits", ["last", "all"])
def test_meta_count_matches_real_forward(preset: str, logits: str) -> None:
    B, S = 2, 11
    model = build_model(preset, attn_implementation="eager", experts_implementation="eager")
    ids = torch.randint(4, 300, (B, S), generator=torch.Generator().manual_seed(0))
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(input_ids=ids, use_cache=False, logits_to_keep=1 if logits == "last" else 0)
    counts = counter.get_flop_counts()
    attn_bmm = sum(ops.get(torch.ops.aten.bmm, 0) for name, ops in counts.items() if name.endswith(".self_attn"))
    real_matmul = sum(counts["Global"].values()) - attn_bmm
    real_experts = sum(sum(ops.values()) for name, ops in counts.items() if name.endswith(".experts"))
    row = _floors().forward_flops(preset, S, B, logits)
    assert attn_bmm > 0
    assert row["matmul_flops"] == real_matmul
    assert row["experts_flops"] == real_experts
    if preset == "tiny-moe":
        text = get_preset(preset).text
        H, I, k, L = text["hidden_size"], text["moe_intermediate_size"], text["top_k_experts"], len(text["layer_types"])
        assert real_experts == B * S * L * k * 6 * H * I > 0


def test_attention_core_uses_per_layer_head_dim_and_window() -> None:
    B, S = 2, 11
    text = get_preset("tiny-ple-kv-shared").text
    expected = 0
    for layer_type in text["layer_types"]:
        sliding = layer_type == "sliding_attention"
        D = text["head_dim"] if sliding else text["global_head_dim"]
        W = text["sliding_window"] if sliding else S
        pairs = sum(min(i + 1, W) for i in range(S))
        expected += 4 * B * text["num_attention_heads"] * D * pairs
    assert _floors().forward_flops("tiny-ple-kv-shared", S, B, "all")["attn_core_flops"] == expected == 445_440
