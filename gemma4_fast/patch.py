"""Patch a Gemma 4 model in place with the fast modules, and undo it exactly.

``patch_model`` swaps ``module.__class__`` of the text path's RMSNorms, attentions, routers,
experts and dense MLPs for the fast subclasses of ``gemma4_fast.modules`` (no weight copy:
parameters, buffers, ``state_dict`` and data pointers are shared; wrappers holding the modules keep
working), stores the
backend on each module (``_g4f_backend``) and, when attention is patched, sets the text config's
``_attn_implementation`` to ``"gemma4_fast"`` so HF builds cheap key-padding masks.
``unpatch_model`` restores every class and the config value exactly.

Scope: ``Gemma4ForCausalLM``, ``Gemma4ForConditionalGeneration`` (only modules under the language
model; vision and audio towers stay HF), the unified family (``gemma4_unified``, when transformers
has it), or any module tree holding them (e.g. a TransformerBridge). Modules are found by
``isinstance`` anywhere under the text model(s); the top-level language model classes themselves (kind
``"logits"``: the final logit softcap in place, ``gemma4_fast.logits``) anywhere in the tree. A subclass of
an HF class is left alone (reported).
"""
from __future__ import annotations

import itertools
import re
import types
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch
from torch import nn

from . import ops
from .mlp import gelu_tanh_unsupported
from .modules import KINDS, fast_class_map, fast_classes
from .registration import NAME, register

_ORIG = "_g4f_orig_class"
_BACKEND = "_g4f_backend"
#: Incremented by every ``patch_model`` / ``unpatch_model`` call: anything that copied patched modules (the
#: bridge's unwrapped twins) rebuilds when it changes.
GENERATION = 0
_ATTN = "_g4f_orig_attn_implementation"
_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")
_NON_TEXT = ("Vision", "Audio", "MultimodalEmbedder")


@dataclass
class ModuleReport:
    """One module the patch considered.

    name: qualified name in the model; kind: one of ``KINDS``; layer: decoder layer index or None;
    fast: whether it runs a fast class; backend: the backend stored on it (fast modules);
    reason: why it stays on HF, or a note on the backend choice (e.g. a torch fallback).
    """

    name: str
    kind: str
    layer: Optional[int]
    fast: bool
    backend: Optional[str] = None
    reason: str = ""


@dataclass
class PatchReport:
    """What ``patch_model`` did: every candidate module, and the attention implementation it set.

    ``str(report)`` is a table with one row per decoder layer (and one for modules outside the layers)
    followed by every module left on HF with its reason.
    """

    requested_backend: str
    modules: list[ModuleReport] = field(default_factory=list)
    attn_implementation: Optional[str] = None

    @property
    def fast(self) -> list[ModuleReport]:
        """Modules now running a fast class."""
        return [m for m in self.modules if m.fast]

    @property
    def left_on_hf(self) -> list[ModuleReport]:
        """Modules left on HF, each with its reason."""
        return [m for m in self.modules if not m.fast]

    def layers(self) -> dict[Optional[int], list[ModuleReport]]:
        """Modules grouped by decoder layer index (None: outside the decoder layers)."""
        out: dict[Optional[int], list[ModuleReport]] = {}
        for m in self.modules:
            out.setdefault(m.layer, []).append(m)
        return out

    def counts(self) -> dict[str, tuple[int, int]]:
        """``{kind: (fast, total)}``."""
        return {k: (sum(m.fast for m in self.modules if m.kind == k), sum(m.kind == k for m in self.modules))
                for k in KINDS}

    @staticmethod
    def _cell(mods: list[ModuleReport]) -> str:
        if not mods:
            return "-"
        fast = [m for m in mods if m.fast]
        backends = sorted({m.backend for m in fast if m.backend})
        if len(mods) == 1:
            return f"fast/{backends[0]}" if fast else "HF"
        return f"{len(fast)}/{len(mods)} fast" + (f" ({','.join(backends)})" if backends else "")

    def __str__(self) -> str:
        head = ("layer", *KINDS)
        rows = []
        groups = self.layers()
        for layer in sorted(groups, key=lambda x: (x is None, x if x is not None else 0)):
            mods = groups[layer]
            rows.append(("model" if layer is None else str(layer),
                         *(self._cell([m for m in mods if m.kind == k]) for k in KINDS)))
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths)
        lines = [f"gemma4_fast patch (backend={self.requested_backend}, attn_implementation="
                 f"{self.attn_implementation or 'unchanged'}): "
                 + ", ".join(f"{k} {f}/{t}" for k, (f, t) in self.counts().items() if t),
                 fmt.format(*head), fmt.format(*("-" * w for w in widths))]
        lines += [fmt.format(*r) for r in rows]
        notes = [m for m in self.fast if m.reason]
        if notes:
            lines.append("notes (fast modules):")
            lines += self._grouped(notes)
        if self.left_on_hf:
            lines.append("left on HF:")
            lines += self._grouped(self.left_on_hf)
        return "\n".join(lines)

    @staticmethod
    def _grouped(mods: list[ModuleReport], show: int = 4) -> list[str]:
        by_reason: dict[str, list[ModuleReport]] = {}
        for m in mods:
            by_reason.setdefault(m.reason, []).append(m)
        out = []
        for reason, group in by_reason.items():
            names = ", ".join(f"{m.name or '(model)'} ({m.kind})" for m in group[:show])
            more = f" and {len(group) - show} more" if len(group) > show else ""
            out.append(f"  {reason}: {names}{more}")
        return out


