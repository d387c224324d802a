"""Memoised hook-name lookups for the bridge's ``run_with_cache`` / ``run_with_hooks`` / ``hooks()``.

Before its forward starts, TransformerLens 4.3's ``run_with_cache`` reads ``bridge.hook_dict`` two or three times
and builds the alias map ``build_alias_to_canonical_map(hook_dict)`` once; ``run_with_hooks`` and ``hooks()``
do both twice (forward and backward hook lists, empty or not). On a 35-layer Gemma 4 bridge (~2,500 hook names)
each ``hook_dict`` costs ~0.2 ms on the CPU (a registry copy, a walk over the architecture's alias templates, a
sort and hash of every hook name, ~380 alias assignments) and each alias map ~0.3 ms (``hasattr`` and ``.name`` on
every hook point); right after a forward, with the hook points out of the CPU caches, 0.4 and 1.3 ms. Two memos,
validated on every use, take most of that away:

- ``_add_aliases_to_hooks`` (what ``hook_dict`` calls to add the aliases to its registry copy) becomes a
  per-instance override that replays the recorded alias assignments while everything the original reads is
  unchanged: the registry (the same dict object, its keys and values in order), ``hook_aliases`` (the same object,
  its contents), the alias templates (TransformerLens's own walk of ``adapter.component_mapping``, re-run and
  compared), TransformerLens's block-alias cache entry (the same entry, still current for the registry size and
  the global alias generation, so TransformerLens would reuse it too) and the methods involved (not overridden
  since). Aliases that fell back to TransformerLens's attribute walk (``resolve_alias``; on Gemma 4 ``hook_embed``
  via ``embed_ln.hook_out`` and ``hook_pos_embed`` via ``pos_embed.hook_out``) are resolved again on every call,
  in order, so their outcome and any warning they raise are TransformerLens's. Anything else changed
  (``clear_hook_registry()`` / ``_initialize_hook_registry()``, a new HookPoint, a rebound or edited alias)
  rebuilds the memo through TransformerLens's ``_collect_hook_aliases_from_registry``.
- the three methods run TransformerLens's own code objects on a copy of their module's globals (made per call, so
  a monkeypatched module is seen; the module itself is untouched) in which ``build_alias_to_canonical_map`` knows
  what the call will read from the map (``_map_keys``, from the arguments). String names (a ``names_filter``
  string or list, the string hook names of ``run_with_hooks`` / ``hooks``) get their own entries, read from those
  hook points' ``.name`` at that moment. A call that reads nothing (``run_with_cache`` with no or a callable
  ``names_filter``, outside compatibility mode) gets the stored map. Any other call (compatibility mode) gets the
  stored map only while every hook point's ``.name`` is unchanged. The stored map stands only for a dict with its
  keys and values in the same order, without nested dicts; any other dict goes to TransformerLens's function.

Both memos hand out fresh dicts (``bridge.hook_dict`` is a new dict on every access, as before), are dropped by
``copy.deepcopy`` (the copy builds its own) and are removed by ``disable_fast_kernels``. They engage only for the
TransformerLens functions they were written against (source digests below) and only while the bridge's class uses
them; otherwise the bridge keeps TransformerLens's code and the report says why.

Limits: registry values are compared with ``==`` (identity for HookPoints, which define no ``__eq__``); a
``run_with_cache`` that switches compatibility mode on from inside the call (in a hook or the filter) reads the
stored map, whose names were not re-read; a warning raised in a replayed attribute walk points at this module's
frames instead of ``hook_dict``'s.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import types
from operator import attrgetter
from typing import Any, Callable, Optional

from transformer_lens.model_bridge import bridge_core
from transformer_lens.model_bridge.generalized_components.base import alias_generation

_MEMO = "_g4f_hook_memo"
_CORE = bridge_core.BridgeCore
_TL_MAP = bridge_core.build_alias_to_canonical_map
_TL_ADD = _CORE._add_aliases_to_hooks
_NAME = attrgetter("name")
_UNSET = object()

# Methods whose results the alias memo stands in for or validates against, as TransformerLens 4.3 defines them.
_WATCHED = ("_collect_hook_aliases_from_registry", "_collect_component_aliases", "_collect_block_instance_aliases",
            "_compute_hook_aliases_cached")
_METHODS = tuple(getattr(_CORE, name) for name in _WATCHED)
# sha256 prefixes of the sources this module reproduces or whose reads it relies on (transformer-lens 4.3.0).
_DIGESTS = {"_add_aliases_to_hooks": "296ed01eacfa4aab", "_collect_hook_aliases_from_registry": "13abe0306aac21c2",
            "_collect_block_instance_aliases": "2e0ca06d6d77abd5", "_compute_hook_aliases_cached": "d41c277679216ccc",
            "build_alias_to_canonical_map": "4ca1390fa9ad4ad6", "run_with_cache": "20d5b759cd3f3202",
            "run_with_hooks": "ba7d36418f4e9b5b", "hooks": "13265dad3b7ff6ff",
            "_resolve_hook_point": "cb244c88050a25c6"}
# The methods that build alias maps, whose reads ``_map_keys`` describes.
_READERS = {name: getattr(_CORE, name) for name in ("run_with_cache", "run_with_hooks", "hooks")}
_SOURCES = {"_add_aliases_to_hooks": _TL_ADD, **dict(zip(_WATCHED, _METHODS)), **_READERS,
            "_resolve_hook_point": _CORE._resolve_hook_point, "build_alias_to_canonical_map": _TL_MAP}
_verdict: Optional[str] = None


def _source_mismatch() -> str:
    """'' when TransformerLens's functions are the ones this module was written against, else which are not."""
    global _verdict
    if _verdict is None:
        found = []
        for name, digest in _DIGESTS.items():
            obj = _SOURCES[name]
            try:
                got = hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]
            except (OSError, TypeError):
                got = "no source"
            if got != digest:
                found.append(name)
        _verdict = ", ".join(found)
    return _verdict


