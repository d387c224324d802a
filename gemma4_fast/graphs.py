"""Opt-in CUDA graphs for repeated prefill forwards: each decoder layer call is captured once per input signature
and replayed.

Why: below ~4k tokens a Gemma 4 forward on a GPU is host-bound (Python in HF, TransformerLens and the op wrappers:
tens of milliseconds per E2B forward against a few of GPU work). Interpretability workloads run the same shapes
again and again (fixed-length batches, patching sweeps), so replaying a captured layer removes that host time.

Scope and rules:

- Only prefill decoder-layer calls: no KV cache, or an HF ``DynamicCache`` still empty at the layer (what a plain
  forward creates; the captured layer records its cache update and applies it to the call's cache after each
  replay), on CUDA, with no autograd graph to record, outside any other capture (plain forwards,
  ``run_with_cache``, ``run_with_hooks`` with hooks outside the layer). Everything around the layers (embeddings, masks, final norm, LM head) stays eager, and so does any
  layer whose call is not eligible (a hook inside a bridge block, a cache, gradients).
- Per layer and signature (shapes, contiguity, dtypes and devices of the tensor arguments, the values of the
  other arguments): the first call runs eagerly (it compiles and tunes the kernels), the second captures and replays,
  later calls copy their inputs into the captured buffers and replay. A capture that fails (a host sync inside
  the layer, an unsupported argument) leaves that layer and signature eager, logged once.
- Outputs are cloned, so a hook or a cache that keeps a layer output never sees it overwritten by a later replay.
- Input copies are skipped where the captured buffer already holds the argument: a layer captured with another
  layer's returned output as its input reads that layer's captured output buffer, layers captured with the
  same tensor argument (the rotary tables, position ids) share one buffer, and layers taking views of one base
  (each layer's slice of the per-layer inputs) read views of one captured copy of that base. Each copy records
  which tensor (object and version counter) the buffer now holds; a later copy of that same, unmodified tensor is
  skipped, anything else (another tensor, an in-place edit by a hook) is copied.
- A graph is dropped (and the layer re-captured after a new warm-up) when a parameter it reads was replaced or moved
  to other storage, and every graph after any ``patch_model`` / ``unpatch_model`` call; replacing a submodule of an HF layer after enabling needs ``disable``/``enable`` again (bridge
  blocks rebuild their twin themselves).
- KV sharing (E2B/E4B): a layer that stores keys/values for later layers republishes its captured buffers in the
  call's ``shared_kv_states`` after each replay; a layer that reads them replays only when the dict holds exactly
  the buffers it was captured against (else it runs eagerly).
- Memory: each signature keeps one memory pool (the largest layer's temporaries plus every layer's captured inputs
  and outputs); at most ``max_signatures`` signatures are kept, the least recently used is dropped.

Whole text-model graphs: a call of the text model that HF's top-level model (or a TransformerBridge's, where every
block would also take its quiet path: no stop / start layer) makes for a plain forward (``input_ids`` only; no cache,
``use_cache=False``; no attention mask or the ready mask mapping of ``gemma4_fast``'s masks; no hidden states or
attentions requested) with no user hook on any module of the text model, no global module hooks and no autograd graph
to record is captured whole (embeddings, per-layer inputs, every layer, the final norm) on its second call per
signature and replayed after: one launch instead of a host-side walk through 35 layers, whose first kernels would
otherwise wait for the host. Other calls run the per-layer graphs above. Invalidation as for layers (replaced or moved
parameters, checked after each launch, the stale output dropped; ``patch_model`` / ``unpatch_model``; a submodule
replaced after enabling needs ``disable`` / ``enable``); the returned output holds clones. While no hook was
registered anywhere (the ``RemovableHandle`` counter) and nothing was patched since the hook check last passed, a
replay launches before that check, which then runs after the launch; a failed check drops the replay's output and
runs the call eagerly (``model_call``).

``enable_prefill_graphs(model_or_bridge)`` / ``disable_prefill_graphs(...)``. On a TransformerBridge with fast
kernels on, quiet blocks (``bridge_integration.quiet``) replay their layer; on a patched HF model the text model or
else every text decoder layer does.
"""
from __future__ import annotations

