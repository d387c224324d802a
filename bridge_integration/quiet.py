"""Quiet blocks: a decoder block with no active hook inside runs its HF layer without the bridge's wrappers.

TransformerBridge wraps every submodule of a decoder layer (attention, projections, norms, MLP, router, experts)
in a component whose call adds host work (HookPoint calls, accelerate alignment, signature inspection): about
40 wrapped calls per Gemma 4 layer. On a GPU below ~4k tokens that host time, not the kernels, sets the forward
time. When nothing inside a block is hooked, the wrappers only pass tensors through, so the block can call an
*unwrapped twin* of its layer instead: a shallow copy of the HF layer whose children are the wrapped HF modules
themselves (same parameters, buffers and forward code; no weight copies). The block's own ``hook_resid_pre`` /
``hook_resid_post`` (``hook_in`` / ``hook_out``) still run on every call, so residual-stream hooks and
``run_with_cache`` of residuals take this path too.

A block is quiet for a call when all of these hold, checked on every call (a few microseconds per block):

- no HookPoint inside the block (every one but ``hook_in`` / ``hook_out``) has a forward or backward hook;
- no other module inside carries a hook other than wiring (TransformerLens's own capture hooks, this package's
  shape recorders, transformers' output-capturing hooks), and there are no global module hooks;
- the block is not the ``stop_at_layer`` / ``start_at_layer`` block of the call (the wrapped path stops or
  injects the residual there);
- the layer's module tree is the one the twin was built from (same children, same classes, no ``patch_model`` /
  ``unpatch_model`` since, same train/eval modes); otherwise the twin is rebuilt. Other attribute changes on the
  wrapped modules after enabling (e.g. editing ``sliding_window`` by hand) need ``disable`` / ``enable`` again.

Blocks whose layer has accelerate hooks (``device_map`` offload or multi-device dispatch) are never made quiet:
their wrappers move tensors between devices. Everything else, including gradients, is unchanged: the twin runs
the same modules. With ``gemma4_fast.graphs.enable_prefill_graphs(bridge)`` a quiet block replays its twin from a
CUDA graph.
"""
from __future__ import annotations

import copy
import inspect
from typing import Any, Callable, Optional

from torch import nn

from .. import patch
from ..attention import WEIGHTS_VIA_SEAM
from ..graphs import ATTR as GRAPHS
from ..hooks import ATTR, global_module_hooks, user_hooks

_STATE = "_g4f_quiet"


def _hook_dicts(m: nn.Module) -> tuple:
    return m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks


def _twin(module: nn.Module, copies: Optional[list] = None) -> nn.Module:
    """``module`` with every bridge component below it replaced by the HF module it wraps (shallow copies of the
    containers on the way and of modules with seams; other leaves and all parameters shared). Seams
    (``_g4f_hooks``) are dropped from the copies: a quiet block has none active. Attention modules with
    TransformerLens's pattern seam are marked so that, like under their wrapper (which always passes
    ``pattern_fn``), they never return weights for ``output_attentions`` (the bridge sets it in the config)."""
    original = module._modules.get("_original_component")
    if isinstance(original, nn.Module):
        return _twin(original, copies)
    children = {k: (None if v is None else _twin(v, copies)) for k, v in module._modules.items()}
    seam = bool(getattr(module, "accepts_pattern_fn", False))
    if all(children[k] is v for k, v in module._modules.items()) and ATTR not in module.__dict__ and not seam:
        return module
    twin = copy.copy(module)
    twin.__dict__["_modules"] = children
    twin.__dict__.pop(ATTR, None)
    twin.__dict__.pop("forward", None)
    if seam:
        twin.__dict__[WEIGHTS_VIA_SEAM] = True
    if copies is not None:
        copies.append((module, twin))
    return twin


