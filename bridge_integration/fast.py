"""Turn the fast kernels on or off inside an existing TransformerBridge.

``enable_fast_kernels(bridge)`` patches the bridge's HF model in place (``gemma4_fast.patch.patch_model``:
class swaps, parameters shared) and connects the fast modules' hook seams (``gemma4_fast.hooks``) to the
bridge's HookPoints:

- attention: ``attn.hook_rot_q`` / ``attn.hook_rot_k`` (post-RoPE, ``[batch, pos, head, d_head]``), the true
  pre-softmax ``attn.hook_attn_scores`` and ``attn.hook_pattern`` (through TransformerLens's pattern seam);
  edits to either change the layer output, and neither is computed unless hooked;
- every RMSNorm component (ln1, ln1_post, ln2, ln2_post, ln_final, the q/k/v norms, the MoE and PLE norms):
  new ``hook_scale`` (``[..., 1]`` fp32) and ``hook_normalized`` (pre-weight rows) from the fused kernel;
- MoE: ``router.hook_probs`` ``[batch, pos, n_experts]``, ``router.hook_top_k_weights`` /
  ``router.hook_top_k_index`` ``[batch, pos, k]`` and ``experts.hook_expert_outputs``
  ``[batch, pos, k, d_model]`` (each chosen expert's output before its routing weight).

The HF model's final logit softcap runs once, in place on the logits (patch kind ``"logits"``,
``gemma4_fast.logits``), except in calls where a hook sits on the unembed component (``unembed.hook_in`` /
``hook_out``, the HF model's ``lm_head``), with labels or with gradients through the logits: there HF's
out-of-place softcap runs, so ``unembed.hook_out`` always carries the raw pre-softcap logits, as in the seed.

Blocks with no active hook inside skip the bridge's per-submodule wrappers (``quiet.py``): residual hooks
still fire, and any inner hook puts the block back on the wrapped path for that call. The bridge's ``forward``,
``run_with_cache`` and ``run_with_hooks`` run with Python's cyclic garbage collector paused (``_gc_paused``), and a
forward that asks for no KV cache runs the HF model with ``use_cache=False`` (``_forward``). ``hook_dict`` and the alias
map that ``run_with_cache`` / ``run_with_hooks`` / ``hooks()`` build before their forward come from a memo validated on
every use (``hook_memo.py``).

Every hook of the seed bridge keeps its name and shape. ``disable_fast_kernels`` undoes all of it.
"""
from __future__ import annotations

import functools
import gc
import logging
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..hooks import clear_hooks, set_hooks
from .hook_memo import install_hook_memo, run_with_alias_memo

logger = logging.getLogger("gemma4_fast")

_STATE_ATTR = "_g4f_fast_state"


class FastKernelsUnavailable(RuntimeError):
    """``fast_kernels=True`` was asked for but the fast path cannot run; the message says why."""


@dataclass
class FastKernelsReport:
    """What ``enable_fast_kernels`` did: the backend, the per-layer patch report, the hooks it added, and
    every fallback with its reason."""

    enabled: bool
    backend: Optional[str] = None
    reason: str = ""
    patch: Any = None
    hooks_added: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if not self.enabled:
            return f"HF delegation (fast kernels off: {self.reason})"
        return (f"fast kernels on ({self.backend} backend): {len(self.hooks_added)} hooks added; "
                "when autograd needs gradients the backward recomputes the torch ops")

    def __str__(self) -> str:
        lines = [self.summary()]
        if self.patch is not None:
            lines.append(str(self.patch))
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def _hf_model(bridge: Any) -> nn.Module:
    model = getattr(bridge, "original_model", None)
    if model is None:
        raise TypeError("bridge must be a TransformerBridge with an HF model (bridge.original_model)")
    return model


