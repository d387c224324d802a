"""Where the host time of a synced E2B bridge forward goes before its whole-model graph launches: time marks at
the entry and exit of each layer of the call path, on the GPU, without the profiler.

    cd bench && python probe_host_prefix.py [--seq 4096 8192] [--calls 20] [--json PATH]

Each mark wraps one callable (TransformerBridge.forward, TransformerLens's driver, the fast logits forward, HF's
``Gemma4ForCausalLM.forward``, ``PrefillGraphs.model_call`` and its signature / hook checks, the whole-model gate,
``CUDAGraph.replay``) and records ``time.perf_counter()`` at its first entry and exit in a call, relative to the
call's start. Each length runs with the replay launched before the hook check and after it
(``PrefillGraphs.launch_first``), alternated twice. Calls are timed as the model rows are (CUDA events around the call, then a device sync). Printed per
length: the median of every mark over the calls after warm-up, the GPU time of a call, and the host time until the
call returns.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from typing import Any, Callable

import torch

import gemma4_fast
from gemma4_fast import graphs as G
from gemma4_fast import logits as L
from gemma4_fast.models import build_model, offline_tokenizer

from common import git_commit, versions

MARKS: dict[str, float] = {}
EVENTS: list = []


def _wrap(owner: Any, attr: str, label: str) -> None:
    fn = owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        MARKS.setdefault(label + ">", time.perf_counter())
        try:
            return fn(*args, **kwargs)
        finally:
            MARKS.setdefault(label + "<", time.perf_counter())
    setattr(owner, attr, wrapped)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.model_bridge.sources.transformers_driver import TransformersDriver

    model = build_model("E2B", torch.bfloat16, "cuda", attn_implementation="eager",
                        experts_implementation="grouped_mm")
    bridge = TransformerBridge.boot_transformers("google/gemma-4-E2B", hf_model=model, tokenizer=offline_tokenizer())
    gemma4_fast.enable_fast_kernels(bridge, True)
    graphs = gemma4_fast.enable_prefill_graphs(bridge)
    hf_cls = type(bridge.original_model)
    hf_base = next(c for c in hf_cls.__mro__[1:] if "forward" in c.__dict__ and not issubclass(c, L.FastLogitsMixin))
    for owner, attr, label in [(TransformerBridge, "forward", "tb.forward"), (TransformersDriver, "forward", "driver"),
                               (L.FastLogitsMixin, "forward", "logits.forward"),
                               (L.FastLogitsMixin, "_g4f_forward", "logits._g4f_forward"),
                               (hf_base, "forward", "hf.forward"), (G.PrefillGraphs, "model_call", "model_call"),
                               (G.PrefillGraphs, "_model_signature", "signature"),
                               (G.PrefillGraphs, "_model_quiet", "quiet"),
                               (G.PrefillGraphs, "_model_hooked", "hooked"),
                               (torch.cuda.CUDAGraph, "replay", "replay")]:
        _wrap(owner, attr, label)
    if graphs.model_gate is not None:
        _wrap(graphs, "model_gate", "gate")
    replay = torch.cuda.CUDAGraph.replay

    def evented(self: Any) -> None:
        EVENTS.append(torch.cuda.Event(enable_timing=True))
        EVENTS[-1].record()
        replay(self)
        EVENTS.append(torch.cuda.Event(enable_timing=True))
        EVENTS[-1].record()
    torch.cuda.CUDAGraph.replay = evented
    res: dict[str, Any] = {"gpu": torch.cuda.get_device_name(), "commit": git_commit(), "versions": versions()}
    for S, first in [(S, first) for S in args.seq for first in (False, True, False, True)]:
        graphs.launch_first = first
        ids = torch.randint(4, 260000, (1, S), device="cuda")
        ids[0, 0] = 2
        rows: list[dict[str, float]] = []
        with torch.no_grad():
            for i in range(args.calls + 3):
                torch.cuda.synchronize()
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                MARKS.clear()
                EVENTS.clear()
                a.record()
                t0 = time.perf_counter()
                out = bridge(ids)
                t1 = time.perf_counter()
                b.record()
                torch.cuda.synchronize()
                del out
                if i >= 3:
                    row = {k: (v - t0) * 1e3 for k, v in MARKS.items()}
                    row["return"], row["gpu_ms"] = (t1 - t0) * 1e3, a.elapsed_time(b)
                    if len(EVENTS) == 2:
                        row["gpu: graph starts"] = a.elapsed_time(EVENTS[0])
                        row["gpu: graph ends"] = a.elapsed_time(EVENTS[1])
                    rows.append(row)
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            a.record()
            for _ in range(8):
                out = bridge(ids)
            b.record()
            torch.cuda.synchronize()
            del out
            chained = a.elapsed_time(b) / 8
        keys = sorted({k for r in rows for k in r}, key=lambda k: statistics.median(r.get(k, 0) for r in rows))
        med = {k: round(statistics.median(r[k] for r in rows if k in r), 3) for k in keys}
        res.setdefault(str(S), []).append({"launch_first": first, "median_ms": med, "chained_ms": chained,
                                           "model_replays": graphs.model_replays,
                                           "early_dropped": graphs.early_dropped})
        print(f"== S={S} launch_first={first}: call {med['gpu_ms']:.2f} ms (events; {chained:.2f} a call back to back), "
              f"host returns after {med['return']:.2f} ms")
        for k in keys:
            if k not in ("gpu_ms", "return"):
                print(f"   {k:24s} {med[k]:8.3f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