class _Plan:
    """What one block checks per call, and its twin.

    ``plain`` holds the hook dicts of every inner module that were empty when the plan was made (any entry makes
    the block loud); ``watched`` the dicts that held only wiring hooks then, with their keys (any change sends
    the call to the full check, which rebuilds the plan when the block is still quiet). ``parents`` /
    ``names_`` / ``children`` / ``classes`` are the parent-child links and classes the twin was built from
    (HookPoints aside).
    """

    def __init__(self, block: nn.Module) -> None:
        layer = block._modules["_original_component"]
        self.index: Optional[int] = block._extract_layer_idx()
        skip = {id(block._modules.get("hook_in")), id(block._modules.get("hook_out"))}
        self.inner: list[nn.Module] = []
        edges: list[tuple[dict, str, nn.Module]] = []
        stack = [block]
        while stack:
            parent = stack.pop()
            for name, child in parent._modules.items():
                if child is None or id(child) in skip:
                    continue
                self.inner.append(child)
                if type(child).__name__ != "HookPoint":
                    edges.append((parent._modules, name, child))
                stack.append(child)
        self.parents = [e[0] for e in edges]
        self.names_ = [e[1] for e in edges]
        self.children = [e[2] for e in edges]
        self.classes = [type(c) for c in self.children]
        self.plain: list[dict] = []
        self.watched: list[tuple[dict, tuple]] = []
        for m in self.inner:
            for d in _hook_dicts(m):
                (self.watched.append((d, tuple(d))) if d else self.plain.append(d))
        self.processed = [m for m in self.inner if hasattr(m, "_use_processed_weights")]
        copies: list[tuple[nn.Module, nn.Module]] = []
        self.twin = _twin(layer, copies)
        self.originals = [o for o, _ in copies]
        self.training = [o.training for o in self.originals]
        self.generation = patch.GENERATION
        params = list(inspect.signature(layer.forward).parameters.values())
        self.names: Optional[list[str]] = (None if any(p.kind is p.VAR_KEYWORD for p in params)
                                           else [p.name for p in params])

    def unchanged(self) -> bool:
        """No hook added or removed inside since the plan was made, the same module tree, no patch or unpatch
        since (a backend change reaches the copied modules only through a rebuild), the same train/eval modes."""
        return (self.generation == patch.GENERATION and not any(self.plain)
                and all(tuple(d) == keys for d, keys in self.watched)
                and [o.training for o in self.originals] == self.training
                and list(map(dict.get, self.parents, self.names_)) == self.children
                and list(map(type, self.children)) == self.classes)

    def quiet(self) -> bool:
        """The full check: no inner module has a hook other than wiring, no processed-weight component."""
        return not any(user_hooks(m, backward=True) for m in self.inner) and not any(
            getattr(m, "_use_processed_weights", False) for m in self.processed)

    def kwargs(self, kwargs: dict, n_args: int) -> dict:
        if self.names is None:
            return kwargs
        allowed = set(self.names) - set(self.names[:n_args])
        return {k: v for k, v in kwargs.items() if k in allowed}


_CALL_ATTRS = ("_stop_at_layer_idx", "_start_at_layer_idx")


def _call_attr(block: nn.Module, attr: str) -> Any:
    """``getattr(block, attr, None)`` for TransformerBridge's per-call block attributes, without the wrapper's
    ``__getattr__`` (which, for an attribute never set, falls back to the wrapped HF layer through a raised
    AttributeError: ~5 us a lookup): the block's own value, else the HF layer's instance attribute."""
    d = block.__dict__
    if attr in d:
        return d[attr]
    return block._modules["_original_component"].__dict__.get(attr)


def _stopped(block: nn.Module, plan: _Plan) -> bool:
    """Whether the block is the ``stop_at_layer`` / ``start_at_layer`` block of this call."""
    for attr in _CALL_ATTRS:
        at = _call_attr(block, attr)
        if at is not None and (plan.index is None or at == plan.index):
            return True
    return False


def _plan_for(block: nn.Module) -> Optional[_Plan]:
    """The block's plan when this call can take the twin, else None."""
    plan: Optional[_Plan] = block.__dict__.get(_STATE)
    if plan is None or global_module_hooks(backward=True) or _stopped(block, plan):
        return None
    if plan.unchanged() and not any(getattr(m, "_use_processed_weights", False) for m in plan.processed):
        return plan
    if not plan.quiet():
        return None
    plan = block.__dict__[_STATE] = _Plan(block)
    return plan if plan.quiet() else None


