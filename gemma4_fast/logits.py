"""Fast Gemma 4 top-level language models: the final logit softcap in place, in one pass.

HF's ``Gemma4ForCausalLM.forward`` (likewise ``Gemma4ForConditionalGeneration`` and the ``gemma4_unified``
classes) ends with ``logits = logits / cap; logits = torch.tanh(logits); logits = logits * cap``: three
out-of-place passes over ``[batch, seq, vocab]`` logits (vocab 262144), and two logits-sized tensors alive at
the peak. ``FastLogitsMixin.forward`` runs HF's forward with the text config's ``final_logit_softcapping`` set
to None (restored in ``finally``, also when the forward raises) and then applies
``gemma4_fast.ops.logit_softcap(logits, cap, out=logits)`` to the returned logits: one read and one write,
no second tensor. The ``"triton"`` backend runs the Triton kernel (fp32 math, one rounding); ``"torch"`` runs
HF's three ops chunk by chunk into the logits (bit-identical to HF, chunk-sized temporaries).

The in-place path is taken only when all of these hold, else HF's forward runs unchanged:

- the cap is a finite number > 0 (``None``: HF applies no softcap either);
- ``labels`` is None (HF's loss must see the softcapped logits inside its forward);
- the call returns a ``ModelOutput`` (``return_dict`` is not False, in the call or the config);
- nothing can hold the raw logits: no user hook (``gemma4_fast.hooks.user_hooks``, backward hooks included)
  on ``lm_head`` or any module under it (inside a TransformerBridge ``lm_head`` is the unembed component, whose
  ``hook_out`` a ``run_with_cache`` caches: those raw logits must not change afterwards), and no global module
  hooks.

On the in-place path with autograd off and a backend other than ``"torch"``, the LM head's ``nn.Linear`` (the one a
TransformerBridge unembed component wraps, too) is routed for one call to ``ops.linear_softcap``, which returns the
softcapped logits (on an sm_90 GPU from one kernel that never writes the raw logits; see
``gemma4_fast.kernels.softcap.linear``); an all-zero bias (TransformerBridge's ``b_U``) is dropped for it, and the
forward then skips the separate softcap pass. A head with its own instance-level ``forward`` (accelerate's device
hooks) is not routed.

A call whose masks are all None by construction (no attention mask, positions or cache; see
``gemma4_fast.masks``) passes HF's text model the ready mask mapping, which skips HF's two mask builders and their
device-to-host syncs, and passes HF's default positions as one kept tensor whose rotary tables the patched rotary
module keeps (``gemma4_fast.rotary``).

When the returned logits require grad (autograd recording through the LM head), the softcap is HF's three
out-of-place ops on them instead (same numbers and gradients as HF's forward).

Limits: while HF's forward runs on the in-place path, the text config reads ``final_logit_softcapping = None``
(code in a hook that reads it sees None). Calls of fast models sharing a config take one re-entrant lock per
config, so a concurrent call from another thread never sees the temporary None; a nested call (a hook running
the model again) reads the real cap from this module's record. A pickled patched model cannot be unpickled by
class name (the fast classes carry HF's names, so ``save_pretrained`` and transformers' class-name checks see
the HF class); ``copy.deepcopy`` works.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
import threading
import weakref
from typing import Any, Iterator, Optional

import torch
from torch import nn

from . import ops
from .hooks import global_module_hooks, user_hooks
from .masks import known_mask_mapping
from .rotary import default_positions, positions_for

_MISSING = object()
#: id(text config) -> its real cap while a fast call on that config runs (the config then reads None or the cap).
_TRUE_CAP: dict[int, Any] = {}
_LOCKS: dict[int, threading.RLock] = {}
_LOCKS_GUARD = threading.Lock()


def _lock(config: Any) -> threading.RLock:
    """The re-entrant lock of ``config`` (created on first use, dropped when the config is collected)."""
    key = id(config)
    with _LOCKS_GUARD:
        lock = _LOCKS.get(key)
        if lock is None:
            lock = _LOCKS[key] = threading.RLock()
            weakref.finalize(config, _LOCKS.pop, key, None)
    return lock


@contextlib.contextmanager
def _cap_reads(config: Any, value: Optional[float], true_cap: Any) -> Iterator[None]:
    """``config.final_logit_softcapping`` reads ``value`` inside the block, with ``true_cap`` on record for
    nested calls; both restored on exit."""
    key = id(config)
    prev_true = _TRUE_CAP.get(key, _MISSING)
    prev_value = config.final_logit_softcapping
    _TRUE_CAP[key] = true_cap
    config.final_logit_softcapping = value
    try:
        yield
    finally:
        config.final_logit_softcapping = prev_value
        if prev_true is _MISSING:
            _TRUE_CAP.pop(key, None)
        else:
            _TRUE_CAP[key] = prev_true


@functools.lru_cache(maxsize=None)
def _positions(forward: Any) -> dict[str, int]:
    """Positional index (after ``self``) of each named parameter of the (unbound) ``forward``."""
    params = list(inspect.signature(forward).parameters.values())[1:]
    return {p.name: i for i, p in enumerate(params)
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)}


def _argument(forward: Any, name: str, args: tuple, kwargs: dict) -> Any:
    """The value of parameter ``name`` of the bound method ``forward`` in a call with ``args`` / ``kwargs``."""
    if name in kwargs:
        return kwargs[name]
    idx = _positions(forward.__func__).get(name)
    return args[idx] if idx is not None and idx < len(args) else None


def raw_logits_observers(module: nn.Module) -> Optional[str]:
    """Why the raw (pre-softcap) logits of ``module``'s LM head may be held by someone (None when they cannot):
    a user hook on ``lm_head`` or a module under it, or global module hooks."""
    head = getattr(module, "lm_head", None)
    if not isinstance(head, nn.Module):
        return "the model has no lm_head module"
    for name, m in head.named_modules():
        if user_hooks(m, backward=True):
            return f"a hook on lm_head{'.' + name if name else ''}"
    if global_module_hooks(backward=True):
        return "global module hooks are set"
    return None


_ROUTED = "_g4f_softcap_route"


def _on_gpu_half(weight: torch.Tensor) -> bool:
    return weight.device.type == "cuda" and weight.dtype in (torch.bfloat16, torch.float16)


def _routing_backend(backend: str) -> Optional[str]:
    """The backend ``ops.linear_softcap`` runs the routed LM head on, or None to leave the head alone: the
    ``"torch"`` backend keeps HF's LM head and its three softcap ops bit for bit."""
    return None if backend == "torch" else backend


