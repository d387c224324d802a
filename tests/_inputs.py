"""Shared test inputs and models (imported by the test modules; ``tests/conftest.py`` puts ``tests/`` on
``sys.path``)."""
from __future__ import annotations

import torch


def left_padded(batch: int, seq: int, pads=(0, 3, 6), seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention_mask)`` ``[batch, seq]``: random ids in [3, 300), row ``b`` left-padded by
    ``pads[b % len(pads)]`` positions (mask 0, id 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (batch, seq), generator=g)
    am = torch.ones_like(ids)
    for b in range(batch):
        am[b, : pads[b % len(pads)]] = 0
    return ids.masked_fill(am == 0, 0), am


def tiny_conditional_generation(preset: str):
    """A tiny ``Gemma4ForConditionalGeneration`` (eager attention, seed 0): the text model of ``preset`` and a
    one-layer vision tower."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration, Gemma4VisionConfig

    from gemma4_fast.models import text_config

    vision = Gemma4VisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=2, head_dim=16)
    cfg = Gemma4Config(text_config=text_config(preset).to_dict(), vision_config=vision.to_dict(), audio_config=None)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return Gemma4ForConditionalGeneration(cfg).eval()


def patched_copy(preset: str, device: str = "cpu", backend: str = "torch"):
    """``(ref, fast, report)``: a random ``preset`` model (seed 0), and a deep copy of it patched with
    ``gemma4_fast.patch_model(backend=backend)`` with that call's report."""
    import copy

    from gemma4_fast.models import build_model
    from gemma4_fast.patch import patch_model

    ref = build_model(preset, device=device)
    fast = copy.deepcopy(ref)
    return ref, fast, patch_model(fast, backend=backend)


def three_way_excess(fast: torch.Tensor, ref64: torch.Tensor, lowp: torch.Tensor, atol: float):
    """The low-precision three-way rule, elementwise: ``(bad, err, bound)`` with ``err = |fast - ref64|``,
    ``bound = 2 |lowp - ref64| + atol * max(1, max |ref64|)`` and ``bad = err > bound`` (``ref64``: float64
    reference, ``lowp``: the plain torch op in the low precision)."""
    err = (fast.double() - ref64).abs()
    bound = 2 * (lowp.double() - ref64).abs() + atol * ref64.abs().max().clamp_min(1.0)
    return err > bound, err, bound
