"""``gemma4_fast.masks``: the ready mask mapping a patched ``Gemma4ForCausalLM`` passes when HF's builders would
return None for both layer types, checked against HF's builders themselves and end to end."""
from __future__ import annotations

import pytest
import torch
from transformers import masking_utils
from transformers.cache_utils import DynamicCache

from gemma4_fast import patch_model
from gemma4_fast.masks import LAYER_TYPES, known_mask_mapping
from gemma4_fast.models import build_model
from gemma4_fast.presets import PRESETS, TINY_PRESETS

CAUSAL_LM_PRESETS = [n for n in TINY_PRESETS if not PRESETS[n].name.startswith("tiny-unified")]


def _ids(n=19, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 250, (batch, n), generator=g)
    ids[:, 0] = 2
    return ids


@pytest.mark.parametrize("name", CAUSAL_LM_PRESETS)
@pytest.mark.parametrize("n", [1, 7, 40])
@pytest.mark.parametrize("with_cache", [False, True])
def test_hf_builders_return_none_where_the_mapping_says_so(name, n, with_cache):
    """The premise: with the gemma4_fast mask function, no attention mask, HF's arange positions and no cache
    (or the fresh DynamicCache of ``use_cache=True``), both builders return None, also past the sliding window."""
    model = build_model(name)
    patch_model(model, backend="torch")
    config = model.config.get_text_config()
    embeds = torch.zeros(2, n, config.hidden_size)
    cache = DynamicCache(config=config) if with_cache else None
    kw = dict(config=config, inputs_embeds=embeds, attention_mask=None, past_key_values=cache,
              position_ids=torch.arange(n)[None])
    assert masking_utils.create_causal_mask(**kw) is None
    assert masking_utils.create_sliding_window_causal_mask(**kw) is None
    assert known_mask_mapping(model, (torch.zeros(2, n, dtype=torch.long),), {}) == dict.fromkeys(LAYER_TYPES)


@pytest.mark.parametrize("name", CAUSAL_LM_PRESETS)
@pytest.mark.parametrize("use_cache", [False, True])
def test_forward_skips_the_builders_with_equal_logits(name, use_cache, monkeypatch):
    model = build_model(name)
    patch_model(model, backend="torch")
    calls = []
    for fn in ("create_causal_mask", "create_sliding_window_causal_mask"):
        orig = getattr(masking_utils, fn)

        def spy(*a, _orig=orig, **k):
            calls.append(1)
            return _orig(*a, **k)
        monkeypatch.setattr(f"transformers.models.gemma4.modeling_gemma4.{fn}", spy)
    ids = _ids()
    with torch.no_grad():
        fast = model(ids, use_cache=use_cache).logits
        assert calls == []
        built = model(ids, use_cache=use_cache, attention_mask=torch.ones_like(ids)).logits
        assert len(calls) == 2
    torch.testing.assert_close(fast, built, rtol=0, atol=0)


def test_calls_that_keep_the_builders():
    model = build_model("tiny-moe")
    ids = _ids()
    assert known_mask_mapping(model, (ids,), {}) is None  # not patched: eager attention
    patch_model(model, backend="torch")
    assert known_mask_mapping(model, (ids,), {}) is not None
    for name in ("attention_mask", "position_ids", "past_key_values", "cache_position"):
        assert known_mask_mapping(model, (ids,), {name: torch.ones_like(ids)}) is None, name
    assert known_mask_mapping(model, (ids, torch.ones_like(ids)), {}) is None
    assert known_mask_mapping(model, (), {"input_ids": ids, "attention_mask": None}) is not None