def _head_linear_routed(linear: nn.Module) -> bool:
    return getattr(linear.__dict__.get("forward"), _ROUTED, False)


def _head_linear(module: nn.Module) -> Optional[nn.Linear]:
    """The ``nn.Linear`` that computes ``module``'s logits (``lm_head``, or the module a TransformerBridge component
    in its place wraps) when its call can be routed to ``ops.linear_softcap``: a plain ``nn.Linear`` with a bf16 /
    fp16 weight on a GPU and no instance-level ``forward`` other than this module's routing (accelerate's device
    hooks install one), else None."""
    head = getattr(module, "lm_head", None)
    inner = head._modules.get("_original_component") if isinstance(head, nn.Module) else None
    linear = inner if isinstance(inner, nn.Module) else head
    if type(linear) is not nn.Linear or not _on_gpu_half(linear.weight):
        return None
    if "forward" in linear.__dict__ and not _head_linear_routed(linear):
        return None
    return linear


_ZERO_BIAS = "_g4f_zero_bias"


def _effective_bias(bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``bias``, or None when it is all zeros (TransformerBridge gives the LM head a zero bias; adding it changes no
    number but sends the GEMM to a slower path). Checked once per bias storage and version (one device-to-host
    read, recorded on the tensor), again after any in-place edit; never during a CUDA graph capture (an unchecked
    bias is kept there)."""
    if bias is None:
        return None
    key = (bias.data_ptr(), bias._version)
    known = getattr(bias, _ZERO_BIAS, None)
    if known is None or known[:2] != key:
        if bias.is_cuda and torch.cuda.is_current_stream_capturing():
            return bias  # no device-to-host read inside a CUDA graph capture: keep the bias
        known = (*key, not bool(torch.count_nonzero(bias).item()))
        setattr(bias, _ZERO_BIAS, known)
    return None if known[2] else bias


def _check_routed(state: dict, logits: torch.Tensor) -> bool:
    """Whether the routed LM head produced ``logits`` (already softcapped); raises when it ran but the forward
    returned other logits (the softcap state of those cannot be known)."""
    if "logits" not in state:
        return False
    if state["logits"] is not logits:
        raise RuntimeError("gemma4_fast logits: the LM head's softcapped output is not the logits the forward "
                           "returned; cannot tell whether the final softcap was applied")
    return True


@contextlib.contextmanager
def _route_head(linear: Optional[nn.Linear], cap: float, backend: str, state: dict) -> Iterator[None]:
    """Inside the block, the next call of ``linear`` returns ``ops.linear_softcap(x, weight, bias, cap)`` (the LM head
    with the softcap applied) and records its output in ``state["logits"]``; later calls run the plain layer. A
    nested fast call routes the layer for itself and restores this routing when it leaves."""
    if linear is None:
        yield
        return
    previous = linear.__dict__.get("forward")

    def forward(x: torch.Tensor) -> torch.Tensor:
        if previous is None:
            linear.__dict__.pop("forward", None)
        else:
            linear.__dict__["forward"] = previous
        state["logits"] = ops.linear_softcap(x, linear.weight, _effective_bias(linear.bias), cap, backend=backend)
        return state["logits"]

    setattr(forward, _ROUTED, True)
    linear.__dict__["forward"] = forward
    try:
        yield
    finally:
        if linear.__dict__.get("forward") is forward:
            if previous is None:
                del linear.__dict__["forward"]
            else:
                linear.__dict__["forward"] = previous


def _valid_cap(cap: Any) -> bool:
    return isinstance(cap, (int, float)) and not isinstance(cap, bool) and math.isfinite(cap) and cap > 0


class FastLogitsMixin:
    """Forward of the top-level Gemma 4 LM classes with the final softcap in place; see the module docstring.

    Each subclass's ``forward`` carries its HF base's signature and docstring (``inspect.signature`` of the fast
    forward is HF's: transformers' generation and TransformerLens read it)."""

    _g4f_backend = "auto"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        hf_forward = next(c.__dict__["forward"] for c in cls.__mro__
                          if "forward" in c.__dict__ and not issubclass(c, FastLogitsMixin))

        def forward(self: Any, *args: Any, **kw: Any) -> Any:
            return FastLogitsMixin.forward(self, *args, **kw)

        cls.forward = functools.update_wrapper(forward, hf_forward)

    def _g4f_in_place_blocker(self, hf_forward: Any, cap: Any, args: tuple, kwargs: dict) -> Optional[str]:
        """Why this call must run HF's forward unchanged (None when the in-place softcap is safe)."""
        if cap is None:
            return "final_logit_softcapping is None"
        if not _valid_cap(cap):
            return f"final_logit_softcapping is {cap!r}, not a finite number > 0"
        if _argument(hf_forward, "labels", args, kwargs) is not None:
            return "labels are given (the loss needs the softcapped logits)"
        return_dict = kwargs.get("return_dict")
        if return_dict is None:
            return_dict = self.config.return_dict
        if not return_dict:
            return "return_dict is False"
        return raw_logits_observers(self)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hf_forward = super().forward
        config = self.config.get_text_config()
        masks = known_mask_mapping(self, args, kwargs)
        positions = None
        if masks is not None:
            kwargs = {**kwargs, "attention_mask": masks}
            positions = self._g4f_default_positions(args, kwargs)
            if positions is not None:
                kwargs["position_ids"] = positions
        with default_positions(positions):
            return self._g4f_forward(hf_forward, config, args, kwargs)

    def _g4f_default_positions(self, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
        """HF's default position ids for this call (``gemma4_fast.rotary.positions_for``) when the token ids sit on
        the input embedding's device (where HF would create them), else None."""
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        weight = getattr(self.get_input_embeddings(), "weight", None)
        if not isinstance(ids, torch.Tensor) or ids.dim() < 2 or not isinstance(weight, torch.Tensor) \
                or weight.device != ids.device:
            return None
        return positions_for(self, int(ids.shape[1]), ids.device)

    def _g4f_forward(self, hf_forward: Any, config: Any, args: tuple, kwargs: dict) -> Any:
        with _lock(config):
            cap = _TRUE_CAP.get(id(config), config.final_logit_softcapping)
            why = self._g4f_in_place_blocker(hf_forward, cap, args, kwargs)
            if why is not None:
                ops.log_once(f"logits:{why}", f"logits: {why}; running HF's softcap", level=logging.DEBUG)
                with _cap_reads(config, cap, cap):
                    return hf_forward(*args, **kwargs)
            state: dict[str, torch.Tensor] = {}
            route = _routing_backend(self._g4f_backend)
            head = None if route is None or torch.is_grad_enabled() else _head_linear(self)
            with _cap_reads(config, None, cap), _route_head(head, cap, route or "auto", state):
                out = hf_forward(*args, **kwargs)
        logits = getattr(out, "logits", None)
        if not isinstance(logits, torch.Tensor):
            raise RuntimeError(f"gemma4_fast logits: {type(self).__name__}.forward returned {type(out).__name__} "
                               "without a logits tensor; the final softcap could not be applied")
        if _check_routed(state, logits):
            return out
        if torch.is_grad_enabled() and logits.requires_grad:
            out.logits = ops.logit_softcap(logits, cap, backend="torch")
            return out
        ops.logit_softcap(logits, cap, out=logits, backend=self._g4f_backend)
        return out
