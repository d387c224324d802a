"""Model suite: Gemma 4 forwards and TransformerBridge workflows, each fast path next to its baseline.

Random-weight models of the real presets (shapes from ``gemma4_fast.presets``), built directly on the
GPU in bf16 with ``gemma4_fast.build_model(..., seed=0)``. One model is alive at a time: items carry a
``model`` marker, ``bench/conftest.py`` runs the items of one model together, and the module-scoped
``pool`` frees a model before building the next (and at the end of the module).

What is timed (rows of the ``model`` suite; ``impl`` says which side):

- ``hf_forward``: ``model(ids, use_cache=False, logits_to_keep=1)``. Baseline ``sdpa`` (HF's SDPA
  attention; MoE experts on HF's default ``grouped_mm``); ``fast``: the same model after
  ``gemma4_fast.patch.patch_model(model, backend="triton")`` (undone after the item).
- ``hf_forward_full_logits``: the same with every position's logits (sizes of the pre-project anchors).
- ``hf_generate``: HF ``generate`` (2048-token prompt, exactly 32 new tokens, greedy, dynamic cache), sdpa vs
  the patched model, and ``graph``: ``gemma4_fast.generate`` on the patched model (preallocated cache, decode
  step replayed as a CUDA graph, captured in the warm-up call and reused): decode tokens/s (prefill included).
- ``bridge_forward`` (full logits), ``bridge_cache_resid`` (``run_with_cache`` with ``names_filter`` =
  ``hook_resid_post`` only), ``bridge_cache_all`` (everything cached), ``bridge_hooks_patch``
  (``run_with_hooks`` zeroing head 0 of layer 0's ``hook_pattern``), ``bridge_generate`` (2048-token prompt,
  32 new tokens, greedy, with one reading hook on a middle layer's ``hook_resid_post``). Baseline
  ``seed``: ``TransformerBridge.boot_transformers(name, hf_model=model, tokenizer=tok)`` (eager attention);
  ``fast``: the same bridge after ``gemma4_fast.enable_fast_kernels(bridge, True)``, which is what
  ``gemma4_fast.boot_transformers(..., fast_kernels=True)`` runs after the boot (undone after the item).

Every row has ``ms`` (median of CUDA-event times of the timed calls), ``peak_gib`` (peak allocation
during the calls above what was allocated before: weights excluded, as in the anchors), ``flops``,
``tflops`` and ``frac_mm`` (an estimate of the forward's matmul and attention FLOPs over the measured
bf16 matmul ceiling; the generate rows instead have ``tok_s`` and an estimate of weight bytes read per
decoded token, as ``TBps`` / ``frac_bw``). Fast rows of ``hf_forward`` / ``bridge_forward`` also carry
``max_rel_diff`` of the last position's logits against the baseline (not a correctness check on deep
random-weight models, whose bf16 runs diverge: see ``bench/bf16_noise.py``), and ``bridge_hooks_patch`` rows
``hook_effect`` (how much the patching hook moved those logits; the seed bridge discards pattern edits).

Inputs: token ids ``[BOS=2] + randint(4, 260)`` (the offline tokenizer's byte range), three sets rotated
between calls. The pre-project anchors (``bench/results/anchors-h100-2026-11-23.json``) are put beside
these rows by ``bench/report.py``. ``--bench-quick`` keeps E2B at 1k/4k, the 6-layer MoE model and one
size of each bridge workflow (no 26B-A4B build). A piece that is not there (``gemma4_fast.patch``)
skips its items with the reason; a measurement that ran and failed fails.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import pytest
import torch

BENCH_SUITE = "model"
QUICK = os.environ.get("GEMMA4_FAST_BENCH_QUICK", "").strip().lower() in ("1", "true", "yes")

# label -> (preset, layers kept); "A4B-6L" is the anchors' 6-layer cut of 26B-A4B.
MODELS: dict[str, tuple[str, Optional[int]]] = {"E2B": ("E2B", None), "A4B-6L": ("26B-A4B", 6),
                                                "26B-A4B": ("26B-A4B", None)}
BOS, TOKEN_LO, TOKEN_HI = 2, 4, 260
GEN_PROMPT, GEN_NEW = 2048, 32
N_SETS = 3
CHECK_MAX_S = 8192

if QUICK:
    PLAN: dict[str, dict[str, list[int]]] = {
        "hf_forward": {"E2B": [1024, 4096], "A4B-6L": [512]},
        "hf_forward_full_logits": {},
        "hf_generate": {"E2B": [GEN_PROMPT]},
        "bridge_forward": {"E2B": [1024]},
        "bridge_cache_resid": {"E2B": [1024]},
        "bridge_cache_all": {"E2B": [1024]},
        "bridge_hooks_patch": {"E2B": [1024]},
        "bridge_generate": {"E2B": [GEN_PROMPT]},
    }
else:
    PLAN = {
        "hf_forward": {"E2B": [1024, 4096, 8192, 32768], "A4B-6L": [512, 4096], "26B-A4B": [512, 4096]},
        "hf_forward_full_logits": {"E2B": [8192], "26B-A4B": [1024, 4096]},
        "hf_generate": {"E2B": [GEN_PROMPT]},
        "bridge_forward": {"E2B": [1024, 4096, 8192], "26B-A4B": [1024, 4096]},
        "bridge_cache_resid": {"E2B": [1024, 4096, 8192], "26B-A4B": [1024, 4096]},
        "bridge_cache_all": {"E2B": [1024, 4096]},
        "bridge_hooks_patch": {"E2B": [1024, 4096]},
        "bridge_generate": {"E2B": [GEN_PROMPT]},
    }
MAY_OOM_S = 32768
# workloads that also get an impl "graph": CUDA-graph decode for hf_generate, prefill graphs
# (gemma4_fast.enable_prefill_graphs) for the forwards
GRAPH_VARIANTS = ("hf_generate", "hf_forward", "bridge_forward", "bridge_cache_resid")
MODEL_ORDER = ("E2B", "A4B-6L", "26B-A4B")
IMPLS = {"hf": ("sdpa", "fast"), "bridge": ("seed", "fast")}


def timing(what: str, S: int, impl: str = "") -> dict[str, int]:
    """Warm-up and timed rounds of one item (few: each call is a whole model). Prefill-graph forwards warm up
    twice (an eager call, then the capture), so every timed round is a replay."""
    if QUICK or what.endswith("_generate") or S >= 16384:
        plan = {"warmup_rounds": 1, "rounds": 2}
    elif S >= 8192:
        plan = {"warmup_rounds": 1, "rounds": 3}
    else:
        plan = {"warmup_rounds": 2, "rounds": 5}
    if impl == "graph" and not what.endswith("_generate"):
        plan["warmup_rounds"] = max(plan["warmup_rounds"], 2)
    return plan


def fast_patch_api() -> tuple[Callable, Callable]:
    """``(patch_model, unpatch_model)`` from ``gemma4_fast.patch``; skips the item when it is missing."""
    try:
        from gemma4_fast.patch import patch_model, unpatch_model
    except ImportError as exc:
        pytest.skip(f"fast path not available: gemma4_fast.patch cannot be imported ({exc})")
    return patch_model, unpatch_model


def set_attn(model: torch.nn.Module, name: str) -> None:
    """Switch an HF model's attention implementation (public API first, the config otherwise)."""
    try:
        model.set_attn_implementation(name)
    except Exception:
        model.config._attn_implementation = name


