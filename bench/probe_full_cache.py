"""Where the time and the memory of a full ``run_with_cache`` go: the seed bridge against the fast one, over every hook
and over the seed's hook names only.

    python bench/probe_full_cache.py [--preset E2B] [--seq 4096] [--calls 7] [--warmup 2]

One random-weight bf16 model (``build_model(preset, seed=0)``, eager attention as the model suite's seed rows), one
``TransformerBridge`` booted on it; the seed rows first, then the same bridge after ``enable_fast_kernels(bridge,
True)``, then the seed again after ``disable_fast_kernels`` (``seed_again``: the allocator's state after the fast
rows). For each side, two caches: ``all`` (``names_filter=None``: every hook the bridge has, the fast side's new
hooks included) and ``seed_names`` (a callable filter keeping the names of the seed bridge's ``hook_dict``: the seed's
hook set, where the fast side's ``hook_attn_scores`` are the true pre-softmax scores instead of the seed's shared
pattern tensor). Per call: wall time (synced before and after; median of ``--calls`` after ``--warmup`` calls), peak
allocation above what was allocated before the call, the caching allocator's device allocations and retries during the
timed calls (``cudaMalloc`` calls and flush-and-retry rounds, which synchronize), and the cache's bytes counted once
per storage, split into the ``hook_attn_scores`` entries that have a storage of their own, the entries of names the
seed lacks, and the rest.
Writes ``full_cache.json`` and prints a table.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time

import torch

from common import print_table, write_results

GIB = 2**30


def _cache_bytes(cache, seed_names: set[str]) -> dict[str, float]:
    """GiB of the cache's distinct storages: total, own-storage ``hook_attn_scores``, names the seed lacks."""
    seen: set[int] = set()
    out = {"cache_gib": 0.0, "scores_gib": 0.0, "new_hooks_gib": 0.0}
    for name, value in cache.items():
        if not isinstance(value, torch.Tensor):
            continue
        storage = value.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        gib = storage.nbytes() / GIB
        out["cache_gib"] += gib
        if name.endswith("hook_attn_scores"):
            out["scores_gib"] += gib
        if name not in seed_names:
            out["new_hooks_gib"] += gib
    return {k: round(v, 3) for k, v in out.items()}


def _measure(bridge, sets, names_filter, calls: int, warmup: int, seed_names: set[str]) -> dict:
    times, peaks, sizes, count = [], [], None, 0
    mallocs = retries = 0
    for i in range(calls + warmup):
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        before = torch.cuda.memory_stats()
        t0 = time.perf_counter()
        with torch.no_grad():
            _, cache = bridge.run_with_cache(sets[i % len(sets)], names_filter=names_filter)
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            after = torch.cuda.memory_stats()
            times.append(dt)
            peaks.append((torch.cuda.max_memory_allocated() - base) / GIB)
            mallocs += after.get("num_device_alloc", 0) - before.get("num_device_alloc", 0)
            retries += after.get("num_alloc_retries", 0) - before.get("num_alloc_retries", 0)
        if sizes is None:
            sizes = _cache_bytes(cache, seed_names)
            count = len(cache)
        del cache
    return {"ms": round(statistics.median(times), 2), "ms_min": round(min(times), 2),
            "ms_each": [round(t, 1) for t in times], "peak_gib": round(max(peaks), 2), "device_allocs": mallocs,
            "alloc_retries": retries, "cached": count, **sizes}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="E2B")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--calls", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    import gemma4_fast
    from gemma4_fast.models import build_model, offline_tokenizer
    from transformer_lens.model_bridge import TransformerBridge

    model = build_model(args.preset, torch.bfloat16, "cuda", attn_implementation="eager")
    bridge = TransformerBridge.boot_transformers(f"google/gemma-4-{args.preset}", hf_model=model,
                                                 tokenizer=offline_tokenizer())
    seed_names = set(bridge.hook_dict)
    g = torch.Generator().manual_seed(0)
    sets = []
    for _ in range(3):
        ids = torch.randint(4, 260, (1, args.seq), generator=g)
        ids[0, 0] = 2
        sets.append(ids.cuda())
    filters = {"all": None, "seed_names": lambda name: name in seed_names}
    rows = []
    for impl in ("seed", "fast", "seed_again"):
        if impl == "fast":
            gemma4_fast.enable_fast_kernels(bridge, True)
        if impl == "seed_again":
            gemma4_fast.disable_fast_kernels(bridge)
        for label, names_filter in filters.items():
            row = {"preset": args.preset, "S": args.seq, "impl": impl, "cache": label,
                   **_measure(bridge, sets, names_filter, args.calls, args.warmup, seed_names)}
            print(row, flush=True)
            rows.append(row)
    print("wrote", write_results("full_cache", rows, extra={"seed_hook_names": len(seed_names)}))
    print_table(rows, ["impl", "cache", "S", "ms", "ms_min", "peak_gib", "device_allocs", "alloc_retries", "cached",
                       "cache_gib", "scores_gib", "new_hooks_gib"])


if __name__ == "__main__":
    main()