def gemma4_text_classes() -> tuple[type, ...]:
    """HF Gemma 4 text attention classes this transformers has (unified family included when present)."""
    from transformers.models.gemma4 import modeling_gemma4 as g4

    classes: list[type] = [g4.Gemma4TextAttention]
    try:
        from transformers.models.gemma4_unified import modeling_gemma4_unified as g4u
        classes.append(g4u.Gemma4UnifiedTextAttention)
    except ImportError:
        pass
    return tuple(classes)


def is_gemma4(model: nn.Module) -> bool:
    """Whether ``model`` contains Gemma 4 text attention modules."""
    classes = gemma4_text_classes()
    return any(isinstance(m, classes) for m in model.modules())


def resolve_backend(model: nn.Module, backend: str = "auto") -> tuple[Optional[str], str]:
    """(backend, reason): the kernel backend the fast path would use on ``model``, or (None, why not).

    ``"auto"`` means Triton on CUDA with a supported dtype; ``"triton"`` also accepts CPU tensors when the
    Triton interpreter is on (tests); ``"torch"`` runs the same modules on the plain-PyTorch ops.
    """
    from ..ops import triton_unavailable_reason

    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'torch', got {backend!r}")
    if backend == "torch":
        return "torch", ""
    params = [p for p in model.parameters() if p.is_floating_point()]
    devices = {p.device.type for p in params}
    if backend == "auto" and devices != {"cuda"}:
        if not torch.cuda.is_available():
            return None, "CUDA is not available"
        return None, f"model parameters are on {sorted(devices)}, not all on CUDA"
    probes = {(p.device, p.dtype): p for p in params}
    for probe in probes.values():
        why = triton_unavailable_reason(probe)
        if why is not None:
            return None, why
    return "triton", ""


def _components(bridge: Any):
    """(component, wrapped HF module) for every bridge component that wraps a module."""
    for module in bridge.modules():
        original = module._modules.get("_original_component")
        if isinstance(original, nn.Module):
            yield module, original


def _add_hook_point(component: nn.Module, name: str, added: list[tuple[nn.Module, str]]) -> Any:
    """The HookPoint ``component.<name>``, created (and remembered in ``added``) when missing."""
    from transformer_lens.hook_points import HookPoint

    hp = component._modules.get(name)
    if not isinstance(hp, HookPoint):
        hp = HookPoint()
        setattr(component, name, hp)
        added.append((component, name))
    return hp


def _remove_hook_point(component: nn.Module, name: str) -> None:
    component._modules.pop(name, None)
    registry = component.__dict__.get("_hook_registry")
    if isinstance(registry, dict):
        registry.pop(name, None)


