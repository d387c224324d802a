"""``bridge.generate`` on the fast path: TransformerLens's token loop replaced by ``gemma4_fast.generate``.

``enable_fast_kernels`` installs :func:`install_generate` on the bridge. The bridge's components sit inside its
HF model, so running that model fires the bridge's hooks exactly as ``bridge(...)`` does; ``gemma4_fast.generate``
then replays the decode step as a CUDA graph (no hook attached) or per unhooked decoder layer (hooks attached:
hooked layers, the embedding and the unembedding run eagerly every step), see ``gemma4_fast.decode``.

Taken over: a string or a 2-D token tensor, greedy or sampled (temperature, top-k, top-p), ``stop_at_eos`` with
TransformerLens's stop tokens and padding of finished rows, ``return_type`` ``"input"`` / ``"str"`` / ``"tokens"``,
``verbose`` and ``use_past_kv_cache=True``. Everything else (lists of prompts, attention masks or
``padding_side`` on tensors, penalties, ``output_logits``, ``return_cache``, ``return_input_tokens``, stop strings
or criteria, embeddings, images, ``use_past_kv_cache=False``) goes to TransformerLens's own ``generate``, logged
once with the reason. Greedy tokens equal TransformerLens's; sampling draws from the same distribution with
other random numbers.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

import torch

from ..decode import generate as fast_generate
from ..kernels._common import log_once

_DEFAULTS = {"freq_penalty": 0.0, "repetition_penalty": 1.0, "use_past_kv_cache": True, "output_logits": False,
             "return_cache": False, "return_input_tokens": False, "names_filter": None, "device": None,
             "pixel_values": None, "stop_strings": None, "stopping_criteria": None, "attention_mask": None,
             "forced_bos_token_id": None}


def _unsupported(args: dict[str, Any], extra: dict[str, Any]) -> Optional[str]:
    """Why the fast loop cannot stand in for TransformerLens's generate with these arguments (None if it can)."""
    inp = args.get("input")
    if isinstance(inp, torch.Tensor):
        if inp.dim() != 2 or inp.is_floating_point():
            return "input is not a 2-D token tensor"
        if args.get("padding_side") is not None:
            return "padding_side on a token tensor (padding read off the tokens)"
    elif not isinstance(inp, str):
        return f"input of type {type(inp).__name__} (a list of prompts needs padding)"
    for name, default in _DEFAULTS.items():
        if name in args and args[name] != default:
            return f"{name}={args[name]!r}"
    if extra:
        return f"extra arguments {sorted(extra)}"
    if args.get("return_type") not in ("input", "str", "tokens"):
        return f"return_type={args.get('return_type')!r}"
    if int(args.get("max_new_tokens", 0)) < 1:
        return "max_new_tokens < 1"
    return None


def _stop_tokens(bridge: Any, eos_token_id) -> tuple[Optional[list[int]], int]:
    """TransformerLens's stop set and the id finished rows are padded with."""
    tok = getattr(bridge, "tokenizer", None)
    tok_eos = getattr(tok, "eos_token_id", None)
    if eos_token_id is None:
        eos_token_id = getattr(bridge.cfg, "eos_token_id", None)
        if eos_token_id is None:
            if tok_eos is None:
                raise ValueError("Must pass eos_token_id if stop_at_eos is True and tokenizer is None or has no "
                                 "eos_token_id")
            eos_token_id = tok_eos
    if isinstance(eos_token_id, int):
        return [eos_token_id], eos_token_id
    stop = [int(t) for t in eos_token_id]
    return stop, (tok_eos if tok_eos is not None else stop[0])


def bridge_generate(bridge: Any, original: Callable, *args: Any, **kwargs: Any):
    """``bridge.generate(...)`` with TransformerLens's signature; see the module docstring."""
    sig = inspect.signature(original)
    bound = sig.bind(*args, **kwargs)
    bound.apply_defaults()
    params = dict(bound.arguments)
    extra = {}
    for name, p in sig.parameters.items():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            extra = params.pop(name, {}) or {}
    why = _unsupported(params, extra)
    if why is not None:
        log_once(f"bridge-generate:{why}", "gemma4_fast: bridge.generate runs TransformerLens's loop (%s)", why)
        return original(*args, **kwargs)
    inp = params["input"]
    if isinstance(inp, str):
        tokens = bridge.to_tokens(inp, prepend_bos=params.get("prepend_bos"), move_to_device=True, truncate=False)
    else:
        tokens = inp.to(bridge.cfg.device)
    stop, pad = (None, 0)
    if params.get("stop_at_eos", True):
        stop, pad = _stop_tokens(bridge, params.get("eos_token_id"))
    temperature = float(params.get("temperature", 1.0))
    sample = bool(params.get("do_sample", True)) and temperature > 0
    with torch.no_grad():
        out = fast_generate(bridge.original_model, tokens, max_new_tokens=int(params["max_new_tokens"]),
                            do_sample=sample, temperature=temperature if sample else 1.0,
                            top_k=params.get("top_k") if sample else None,
                            top_p=params.get("top_p") if sample else None, eos_token_id=stop, pad_token_id=pad)
    rtype = params.get("return_type", "input")
    if rtype == "input":
        rtype = "str" if isinstance(inp, str) else "tokens"
    if rtype == "tokens":
        return out
    if isinstance(inp, str):
        return bridge.tokenizer.decode(out[0], skip_special_tokens=True)
    texts = [bridge.tokenizer.decode(row, skip_special_tokens=True) for row in out]
    return texts[0] if len(texts) == 1 else texts


def install_generate(bridge: Any) -> Callable[[], None]:
    """Route ``bridge.generate`` through :func:`bridge_generate`; returns the function that undoes it."""
    from .fast import install_method

    return install_method(bridge, "generate", bridge_generate)


__all__ = ["bridge_generate", "install_generate"]
