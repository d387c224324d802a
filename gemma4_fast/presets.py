"""Presets: the text configs of the real Gemma 4 models, and tiny test models of each structural family.

Each preset is a :class:`Preset`: ``text`` holds ``Gemma4TextConfig`` keyword arguments (for the unified
family, ``Gemma4UnifiedTextConfig`` ones); ``vision`` / ``audio`` hold the encoder configs of the
multimodal checkpoints (used only to count the published totals, and by ``build_model(...,
multimodal=True)``). Real-model values follow the public ``config.json`` files of the Gemma 4 releases:

- E2B / E4B: Per-Layer Embeddings (PLE, width 256), KV sharing of the last layers, one full-attention
  layer every 5 (E2B) or 6 (E4B), window 512, head_dim 256 / 512 on full layers.
- 31B: dense, K==V on full layers (no ``v_proj``), 16 KV heads sliding / 4 full, window 1024.
- 26B-A4B: dense MLP beside 128 experts (top-8, width 704), K==V, 8 KV heads sliding / 2 full.
- 12B (unified, encoder-free): the ``gemma4_unified`` text decoder (transformers >= 5.23).

Tiny presets use deliberately odd sizes (head dims and widths not multiples of 16, windows smaller than
typical test sequences) so the kernels' edge handling is exercised.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

VOCAB = 262_144


def _pattern(n_layers: int, period: int) -> list[str]:
    """``period - 1`` sliding layers then one full layer, repeated; the last layer is full."""
    types = ["full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(n_layers)]
    types[-1] = "full_attention"
    return types


@dataclass(frozen=True)
class Preset:
    """A named model shape. ``family`` is one of 'ple-kv-shared', 'dense-k-eq-v', 'moe', 'unified'."""

    name: str
    family: str
    text: dict[str, Any]
    vision: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    published_params: float | None = None
    published_note: str = ""
    tiny: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def unified(self) -> bool:
        return self.family == "unified"


_COMMON = dict(vocab_size=VOCAB, vocab_size_per_layer_input=VOCAB, rms_norm_eps=1e-6,
               hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=30.0, tie_word_embeddings=True,
               pad_token_id=0, eos_token_id=1, bos_token_id=2, head_dim=256, global_head_dim=512)

_VISION_SMALL = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=16, num_attention_heads=12,
                     num_key_value_heads=12, head_dim=64)
_VISION_LARGE = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                     num_key_value_heads=16, head_dim=72)
_AUDIO = dict(hidden_size=1024, num_hidden_layers=12, num_attention_heads=8)

PRESETS: dict[str, Preset] = {}


def _add(p: Preset) -> None:
    PRESETS[p.name] = p


_add(Preset("E2B", "ple-kv-shared", dict(
    _COMMON, hidden_size=1536, intermediate_size=6144, num_hidden_layers=35, num_attention_heads=8,
    num_key_value_heads=1, sliding_window=512, layer_types=_pattern(35, 5), hidden_size_per_layer_input=256,
    num_kv_shared_layers=20, use_double_wide_mlp=True, max_position_embeddings=131_072),
    vision=_VISION_SMALL, audio=_AUDIO, published_params=5.1e9,
    published_note="total with embeddings, vision and audio encoders"))
_add(Preset("E4B", "ple-kv-shared", dict(
    _COMMON, hidden_size=2560, intermediate_size=10240, num_hidden_layers=42, num_attention_heads=8,
    num_key_value_heads=2, sliding_window=512, layer_types=_pattern(42, 6), hidden_size_per_layer_input=256,
    num_kv_shared_layers=18, use_double_wide_mlp=False, max_position_embeddings=131_072),
    vision=_VISION_SMALL, audio=_AUDIO, published_params=8.0e9,
    published_note="total with embeddings, vision and audio encoders"))
_add(Preset("31B", "dense-k-eq-v", dict(
    _COMMON, hidden_size=5376, intermediate_size=21504, num_hidden_layers=60, num_attention_heads=32,
    num_key_value_heads=16, num_global_key_value_heads=4, attention_k_eq_v=True, sliding_window=1024,
    layer_types=_pattern(60, 6), hidden_size_per_layer_input=0, max_position_embeddings=262_144),
    vision=_VISION_LARGE, published_params=30.7e9, published_note="text decoder with embeddings"))
_add(Preset("26B-A4B", "moe", dict(
    _COMMON, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30, num_attention_heads=16,
    num_key_value_heads=8, num_global_key_value_heads=2, attention_k_eq_v=True, sliding_window=1024,
    layer_types=_pattern(30, 6), hidden_size_per_layer_input=0, enable_moe_block=True, num_experts=128,
    top_k_experts=8, moe_intermediate_size=704, max_position_embeddings=262_144),
    vision=_VISION_LARGE, published_params=25.2e9, published_note="text decoder with embeddings"))
_add(Preset("12B", "unified", dict(
    vocab_size=VOCAB, hidden_size=3840, intermediate_size=15360, num_hidden_layers=48, num_attention_heads=16,
    num_key_value_heads=8, head_dim=256, global_head_dim=512, sliding_window=1024, layer_types=_pattern(48, 6),
    final_logit_softcapping=30.0, rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    max_position_embeddings=262_144), published_note="encoder-free unified text decoder (shape per the "
    "Gemma 3 12B lineage; no published total is checked)"))

_TINY_COMMON = dict(vocab_size=300, vocab_size_per_layer_input=300, rms_norm_eps=1e-6,
                    hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True, pad_token_id=0,
                    eos_token_id=1, bos_token_id=2, max_position_embeddings=1024, initializer_range=0.2)

_add(Preset("tiny-ple-kv-shared", "ple-kv-shared", dict(
    _TINY_COMMON, hidden_size=48, intermediate_size=40, num_hidden_layers=10, num_attention_heads=4,
    num_key_value_heads=1, head_dim=24, global_head_dim=40, sliding_window=5, layer_types=_pattern(10, 5),
    hidden_size_per_layer_input=12, num_kv_shared_layers=4, use_double_wide_mlp=True,
    final_logit_softcapping=30.0), tiny=True))
_add(Preset("tiny-dense-k-eq-v", "dense-k-eq-v", dict(
    _TINY_COMMON, hidden_size=56, intermediate_size=72, num_hidden_layers=6, num_attention_heads=4,
    num_key_value_heads=2, num_global_key_value_heads=1, attention_k_eq_v=True, head_dim=24,
    global_head_dim=40, sliding_window=7, layer_types=_pattern(6, 3), hidden_size_per_layer_input=0,
    final_logit_softcapping=30.0), tiny=True))
_add(Preset("tiny-moe", "moe", dict(
    _TINY_COMMON, hidden_size=44, intermediate_size=40, num_hidden_layers=6, num_attention_heads=4,
    num_key_value_heads=2, num_global_key_value_heads=1, attention_k_eq_v=True, head_dim=20,
    global_head_dim=36, sliding_window=6, layer_types=_pattern(6, 3), hidden_size_per_layer_input=0,
    enable_moe_block=True, num_experts=6, top_k_experts=2, moe_intermediate_size=18,
    final_logit_softcapping=30.0), tiny=True))
_add(Preset("tiny-unified", "unified", dict(
    _TINY_COMMON, hidden_size=40, intermediate_size=56, num_hidden_layers=6, num_attention_heads=2,
    num_key_value_heads=1, head_dim=20, global_head_dim=36, sliding_window=5, layer_types=_pattern(6, 3),
    final_logit_softcapping=30.0), tiny=True))

TINY_PRESETS = tuple(name for name, p in PRESETS.items() if p.tiny)
REAL_PRESETS = tuple(name for name, p in PRESETS.items() if not p.tiny)


def get_preset(name: str) -> Preset:
    """The preset called ``name`` (case-insensitive); a clear error listing the choices otherwise."""
    for key, p in PRESETS.items():
        if key.lower() == name.lower():
            return p
    raise KeyError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