class _TokenShape:
    """Remembers the [batch, pos] of the residual stream entering each decoder layer, so flattened MoE
    tensors ``[tokens, ...]`` can be shown to hooks as ``[batch, pos, ...]``."""

    def __init__(self) -> None:
        self.shape: Optional[tuple[int, int]] = None

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if isinstance(hidden, torch.Tensor) and hidden.dim() == 3:
            self.shape = (hidden.shape[0], hidden.shape[1])

    def wrap(self, hook: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(t: torch.Tensor) -> torch.Tensor:
            if self.shape is None or self.shape[0] * self.shape[1] != t.shape[0]:
                return hook(t)
            out = hook(t.reshape(*self.shape, *t.shape[1:]))
            return out.reshape(t.shape)
        fn.has_hooks = getattr(hook, "has_hooks", lambda: True)  # type: ignore[attr-defined]
        return fn


def _is_class(module: nn.Module, *names: str) -> bool:
    return any(c.__name__ in names for c in type(module).__mro__)


def _connect_hooks(bridge: Any) -> tuple[list[str], list[Callable[[], None]]]:
    """Add the new HookPoints and set the fast modules' seams; return (names added, undo callables)."""
    added: list[tuple[nn.Module, str]] = []
    undo: list[Callable[[], None]] = []
    for comp, original in _components(bridge):
        if _is_class(original, "Gemma4TextAttention", "Gemma4UnifiedTextAttention"):
            set_hooks(original, rot_q=_heads_first(comp._modules.get("hook_rot_q")),
                      rot_k=_heads_first(comp._modules.get("hook_rot_k")), scores=comp._modules.get("hook_attn_scores"))
            _allow_layer_head_dim(comp, original, undo)
        elif _is_class(original, "Gemma4RMSNorm", "Gemma4UnifiedRMSNorm"):
            set_hooks(original, scale=_as_divisor(_add_hook_point(comp, "hook_scale", added)),
                      normalized=_add_hook_point(comp, "hook_normalized", added))
        elif _is_class(original, "Gemma4TextRouter"):
            shaper = _block_shaper(_owning_block(bridge, comp), undo)
            set_hooks(original, **{k: shaper.wrap(_add_hook_point(comp, f"hook_{k}", added))
                                   for k in ("probs", "top_k_weights", "top_k_index")})
        elif _is_class(original, "Gemma4TextExperts"):
            shaper = _block_shaper(_owning_block(bridge, comp), undo)
            set_hooks(original, expert_outputs=shaper.wrap(_add_hook_point(comp, "hook_expert_outputs", added)))
        else:
            continue
        undo.append(lambda original=original: clear_hooks(original))
    undo.extend(lambda c=c, n=n: _remove_hook_point(c, n) for c, n in added)
    paths = {id(m): n for n, m in bridge.named_modules()}
    return [f"{paths.get(id(c), '')}.{n}".lstrip(".") for c, n in added], undo


def _mapped(hook: Optional[Callable[[torch.Tensor], torch.Tensor]], into: Callable[[torch.Tensor], torch.Tensor],
            back: Callable[[torch.Tensor], torch.Tensor]):
    """A seam callable that shows ``hook`` ``into(t)`` and maps an edited result ``back``; an unedited one (the
    same object, or None) returns ``t`` itself, so observing costs no round trip and no rounding."""
    if hook is None:
        return None

    def fn(t: torch.Tensor) -> torch.Tensor:
        shown = into(t)
        out = hook(shown)
        return t if out is None or out is shown else back(out)
    fn.has_hooks = getattr(hook, "has_hooks", lambda: True)  # type: ignore[attr-defined]
    return fn


def _heads_first(hook):
    """The module seam carries ``[batch, pos, head, d_head]``; the AttentionBridge's ``hook_rot_q`` /
    ``hook_rot_k`` take HF's ``[batch, head, pos, d_head]`` and show users ``[batch, pos, head, d_head]``
    through their own conversion."""
    return _mapped(hook, lambda t: t.transpose(1, 2), lambda t: t.transpose(1, 2))


def _as_divisor(hook):
    """The module seam carries ``rstd = (mean(x²)+eps)^-0.5``; TransformerLens's ``hook_scale`` (and the
    ActivationCache tools that divide by it) use the divisor ``sqrt(mean(x²)+eps)``. Convert both ways so
    edits flow back."""
    return _mapped(hook, torch.reciprocal, torch.reciprocal)


def _allow_layer_head_dim(comp: nn.Module, original: nn.Module, undo: list[Callable[[], None]]) -> None:
    """Let TransformerLens split this layer's W_O into heads of the layer's own head_dim.

    Gemma 4 full-attention layers use head_dim 512 beside 256 elsewhere; TransformerLens's head split accepts
    one extra width per component (``_v_head_dim``), so per-head results (``cache.stack_head_results``,
    ``compute_head_results``) work across layers whose head_dim differs.
    """
    d_head = getattr(getattr(comp, "config", None), "d_head", None)
    head_dim = getattr(original, "head_dim", None)
    if not d_head or not head_dim or head_dim == d_head or "_v_head_dim" in comp.__dict__:
        return
    comp.__dict__["_v_head_dim"] = int(head_dim)
    undo.append(lambda: comp.__dict__.pop("_v_head_dim", None))


def _owning_block(bridge: Any, comp: nn.Module) -> Optional[nn.Module]:
    for block in getattr(bridge, "blocks", []):
        if any(m is comp for m in block.modules()):
            return block
    return None


def _block_shaper(block: Optional[nn.Module], undo: list[Callable[[], None]]) -> _TokenShape:
    if block is None:
        return _TokenShape()
    shaper = block.__dict__.get("_g4f_shaper")
    if shaper is None:
        shaper = _TokenShape()
        block.__dict__["_g4f_shaper"] = shaper
        handle = block.register_forward_pre_hook(shaper.pre_hook, with_kwargs=True)
        undo.append(handle.remove)
        undo.append(lambda: block.__dict__.pop("_g4f_shaper", None))
    return shaper


def install_method(bridge: Any, name: str, body: Callable[..., Any]) -> Callable[[], None]:
    """Make ``bridge.<name>(...)`` run ``body(bridge, original, ...)``, ``original`` being the class's method bound to
    the same bridge; returns the undo.

    The override is a method bound with ``types.MethodType`` that looks the original up on each call, so a copy of the
    bridge (``copy.deepcopy``) rebinds it to the copy instead of calling back into the source bridge.
    """
    @functools.wraps(getattr(type(bridge), name))
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        return body(self, getattr(type(self), name).__get__(self), *args, **kwargs)

    bound = types.MethodType(method, bridge)
    bridge.__dict__[name] = bound

    def undo() -> None:
        if bridge.__dict__.get(name) is bound:
            del bridge.__dict__[name]
    return undo


def _gc_paused(bridge: Any, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``original(...)`` with Python's cyclic garbage collector paused for the duration of the (outermost) call.

    A ``run_with_cache`` of every hook registers and removes ~2,500 hooks and allocates as many closures and
    handles; each allocation burst triggers collections that walk the whole heap (model, bridge, caches). Pausing
    the collector for the call and letting it run afterwards halves the host time of such calls (CPU, E2B-shaped
    35-layer model: 120 -> 58 ms per full ``run_with_cache``). Memory freed by reference counting is unaffected;
    only reference cycles created inside the call wait for the next collection after it.
    """
    if not gc.isenabled():
        return original(*args, **kwargs)
    gc.disable()
    try:
        return original(*args, **kwargs)
    finally:
        gc.enable()


_CACHE_KWARGS = ("use_cache", "past_key_values", "use_past_kv_cache")


def _forward(bridge: Any, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The bridge's ``forward`` with the GC paused, and without the HF cache nobody asked for.

    TransformerBridge calls the HF model with the config's ``use_cache`` (True for Gemma 4), so a plain forward,
    ``run_with_cache`` or ``run_with_hooks`` builds a ``DynamicCache`` and copies every layer's keys and values into
    it (``torch.cat`` onto an empty tensor: 3 ms of a 26B-A4B 4k forward), then drops it. When the call asks for no
    cache (no ``use_cache`` / ``past_key_values`` / ``use_past_kv_cache``, a return type other than
    ``"logits_and_cache"``, no TransformerLens generate loop capturing the cache) it passes ``use_cache=False``: the
    same keys, values and outputs, no copies (KV-shared layers read the ``shared_kv_states`` HF passes either way).
    """
    if (len(args) <= 1 and kwargs.get("return_type") != "logits_and_cache"
            and not any(k in kwargs for k in _CACHE_KWARGS) and not getattr(bridge, "_capture_hf_cache", False)):
        kwargs["use_cache"] = False
    return _gc_paused(bridge, original, *args, **kwargs)


def _gc_paused_memo(bridge: Any, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``_gc_paused`` around TransformerLens's method running with the bridge's hook-name memo
    (``hook_memo.run_with_alias_memo``; the method itself when the bridge has none)."""
    return _gc_paused(bridge, functools.partial(run_with_alias_memo, bridge, original), *args, **kwargs)


def _pause_gc(bridge: Any, undo: list[Callable[[], None]]) -> None:
    for name in ("forward", "run_with_cache", "run_with_hooks"):
        if callable(getattr(type(bridge), name, None)) and name not in bridge.__dict__:
            undo.append(install_method(bridge, name, _forward if name == "forward" else _gc_paused_memo))


def _rescan_hooks(bridge: Any) -> None:
    bridge.clear_hook_registry()
    bridge._initialize_hook_registry()


def enable_fast_kernels(bridge: Any, mode: bool | str = True, *, backend: str = "auto") -> FastKernelsReport:
    """Put a booted Gemma 4 TransformerBridge on the fast kernels, in place.

    Args:
        bridge: a ``TransformerBridge`` (from ``boot_transformers``).
        mode: ``True`` raises ``FastKernelsUnavailable`` when the fast path cannot run; ``"auto"`` logs one
            line with the reason and leaves the bridge on HF delegation.
        backend: ``"auto"`` (Triton on CUDA), ``"triton"`` (also under the CPU interpreter) or ``"torch"``
            (the same fast modules on the plain-PyTorch ops: the CPU test path).
    Returns:
        a :class:`FastKernelsReport`, also available later as ``bridge.fast_kernels_report()``.
    """
    if mode not in (True, "auto"):
        raise ValueError(f"mode must be True or 'auto', got {mode!r}")
    model = _hf_model(bridge)
    existing = bridge.__dict__.get(_STATE_ATTR)
    if existing is not None and existing["report"].enabled:
        return existing["report"]
    if not is_gemma4(model):
        report = FastKernelsReport(False, reason=f"{type(model).__name__} is not a Gemma 4 model")
    else:
        chosen, why = resolve_backend(model, backend)
        report = FastKernelsReport(chosen is not None, chosen, why)
    if not report.enabled:
        if mode is True:
            raise FastKernelsUnavailable(f"fast_kernels=True but the fast path cannot run: {report.reason}")
        logger.warning("fast kernels off, staying on HF delegation: %s", report.reason)
        _set_state(bridge, report, [])
        return report
    from ..patch import patch_model

    report.patch = patch_model(model, backend=report.backend)
    report.hooks_added, undo = _connect_hooks(bridge)
    from .generate import install_generate

    undo.append(install_generate(bridge))
    from .quiet import install_quiet_blocks

    wrapped, undo_quiet = install_quiet_blocks(bridge)
    undo.append(undo_quiet)
    report.notes.extend(f"{line}: this block always runs through the bridge's wrappers" for line in wrapped)
    why, undo_memo = install_hook_memo(bridge)
    undo.append(undo_memo)
    if why:
        report.notes.append(f"hook-name memo off: {why}")
    _pause_gc(bridge, undo)
    _rescan_hooks(bridge)
    _set_state(bridge, report, undo)
    return report


def disable_fast_kernels(bridge: Any) -> None:
    """Return the bridge to the seed behaviour (HF delegation): unpatch the model, drop the added hooks and any
    prefill graphs."""
    state = bridge.__dict__.pop(_STATE_ATTR, None)
    if state is None or not state["report"].enabled:
        return
    from ..graphs import disable_prefill_graphs

    disable_prefill_graphs(bridge)
    from ..patch import unpatch_model

    for fn in reversed(state["undo"]):
        fn()
    unpatch_model(_hf_model(bridge))
    _rescan_hooks(bridge)


def _set_state(bridge: Any, report: FastKernelsReport, undo: list[Callable[[], None]]) -> None:
    bridge.__dict__[_STATE_ATTR] = {"report": report, "undo": undo}


def fast_kernels_report(bridge: Any) -> FastKernelsReport:
    """The report of the last ``enable_fast_kernels`` on ``bridge`` (fast kernels off if never enabled)."""
    state = bridge.__dict__.get(_STATE_ATTR)
    return state["report"] if state else FastKernelsReport(False, reason="not enabled")
