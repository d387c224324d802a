"""Token generation for patched Gemma 4 models with a preallocated KV cache, the decode step replayed as a CUDA graph.

HF ``generate`` spends most of a decode step in Python (about 80 ms per token on E2B, against a few ms of
GPU work), so the fast kernels alone cannot speed decoding up. ``generate(model, input_ids, ...)`` runs the
prompt through the patched model once (prefill, eager), then captures one decode step, the model forward of
one token per row plus the choice of the next token, in a CUDA graph and replays it for every new token.

What makes the step replayable:

- ``DecodeCache``: one ``[B, Hkv, L, D]`` key and value buffer per layer that owns a cache (the KV-shared
  layers reuse their source layer's buffers, as in HF), written at a slot held in a device tensor. Sliding
  layers keep the full length too; their window is applied by the attention kernel.
- the attention reads the number of valid keys per row from a device tensor (``kv_lens``, see
  ``gemma4_fast.kernels.attention.attention``), so no Python int changes between steps;
- the masks are passed to HF as a prebuilt dict (``None`` per layer type: the cache's own key padding mask
  covers left padding), and ``position_ids`` come from a device tensor;
- the next token (argmax, or Gumbel-max sampling after temperature / top-k / top-p) is picked on the device
  and the step advances the slot, the lengths, the positions and the output column in place.

Hooks. Hooks must see every step, so a decoder layer holding a hook (a forward hook or pre-hook on any of its
modules, e.g. a TransformerBridge HookPoint, or an active ``gemma4_fast`` seam) runs eagerly. When hooks are
attached, the step runs in layer mode: the embedding, the final norm, the LM head and every hooked layer run
eagerly (their hooks fire as in a plain forward) and each unhooked decoder layer replays its own CUDA graph.
A graphed layer's output handed to an eager consumer is a fresh copy, never the graph's buffer.

Scope and limits: ``Gemma4ForCausalLM``, ``Gemma4ForConditionalGeneration`` (text only) and the unified class,
patched with ``patch_model`` on every attention layer (else ``ValueError``), all on one CUDA device for the
graphs. Without CUDA, with the model on several devices, or with ``cuda_graph=False`` every step runs eagerly
(logged with the reason). Greedy output equals HF ``generate`` (same logits, same argmax); sampling draws from
the same distribution as HF's temperature / top-k / top-p warpers but with its own random numbers. The cache
holds ``L`` (prompt plus new tokens, rounded up to ``LENGTH_BUCKET``) positions for every cache layer, sliding
ones included.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .attention import FastAttentionMixin
from .hooks import ATTR, global_module_hooks, hook_active, user_hooks

logger = logging.getLogger("gemma4_fast")

LENGTH_BUCKET = 256
_DECODER_ATTR = "_g4f_decoder"


class DecodeCache:
    """Preallocated keys/values for the cache layers of a Gemma 4 text model (HF ``Cache`` duck type).

    Attributes:
        length: ``L``, positions per buffer.
        kv_lens: ``[B]`` int32 device tensor, valid keys per row (during a step: the slot plus one).
        slot: ``[1]`` int64 device tensor, the position the next ``update`` writes.
        key_padding: ``[B, L]`` bool, False at left padding.
        host_len: the filled length as a Python int during the prefill, else None (decode steps).
        known_len: the valid length as a Python int during decode steps that run Python every step (eager and
            per-layer graph modes), for attention with hooks; None while a whole-step graph replays.

    ``update(k, v, layer_idx)`` writes ``k``/``v`` (``[B, Hkv, n, D]``) at ``[host_len, host_len + n)`` on the
    host path or at ``slot`` (n = 1) on the device path, and returns the whole buffers.
    """

    is_gemma4_fast_decode_cache = True
    is_compileable = False

    def __init__(self, batch: int, length: int, device: torch.device) -> None:
        self.length = int(length)
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.kv_lens = torch.zeros(batch, dtype=torch.int32, device=device)
        self.slot = torch.zeros(1, dtype=torch.long, device=device)
        self.key_padding = torch.ones(batch, self.length, dtype=torch.bool, device=device)
        self.host_len: Optional[int] = 0
        self.known_len: Optional[int] = None
        self.pending = 0

    def reset(self, key_padding: torch.Tensor) -> None:
        """Start a new sequence batch: ``key_padding`` ``[B, n]`` bool for the prompt positions."""
        n = key_padding.shape[-1]
        self.key_padding.fill_(True)
        self.key_padding[:, :n].copy_(key_padding)
        self.kv_lens.zero_()
        self.slot.zero_()
        self.host_len = 0
        self.pending = 0

    def _buffers(self, layer_idx: int, like: torch.Tensor, values: bool) -> torch.Tensor:
        store = self.values if values else self.keys
        buf = store.get(layer_idx)
        b, h, _, d = like.shape
        if buf is None or buf.shape != (b, h, self.length, d) or buf.dtype != like.dtype:
            buf = torch.zeros(b, h, self.length, d, dtype=like.dtype, device=like.device)
            store[layer_idx] = buf
        return buf

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        kbuf = self._buffers(layer_idx, key_states, False)
        vbuf = self._buffers(layer_idx, value_states, True)
        n = key_states.shape[-2]
        if self.host_len is not None:
            if self.host_len + n > self.length:
                raise ValueError(f"DecodeCache holds {self.length} positions; writing {n} at {self.host_len}")
            kbuf[:, :, self.host_len: self.host_len + n].copy_(key_states)
            vbuf[:, :, self.host_len: self.host_len + n].copy_(value_states)
            self.pending = n
        else:
            kbuf.index_copy_(2, self.slot, key_states)
            vbuf.index_copy_(2, self.slot, value_states)
        return kbuf, vbuf

    def attention_inputs(self, n_queries: int, hooked: bool = False, window: Optional[int] = None):
        """``(mask, kv_lens, start)`` for the attention of the current forward (see ``attention_core``): the
        keys to attend are ``[start, mask.shape[-1])`` of the buffers.

        On the host path the keys end after the tokens the cache layers wrote in this forward (KV-shared
        layers may see fewer queries: HF slices them to ``logits_to_keep``). A hooked attention (scores /
        pattern seams, ``output_attentions``) in a decode step gets the keys HF's dynamic cache would return,
        so its hooks see HF's shapes: all ``known_len`` keys, or on a sliding layer the last ``window - 1``
        cached ones plus the new ones.
        """
        if self.host_len is not None:
            return self.key_padding[:, : self.host_len + max(self.pending, n_queries)], None, 0
        if hooked:
            if self.known_len is None:
                raise RuntimeError("attention hooks in a decode step whose length lives only on the device")
            start = 0 if window is None else max(0, self.known_len - n_queries - (int(window) - 1))
            return self.key_padding[:, start: self.known_len], None, start
        return self.key_padding, self.kv_lens, 0

    def advance_host(self, n: int) -> None:
        """After a host-path forward of ``n`` tokens: move the device counters to match."""
        self.host_len += n
        self.pending = 0
        self.kv_lens.fill_(self.host_len)
        self.slot.fill_(self.host_len)

    def begin_step(self) -> None:
        """Before a device-path forward of one token (graph-safe): its key becomes valid."""
        self.kv_lens.add_(1)
        if self.known_len is not None:
            self.known_len += 1

    def end_step(self) -> None:
        """After a device-path forward of one token (graph-safe): the next write slot."""
        self.slot.add_(1)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if self.host_len is None:
            raise RuntimeError("DecodeCache length lives on the device during graph decoding; pass position_ids")
        return self.host_len

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return self.length


@dataclass
class SamplingConfig:
    """Next-token choice: greedy when ``do_sample`` is False, else temperature, top-k, top-p (HF order)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None

    def check(self) -> None:
        if self.do_sample:
            if not self.temperature > 0:
                raise ValueError(f"temperature must be > 0, got {self.temperature}")
            if self.top_k is not None and int(self.top_k) < 1:
                raise ValueError(f"top_k must be None or >= 1, got {self.top_k}")
            if self.top_p is not None and not 0 < float(self.top_p) <= 1:
                raise ValueError(f"top_p must be None or in (0, 1], got {self.top_p}")


