"""Host cost of a whole-text-model graph replay: time from the text-model call to the graph launch, and the parts of
``PrefillGraphs.model_call`` (signature, weights check, input copies), on a patched E2B at S tokens.

    python bench/probe_model_graph.py [--seq 8192] [--calls 20]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from gemma4_fast import enable_prefill_graphs, patch_model
from gemma4_fast import graphs as G
from gemma4_fast.models import build_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--calls", type=int, default=20)
    args = ap.parse_args()
    model = build_model("E2B", torch.bfloat16, "cuda")
    patch_model(model)
    graphs = enable_prefill_graphs(model)
    ids = torch.randint(4, 260000, (1, args.seq), device="cuda")
    marks: dict = {}
    orig_call, orig_sig, orig_replay = G.PrefillGraphs.model_call, G.PrefillGraphs._model_signature, None

    def call(self, *a, **k):
        marks["call"] = time.perf_counter()
        return orig_call(self, *a, **k)

    def sig(self, *a, **k):
        t = time.perf_counter()
        out = orig_sig(self, *a, **k)
        marks["sig"] = time.perf_counter() - t
        return out

    G.PrefillGraphs.model_call, G.PrefillGraphs._model_signature = call, sig
    orig_replay = torch.cuda.CUDAGraph.replay

    def replay(self):
        marks["replay"] = time.perf_counter()
        return orig_replay(self)

    torch.cuda.CUDAGraph.replay = replay
    rows = []
    with torch.no_grad():
        for i in range(args.calls):
            torch.cuda.synchronize()
            marks.clear()
            t0 = time.perf_counter()
            model(ids, use_cache=False, logits_to_keep=1)
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            if "replay" in marks and i >= 3:
                rows.append(((marks["call"] - t0) * 1e3, (marks["replay"] - marks["call"]) * 1e3, marks["sig"] * 1e3,
                             (t1 - t0) * 1e3))
    entry = next(iter(graphs.model_entries.values()))
    n = 50
    t = time.perf_counter()
    for _ in range(n):
        entry.weights()
    w = (time.perf_counter() - t) / n * 1e3
    med = [statistics.median(c) for c in zip(*rows)]
    print(f"model replays {graphs.model_replays}; medians ms: to text-model call {med[0]:.3f}, call to replay "
          f"{med[1]:.3f} (signature {med[2]:.3f}; weights check alone, warm {w:.3f}), host time of the call {med[3]:.3f}")


if __name__ == "__main__":
    main()
