"""TransformerLens architecture adapters this package adds.

``Gemma4UnifiedForCausalLM`` (the encoder-free 12B family's text-only class, transformers >= 5.23) has the
same decoder module paths as ``Gemma4ForCausalLM`` (no PLE, no MoE — both optional in the Gemma 4 adapter),
so the Gemma 4 text adapter maps it unchanged. ``register_adapters()`` (called by ``import gemma4_fast``)
adds it to TransformerLens's architecture table and adapter factory.
"""
from __future__ import annotations

from transformer_lens.model_bridge.supported_architectures.gemma4_text import Gemma4TextArchitectureAdapter


class Gemma4UnifiedTextArchitectureAdapter(Gemma4TextArchitectureAdapter):
    """Adapter for ``Gemma4UnifiedForCausalLM``: the Gemma 4 text adapter (same paths and hooks)."""


ADDED_ARCHITECTURES = {"Gemma4UnifiedForCausalLM": Gemma4UnifiedTextArchitectureAdapter}


def register_adapters() -> None:
    """Make TransformerBridge accept the architectures in ``ADDED_ARCHITECTURES`` (idempotent)."""
    from transformer_lens.factories import architecture_adapter_factory as factory

    for name, adapter in ADDED_ARCHITECTURES.items():
        factory.SUPPORTED_ARCHITECTURES.setdefault(name, adapter)
        registry = getattr(factory.ArchitectureAdapterFactory, "_adapters", None)
        if isinstance(registry, dict):
            registry.setdefault(name, adapter)