def pick_tokens(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Next tokens ``[B]`` from ``logits`` ``[B, V]`` (fp32), on the device and without host syncs."""
    if not cfg.do_sample:
        return logits.argmax(dim=-1)
    scores = logits / float(cfg.temperature)
    if cfg.top_k is not None and int(cfg.top_k) < scores.shape[-1]:
        kth = torch.topk(scores, int(cfg.top_k), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if cfg.top_p is not None and float(cfg.top_p) < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False, dim=-1)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cum <= (1 - float(cfg.top_p))
        drop_sorted[:, -1] = False
        drop = drop_sorted.scatter(1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    u = torch.rand_like(scores).clamp_(min=1e-20)
    return (scores - torch.log(-torch.log(u))).argmax(dim=-1)


def _hooked_modules(model: nn.Module) -> list[str]:
    """Names of the modules whose hooks must see every decode step: user hooks (``hooks.user_hooks``), active
    seams, and global module hooks."""
    names = []
    for name, m in model.named_modules():
        if user_hooks(m):
            names.append(name or type(m).__name__)
        elif any(hook_active(fn) for fn in (m.__dict__.get(ATTR) or {}).values()):
            names.append(name)
    if global_module_hooks():
        names.append("(global module hooks)")
    return names


def _text_config(model: nn.Module):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _text_layers(model: nn.Module) -> Sequence[nn.Module]:
    from .patch import _text_roots

    roots = _text_roots(model)
    if len(roots) != 1:
        raise ValueError(f"expected one Gemma 4 text model in {type(model).__name__}, found {len(roots)}")
    return list(roots[0][1].layers)


def _layer_attention(layer: nn.Module) -> Optional[nn.Module]:
    return next((m for m in layer.modules() if isinstance(m, FastAttentionMixin)), None)


class _Emulated:
    """Stand-in for ``torch.cuda.CUDAGraph`` (see ``_LayerGraph.emulate``): replay re-runs the recorded call and
    copies its result into the outputs of the first run."""

    def __init__(self, run) -> None:
        self.run, self.out, self.fresh = run, None, True

    def replay(self) -> None:
        if self.fresh:
            self.fresh = False
            return
        res = self.run()
        for dst, src in zip(_tensors(self.out), _tensors(res)):
            dst.copy_(src)


def _tensors(out) -> tuple:
    return (out,) if isinstance(out, torch.Tensor) else tuple(out)


class _LayerGraph:
    """One decoder layer's decode step as a CUDA graph, installed as the layer's ``forward``.

    The first call captures (then replays) the layer with its inputs copied into static buffers; later calls
    copy the inputs that changed and replay. Position embeddings are copied once per step per layer type
    (``shared_pe``). A layer that stores its keys/values for KV-shared layers re-publishes the cache buffers in
    ``shared_kv_states`` after each replay (inside the graph that assignment is Python, not replayed).
    """

    #: CPU tests of the plumbing: "capture" records the call and "replay" re-runs it on the static buffers with the
    #: capture-time Python state (as a graph would), writing into the static outputs.
    emulate = False

    def __init__(self, layer: nn.Module, cache: DecodeCache, pool, shared_pe: dict, copy_out: bool) -> None:
        self.layer, self.cache, self.pool, self.shared_pe, self.copy_out = layer, cache, pool, shared_pe, copy_out
        self.attn = _layer_attention(layer)
        self.forward = layer.forward
        self.graph = None
        self.previous = None

    def install(self) -> None:
        self.previous = self.layer.__dict__.get("forward")
        self.layer.__dict__["forward"] = self

    def remove(self) -> None:
        """Restore the layer's own ``forward`` (or the instance wrapper it had, e.g. prefill graphs)."""
        if self.layer.__dict__.get("forward") is self:
            if self.previous is None:
                del self.layer.__dict__["forward"]
            else:
                self.layer.__dict__["forward"] = self.previous

    def _pe(self, pe):
        kind = getattr(self.attn, "layer_type", None)
        slot = self.shared_pe.get(kind)
        if slot is None:
            slot = self.shared_pe[kind] = {"src": None, "bufs": tuple(t.clone() for t in pe)}
        if slot["src"] is not pe[0]:
            for buf, t in zip(slot["bufs"], pe):
                buf.copy_(t)
            slot["src"] = pe[0]
        return slot["bufs"]

    def __call__(self, hidden_states, per_layer_input=None, *args, shared_kv_states=None, position_embeddings=None,
                 **kwargs):
        pe = None if position_embeddings is None else self._pe(position_embeddings)
        if self.graph is None:
            self.h = hidden_states.clone() if not getattr(hidden_states, "_g4f_static", False) else hidden_states
            self.pli = None if per_layer_input is None else per_layer_input.clone()
            if self.emulate:
                def run():
                    return self.forward(self.h, self.pli, *args, shared_kv_states=shared_kv_states,
                                        position_embeddings=pe, **kwargs)
                self.graph = _Emulated(run)
                out = run()
            else:
                torch.cuda.synchronize()
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph, pool=self.pool):
                    out = self.forward(self.h, self.pli, *args, shared_kv_states=shared_kv_states,
                                       position_embeddings=pe, **kwargs)
            self.out = out
            self.graph.out = out
            if isinstance(out, torch.Tensor):
                out._g4f_static = True
        else:
            if hidden_states is not self.h:
                self.h.copy_(hidden_states)
            if per_layer_input is not None:
                self.pli.copy_(per_layer_input)
        self.graph.replay()
        attn = self.attn
        if attn is not None and getattr(attn, "store_full_length_kv", False) and shared_kv_states is not None:
            idx = attn.layer_idx
            shared_kv_states[attn.layer_type] = self.cache.keys[idx], self.cache.values[idx]
        if self.copy_out:
            return self.out.clone() if isinstance(self.out, torch.Tensor) else tuple(t.clone() for t in self.out)
        return self.out