def _freeze(aliases: Any) -> tuple:
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in aliases.items())


def _resolve_one(bridge: Any, registry: dict, alias_name: str, targets: tuple) -> tuple[Any, bool]:
    """One alias as ``BridgeCore._add_aliases_to_hooks`` resolves it: (hook point or _UNSET, whether it went
    through ``resolve_alias``)."""
    fell = False
    for t in targets:
        hp = registry.get(t)
        if hp is not None:
            return hp, fell
        fell = True
        try:
            target_hook = bridge_core.resolve_alias(bridge, alias_name, {alias_name: t})
            if target_hook is not None:
                return target_hook, True
        except AttributeError:
            continue
    return _UNSET, fell


class _Aliases:
    """The alias assignments of one registry state and what they were computed from."""

    def __init__(self, bridge: Any, hooks: dict) -> None:
        """Compute the assignments as TransformerLens does, writing them into ``hooks`` as they are found."""
        registry = bridge._hook_registry
        component_aliases = bridge._collect_hook_aliases_from_registry()
        hook_aliases = bridge.hook_aliases
        all_aliases = {**hook_aliases, **component_aliases}
        self.order: list[str] = []
        self.outcomes: list[Any] = []
        self.fallbacks: list[tuple[int, str, tuple]] = []
        for alias_name, target in all_aliases.items():
            targets = tuple(target) if isinstance(target, list) else (target,)
            got, fell = _resolve_one(bridge, registry, alias_name, targets)
            if got is not _UNSET:
                hooks[alias_name] = got
            if fell:
                self.fallbacks.append((len(self.order), alias_name, targets))
            self.order.append(alias_name)
            self.outcomes.append(got)
        self.rec = self.assemble(len(self.order))
        self.registry = registry
        self.keys = list(registry)
        self.values = list(registry.values())
        self.hook_aliases = hook_aliases
        self.frozen = _freeze(hook_aliases)
        mapping = getattr(bridge.adapter, "component_mapping", _UNSET)
        self.walk = _UNSET if mapping is _UNSET else bridge._collect_component_aliases(mapping)
        self.block = bridge._block_alias_cache
        self.methods = tuple(getattr(type(bridge), name) for name in _WATCHED)

    def assemble(self, upto: int, changed: Optional[dict] = None) -> dict:
        """The assignments of the first ``upto`` aliases, with ``changed`` (index -> outcome) applied."""
        changed = changed or {}
        out = {}
        for i in range(upto):
            got = changed.get(i, self.outcomes[i])
            if got is not _UNSET:
                out[self.order[i]] = got
        return out

    def current(self, bridge: Any) -> bool:
        """Whether every input of the assignments is what it was (the fallback walks aside)."""
        registry = bridge._hook_registry
        if (registry is not self.registry or len(registry) != len(self.keys) or list(registry) != self.keys
                or list(registry.values()) != self.values):
            return False
        hook_aliases = bridge.hook_aliases
        if hook_aliases is not self.hook_aliases or _freeze(hook_aliases) != self.frozen:
            return False
        cls = type(bridge)
        if any(getattr(cls, name) is not m for name, m in zip(_WATCHED, self.methods)) or any(
                name in bridge.__dict__ for name in _WATCHED):
            return False
        block = bridge._block_alias_cache
        if block is None or block is not self.block or block[0] != (len(registry), alias_generation()):
            return False
        mapping = getattr(bridge.adapter, "component_mapping", _UNSET)
        return (mapping is not _UNSET and self.walk is not _UNSET
                and bridge._collect_component_aliases(mapping) == self.walk)

    def replay(self, bridge: Any, hooks: dict) -> "_Aliases":
        """Resolve the fallback aliases again and apply the assignments to ``hooks``; returns the state for the
        next call (a copy with the new outcomes when a walk found something else)."""
        changed: dict[int, Any] = {}
        for i, alias_name, targets in self.fallbacks:
            try:
                got, _ = _resolve_one(bridge, self.registry, alias_name, targets)
            except BaseException:
                hooks.update(self.assemble(i, changed))
                raise
            if got is not self.outcomes[i]:
                changed[i] = got
        state = self
        if changed:
            state = _Aliases.__new__(_Aliases)
            state.__dict__.update(self.__dict__)
            state.outcomes = [changed.get(i, got) for i, got in enumerate(self.outcomes)]
            state.rec = state.assemble(len(state.order))
        hooks.update(state.rec)
        return state