def token_sets(S: int, n: int, device: Any, seed: int = 0) -> list[torch.Tensor]:
    """``n`` random id tensors ``[1, S]`` int64: BOS then ids in [4, 260) (never a constant input)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + S)
    out = []
    for _ in range(n):
        ids = torch.randint(TOKEN_LO, TOKEN_HI, (1, S), generator=gen)
        ids[0, 0] = BOS
        out.append(ids.to(device))
    return out


def attention_pairs(S: int, window: Optional[int]) -> int:
    """Visible (query, key) pairs of causal attention over S tokens, optionally within a window."""
    if not window or window >= S:
        return S * (S + 1) // 2
    return window * (window + 1) // 2 + (S - window) * window


def active_linear_params(model: torch.nn.Module, within: Optional[torch.nn.Module] = None) -> float:
    """Matmul weights one token goes through: every 2-D+ weight of the text model (or of ``within``, one of its
    submodules) except embedding tables; stacked experts count top_k / n_experts; K/V projections of KV-shared
    layers are not run."""
    cfg = model.config
    inner = model.model
    skip: set[int] = set()
    for layer in getattr(inner, "layers", []):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and getattr(attn, "is_kv_shared_layer", False):
            for proj in ("k_proj", "v_proj"):
                mod = getattr(attn, proj, None)
                if mod is not None:
                    skip.update(id(p) for p in mod.parameters())
    total = 0.0
    for name, p in (within or inner).named_parameters():
        if p.dim() < 2 or "embed_tokens" in name or id(p) in skip:
            continue
        n = float(p.numel())
        if p.dim() == 3 and getattr(cfg, "num_experts", None):
            n *= cfg.top_k_experts / cfg.num_experts
        total += n
    return total


def hf_trims_kv_shared(model: torch.nn.Module) -> bool:
    """Whether this transformers runs the KV-shared layers (E2B/E4B) on the kept logit rows only when asked for
    an integer ``logits_to_keep`` (``_maybe_slice_kv_shared_inputs``, transformers >= 5.23; 5.17 runs them on
    every position)."""
    inner = getattr(model, "model", None)
    return hasattr(inner, "_maybe_slice_kv_shared_inputs") and bool(getattr(model.config, "num_kv_shared_layers", 0))


def forward_flops(model: torch.nn.Module, S: int, logits_rows: int) -> float:
    """Estimated FLOPs of one forward over S tokens: 2 x active weights x S, causal (windowed) attention
    4 x heads x head_dim per visible pair, and the tied LM head for ``logits_rows`` positions. Where
    ``hf_trims_kv_shared`` and only the last ``logits_rows < S`` rows are kept, the KV-shared layers count those
    rows only (their queries see all S keys). ``bench/floors.py`` counts the same with torch's FLOP counter."""
    cfg = model.config
    layers = list(getattr(model.model, "layers", []))
    first_shared = len(layers) - int(getattr(cfg, "num_kv_shared_layers", 0) or 0)
    trim = logits_rows < S and hf_trims_kv_shared(model)
    flops = 2.0 * active_linear_params(model) * S
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        window = getattr(attn, "sliding_window", None)
        pairs = attention_pairs(S, window)
        if trim and i >= first_shared:
            flops -= 2.0 * active_linear_params(model, layer) * (S - logits_rows)
            pairs = sum(min(S - j, window or S) for j in range(logits_rows))
        flops += 4.0 * cfg.num_attention_heads * attn.head_dim * pairs
    flops += 2.0 * cfg.vocab_size * cfg.hidden_size * logits_rows
    return flops