import logging
import weakref
from collections import OrderedDict
from itertools import chain
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from . import patch
from .hooks import global_module_hooks, user_hooks

logger = logging.getLogger("gemma4_fast")

ATTR = "_g4f_prefill_graphs"
_HOLDS = "_g4f_holds"  # on a captured buffer: (weakref to the tensor whose value it holds, that tensor's version)
_VIEW = "_g4f_view"  # on a captured buffer that views a captured base: (the base buffer, the view's geometry)
_STATIC = "_g4f_graph_signature"
_SHARED = "shared_kv_states"
_CACHE = "past_key_values"


class _Emulated:
    """CPU stand-in for a captured graph (tests of the plumbing): ``replay`` re-runs the recorded call on the static
    inputs and copies its results into the capture's outputs and published tensors, as a replay overwrites them."""

    def __init__(self) -> None:
        self.run: Optional[Callable[[], list[torch.Tensor]]] = None
        self.targets: list[torch.Tensor] = []

    def replay(self) -> None:
        for dst, src in zip(self.targets, self.run()):
            dst.copy_(src)


def _flat(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _flat(v)]
    return []


def _signature(value: Any) -> Any:
    """A hashable description of one argument, or raise TypeError when it cannot be replayed."""
    if isinstance(value, torch.Tensor):
        return ("T", tuple(value.shape), value.is_contiguous(), value.dtype, value.device)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        return (type(value).__name__,) + tuple(_signature(v) for v in value)
    raise TypeError(type(value).__name__)


#: A view argument shares a captured copy of its base when the base is at most this many times larger (e.g. each
#: layer's slice of the per-layer inputs ``[B, S, layers, D]``): one base copy a forward instead of one per layer.
_MAX_BASE_RATIO = 64


def _view_geometry(t: torch.Tensor) -> tuple:
    """Shape, strides and storage offset relative to its base of the view ``t``."""
    return tuple(t.shape), t.stride(), t.storage_offset() - t._base.storage_offset()


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(_clone(v) for v in value)
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return value


class _RecordingCache:
    """Stands in for a fresh ``DynamicCache`` while a layer is captured: ``update`` returns the new keys/values (what
    an empty dynamic layer returns) and records the call; after each replay the recorded updates are applied to the
    call's real cache with the replayed tensors (cloned)."""

    layers = ()

    def __init__(self) -> None:
        self.updates: list[tuple] = []

    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        self.updates.append((key_states, value_states, layer_idx, args, kwargs))
        return key_states, value_states


def _fresh_dynamic(cache: Any, layer_idx: Optional[int]) -> bool:
    """Whether ``cache`` is an HF ``DynamicCache`` whose layer ``layer_idx`` holds nothing yet (a prefill that fills
    it), so a captured layer can record its update and replay it onto the cache."""
    if type(cache).__name__ != "DynamicCache" or layer_idx is None:
        return False
    layers = getattr(cache, "layers", None)
    if layers is None:
        return False
    if layer_idx >= len(layers):
        return True
    layer = layers[layer_idx]
    if not hasattr(layer, "get_seq_length"):  # KV-shared layers hold a placeholder and never update the cache
        return True
    return not getattr(layer, "is_initialized", True) or layer.get_seq_length() == 0


class _Entry:
    """One layer and signature: warm-up count, then the graph with its static inputs/outputs."""

    def __init__(self) -> None:
        self.calls = 0
        self.failed = False
        self.graph: Any = None
        self.args: tuple = ()
        self.kwargs: dict = {}
        self.out: Any = None
        self.published: dict[str, Any] = {}
        self.consumed: dict[str, Any] = {}
        self.recorder: Optional[_RecordingCache] = None
        self.param_dicts: list[dict] = []
        self.params: tuple = ()
        self.storages: list = []

    def weights(self) -> tuple:
        """Identity and storage of every parameter the graph reads (a replaced or moved weight invalidates it).
        Iterates in C where it can: the whole-model check runs on every replay."""
        params = [p for p in chain.from_iterable(map(dict.values, self.param_dicts)) if p is not None]
        return list(map(id, params)), list(map(torch.Tensor.data_ptr, params))


