"""Drop-in fast subclasses of HF's Gemma 4 text modules, and the HF-class -> fast-class table.

Each fast class adds no parameter, buffer or submodule to its HF base: patching swaps
``module.__class__`` in place (see ``gemma4_fast.patch``), so weights, ``state_dict`` keys and any
wrapper around the module (TransformerBridge's ``original_component``) are untouched.

- ``FastGemma4RMSNorm(Gemma4RMSNorm)``: ``gemma4_fast.norm``.
- ``FastGemma4TextAttention(Gemma4TextAttention)``: ``gemma4_fast.attention``.
- ``FastGemma4TextRouter(Gemma4TextRouter)``, ``FastGemma4TextExperts(Gemma4TextExperts)``:
  ``gemma4_fast.moe``.
- ``FastGemma4TextMLP(Gemma4TextMLP)``: ``gemma4_fast.mlp`` (fused ``gelu_tanh(gate) * up``).
- ``FastGemma4TextDecoderLayer(Gemma4TextDecoderLayer)``: ``gemma4_fast.layer`` (residual adds fused into the
  norms when no hook is on them; kind ``"residual"``).
- With transformers' ``gemma4_unified`` family (the encoder-free 12B): ``FastGemma4UnifiedRMSNorm``,
  ``FastGemma4UnifiedTextAttention`` and, when that family defines it, ``FastGemma4UnifiedTextMLP``
  (same code; that family has no MoE).
- ``FastGemma4TextRotaryEmbedding(Gemma4TextRotaryEmbedding)``: ``gemma4_fast.rotary`` (the tables of HF's default
  positions kept between calls; kind ``"rotary"``).
- ``FastGemma4TextScaledWordEmbedding``, ``FastGemma4TextModel``: ``gemma4_fast.prologue`` (the embedding scale as a
  Python number, the per-layer-input projection in one pass; kind ``"prologue"``). The text model keeps its HF
  class's names too: transformers finds what a model can record (``output_hidden_states``) by ``str(class)``.
- Top-level language models, kind ``"logits"`` (``gemma4_fast.logits``: the final logit softcap in place):
  ``FastGemma4ForCausalLM``, ``FastGemma4ForConditionalGeneration`` and, with ``gemma4_unified``,
  ``FastGemma4UnifiedForCausalLM`` / ``FastGemma4UnifiedForConditionalGeneration``. These keep their HF
  class's ``__name__``, ``__qualname__`` and ``__module__`` (``save_pretrained`` writes the HF architecture
  name; transformers' checks by class name and module see the HF class).

Each instance reads its backend from ``_g4f_backend`` (``"auto"``, ``"triton"`` or ``"torch"``, set
by ``patch_model``) and its hook seams from ``_g4f_hooks`` (``gemma4_fast.hooks``).
"""
from __future__ import annotations

from functools import lru_cache

from transformers.models.gemma4.modeling_gemma4 import (Gemma4ForCausalLM, Gemma4ForConditionalGeneration,
                                                        Gemma4RMSNorm, Gemma4TextAttention, Gemma4TextDecoderLayer,
                                                        Gemma4TextExperts, Gemma4TextMLP, Gemma4TextModel,
                                                        Gemma4TextRotaryEmbedding, Gemma4TextRouter,
                                                        Gemma4TextScaledWordEmbedding)

from .attention import FastAttentionMixin
from .layer import FastDecoderLayerMixin
from .logits import FastLogitsMixin
from .mlp import FastMLPMixin
from .moe import FastExpertsMixin, FastRouterMixin
from .norm import FastRMSNormMixin
from .prologue import FastScaledEmbeddingMixin, FastTextModelMixin
from .rotary import FastRotaryMixin

KINDS = ("attention", "rms_norm", "router", "experts", "mlp", "residual", "rotary", "prologue", "logits")


def _hf_named(fast: type, hf: type) -> type:
    """Give ``fast`` the name, qualified name and module of its HF base (for the top-level model classes)."""
    fast.__name__, fast.__qualname__, fast.__module__ = hf.__name__, hf.__qualname__, hf.__module__
    return fast


class FastGemma4RMSNorm(FastRMSNormMixin, Gemma4RMSNorm):
    """``Gemma4RMSNorm`` on the RMSNorm op (``gemma4_fast.norm``)."""


class FastGemma4TextAttention(FastAttentionMixin, Gemma4TextAttention):
    """``Gemma4TextAttention`` on the attention ops (``gemma4_fast.attention``)."""


class FastGemma4TextRouter(FastRouterMixin, Gemma4TextRouter):
    """``Gemma4TextRouter`` on the router op (``gemma4_fast.moe``)."""


class FastGemma4TextExperts(FastExpertsMixin, Gemma4TextExperts):
    """``Gemma4TextExperts`` on the grouped expert op (``gemma4_fast.moe``)."""


class FastGemma4TextMLP(FastMLPMixin, Gemma4TextMLP):
    """``Gemma4TextMLP`` with the fused activation op (``gemma4_fast.mlp``)."""


class FastGemma4TextDecoderLayer(FastDecoderLayerMixin, Gemma4TextDecoderLayer):
    """``Gemma4TextDecoderLayer`` with the residual adds fused into its norms (``gemma4_fast.layer``)."""


class FastGemma4TextRotaryEmbedding(FastRotaryMixin, Gemma4TextRotaryEmbedding):
    """``Gemma4TextRotaryEmbedding`` keeping the tables of the default positions (``gemma4_fast.rotary``)."""


class FastGemma4TextScaledWordEmbedding(FastScaledEmbeddingMixin, Gemma4TextScaledWordEmbedding):
    """``Gemma4TextScaledWordEmbedding`` scaling by a Python number in place (``gemma4_fast.prologue``)."""