def decode_bytes_per_token(model: torch.nn.Module) -> float:
    """Estimated weight bytes one decoded token reads (active matmul weights and the LM head)."""
    cfg = model.config
    elt = next(model.parameters()).element_size()
    return elt * (active_linear_params(model) + cfg.vocab_size * cfg.hidden_size)


def gemma4_fast_report(bridge: Any) -> str:
    """One-line summary of what ``enable_fast_kernels`` did on ``bridge``."""
    from gemma4_fast.bridge_integration import fast_kernels_report

    return fast_kernels_report(bridge).summary()


class ModelCase:
    """One built model with its baselines and fast paths; switches the model between them.

    ``hf(impl)`` returns the HF model on ``"sdpa"`` (or ``"eager"``) or, for ``"fast"``, patched with
    ``patch_model(model, backend=backend)``. ``bridge(impl)`` returns the model's one TransformerBridge
    (booted on first use), on HF delegation for ``"seed"`` or after ``enable_fast_kernels(bridge, True)``
    for ``"fast"``. One bridge per model: the boot swaps bridge components into the HF model, so a second
    bridge on the same model would wrap the first one's (its pattern hooks then do nothing). For the same
    reason every HF-forward item of a model runs before its first bridge item. Leaving a fast state undoes
    it (``unpatch_model`` / ``disable_fast_kernels``).
    """

    def __init__(self, label: str, *, device: Any = "cuda", dtype: torch.dtype = torch.bfloat16,
                 backend: str = "triton", experts: Optional[str] = None, tokenizer: Any = None) -> None:
        import gemma4_fast

        preset, layers = MODELS.get(label, (label, None))
        self.label, self.preset, self.device, self.dtype, self.backend = label, preset, device, dtype, backend
        moe = bool(gemma4_fast.get_preset(preset).text.get("enable_moe_block"))
        self.experts = experts or ("grouped_mm" if moe else "eager")
        self.model = gemma4_fast.build_model(preset, dtype=dtype, device=device, seed=0, attn_implementation="sdpa",
                                             experts_implementation=self.experts, num_hidden_layers=layers)
        self.tok = tokenizer if tokenizer is not None else gemma4_fast.offline_tokenizer()
        self.bridge_obj: Any = None
        self.state: Optional[str] = None
        self.patch_report: Any = None
        self.graphs_on: Any = None
        self.last_logits: dict[tuple, torch.Tensor] = {}
        self._flops_cache: dict[tuple[int, int], float] = {}

    @property
    def n_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    def flops(self, S: int, logits_rows: int) -> float:
        key = (S, logits_rows)
        if key not in self._flops_cache:
            self._flops_cache[key] = forward_flops(self.model, S, logits_rows)
        return self._flops_cache[key]

    def _leave_fast(self) -> None:
        if self.graphs_on is not None:
            import gemma4_fast
            gemma4_fast.disable_prefill_graphs(self.graphs_on)
            self.graphs_on = None
        if self.state == "hf-fast":
            fast_patch_api()[1](self.model)
        elif self.state == "bridge-fast":
            import gemma4_fast
            gemma4_fast.disable_fast_kernels(self.bridge_obj)
        self.state = None

    def hf(self, impl: str) -> torch.nn.Module:
        if self.bridge_obj is not None:
            raise RuntimeError("HF-forward items must run before the bridge is booted on this model "
                               "(the bridge swaps its components into the HF model)")
        self._leave_fast()
        if impl in ("fast", "graph"):
            patch_model, _ = fast_patch_api()
            self.patch_report = patch_model(self.model, backend=self.backend)
            self.state = "hf-fast"
            if impl == "graph":
                import gemma4_fast
                gemma4_fast.enable_prefill_graphs(self.model)
                self.graphs_on = self.model
        else:
            set_attn(self.model, impl)
        return self.model

    def bridge(self, impl: str) -> Any:
        self._leave_fast()
        if self.bridge_obj is None:
            from transformer_lens.model_bridge import TransformerBridge
            self.bridge_obj = TransformerBridge.boot_transformers(
                self.preset, hf_model=self.model, tokenizer=self.tok, device=str(self.device), dtype=self.dtype)
        if impl == "seed":
            set_attn(self.model, "eager")
            return self.bridge_obj
        fast_patch_api()
        import gemma4_fast
        gemma4_fast.enable_fast_kernels(self.bridge_obj, True, backend=self.backend)
        self.state = "bridge-fast"
        if impl == "graph":
            gemma4_fast.enable_prefill_graphs(self.bridge_obj)
            self.graphs_on = self.bridge_obj
        return self.bridge_obj

    def fast_summary(self, kind: str) -> str:
        if kind == "hf":
            rep = self.patch_report
            text = rep.summary() if hasattr(rep, "summary") else str(rep)
        else:
            text = gemma4_fast_report(self.bridge_obj)
        return " ".join(str(text).split())[:300]

    def close(self) -> None:
        try:
            self._leave_fast()
        finally:
            self.bridge_obj = self.model = None
            self.last_logits.clear()


