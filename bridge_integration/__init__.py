"""Glue between gemma4_fast and TransformerLens's TransformerBridge (installed as
``gemma4_fast.bridge_integration``)."""
