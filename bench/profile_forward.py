"""Profile one model forward on the GPU: where host and device time go, and any host syncs.

    python bench/profile_forward.py --preset E2B --seq 1024 [--fast [--graphs]] [--mode hf|bridge|cache_resid|cache_all|decode]
                                    [--sync-trace] [--cprofile N] [--rows 25] [--cuda-rows 12]

``--mode hf`` times ``model(ids, use_cache=False, logits_to_keep=1)``; ``bridge`` the TransformerBridge
forward (seed, or with ``enable_fast_kernels`` when ``--fast``); ``cache_resid`` the bridge's ``run_with_cache``
of every ``hook_resid_post``; ``cache_all`` its ``run_with_cache`` of every hook (``--graphs``: prefill graphs on, forwards only); ``decode`` one greedy decode
step with a dynamic cache after a prompt of ``--seq``
tokens. Prints the wall time per call, the GPU time of one call
(profiler), the number of device-to-host syncs, the top ops by self CPU and self CUDA time; ``--sync-trace``
adds where each distinct sync comes from (``torch.cuda.set_sync_debug_mode``) and ``--cprofile N`` the N
Python functions with the most cumulative host time. Every fallback line the fast path logs is printed too.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import logging
import pstats
import time
import traceback
import warnings
from collections import Counter
from typing import Any, Callable

import torch


def _sync_sites(fn: Callable[[], Any]) -> Counter:
    """Distinct call sites (project / transformers frames) of the syncs ``fn()`` makes."""
    sites: Counter = Counter()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            orig = warnings.showwarning

            def record(message, category, filename, lineno, file=None, line=None):
                stack = [f for f in traceback.extract_stack()[:-1]
                         if ("gemma4_fast" in f.filename or "transformers" in f.filename
                             or "kernels/" in f.filename or "bridge_integration" in f.filename)]
                sites["  <-  ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno} {f.name}"
                                     for f in stack[-3:]) or "(outside the project)"] += 1

            warnings.showwarning = record
            try:
                fn()
                for w in caught:
                    record(w.message, w.category, w.filename, w.lineno)
            finally:
                warnings.showwarning = orig
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return sites


def _build_call(args, model, tok, s: int) -> Callable[[], Any]:
    ids = torch.randint(4, 260, (1, s), device="cuda")
    ids[0, 0] = 2
    if args.mode == "hf":
        return lambda: model(ids, use_cache=False, logits_to_keep=1)
    if args.mode == "decode":
        from transformers import DynamicCache

        holder = {}

        def prefill():
            cache = DynamicCache(config=model.config)
            out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
            holder.update(cache=cache, nxt=out.logits[:, -1:].argmax(-1), pos=s)

        def step():
            if "cache" not in holder or holder["pos"] >= s + 64:
                prefill()
            out = model(holder["nxt"], past_key_values=holder["cache"], use_cache=True)
            holder["nxt"] = out.logits[:, -1:].argmax(-1)
            holder["pos"] += 1
        prefill()
        return step
    bridge = _bridge(args, model, tok)
    if args.mode == "cache_resid":
        return lambda: bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_resid_post"))
    if args.mode == "cache_all":
        return lambda: bridge.run_with_cache(ids)
    return lambda: bridge(ids, return_type="logits")


_BRIDGE: dict[str, Any] = {}


def _bridge(args, model, tok):
    if "b" not in _BRIDGE:
        import gemma4_fast
        from transformer_lens.model_bridge import TransformerBridge

        bridge = TransformerBridge.boot_transformers(f"google/gemma-4-{args.preset}", hf_model=model, tokenizer=tok)
        if args.fast:
            gemma4_fast.enable_fast_kernels(bridge, True)
            if args.graphs:
                gemma4_fast.enable_prefill_graphs(bridge)
        _BRIDGE["b"] = bridge
    return _BRIDGE["b"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="E2B")
    ap.add_argument("--seq", type=int, nargs="+", default=[1024])
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--fast", action="store_true")
    ap.add_argument("--mode", choices=("hf", "bridge", "cache_resid", "cache_all", "decode"), default="hf")
    ap.add_argument("--graphs", action="store_true")
    ap.add_argument("--trace", default=None, help="write the chrome trace of two profiled calls to TRACE-<preset>-<mode>-<S>.json "
                    "(tables then sum both; bench/trace_summary.py reads the second)")
    ap.add_argument("--sync-trace", action="store_true")
    ap.add_argument("--cprofile", type=int, default=0)
    ap.add_argument("--cprofile-sort", default="tottime", help="pstats sort key of the --cprofile table (cumtime, ...)")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--cuda-rows", type=int, default=12)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="LOG %(name)s: %(message)s")
    import gemma4_fast
    from gemma4_fast.models import build_model, offline_tokenizer

    on_bridge = args.mode in ("bridge", "cache_resid", "cache_all")
    attn = "eager" if on_bridge else args.attn
    model = build_model(args.preset, torch.bfloat16, "cuda", attn_implementation=attn,
                        experts_implementation="grouped_mm", num_hidden_layers=args.layers)
    tok = offline_tokenizer() if on_bridge else None
    if args.fast and not on_bridge:
        print(gemma4_fast.patch_model(model, backend="triton").counts())
        if args.graphs and args.mode == "hf":
            gemma4_fast.enable_prefill_graphs(model)
    for s in args.seq:
        call = _build_call(args, model, tok, s)
        with torch.no_grad():
            for _ in range(3):
                call()
            torch.cuda.synchronize()
            n = 10 if args.mode == "decode" else 5
            each = []
            for _ in range(n):
                t0 = time.perf_counter()
                call()
                torch.cuda.synchronize()
                each.append((time.perf_counter() - t0) * 1e3)
            wall = sorted(each)[n // 2]
            calls = 2 if args.trace else 1  # a traced run profiles a second call: the first pays the profiler's start
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                for _ in range(calls):
                    with torch.profiler.record_function("profiled_call"):
                        call()
                    torch.cuda.synchronize()
            if args.trace:
                prof.export_chrome_trace(f"{args.trace}-{args.preset}-{args.mode}-{s}.json")
            ka = prof.key_averages()
            gpu_ms = sum(e.self_device_time_total for e in ka) / 1e3 / calls
            syncs = sum(e.count for e in ka if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize")
                        or "DtoH" in e.key or e.key == "aten::_local_scalar_dense") // calls
            print(f"== {args.preset} mode={args.mode} S={s} fast={args.fast}: {wall:.2f} ms/call wall (median; calls "
                  f"{', '.join(f'{t:.1f}' for t in each)}), "
                  f"{gpu_ms:.2f} ms GPU (profiled call), host syncs {syncs}")
            print(ka.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
            print(ka.table(sort_by="self_cuda_time_total", row_limit=args.cuda_rows, max_name_column_width=60))
            if args.sync_trace:
                sites = _sync_sites(call)
                print(f"-- sync sites ({sum(sites.values())} syncs):")
                for site, count in sites.most_common(15):
                    print(f"  {count:4d}  {site}")
            if args.cprofile:
                pr = cProfile.Profile()
                pr.enable()
                call()
                torch.cuda.synchronize()
                pr.disable()
                buf = io.StringIO()
                pstats.Stats(pr, stream=buf).sort_stats(args.cprofile_sort).print_stats(args.cprofile)
                print(f"-- cProfile ({args.cprofile_sort}):\n" + "\n".join(buf.getvalue().splitlines()[:args.cprofile + 12]))


if __name__ == "__main__":
    main()