@dataclass
class Work:
    """One timed workload: ``fn()`` after ``setup(i)``; ``fields`` identify the row; ``check()`` runs once
    after timing and returns extra fields."""

    fn: Callable[[], Any]
    setup: Callable[[int], None]
    fields: dict[str, Any]
    flops: Optional[float] = None
    nbytes: Optional[float] = None
    check: Callable[[], dict[str, Any]] = field(default=lambda: {})


def _zero_head0(pattern: torch.Tensor, hook: Any) -> torch.Tensor:
    pattern[:, 0] = 0
    return pattern


def _last_logits(out: Any) -> torch.Tensor:
    logits = out.logits if hasattr(out, "logits") else (out[0] if isinstance(out, tuple) else out)
    return logits[0, -1].float().clone()


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def make_work(case: ModelCase, what: str, S: int, impl: str) -> Work:
    """The workload of one (model, what, S, impl) item on ``case``, with the model switched to ``impl``."""
    sets = token_sets(S, N_SETS, case.device)
    cur = {"ids": sets[0]}

    def setup(i: int) -> None:
        cur["ids"] = sets[i % len(sets)]

    fields: dict[str, Any] = {"model": case.label, "preset": case.preset, "what": what, "impl": impl, "S": S,
                              "layers": case.n_layers}
    baseline = IMPLS["bridge" if what.startswith("bridge") else "hf"][0]
    key = (what.replace("_full_logits", ""), S)

    def keep_and_compare(run: Callable[[torch.Tensor], Any]) -> dict[str, Any]:
        if S > CHECK_MAX_S:
            return {}
        with torch.no_grad():
            last = _last_logits(run(sets[0]))
        case.last_logits[(*key, impl)] = last
        ref = case.last_logits.get((*key, baseline))
        out = {"max_rel_diff": _rel_diff(last, ref)} if impl != baseline and ref is not None else {}
        if case.graphs_on is not None:
            import gemma4_fast
            graphs = gemma4_fast.graphs.prefill_graphs(case.graphs_on)
            entries = list(graphs.entries.values()) if graphs is not None else []
            whole = list(graphs.model_entries.values()) if graphs is not None else []
            out.update(graph_layers=sum(e.graph is not None for e in entries),
                       graph_models=sum(e.graph is not None for e in whole),
                       graph_capture_failures=sum(e.failed for e in entries + whole))
        return out

    if what == "hf_generate":
        model = case.hf("fast" if impl == "graph" else impl)
        fields["impl_detail"] = {"fast": f"HF generate after patch_model(backend={case.backend})",
                                 "graph": f"gemma4_fast.generate (CUDA-graph decode) after patch_model("
                                          f"backend={case.backend})"}.get(
            impl, f"HF generate, attn={model.config._attn_implementation}")
        fields.update(prompt=S, new=GEN_NEW)

        def fn():
            with torch.no_grad():
                if impl == "graph":
                    import gemma4_fast
                    return gemma4_fast.generate(model, cur["ids"], max_new_tokens=GEN_NEW, cuda_graph=True)
                return model.generate(cur["ids"], attention_mask=torch.ones_like(cur["ids"]),
                                      max_new_tokens=GEN_NEW, min_new_tokens=GEN_NEW, do_sample=False,
                                      pad_token_id=0)

        def check() -> dict[str, Any]:
            return {"generated": int(fn().shape[-1] - S)}
        return Work(fn, setup, fields, nbytes=decode_bytes_per_token(case.model) * GEN_NEW, check=check)

    if what in ("hf_forward", "hf_forward_full_logits"):
        model = case.hf(impl)
        full = what == "hf_forward_full_logits"
        kw: dict[str, Any] = {"use_cache": False} if full else {"use_cache": False, "logits_to_keep": 1}
        fields["impl_detail"] = {"fast": f"patch_model(backend={case.backend})",
                                 "graph": f"patch_model(backend={case.backend}) + enable_prefill_graphs"}.get(
            impl, f"HF attn={model.config._attn_implementation}, experts={case.experts}")
        if impl in ("fast", "graph"):
            fields["fast_report"] = case.fast_summary("hf")

        def fn():
            with torch.no_grad():
                return model(cur["ids"], **kw)
        return Work(fn, setup, fields, flops=case.flops(S, S if full else 1),
                    check=lambda: keep_and_compare(lambda ids: model(ids, **kw)))

    bridge = case.bridge(impl)
    fields["impl_detail"] = {"seed": "TransformerBridge.boot_transformers (eager)",
                             "graph": f"enable_fast_kernels(bridge, backend={case.backend}) + enable_prefill_graphs"
                             }.get(impl, f"enable_fast_kernels(bridge, backend={case.backend})")
    if impl in ("fast", "graph"):
        fields["fast_report"] = case.fast_summary("bridge")
    flops = case.flops(S, S)

    if what == "bridge_forward":
        def fn():
            with torch.no_grad():
                return bridge(cur["ids"])
        return Work(fn, setup, fields, flops=flops, check=lambda: keep_and_compare(bridge))

    if what in ("bridge_cache_resid", "bridge_cache_all"):
        names = (lambda n: n.endswith("hook_resid_post")) if what == "bridge_cache_resid" else None

        def fn():
            with torch.no_grad():
                logits, cache = bridge.run_with_cache(cur["ids"], names_filter=names)
            fields.setdefault("cached_tensors", len(cache))
            return logits, cache
        return Work(fn, setup, fields, flops=flops)

    if what == "bridge_hooks_patch":
        hooks = [("blocks.0.attn.hook_pattern", _zero_head0)]

        def fn():
            with torch.no_grad():
                return bridge.run_with_hooks(cur["ids"], fwd_hooks=hooks)

        def check() -> dict[str, Any]:
            plain = case.last_logits.get(("bridge_forward", S, impl))
            if plain is None or S > CHECK_MAX_S:
                return {}
            with torch.no_grad():
                hooked = _last_logits(bridge.run_with_hooks(sets[0], fwd_hooks=hooks))
            return {"hook_effect": _rel_diff(hooked, plain)}
        return Work(fn, setup, fields, flops=flops, check=check)

    if what == "bridge_generate":
        calls = {"n": 0}
        layer = case.n_layers // 2

        def reader(t: torch.Tensor, hook: Any) -> None:
            calls["n"] += 1

        def fn():
            with torch.no_grad(), bridge.hooks(fwd_hooks=[(f"blocks.{layer}.hook_resid_post", reader)]):
                return bridge.generate(cur["ids"], max_new_tokens=GEN_NEW, do_sample=False, stop_at_eos=False,
                                       verbose=False, return_type="tokens")
        fields.update(prompt=S, new=GEN_NEW)

        def check() -> dict[str, Any]:
            calls["n"] = 0
            out = fn()
            return {"hook_calls_per_generate": calls["n"], "generated": int(out.shape[-1] - S)}
        return Work(fn, setup, fields, nbytes=decode_bytes_per_token(case.model) * GEN_NEW, check=check)

    raise ValueError(f"unknown workload {what!r}")