class _AliasMap:
    """``build_alias_to_canonical_map`` of one hook dict (no nested dicts), with the keys, values and hook-point
    names it read."""

    def __init__(self, hook_dict: dict, result: dict) -> None:
        self.map = dict(result)
        self.keys = list(hook_dict)
        self.values = list(hook_dict.values())
        self.unique = list({id(v): v for v in self.values}.values())
        self.names = list(map(_NAME, self.unique))

    def same_items(self, hook_dict: dict) -> bool:
        return len(hook_dict) == len(self.keys) and list(hook_dict) == self.keys and list(
            hook_dict.values()) == self.values

    def same_names(self) -> bool:
        return list(map(_NAME, self.unique)) == self.names


def _entries(hook_dict: dict, keys: frozenset) -> dict:
    """The entries of ``build_alias_to_canonical_map(hook_dict)`` under ``keys``, for a dict without nested dicts:
    a key maps to its hook point's ``.name`` where that differs from the key."""
    out = {}
    for key in keys:
        if key in hook_dict:
            value = hook_dict[key]
            if hasattr(value, "name") and key != value.name:
                out[key] = value.name
    return out


class _Memo:
    """Per-bridge memo (``bridge.__dict__[_MEMO]``); a deep copy or an unpickled bridge starts empty."""

    def __init__(self) -> None:
        self.aliases: Optional[_Aliases] = None
        self.map: Optional[_AliasMap] = None

    def __deepcopy__(self, memo: dict) -> "_Memo":
        return _Memo()

    def __reduce__(self) -> tuple:
        return (_Memo, ())


def _add_aliases_to_hooks(bridge: Any, original: Callable[..., Any], hooks: dict) -> None:
    """``BridgeCore._add_aliases_to_hooks`` from the memo while its inputs are unchanged."""
    memo = bridge.__dict__.get(_MEMO)
    if memo is None or getattr(original, "__func__", None) is not _TL_ADD:
        return original(hooks)
    state = memo.aliases
    if state is not None and state.current(bridge):
        memo.aliases = state.replay(bridge, hooks)
        return None
    memo.aliases = None
    memo.aliases = _Aliases(bridge, hooks)
    return None


def _alias_map(memo: _Memo, keys: Optional[frozenset], hook_dict: Any, prefix: str = "") -> dict:
    """``build_alias_to_canonical_map`` for a caller that reads only ``.get(key)`` for ``keys`` (None: anything).

    For a ``hook_dict`` with the stored map's items (hence no nested dicts): some keys get their entries, read from
    ``hook_dict``; no keys (nothing read) a copy of the stored map; ``keys=None`` a copy of the stored map while the
    hook points' names are unchanged too. Everything else is TransformerLens's function (and stored when it can be).
    """
    if prefix or type(hook_dict) is not dict:
        return _TL_MAP(hook_dict, prefix)
    state = memo.map
    if state is not None and state.same_items(hook_dict):
        if keys:
            return _entries(hook_dict, keys)
        if keys is not None or state.same_names():
            return dict(state.map)
    result = _TL_MAP(hook_dict, prefix)
    memo.map = None
    if not any(isinstance(v, dict) for v in hook_dict.values()):
        try:
            memo.map = _AliasMap(hook_dict, result)
        except Exception:
            memo.map = None
    return result