class PrefillGraphs:
    """The captured layer graphs of one model (see the module docstring)."""

    #: CPU tests: emulate capture/replay (``_Emulated``) instead of CUDA graphs.
    emulate = False

    def __init__(self, max_signatures: int = 2) -> None:
        if max_signatures < 1:
            raise ValueError(f"max_signatures must be >= 1, got {max_signatures}")
        self.max_signatures = max_signatures
        self.pools: OrderedDict[Any, Any] = OrderedDict()
        self.entries: dict[tuple[int, Any, Any], _Entry] = {}
        self.cache_index: dict[int, Optional[int]] = {}
        self.replays = 0
        self._forward: Optional[Callable[[], Any]] = None
        self._forward_sig: Any = None
        self.generation = patch.GENERATION
        #: id(argument tensor) -> (weakref to it, weakref to the captured buffer holding its value): capture-time
        #: sharing. What a buffer holds (``_HOLDS``) and which base it views (``_VIEW``) are attributes of the buffer.
        self._buffer_of: dict[int, tuple[Any, Any]] = {}
        self.copies_skipped = 0
        #: Whole text-model graphs: signature -> entry (least recently used dropped beyond ``max_signatures``).
        self.model_entries: OrderedDict[Any, _Entry] = OrderedDict()
        self.model_replays = 0
        self._hook_dicts: Optional[tuple[int, int, list, list]] = None
        self._in_whole_model = False
        #: Extra condition of a whole-model call (a TransformerBridge: every block would take its quiet path); its
        #: optional ``per_call`` attribute is the part that depends on the call's arguments alone.
        self.model_gate: Optional[Callable[[], bool]] = None
        #: Whether a replay may launch before the hook check (``model_call``); the stamp of the last check that
        #: passed; replays whose later check failed (their output dropped).
        self.launch_first = True
        self._quiet_stamp: Optional[tuple] = None
        self.early_dropped = 0

    def clear(self) -> None:
        self.pools.clear()
        self.entries.clear()
        self.model_entries.clear()
        self._hook_dicts = None
        self._buffer_of.clear()

    def _note(self, buf: torch.Tensor, src: torch.Tensor) -> None:
        """Record that ``buf`` holds the value of ``src`` (as it is now) and can stand in for it."""
        ref = weakref.ref(src)
        setattr(buf, _HOLDS, (ref, src._version))
        self._buffer_of[id(src)] = (ref, weakref.ref(buf))
        if len(self._buffer_of) > 4096:  # records of past forwards' arguments and dropped buffers
            self._buffer_of = {k: v for k, v in self._buffer_of.items()
                               if v[0]() is not None and v[1]() is not None}

    @staticmethod
    def _holds(buf: torch.Tensor, src: torch.Tensor) -> bool:
        """Whether ``buf`` holds the value of ``src`` as it is now (same object, version unchanged)."""
        held = getattr(buf, _HOLDS, None)
        return held is not None and held[0]() is src and held[1] == src._version

    def _copy_into(self, dst: Any, src: Any) -> None:
        """Copy each argument tensor into its captured buffer unless the buffer already holds it. A buffer that is
        a view of a captured base (``_buffers``) takes the argument's base instead when the argument is the same
        view of a base of the same layout (one copy of the base serves every layer's view of it)."""
        for d, s in zip(_flat(dst), _flat(src)):
            if d is s:
                continue
            view = getattr(d, _VIEW, None)
            if view is not None:
                base_buf, geometry = view
                base = s._base
                if base is not None and _view_geometry(s) == geometry and base.shape == base_buf.shape \
                        and base.stride() == base_buf.stride() and base.dtype == base_buf.dtype:
                    self._copy_into(base_buf, base)
                    continue
                setattr(base_buf, _HOLDS, None)  # this copy changes part of the base buffer
                d.copy_(s)  # a view buffer records nothing: a later copy of its base rewrites it
                continue
            if self._holds(d, s):
                self.copies_skipped += 1
                continue
            d.copy_(s)
            self._note(d, s)

    def _buffers(self, value: Any) -> Any:
        """Captured input buffers for ``value``: a buffer that already holds a tensor argument (another layer's
        output, an argument several layers take) is shared, anything else is cloned."""
        if isinstance(value, torch.Tensor):
            base = value._base
            if base is not None and base.is_contiguous() and base.numel() <= _MAX_BASE_RATIO * value.numel():
                base_buf = self._buffers(base)
                geometry = _view_geometry(value)
                buf = base_buf.as_strided(value.shape, value.stride(), base_buf.storage_offset() + geometry[2])
                setattr(buf, _VIEW, (base_buf, geometry))
                return buf
            known = self._buffer_of.get(id(value))
            held = known[1]() if known is not None else None
            if held is not None and self._holds(held, value) and held.shape == value.shape \
                    and held.stride() == value.stride() and held.dtype == value.dtype and held.device == value.device:
                return held
            buf = value.clone()
            self._note(buf, value)
            return buf
        if isinstance(value, tuple):
            return tuple(self._buffers(v) for v in value)
        if isinstance(value, list):
            return [self._buffers(v) for v in value]
        return value

    def _returned(self, out: Any) -> Any:
        """Clones of the captured outputs for the caller, each recorded as held by its captured buffer (a later
        layer may take it as input)."""
        res = _clone(out)
        for buf, copy in zip(_flat(out), _flat(res)):
            self._note(buf, copy)
        return res

    def _layer_index(self, layer: nn.Module) -> Optional[int]:
        idx = self.cache_index.get(id(layer), -1)
        if idx == -1:
            attn = next((m for m in layer.modules() if hasattr(m, "is_kv_shared_layer")), None)
            idx = self.cache_index[id(layer)] = getattr(attn, "layer_idx", None)
        return idx

    def _eligible(self, layer: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple]:
        """The call's signature, or None when it must run eagerly."""
        if not args or not isinstance(args[0], torch.Tensor):
            return None
        cache = kwargs.get("past_key_values")
        if cache is not None and not _fresh_dynamic(cache, self._layer_index(layer)):
            return None
        device = args[0].device
        if (device.type != "cuda" and not self.emulate) or self._in_whole_model:
            return None
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        if torch.is_grad_enabled() and (args[0].requires_grad or any(p.requires_grad for p in layer.parameters())):
            return None
        try:
            return (_signature(args),
                    tuple(sorted((k, "D" if k in (_SHARED, _CACHE) else _signature(v)) for k, v in kwargs.items())))
        except TypeError:
            return None

    def _pool(self, sig: Any) -> Any:
        """The memory pool of the forward shape ``sig`` (least recently used signatures dropped)."""
        if sig in self.pools:
            self.pools.move_to_end(sig)
            return self.pools[sig]
        while len(self.pools) >= self.max_signatures:
            old, _ = self.pools.popitem(last=False)
            for key in [k for k in self.entries if k[1] == old]:
                del self.entries[key]
        self.pools[sig] = None if self.emulate else torch.cuda.graph_pool_handle()
        return self.pools[sig]

    def __call__(self, layer: nn.Module, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """Run ``fn(*args, **kwargs)`` (one call of decoder layer ``layer``), through a graph when eligible."""
        call_sig = self._eligible(layer, args, kwargs)
        if call_sig is None:
            return fn(*args, **kwargs)
        if self.generation != patch.GENERATION:  # a patch or unpatch since: the graphs ran other module classes
            self.clear()
            self.generation = patch.GENERATION
        shared = kwargs.get(_SHARED)
        fwd_sig = self._forward_key(_signature(args[0]), shared)
        pool = self._pool(fwd_sig)
        key = (id(layer), fwd_sig, call_sig)
        entry = self.entries.get(key)
        if entry is None:
            entry = self.entries[key] = _Entry()
        if entry.graph is None:
            entry.calls += 1
            if entry.failed or entry.calls < 2 or not self._static_shared(shared, fwd_sig):
                return fn(*args, **kwargs)
            return self._capture(entry, layer, fn, args, kwargs, shared, pool, fwd_sig)
        if any(shared is None or shared.get(k) is not v for k, v in entry.consumed.items()):
            return fn(*args, **kwargs)
        if entry.weights() != entry.params:
            del self.entries[key]
            return fn(*args, **kwargs)
        self._copy_into(entry.args, args)
        for k, v in entry.kwargs.items():
            self._copy_into(v, kwargs[k])
        entry.graph.replay()
        self.replays += 1
        if shared is not None:
            shared.update(entry.published)
        if entry.recorder is not None and kwargs.get(_CACHE) is not None:
            for key_states, value_states, idx, a, kw in entry.recorder.updates:
                kwargs[_CACHE].update(key_states.clone(), value_states.clone(), idx, *a, **kw)
        return self._returned(entry.out)

    def _forward_key(self, sig: Any, shared: Optional[dict]) -> Any:
        """The signature that groups the layer calls of one forward (one memory pool, one set of captured KV
        buffers): the hidden-states signature of the first eligible layer call that saw this forward's
        ``shared_kv_states`` dict (later layers may see fewer positions: HF cuts KV-shared layers to the kept
        logits)."""
        if shared is None:
            return sig
        if self._forward is None or self._forward() is not shared:
            try:
                self._forward = weakref.ref(shared)
            except TypeError:
                self._forward = (lambda d: lambda: d)(shared)
            self._forward_sig = sig
        return self._forward_sig

    @staticmethod
    def _static_shared(shared: Optional[dict], fwd_sig: Any) -> bool:
        """Whether every tensor in ``shared_kv_states`` is a captured buffer of this forward shape."""
        return shared is None or all(getattr(t, _STATIC, None) == fwd_sig for t in _flat(list(shared.values())))

    def _capture(self, entry: _Entry, layer: nn.Module, fn, args, kwargs, shared, pool, fwd_sig) -> Any:
        entry.args = self._buffers(args)
        statics = {k: self._buffers(v) for k, v in kwargs.items() if k not in (_SHARED, _CACHE)}
        before = dict(shared) if shared is not None else {}
        real_cache = kwargs.get(_CACHE)
        recorder = None if real_cache is None else _RecordingCache()
        extra = {} if recorder is None else {_CACHE: recorder}

        def call(kv: Optional[dict]) -> Any:
            if recorder is not None:
                recorder.updates.clear()
            return fn(*entry.args, **statics, **extra, **({} if shared is None else {_SHARED: kv}))

        try:
            if self.emulate:
                graph = _Emulated()
                out = call(shared)
            else:
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = call(shared)
        except Exception as exc:  # a host sync or an unsupported op inside the layer: stay eager
            entry.failed = True
            if shared is not None:
                shared.clear()
                shared.update(before)
            logger.warning("prefill graphs: %s stays eager for input %s (capture failed: %s)",
                           type(layer).__name__, tuple(args[0].shape), exc)
            return fn(*args, **kwargs)
        entry.kwargs, entry.out, entry.consumed, entry.recorder = statics, out, before, recorder
        entry.param_dicts = [m._parameters for m in layer.modules()]
        entry.params = entry.weights()
        entry.published = {k: v for k, v in (shared or {}).items() if before.get(k) is not v}
        for t in _flat(out) + _flat(list(entry.published.values())):
            setattr(t, _STATIC, fwd_sig)
        if self.emulate:
            def run() -> list[torch.Tensor]:
                scratch = dict(entry.consumed)
                res = call(scratch)
                return _flat(res) + [t for k in entry.published for t in _flat(scratch[k])]
            graph.run = run
            graph.targets = _flat(out) + _flat(list(entry.published.values()))
        entry.graph = graph
        graph.replay()
        self.replays += 1
        if recorder is not None:
            for key_states, value_states, idx, a, kw in recorder.updates:
                real_cache.update(key_states.clone(), value_states.clone(), idx, *a, **kw)
        return self._returned(out)

    def _model_hooked(self, model: nn.Module) -> bool:
        """Whether any module of ``model`` has a user hook (``hooks.user_hooks``: any hook on a TransformerLens
        ``HookPoint``, any other forward (pre-)hook not defined in wiring modules, e.g. transformers' output-capturing
        hooks, which record only in calls that request hidden states or attentions, never eligible here), or global
        module hooks are set. The modules and their hook dicts are collected once per model and patch generation."""
        known = self._hook_dicts
        if known is None or known[0] != id(model) or known[1] != patch.GENERATION:
            modules = list(model.modules())
            dicts = [d for m in modules for d in (m._forward_hooks, m._forward_pre_hooks)]
            known = self._hook_dicts = (id(model), patch.GENERATION, dicts, modules)
        if any(known[2]):
            return any(user_hooks(m) for m in known[3])
        return global_module_hooks()

    def _model_signature(self, model: nn.Module, args: tuple, kwargs: dict) -> Optional[tuple]:
        """The signature of a text-model call that can run as one graph, or None (see the module docstring)."""
        ids = kwargs.get("input_ids")
        if args or not isinstance(ids, torch.Tensor) or kwargs.get("use_cache") is not False:
            return None
        mask, pos, keep = kwargs.get("attention_mask"), kwargs.get("position_ids"), kwargs.get("logits_to_keep", 0)
        if mask is not None and not (isinstance(mask, dict) and all(v is None for v in mask.values())):
            return None
        if (pos is not None and not isinstance(pos, torch.Tensor)) or type(keep) is not int:
            return None
        if any(v is not None and v is not False for k, v in kwargs.items() if k not in _MODEL_KWARGS):
            return None
        if ids.device.type != "cuda" and not self.emulate:
            return None
        if ids.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        if torch.is_grad_enabled() and any(p.requires_grad for p in model.parameters()):
            return None
        return (_signature(ids), None if pos is None else _signature(pos),
                None if mask is None else tuple(sorted(mask)), keep)

    @staticmethod
    def _stamp(model: nn.Module) -> tuple:
        """What a passing hook check of ``model`` is remembered with: every hook registration anywhere creates a
        ``RemovableHandle`` (a process-wide counter), and ``patch_model`` / ``unpatch_model`` bump the generation."""
        return RemovableHandle.next_id, patch.GENERATION, id(model)

    def _model_quiet(self, model: nn.Module) -> bool:
        """The hook check of a whole-model call: no user hook on any module of ``model``, no global module hooks,
        and the extra condition (``model_gate``) holds. Remembers the stamp of a pass."""
        stamp = self._stamp(model)
        quiet = not self._model_hooked(model) and (self.model_gate is None or self.model_gate())
        self._quiet_stamp = stamp if quiet else None
        return quiet

    def _may_launch_first(self, model: nn.Module) -> bool:
        """Whether a replay may launch before the hook check: no hook registered and no patch change since the last
        check passed, no global module hooks, and the per-call part of ``model_gate`` (no stop / start block)."""
        if not self.launch_first or self._quiet_stamp != self._stamp(model) or global_module_hooks():
            return False
        per_call = getattr(self.model_gate, "per_call", None)
        return per_call is None or per_call()

    def model_call(self, model: nn.Module, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """Run ``fn(*args, **kwargs)`` (one call of the text model ``model``), through a whole-model graph when
        eligible.

        The hook check (``_model_quiet``: every module's hook dicts and, on a bridge, every block's module tree,
        ~0.1-0.6 ms of host time) runs before the launch unless nothing can have changed cheaply detectably since it
        last passed (``_may_launch_first``); then the replay launches first and the same check runs after it, off the
        critical path: when it fails (a hook put into a dict without a handle, a module swapped into the tree), the
        replay's output is dropped and the call runs eagerly, hooks and all."""
        sig = self._model_signature(model, args, kwargs)
        if sig is None:
            return fn(*args, **kwargs)
        if self.generation != patch.GENERATION:
            self.clear()
            self.generation = patch.GENERATION
        entry = self.model_entries.get(sig)
        early = entry is not None and entry.graph is not None and self._may_launch_first(model)
        if not early and not self._model_quiet(model):
            return fn(*args, **kwargs)
        if entry is None:
            while len(self.model_entries) >= self.max_signatures:
                self.model_entries.popitem(last=False)
            entry = self.model_entries[sig] = _Entry()
        self.model_entries.move_to_end(sig)
        if entry.graph is None:
            entry.calls += 1
            if entry.failed:
                return fn(**kwargs)
            if entry.calls < 2:  # the warm-up: the layers run eagerly, as they will inside the capture
                return self._whole(fn, kwargs)
            return self._capture_model(entry, model, fn, kwargs)
        for k, v in entry.kwargs.items():
            if isinstance(v, torch.Tensor):
                self._copy_into(v, kwargs[k])
        entry.graph.replay()
        if early and not self._model_quiet(model):
            self.early_dropped += 1
            return fn(**kwargs)
        # Checked after the launch, off the critical path: the entry keeps every captured parameter's storage alive,
        # so a replay after a weight was replaced or moved reads valid (stale) memory, and its output is dropped.
        if entry.weights() != entry.params:
            if not self.emulate:
                torch.cuda.current_stream(kwargs["input_ids"].device).synchronize()
            del self.model_entries[sig]
            return fn(**kwargs)
        self.model_replays += 1
        return _output_clone(entry.out)

    def _whole(self, fn: Callable[..., Any], kwargs: dict) -> Any:
        """``fn(**kwargs)`` with the per-layer graphs off (inside a whole-model warm-up, capture or emulated
        replay)."""
        self._in_whole_model = True
        try:
            return fn(**kwargs)
        finally:
            self._in_whole_model = False

    def _capture_model(self, entry: _Entry, model: nn.Module, fn: Callable[..., Any], kwargs: dict) -> Any:
        statics = {}
        for k, v in kwargs.items():
            if isinstance(v, torch.Tensor):
                statics[k] = v.clone()
                self._note(statics[k], v)
            else:
                statics[k] = v
        try:
            if self.emulate:
                graph = _Emulated()
                out = self._whole(fn, statics)
            else:
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=torch.cuda.graph_pool_handle()):
                    out = self._whole(fn, statics)
            values = list(out.values()) if hasattr(out, "values") else None
            if values is None or not values or not all(isinstance(v, torch.Tensor) for v in values):
                raise TypeError(f"returns {type(out).__name__} holding more than tensors")
        except Exception as exc:  # a host sync, an unsupported op or output: per-layer graphs for this signature
            entry.failed = True
            logger.warning("prefill graphs: %s keeps per-layer graphs for input %s (whole-model capture failed: %s)",
                           type(model).__name__, tuple(kwargs["input_ids"].shape), exc)
            return fn(**kwargs)
        if self.emulate:
            graph.run = lambda: list(self._whole(fn, statics).values())
            graph.targets = values
        entry.kwargs, entry.out, entry.graph = statics, out, graph
        entry.param_dicts = [m._parameters for m in model.modules()]
        entry.params = entry.weights()
        entry.storages = [p.untyped_storage() for d in entry.param_dicts for p in d.values() if p is not None]
        graph.replay()
        self.model_replays += 1
        return _output_clone(out)


#: Text-model call arguments a whole-model graph reads (any other must be None or False).
_MODEL_KWARGS = ("input_ids", "attention_mask", "position_ids", "use_cache", "logits_to_keep")


def _output_clone(out: Any) -> Any:
    """A new output of ``out``'s class holding clones of its tensors."""
    return type(out)(**{k: v.clone() for k, v in out.items()})


def _hf_model(obj: Any) -> nn.Module:
    return obj.original_model if hasattr(obj, "original_model") and hasattr(obj, "hook_dict") else obj


def _is_bridge(obj: Any) -> bool:
    return hasattr(obj, "hook_dict") and hasattr(obj, "blocks")


def _wrap_text_model(model: nn.Module, graphs: PrefillGraphs) -> None:
    """Route calls of ``model``'s text model through ``graphs.model_call``."""
    from .patch import _text_roots

    text_model = _text_roots(model)[0][1]

    def plain_model(*args, **kwargs):
        return type(text_model).forward(text_model, *args, **kwargs)

    def model_forward(*args, **kwargs):
        return graphs.model_call(text_model, plain_model, args, kwargs)
    model_forward._g4f_prefill = True  # type: ignore[attr-defined]
    text_model.__dict__["forward"] = model_forward


def _unwrap_text_model(model: nn.Module) -> None:
    from .patch import _text_roots

    roots = _text_roots(model)
    if roots and getattr(roots[0][1].__dict__.get("forward"), "_g4f_prefill", False):
        del roots[0][1].__dict__["forward"]


def enable_prefill_graphs(obj: Any, max_signatures: int = 2, whole_model: bool = True) -> PrefillGraphs:
    """Replay decoder-layer prefill calls of ``obj`` from CUDA graphs (see the module docstring).

    Args:
        obj: a TransformerBridge with fast kernels on (its quiet blocks replay), or an HF Gemma 4 model patched with
            ``patch_model`` (every text decoder layer replays).
        max_signatures: how many forward shapes keep their graphs (each holds one memory pool).
        whole_model: also capture eligible text-model calls whole (see the module docstring; on a TransformerBridge
            only calls in which every block would take its quiet path, i.e. no hook anywhere in the text model).
    Returns:
        the ``PrefillGraphs`` object (``.replays`` counts layer replays, ``.model_replays`` whole-model replays;
        ``.clear()`` frees every graph).
    """
    graphs = PrefillGraphs(max_signatures)
    if _is_bridge(obj):
        from .bridge_integration.fast import fast_kernels_report

        if not fast_kernels_report(obj).enabled:
            raise ValueError("prefill graphs on a TransformerBridge need fast kernels on (enable_fast_kernels)")
        from .bridge_integration.quiet import all_quiet_gate

        disable_prefill_graphs(obj)
        obj.__dict__[ATTR] = graphs
        for block in obj.blocks:
            block.__dict__[ATTR] = graphs
        if whole_model:
            graphs.model_gate = all_quiet_gate(list(obj.blocks))
            _wrap_text_model(_hf_model(obj), graphs)
        return graphs
    from .decode import _text_layers
    from .patch import is_patched

    model = _hf_model(obj)
    if not is_patched(model):
        raise ValueError("prefill graphs need a model patched with gemma4_fast.patch_model")
    disable_prefill_graphs(model)
    model.__dict__[ATTR] = graphs
    if whole_model:
        _wrap_text_model(model, graphs)
    for layer in _text_layers(model):
        def plain(*args, _layer=layer, **kwargs):  # the class's forward at call time (patching swaps classes)
            return type(_layer).forward(_layer, *args, **kwargs)

        def forward(*args, _layer=layer, _plain=plain, **kwargs):
            return graphs(_layer, _plain, args, kwargs)
        forward._g4f_prefill = True  # type: ignore[attr-defined]
        layer.__dict__["forward"] = forward
    return graphs


def disable_prefill_graphs(obj: Any) -> None:
    """Drop the prefill graphs of ``obj`` (bridge or patched model) and restore plain layer calls."""
    graphs = obj.__dict__.pop(ATTR, None)
    if graphs is not None:
        graphs.clear()
    if _is_bridge(obj):
        for block in obj.blocks:
            block.__dict__.pop(ATTR, None)
        _unwrap_text_model(_hf_model(obj))
        return
    from .decode import _text_layers

    try:
        layers = _text_layers(obj)
    except ValueError:
        return
    _unwrap_text_model(obj)
    for module in layers:
        fwd = module.__dict__.get("forward")
        if getattr(fwd, "_g4f_prefill", False):
            del module.__dict__["forward"]


def prefill_graphs(obj: Any) -> Optional[PrefillGraphs]:
    """The ``PrefillGraphs`` enabled on ``obj`` (bridge or model), or None."""
    return obj.__dict__.get(ATTR)