class ModelPool:
    """Keeps at most one :class:`ModelCase` alive; asking for another label frees the current one first."""

    def __init__(self, **case_kwargs: Any) -> None:
        self.case_kwargs = case_kwargs
        self.case: Optional[ModelCase] = None
        self.tok: Any = None

    def get(self, label: str) -> ModelCase:
        if self.case is not None and self.case.label == label:
            return self.case
        self.release()
        if self.tok is None:
            import gemma4_fast
            self.tok = gemma4_fast.offline_tokenizer()
        self.case = ModelCase(label, tokenizer=self.tok, **self.case_kwargs)
        return self.case

    def release(self) -> None:
        if self.case is not None:
            self.case.close()
            self.case = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def pool(gpu):
    p = ModelPool(device="cuda", dtype=torch.bfloat16, backend="triton")
    yield p
    p.release()


@pytest.fixture(autouse=True)
def _free_between_items():
    yield
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def params(what: str) -> list[Any]:
    """pytest params (model, S, impl) of one workload, model-major, impls side by side per size."""
    kind = "bridge" if what.startswith("bridge") else "hf"
    impls = IMPLS[kind] + (("graph",) if what in GRAPH_VARIANTS else ())
    out = []
    for model in MODEL_ORDER:
        for S in PLAN[what].get(model, []):
            for impl in impls:
                if impl == "graph" and what != "hf_generate" and S > CHECK_MAX_S:
                    continue  # prefill graphs keep their memory pool; the longest sizes are timed without them
                out.append(pytest.param(model, S, impl, id=f"{model}-S{S}-{impl}", marks=pytest.mark.model(model)))
    if not out:
        plan = "quick" if QUICK else "full"
        out.append(pytest.param(None, None, None, id="none",
                                marks=pytest.mark.skip(reason=f"{what}: no sizes in the {plan} plan")))
    return out