def _map_keys(bridge: Any, name: str, args: tuple, kwargs: dict) -> Optional[frozenset]:
    """The keys TransformerLens 4.3's ``name`` reads from its alias maps for these arguments (None: any).

    ``run_with_cache`` reads ``.get`` of a string or list ``names_filter`` and, in compatibility mode, the whole
    map; ``run_with_hooks`` / ``hooks`` read ``.get`` of the hook names given as strings.
    """
    if name == "run_with_cache":
        if getattr(bridge, "compatibility_mode", False) == True:  # noqa: E712 (TransformerLens's test)
            return None
        names_filter = args[3] if len(args) > 3 else kwargs.get("names_filter")
        if isinstance(names_filter, str):
            return frozenset((names_filter,)) if type(names_filter) is str else None
        if isinstance(names_filter, list):
            return frozenset(names_filter) if all(type(n) is str for n in names_filter) else None
        return frozenset()
    first = 1 if name == "run_with_hooks" else 0
    keys: set = set()
    for i, arg in enumerate(("fwd_hooks", "bwd_hooks")):
        hook_list = args[first + i] if len(args) > first + i else kwargs.get(arg, [])
        if type(hook_list) not in (list, tuple):
            return None
        for entry in hook_list:
            if type(entry) not in (list, tuple) or len(entry) != 2:
                return None
            if isinstance(entry[0], str):
                if type(entry[0]) is not str:
                    return None
                keys.add(entry[0])
    return frozenset(keys)


def with_alias_memo(bridge: Any, original: Callable[..., Any], args: tuple, kwargs: dict) -> Callable[..., Any]:
    """``original`` (TransformerLens's ``run_with_cache`` / ``run_with_hooks`` / ``hooks`` bound to ``bridge``)
    running on a copy of its module's globals whose ``build_alias_to_canonical_map`` uses the bridge's memo for
    the keys these arguments make it read; ``original`` itself when there is no memo or the method is not
    TransformerLens's."""
    memo = bridge.__dict__.get(_MEMO)
    fn = getattr(original, "__func__", None)
    if memo is None or fn is None or getattr(original, "__self__", None) is not bridge:
        return original
    if _READERS.get(getattr(fn, "__name__", None)) is not fn:
        return original
    if fn.__globals__.get("build_alias_to_canonical_map") is not _TL_MAP:
        return original
    keys = _map_keys(bridge, fn.__name__, args, kwargs)
    namespace = dict(fn.__globals__)
    namespace["build_alias_to_canonical_map"] = functools.partial(_alias_map, memo, keys)
    clone = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
    clone.__kwdefaults__ = fn.__kwdefaults__
    clone.__qualname__ = fn.__qualname__
    return types.MethodType(clone, bridge)


def run_with_alias_memo(bridge: Any, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``original(*args, **kwargs)`` through :func:`with_alias_memo`."""
    return with_alias_memo(bridge, original, args, kwargs)(*args, **kwargs)


def memo_unsupported(bridge: Any) -> str:
    """Why the memo cannot stand in for TransformerLens's code on ``bridge`` ('' if it can)."""
    mismatch = _source_mismatch()
    if mismatch:
        return f"TransformerLens's {mismatch} differ from the version the memo was written against"
    cls = type(bridge)
    if getattr(cls, "_add_aliases_to_hooks", None) is not _TL_ADD or any(
            getattr(cls, name, None) is not m for name, m in zip(_WATCHED, _METHODS)):
        return f"{cls.__name__} overrides TransformerLens's hook-alias methods"
    if any(name in bridge.__dict__ for name in ("_add_aliases_to_hooks", "hooks", *_WATCHED)):
        return "the bridge instance overrides TransformerLens's hook-alias methods"
    if getattr(getattr(bridge, "adapter", None), "component_mapping", None) is None:
        return "the bridge's adapter has no component_mapping"
    return ""


def install_hook_memo(bridge: Any) -> tuple[str, Callable[[], None]]:
    """Give ``bridge`` the memo: ``_add_aliases_to_hooks`` and ``hooks`` overrides (``run_with_cache`` /
    ``run_with_hooks`` take it through :func:`with_alias_memo`). Returns ('' or why not, undo)."""
    why = memo_unsupported(bridge)
    if why:
        return why, lambda: None
    from .fast import install_method

    bridge.__dict__[_MEMO] = _Memo()
    undo_add = install_method(bridge, "_add_aliases_to_hooks", _add_aliases_to_hooks)
    undo_hooks = install_method(bridge, "hooks", run_with_alias_memo)

    def undo() -> None:
        undo_hooks()
        undo_add()
        bridge.__dict__.pop(_MEMO, None)

    return "", undo


__all__ = ["install_hook_memo", "memo_unsupported", "run_with_alias_memo", "with_alias_memo"]