class FastGemma4TextModel(FastTextModelMixin, Gemma4TextModel):
    """``Gemma4TextModel`` with the per-layer-input projection in one pass (``gemma4_fast.prologue``)."""


class FastGemma4ForCausalLM(FastLogitsMixin, Gemma4ForCausalLM):
    """``Gemma4ForCausalLM`` with the final logit softcap in place (``gemma4_fast.logits``)."""


class FastGemma4ForConditionalGeneration(FastLogitsMixin, Gemma4ForConditionalGeneration):
    """``Gemma4ForConditionalGeneration`` with the final logit softcap in place (``gemma4_fast.logits``)."""


_hf_named(FastGemma4TextModel, Gemma4TextModel)  # transformers keys its output-capture registry on str(class)
_hf_named(FastGemma4ForCausalLM, Gemma4ForCausalLM)
_hf_named(FastGemma4ForConditionalGeneration, Gemma4ForConditionalGeneration)

try:
    from transformers.models.gemma4_unified.modeling_gemma4_unified import (Gemma4UnifiedRMSNorm,
                                                                            Gemma4UnifiedTextAttention)
except ImportError:
    Gemma4UnifiedRMSNorm = Gemma4UnifiedTextAttention = None

if Gemma4UnifiedRMSNorm is not None:
    class FastGemma4UnifiedRMSNorm(FastRMSNormMixin, Gemma4UnifiedRMSNorm):
        """``Gemma4UnifiedRMSNorm`` on the RMSNorm op (``gemma4_fast.norm``)."""

    class FastGemma4UnifiedTextAttention(FastAttentionMixin, Gemma4UnifiedTextAttention):
        """``Gemma4UnifiedTextAttention`` on the attention ops (``gemma4_fast.attention``)."""
else:
    FastGemma4UnifiedRMSNorm = FastGemma4UnifiedTextAttention = None

try:
    from transformers.models.gemma4_unified.modeling_gemma4_unified import Gemma4UnifiedTextMLP
except ImportError:
    Gemma4UnifiedTextMLP = None

if Gemma4UnifiedTextMLP is not None:
    class FastGemma4UnifiedTextMLP(FastMLPMixin, Gemma4UnifiedTextMLP):
        """``Gemma4UnifiedTextMLP`` with the fused activation op (``gemma4_fast.mlp``)."""
else:
    FastGemma4UnifiedTextMLP = None

try:
    from transformers.models.gemma4_unified.modeling_gemma4_unified import (
        Gemma4UnifiedForCausalLM, Gemma4UnifiedForConditionalGeneration)
except ImportError:
    Gemma4UnifiedForCausalLM = Gemma4UnifiedForConditionalGeneration = None

if Gemma4UnifiedForCausalLM is not None:
    class FastGemma4UnifiedForCausalLM(FastLogitsMixin, Gemma4UnifiedForCausalLM):
        """``Gemma4UnifiedForCausalLM`` with the final logit softcap in place (``gemma4_fast.logits``)."""

    class FastGemma4UnifiedForConditionalGeneration(FastLogitsMixin, Gemma4UnifiedForConditionalGeneration):
        """``Gemma4UnifiedForConditionalGeneration`` with the final logit softcap in place."""

    _hf_named(FastGemma4UnifiedForCausalLM, Gemma4UnifiedForCausalLM)
    _hf_named(FastGemma4UnifiedForConditionalGeneration, Gemma4UnifiedForConditionalGeneration)
else:
    FastGemma4UnifiedForCausalLM = FastGemma4UnifiedForConditionalGeneration = None


@lru_cache(maxsize=None)
def fast_class_map() -> dict:
    """``{HF class: (fast class, kind)}`` for every HF class this transformers has; kind in ``KINDS``."""
    table = {
        Gemma4RMSNorm: (FastGemma4RMSNorm, "rms_norm"),
        Gemma4TextAttention: (FastGemma4TextAttention, "attention"),
        Gemma4TextRouter: (FastGemma4TextRouter, "router"),
        Gemma4TextExperts: (FastGemma4TextExperts, "experts"),
        Gemma4TextMLP: (FastGemma4TextMLP, "mlp"),
        Gemma4TextDecoderLayer: (FastGemma4TextDecoderLayer, "residual"),
        Gemma4TextRotaryEmbedding: (FastGemma4TextRotaryEmbedding, "rotary"),
        Gemma4TextScaledWordEmbedding: (FastGemma4TextScaledWordEmbedding, "prologue"),
        Gemma4TextModel: (FastGemma4TextModel, "prologue"),
        Gemma4ForCausalLM: (FastGemma4ForCausalLM, "logits"),
        Gemma4ForConditionalGeneration: (FastGemma4ForConditionalGeneration, "logits"),
    }
    if Gemma4UnifiedRMSNorm is not None:
        table[Gemma4UnifiedRMSNorm] = (FastGemma4UnifiedRMSNorm, "rms_norm")
        table[Gemma4UnifiedTextAttention] = (FastGemma4UnifiedTextAttention, "attention")
    if Gemma4UnifiedTextMLP is not None:
        table[Gemma4UnifiedTextMLP] = (FastGemma4UnifiedTextMLP, "mlp")
    if Gemma4UnifiedForCausalLM is not None:
        table[Gemma4UnifiedForCausalLM] = (FastGemma4UnifiedForCausalLM, "logits")
        table[Gemma4UnifiedForConditionalGeneration] = (FastGemma4UnifiedForConditionalGeneration, "logits")
    return table


def fast_classes() -> tuple:
    """Every fast class of ``fast_class_map``."""
    return tuple(fast for fast, _ in fast_class_map().values())