def run_item(pool: ModelPool, cuda_bench: Any, what: str, model: str, S: int, impl: str) -> dict[str, Any]:
    """Build (or reuse) the model, time the workload, run its check, and record the row."""
    case = pool.get(model)
    work = make_work(case, what, S, impl)
    try:
        row = cuda_bench(work.fn, setup=work.setup, flops=work.flops, nbytes=work.nbytes, memory=True,
                         **timing(what, S, impl), **work.fields)
    except torch.cuda.OutOfMemoryError as exc:
        if S < MAY_OOM_S:
            raise
        gc.collect()
        torch.cuda.empty_cache()
        cuda_bench.recorder(dict(work.fields, error=f"OutOfMemoryError: {str(exc)[:300]}"))
        pytest.skip(f"{model} at S={S} does not fit in GPU memory ({impl})")
    extra = work.check()
    if what.endswith("_generate"):
        extra["tok_s"] = GEN_NEW / (row["ms"] * 1e-3)
    row.update(extra)
    cuda_bench.benchmark.extra_info.update(extra)
    return row


@pytest.mark.parametrize("model,S,impl", params("hf_forward"))
def test_hf_forward(pool, cuda_bench, model, S, impl):
    run_item(pool, cuda_bench, "hf_forward", model, S, impl)