class Decoder:
    """Prefill + decode loop of one patched model; keeps its cache and captured graph between calls.

    ``Decoder(model)(input_ids, attention_mask, max_new_tokens=..., ...)``; see :func:`generate`.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.text_config = _text_config(model)
        self.cache: Optional[DecodeCache] = None
        self.graph = None
        self.graph_key = None
        self.state: dict[str, torch.Tensor] = {}
        self.masks = {t: None for t in set(self.text_config.layer_types)}
        self.runners: list[_LayerGraph] = []
        self.runners_key = None
        self.signature = None

    def _signature(self) -> int:
        """What a captured graph depends on besides the cache: the parameters' storage and the module classes
        (a ``.to(dtype)``, a re-patch or a bridge boot in between must not replay a stale graph)."""
        return hash((tuple((p.data_ptr(), p.dtype) for p in self.model.parameters()),
                     tuple(type(m) for m in self.model.modules())))

    def mode(self, cuda_graph: Union[bool, str], device: torch.device,
             hooked: Optional[list[str]] = None) -> tuple[str, str]:
        """``(mode, reason)``: ``"graph"`` (the whole step is one graph), ``"layers"`` (hooks are attached:
        unhooked decoder layers are graphed, the rest runs eagerly) or ``"eager"``. ``hooked``: the result of
        ``_hooked_modules(model)`` when the caller has it."""
        if cuda_graph is False:
            return "eager", "cuda_graph=False"
        if device.type != "cuda" and not _LayerGraph.emulate:
            return "eager", f"the model is on {device.type}, CUDA graphs need CUDA"
        devices = {p.device for p in self.model.parameters()}
        if len(devices) > 1:
            return "eager", f"the model spans {len(devices)} devices"
        hooked = _hooked_modules(self.model) if hooked is None else hooked
        if hooked:
            return "layers", f"hooks are attached ({', '.join(hooked[:3])}{' ...' if len(hooked) > 3 else ''})"
        if device.type != "cuda":
            return "layers", "emulated per-layer graphs"
        return "graph", ""

    def _install_runners(self) -> None:
        layers = _text_layers(self.model)
        graphed = [not _hooked_modules(layer) for layer in layers]
        key = (id(self.cache), tuple(graphed))
        if key != self.runners_key:
            pool = None if _LayerGraph.emulate else torch.cuda.graph_pool_handle()
            shared_pe: dict = {}
            self.runners = [
                _LayerGraph(layer, self.cache, pool, shared_pe, copy_out=not (i + 1 < len(layers) and graphed[i + 1]))
                for i, layer in enumerate(layers) if graphed[i]]
            self.runners_key = key
        for r in self.runners:
            r.install()

    def _remove_runners(self) -> None:
        for r in self.runners:
            r.remove()

    def _forward(self, ids: torch.Tensor, pos: torch.Tensor, all_positions: bool = False) -> torch.Tensor:
        """Last-position logits (fp32). ``all_positions`` runs every position through every layer and the LM
        head (what hooks of a plain forward see); otherwise HF may cut KV-shared layers to the last position."""
        out = self.model(input_ids=ids, position_ids=pos, past_key_values=self.cache, attention_mask=self.masks,
                         use_cache=True, logits_to_keep=0 if all_positions else 1)
        return out.logits[:, -1, :].float()

    def _emit(self, nxt: torch.Tensor, eos: Optional[torch.Tensor], pad: int) -> None:
        st = self.state
        if eos is not None:
            nxt = torch.where(st["done"], torch.full_like(nxt, pad), nxt)
            st["done"] |= torch.isin(nxt, eos)
        st["out"].index_copy_(1, st["step"], nxt[:, None])
        st["ids"].copy_(nxt[:, None])
        st["step"].add_(1)

    def _step(self, sampling: SamplingConfig, eos, pad: int) -> None:
        st = self.state
        self.cache.begin_step()
        logits = self._forward(st["ids"], st["pos"])
        self.cache.end_step()
        st["pos"].add_(1)
        self._emit(pick_tokens(logits, sampling), eos, pad)

    def check_patched(self) -> None:
        from .patch import _text_roots

        text = [m for _, root in _text_roots(self.model) for m in root.modules()]
        attn = [m for m in text if type(m).__name__.endswith("Attention") and hasattr(m, "q_proj")]
        slow = [type(m).__name__ for m in attn if not isinstance(m, FastAttentionMixin)]
        if not attn or slow:
            raise ValueError("generate needs a model patched with gemma4_fast.patch_model (attention on every "
                             f"layer); unpatched attention modules: {sorted(set(slow)) or 'no attention found'}")

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                 max_new_tokens: int = 32, sampling: Optional[SamplingConfig] = None,
                 eos_token_id: Union[int, Sequence[int], None] = None, pad_token_id: int = 0,
                 cuda_graph: Union[bool, str] = "auto") -> torch.Tensor:
        self.check_patched()
        sampling = sampling or SamplingConfig()
        sampling.check()
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got {tuple(input_ids.shape)}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        device = self.model.get_input_embeddings().weight.device
        ids = input_ids.to(device)
        B, S = ids.shape
        am = torch.ones_like(ids) if attention_mask is None else attention_mask.to(device)
        if am.shape != ids.shape:
            raise ValueError(f"attention_mask must have input_ids' shape {tuple(ids.shape)}, got {tuple(am.shape)}")
        length = -(-(S + max_new_tokens) // LENGTH_BUCKET) * LENGTH_BUCKET
        signature = self._signature()
        if (self.cache is None or self.cache.length != length or self.cache.kv_lens.shape[0] != B
                or signature != self.signature):
            self.cache = DecodeCache(B, length, device)
            self.graph = self.graph_key = None
            self.runners, self.runners_key, self.signature = [], None, signature
            self.state = dict(ids=torch.zeros(B, 1, dtype=torch.long, device=device),
                              pos=torch.zeros(B, 1, dtype=torch.long, device=device),
                              out=torch.zeros(B, max(max_new_tokens, 1), dtype=torch.long, device=device),
                              step=torch.zeros(1, dtype=torch.long, device=device),
                              done=torch.zeros(B, dtype=torch.bool, device=device))
        st = self.state
        if st["out"].shape[1] < max_new_tokens:
            st["out"] = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
            self.graph = self.graph_key = None
        eos = None
        if eos_token_id is not None:
            eos_list = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
            eos = torch.tensor(eos_list, dtype=torch.long, device=device)
        st["step"].zero_()
        st["done"].zero_()
        st["out"].fill_(pad_token_id)

        self.cache.reset(am.bool())
        prompt_pos = (am.long().cumsum(-1) - 1).masked_fill(am == 0, 1)
        hooked = _hooked_modules(self.model)
        mode, why = self.mode(cuda_graph, device, hooked)
        if mode == "eager" and cuda_graph is True:
            raise ValueError(f"cuda_graph=True but the decode step cannot be captured: {why}")
        logits = self._forward(ids, prompt_pos, all_positions=bool(hooked))
        self.cache.advance_host(S)
        self.cache.host_len = None
        self.cache.known_len = S
        st["pos"].copy_(am.long().sum(-1, keepdim=True))
        self._emit(pick_tokens(logits, sampling), eos, pad_token_id)

        if mode != "graph":
            logger.info("gemma4_fast.generate: %s decode steps (%s)", "per-layer graph" if mode == "layers"
                        else "eager", why)
        steps = max_new_tokens - 1
        if eos is not None and bool(st["done"].all()):
            steps = 0
        done_steps = 0
        key = (sampling.do_sample, sampling.temperature, sampling.top_k, sampling.top_p,
               None if eos is None else tuple(eos.tolist()), pad_token_id)
        try:
            while done_steps < steps:
                if mode == "graph" and self.graph is not None and self.graph_key == key:
                    self.cache.known_len = None
                    self.graph.replay()
                elif mode == "graph" and done_steps >= 1:
                    self._capture(sampling, eos, pad_token_id, key)
                    continue
                else:
                    if mode == "layers" and done_steps == 1:
                        self._install_runners()
                    self._step(sampling, eos, pad_token_id)
                done_steps += 1
                if eos is not None and bool(st["done"].all()):
                    break
        finally:
            self._remove_runners()
        n_new = done_steps + 1
        return torch.cat([ids, st["out"][:, :n_new]], dim=1)

    def _capture(self, sampling: SamplingConfig, eos, pad: int, key) -> None:
        """Capture one decode step (after an eager one compiled and tuned every kernel it launches)."""
        self.cache.known_len = None
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step(sampling, eos, pad)
        self.graph_key = key


def generate(model: nn.Module, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
             max_new_tokens: int = 32, do_sample: bool = False, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None,
             eos_token_id: Union[int, Sequence[int], None] = None, pad_token_id: int = 0,
             cuda_graph: Union[bool, str] = "auto") -> torch.Tensor:
    """Generate ``max_new_tokens`` tokens per row with a patched Gemma 4 model (CUDA-graph decode on CUDA).

    Args:
        model: a Gemma 4 causal LM (or conditional-generation / unified model, text only) after
            ``gemma4_fast.patch_model``; its decoder and CUDA graph are kept on the model between calls.
        input_ids: ``[B, S]`` token ids, left padded when rows differ in length.
        attention_mask: ``[B, S]`` 1 = token, 0 = left padding (None: all tokens).
        max_new_tokens: tokens to add per row (>= 1).
        do_sample, temperature, top_k, top_p: HF's meaning; greedy by default. Sampling uses the Gumbel-max
            trick on the warped logits (same distribution as HF, different random numbers).
        eos_token_id: an id or ids ending a row: later tokens of that row are ``pad_token_id``, and
            generation stops early once every row has ended (the output is then shorter, as in HF).
        pad_token_id: filler after a row's end.
        cuda_graph: "auto" (graph on CUDA when no hook is attached), True (raise if not possible), False.

    Returns:
        ``[B, S + n]`` int64: the prompt followed by the ``n <= max_new_tokens`` new tokens.
    """
    decoder = getattr(model, _DECODER_ATTR, None)
    if decoder is None:
        decoder = Decoder(model)
        object.__setattr__(model, _DECODER_ATTR, decoder)
    return decoder(input_ids, attention_mask, max_new_tokens=max_new_tokens,
                   sampling=SamplingConfig(do_sample, temperature, top_k, top_p), eos_token_id=eos_token_id,
                   pad_token_id=pad_token_id, cuda_graph=cuda_graph)


__all__ = ["generate", "Decoder", "DecodeCache", "SamplingConfig", "pick_tokens", "LENGTH_BUCKET"]