def all_quiet_gate(blocks: list[nn.Module]) -> Callable[[], bool]:
    """``gate()``: every block would take its quiet path in a call without autograd (``all(_plan_for(b) is not None
    for b in blocks)``, backward hooks aside: they cannot fire there), with the common case checked over all blocks
    at once: when every block has a plan, none is the stop / start block and the plans are the ones seen last time,
    their ``unchanged`` conditions run as a few C-level passes over lists joined across the blocks (each hook dict
    once); anything else (and any failed check) takes the per-block path, which also rebuilds plans. For the
    whole-model graph of a bridge forward, where this runs on every replay (after the launch while nothing changed
    detectably: ``PrefillGraphs.model_call``); ``gate.per_call()`` is the part that depends on the call alone."""
    cache: dict[str, Any] = {"plans": None}

    def rebuild(plans: list[_Plan]) -> None:
        # A wrapped HF module is reached twice (through its wrapper and through its HF parent): check it once. Only
        # forward (pre-)hook dicts: the whole-model path runs without autograd (``PrefillGraphs._model_signature``),
        # where backward hooks never fire.
        fwd = {id(d) for p in plans for m in p.inner for d in (m._forward_hooks, m._forward_pre_hooks)}
        plain = list({id(d): d for p in plans for d in p.plain if id(d) in fwd}.values())
        edges = list({(id(d), n): (d, n, c, k) for p in plans
                      for d, n, c, k in zip(p.parents, p.names_, p.children, p.classes)}.values())
        cache.update(plans=plans, parents=[e[0] for e in edges], names=[e[1] for e in edges],
                     children=[e[2] for e in edges], classes=[e[3] for e in edges], plain=plain,
                     watched=[w for p in plans for w in p.watched], originals=[o for p in plans for o in p.originals],
                     training=[t for p in plans for t in p.training],
                     processed=[m for p in plans for m in p.processed])

    def per_call() -> bool:
        """The conditions a call's arguments can change (cheap): every block has a plan, no global module hooks,
        no stop / start block."""
        plans = [b.__dict__.get(_STATE) for b in blocks]
        return (None not in plans and not global_module_hooks(backward=True)
                and not any(_stopped(b, p) for b, p in zip(blocks, plans)))

    def fast() -> bool:
        if not per_call():
            return False
        plans = [b.__dict__.get(_STATE) for b in blocks]
        old = cache["plans"]
        if old is None or len(old) != len(plans) or any(a is not b for a, b in zip(old, plans)):
            rebuild(plans)
        c = cache
        gen = patch.GENERATION
        return (all(p.generation == gen for p in plans) and not any(c["plain"])
                and all(tuple(d) == keys for d, keys in c["watched"])
                and [o.training for o in c["originals"]] == c["training"]
                and list(map(dict.get, c["parents"], c["names"])) == c["children"]
                and list(map(type, c["children"])) == c["classes"]
                and not any(getattr(m, "_use_processed_weights", False) for m in c["processed"]))

    def gate() -> bool:
        return fast() or all(_plan_for(b) is not None for b in blocks)

    gate.per_call = per_call  # type: ignore[attr-defined]
    return gate


def _quiet_class(cls: type) -> type:
    """A subclass of the block class whose ``forward`` takes the twin when the block is quiet (same name, so
    anything that reads the class name sees the original)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        plan = _plan_for(self)
        if plan is None:
            return cls.forward(self, *args, **kwargs)
        args, kwargs = self._hook_input_hidden_states(args, kwargs)
        kwargs = plan.kwargs(kwargs, len(args))
        graphs = self.__dict__.get(GRAPHS)
        output = plan.twin(*args, **kwargs) if graphs is None else graphs(plan.twin, plan.twin, args, kwargs)
        return self._apply_output_hook(output,
                                       force_tuple_for_bare_tensor=self._is_standalone_hidden_state_call(args, kwargs))

    return type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__, "_g4f_quiet_base": cls})


_CLASSES: dict[type, type] = {}


def install_quiet_blocks(bridge: Any) -> tuple[list[str], Callable[[], None]]:
    """Make every eligible block of ``bridge`` take its unwrapped twin when quiet.

    Returns:
        (reasons, undo): one line per block left on the wrapped path (and why), and a callable that restores
        every block's class and drops the twins.
    """
    done: list[nn.Module] = []
    reasons: list[str] = []
    for i, block in enumerate(getattr(bridge, "blocks", [])):
        layer = block._modules.get("_original_component")
        if not isinstance(layer, nn.Module) or not hasattr(block, "_apply_output_hook"):
            reasons.append(f"blocks.{i}: not a TransformerLens BlockBridge over a module")
            continue
        if any(hasattr(m, "_hf_hook") for m in block.modules()):
            reasons.append(f"blocks.{i}: accelerate hooks (device_map) move tensors in the wrappers")
            continue
        cls = type(block)
        base = cls.__dict__.get("_g4f_quiet_base", None) or cls
        quiet_cls = _CLASSES.get(base)
        if quiet_cls is None:
            quiet_cls = _CLASSES[base] = _quiet_class(base)
        block.__dict__[_STATE] = _Plan(block)
        block.__class__ = quiet_cls
        done.append(block)

    def undo() -> None:
        for block in done:
            block.__dict__.pop(_STATE, None)
            block.__dict__.pop(GRAPHS, None)
            base = type(block).__dict__.get("_g4f_quiet_base")
            if base is not None:
                block.__class__ = base

    return reasons, undo