@pytest.mark.parametrize("model,S,impl", params("hf_forward_full_logits"))
def test_hf_forward_full_logits(pool, cuda_bench, model, S, impl):
    run_item(pool, cuda_bench, "hf_forward_full_logits", model, S, impl)


@pytest.mark.parametrize("model,S,impl", params("hf_generate"))
def test_hf_generate(pool, cuda_bench, model, S, impl):
    run_item(pool, cuda_bench, "hf_generate", model, S, impl)


@pytest.mark.parametrize("model,S,impl", params("bridge_forward"))
def test_bridge_forward(pool, cuda_bench, model, S, impl):
    run_item(pool, cuda_bench, "bridge_forward", model, S, impl)


@pytest.mark.parametrize("model,S,impl", params("bridge_cache_resid"))
def test_bridge_cache_resid(pool, cuda_bench, model, S, impl):
    run_item(pool, cuda_bench, "bridge_cache_resid", model, S, impl)


@pytest.mark.parametrize("model,S,impl", params("bridge_cache_all"))
def test_bridge_cache_all(pool, cuda_bench, model, S, impl):
    run_item(pool, cuda_bench, "bridge_cache_all", model, S, impl)


@pytest.mark.parametrize("model,S,impl", params("bridge_hooks_patch"))
def test_bridge_hooks_patch(pool, cuda_bench, model, S, impl):
    run_item(pool, cuda_bench, "bridge_hooks_patch", model, S, impl)


@pytest.mark.parametrize("model,S,impl", params("bridge_generate"))
def test_bridge_generate(pool, cuda_bench, model, S, impl):
    run_item(pool, cuda_bench, "bridge_generate", model, S, impl)



def plan_summary() -> list[tuple[str, str, int]]:
    """(what, model, S) of every planned size, in run order (for the README and the CPU tests)."""
    return [(what, model, S) for model in MODEL_ORDER for what in PLAN for S in PLAN[what].get(model, [])]