def _text_model_classes() -> tuple:
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextModel

    classes = [Gemma4TextModel]
    try:
        from transformers.models.gemma4_unified.modeling_gemma4_unified import Gemma4UnifiedTextModel
        classes.append(Gemma4UnifiedTextModel)
    except ImportError:
        pass
    return tuple(classes)


def _walk(module: nn.Module, prefix: str, skip_non_text: bool, seen: set) -> Iterator[tuple[str, nn.Module]]:
    if id(module) in seen:
        return
    seen.add(id(module))
    if skip_non_text and any(tag in type(module).__name__ for tag in _NON_TEXT):
        return
    yield prefix, module
    for name, child in module._modules.items():
        if child is not None:
            yield from _walk(child, f"{prefix}.{name}" if prefix else name, skip_non_text, seen)


def _text_roots(model: nn.Module) -> list[tuple[str, nn.Module]]:
    classes = _text_model_classes()
    return [(n, m) for n, m in model.named_modules() if isinstance(m, classes)]


def _candidates(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` under the text model(s); without one, the tree minus vision/audio parts."""
    roots = _text_roots(model)
    seen: set = set()
    if roots:
        for name, root in roots:
            yield from _walk(root, name, False, seen)
    else:
        yield from _walk(model, "", True, seen)


def _top_level(model: nn.Module, classes: tuple) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` for every top-level language model (an instance of ``classes``) in ``model``'s tree."""
    for name, module in model.named_modules():
        if isinstance(module, classes):
            yield name, module


def _layer_of(name: str) -> Optional[int]:
    found = _LAYER_RE.findall(name)
    return int(found[-1]) if found else None


def _probe_tensor(module: nn.Module, default: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    for t in module.parameters(recurse=True):
        return t
    return default


def _resolve_backend(backend: str, probe: Optional[torch.Tensor]) -> tuple[Optional[str], str]:
    """``(backend to store or None to stay on HF, reason/note)`` for one module."""
    if backend == "torch":
        return "torch", ""
    why = ops.triton_unavailable_reason(probe)
    if why is None:
        return "triton", ""
    if backend == "triton":
        return None, f"backend triton unavailable: {why}"
    return "torch", f"{why}: torch backend"


def _without_ple(module: nn.Module) -> bool:
    """A text model without per-layer inputs: its ``"prologue"`` patch would have nothing to fuse (not a candidate;
    its scaled embeddings still are)."""
    return hasattr(module, "project_per_layer_inputs") and not getattr(module, "hidden_size_per_layer_input", 0)


def _module_unsupported(kind: str, module: nn.Module) -> Optional[str]:
    if kind == "experts":
        from .registration import _experts_unsupported
        return _experts_unsupported(module)
    if kind == "router" and getattr(getattr(module, "config", None), "top_k_experts", None) is None:
        return "config has no top_k_experts"
    if kind == "mlp":
        return gelu_tanh_unsupported(getattr(module, "act_fn", None))
    if kind == "logits":
        if not isinstance(getattr(module, "lm_head", None), nn.Module):
            return "the model has no lm_head module"
        if module.config.get_text_config().final_logit_softcapping is None:
            return "final_logit_softcapping is None: no softcap to apply"
    return None


def patch_model(model: nn.Module, *, backend: str = "auto", attention: bool = True, moe: bool = True,
                rms_norm: bool = True, mlp: bool = True, rotary: bool = True, prologue: bool = True,
                logits: bool = True) -> PatchReport:
    """Swap the text path's Gemma 4 modules for the fast ones, in place; returns a ``PatchReport``.

    Args:
        model: a Gemma 4 model (``Gemma4ForCausalLM``, ``Gemma4ForConditionalGeneration``, the unified
            classes) or any ``nn.Module`` holding one (e.g. a TransformerBridge).
        backend: ``"auto"`` (per module: Triton when its parameters' device/dtype allow it at this call,
            else torch, noted in the report), ``"triton"`` (modules that cannot take it stay on HF,
            with the reason) or ``"torch"`` (the ops' plain PyTorch twins).
        attention: patch ``Gemma4TextAttention`` and set the text config's ``_attn_implementation`` to
            ``"gemma4_fast"`` (restored by ``unpatch_model``).
        moe: patch ``Gemma4TextRouter`` and ``Gemma4TextExperts``.
        rms_norm: patch ``Gemma4RMSNorm`` (layer norms, q/k/v norms, router norm, final norm) and the text
            decoder layers (``"residual"``: residual adds fused into the post-sublayer norms while no hook is on
            them; ``gemma4_fast.layer``).
        mlp: patch the dense ``Gemma4TextMLP`` (fused ``gelu_tanh(gate) * up``; the three linears stay
            HF modules). An MLP whose ``act_fn`` is not the tanh GELU stays on HF, with the reason.
        rotary: patch ``Gemma4TextRotaryEmbedding``: the ``(cos, sin)`` tables of HF's default positions (calls
            the patched top-level forward marks: no positions, mask or cache given) are kept between calls
            (``gemma4_fast.rotary``); every other call computes them as HF does.
        prologue: patch ``Gemma4TextScaledWordEmbedding`` (the embedding scale applied as a Python number, in
            place) and, on models with per-layer inputs, ``Gemma4TextModel`` (the per-layer-input projection's
            scale, norm, sum and product in one pass while its norm is unobserved; ``gemma4_fast.prologue``).
        logits: patch the top-level ``Gemma4ForCausalLM`` / ``Gemma4ForConditionalGeneration`` (and the
            unified twins): the final logit softcap ``cap * tanh(logits / cap)`` runs once, in place on the
            returned logits (``gemma4_fast.logits``), whenever no labels are given, the call returns a
            ``ModelOutput``, autograd does not record through the logits and no hook on ``lm_head`` (or a global
            module hook) could hold the raw logits; otherwise that call runs HF's forward. A model whose config
            has no ``final_logit_softcapping`` stays on HF, with the reason.

    Calling it again on a patched model updates the backends (and patches what was left out before).
    """
    global GENERATION
    ops.check_backend(backend)
    register()
    GENERATION += 1
    enabled = {"attention": attention, "rms_norm": rms_norm, "router": moe, "experts": moe, "mlp": mlp,
               "residual": rms_norm, "rotary": rotary, "prologue": prologue, "logits": logits}
    table = fast_class_map()
    fast_set = set(fast_classes())
    hf_for_fast = {fast: hf for hf, (fast, _) in table.items()}
    report = PatchReport(requested_backend=backend)
    default_probe = next(iter(model.parameters()), None)
    attention_modules: list[nn.Module] = []
    top_classes = tuple(hf for hf, (_, kind) in table.items() if kind == "logits")
    done: set[int] = set()
    for name, module in itertools.chain(_candidates(model), _top_level(model, top_classes)):
        if id(module) in done:
            continue
        done.add(id(module))
        cls = type(module)
        if cls in fast_set:
            kind = table[hf_for_fast[cls]][1]
            fast_cls = cls
        else:
            match = next(((hf, fk) for hf, fk in table.items() if isinstance(module, hf)), None)
            if match is None:
                continue
            hf, (fast_cls, kind) = match
            if kind == "prologue" and _without_ple(module):
                continue
            if cls is not hf:
                report.modules.append(ModuleReport(name, kind, _layer_of(name), False,
                                                   reason=f"subclass {cls.__name__} of {hf.__name__}: not patched"))
                continue
        already = cls in fast_set
        entry = ModuleReport(name, kind, _layer_of(name), already,
                             backend=module.__dict__.get(_BACKEND) if already else None)
        report.modules.append(entry)
        if not enabled[kind]:
            flag = {"router": "moe", "experts": "moe", "residual": "rms_norm"}.get(kind, kind)
            entry.reason = f"{flag}=False in this call: left as it was" if already else f"{flag}=False"
            continue
        why = None if already else _module_unsupported(kind, module)
        if why is not None:
            entry.reason = why
            continue
        probe_module = module.lm_head if kind == "logits" else module
        chosen, note = _resolve_backend(backend, _probe_tensor(probe_module, default_probe))
        if chosen is None:
            entry.reason = note + (": backend left as it was" if already else "")
            continue
        if cls not in fast_set:
            module.__dict__[_ORIG] = cls
            module.__class__ = fast_cls
            _rebind_accelerate_forward(module)
        module.__dict__[_BACKEND] = chosen
        entry.fast, entry.backend, entry.reason = True, chosen, note
        if kind == "attention":
            attention_modules.append(module)
    if attention_modules:
        _set_attn_implementation(attention_modules)
        report.attn_implementation = NAME
    return report


def _rebind_accelerate_forward(module: nn.Module) -> None:
    """Point an accelerate hook (``device_map`` dispatch) at the module's current class forward.

    accelerate's ``add_hook_to_module`` keeps the forward bound at dispatch time in ``_old_forward`` and
    calls it from the hooked ``forward``; after a class swap that would still run the old class's forward.
    """
    old = module.__dict__.get("_old_forward")
    if old is not None and getattr(old, "__self__", None) is module:
        module.__dict__["_old_forward"] = types.MethodType(type(module).forward, module)


def _set_attn_implementation(attention_modules: list[nn.Module]) -> None:
    """Set each fast attention's config to ``"gemma4_fast"``, remembering the old value on the modules."""
    old_by_config: dict[int, Optional[str]] = {}
    for module in attention_modules:
        config = getattr(module, "config", None)
        if config is None:
            continue
        if id(config) not in old_by_config:
            current = config._attn_implementation
            old_by_config[id(config)] = current if current != NAME else None
            config._attn_implementation = NAME
        if old_by_config[id(config)] is not None and _ATTN not in module.__dict__:
            module.__dict__[_ATTN] = old_by_config[id(config)]


def unpatch_model(model: nn.Module) -> int:
    """Undo ``patch_model`` in place: original classes, no ``_g4f_*`` attributes, the config's
    ``_attn_implementation`` as it was. Returns the number of modules restored."""
    global GENERATION
    GENERATION += 1
    restored = 0
    for module in model.modules():
        orig = module.__dict__.pop(_ORIG, None)
        if orig is not None:
            module.__class__ = orig
            _rebind_accelerate_forward(module)
            restored += 1
        module.__dict__.pop(_BACKEND, None)
        module.__dict__.pop("_g4f_hooks", None)
        module.__dict__.pop("_g4f_rotary_tables", None)
        module.__dict__.pop("_g4f_positions_kept", None)
        module.__dict__.pop("_g4f_embed_scale", None)
        if _ATTN in module.__dict__:
            old = module.__dict__.pop(_ATTN)
            config = getattr(module, "config", None)
            if config is not None and config._attn_implementation == NAME:
                config._attn_implementation = old
    return restored


def is_patched(model: nn.Module) -> bool:
    """Whether any module of ``model`` runs a fast class put there by ``patch_model``."""
    return any(_ORIG in m.__dict__ for m in model.modules())
