"""Attention benchmarks on the GPU: Triton kernels vs SDPA, FLOPs over visible pairs only.

Script mode (run from the repository root on the GPU machine)::

    python bench/bench_attention.py --compile-only   # launch every kernel variant once (fills the Triton cache)
    python bench/bench_attention.py --sweep          # time the candidate configs, write the tuned table
    python bench/bench_attention.py --final          # final table + write_results("attention", rows)

``--sweep`` writes ``<out>/<gpu-slug>.json`` in the ``kernels/attention/configs/`` format (copy it
there to ship it) and ``<out>/attention_sweep.json``; ``<out>`` is $GEMMA4_FAST_RESULTS or
``bench/results/<gpu-slug>``. pytest-benchmark suite: ``pytest bench/bench_attention.py`` (skipped
without CUDA).

Metrics: prefill TFLOP/s = 4 * visible_pairs * D * Hq * B / t (SDPA is timed in the same run as the
ratio base); decode GB/s = bytes of the visible K/V rows read (plus q, o) / t, timed as CUDA-graph
replays over rotated input sets larger than L2; pattern emission GB/s = bytes of the written
``[B, Hq, Sq, Sk]`` tensor / t.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (ceilings, cuda_time_ms, gpu_slug, needs_cuda_benchmark, print_table,  # noqa: E402
                    write_results)

L2_BYTES = 50 * 2**20


def visible_pairs(sq: int, sk: int, window, causal: bool = True) -> int:
    """Number of (query, key) pairs the mask lets through (no padding)."""
    if not causal:
        return sq * sk
    total = 0
    for i in range(sq):
        p = sk - sq + i
        total += p + 1 if window is None else min(p + 1, window)
    return total


def make_qkv(B, Hq, Hkv, Sq, Sk, D, dtype=torch.bfloat16, seed=0):
    """q/k/v as HF hands them: ``.transpose(1, 2)`` views of ``[B, S, H, D]`` buffers; random, never zeros."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(B, Sq, Hq, D, device="cuda", dtype=dtype, generator=g).transpose(1, 2)
    k = torch.randn(B, Sk, Hkv, D, device="cuda", dtype=dtype, generator=g).transpose(1, 2)
    v = torch.randn(B, Sk, Hkv, D, device="cuda", dtype=dtype, generator=g).transpose(1, 2)
    return q, k, v


def _api():
    from gemma4_fast.kernels.attention import api, configs, fwd, pattern
    return api, configs, fwd, pattern


def launch_fn(kind, q, k, v, window, cfg, causal=True):
    """``(closure, output)``: one launch of a kernel family with an explicit config (no selection policy)."""
    api, _, F, P = _api()
    B, Hq, Sq, D = q.shape
    scale = 1.0
    if kind == "fwd" and cfg.get("HOPPER"):
        from gemma4_fast.kernels.attention import hopper as H
        o = torch.empty(B, Sq, Hq, D, device="cuda", dtype=q.dtype).permute(0, 2, 1, 3)
        why = H.hopper_unsupported(q, k, v, o, window, None, causal, None)
        if why is not None:
            raise ValueError(f"the Hopper kernel does not take this case: it {why}")
        return (lambda: H.attention_hopper_fwd(q, k, v, o, None, scale=scale, window=window, config=cfg)), o
    if kind == "fwd":
        o = torch.empty(B, Sq, Hq, D, device="cuda", dtype=q.dtype).permute(0, 2, 1, 3)
        return (lambda: F.attention_fwd(q, k, v, o, None, None, scale=scale, window=window, softcap=None,
                                        causal=causal, config=cfg)), o
    if kind == "split":
        o = torch.empty(B, Sq, Hq, D, device="cuda", dtype=q.dtype).permute(0, 2, 1, 3)
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        return (lambda: F.attention_split_fwd(q, k, v, o, None, None, scale=scale, window=window, softcap=None,
                                              causal=causal, config=cfg, sm_count=sms,
                                              new_empty=api._new_empty)), o
    out = torch.empty(B, Hq, Sq, k.shape[2], device="cuda", dtype=q.dtype)
    lse = _api()[0].attention_lse(q, k, scale=scale, window=window, causal=causal)
    return (lambda: P.attention_scores_fwd(q, k, out, lse, None, scale=scale, window=window, softcap=None,
                                           causal=causal, config=cfg)), out


# (kind, name, B, Hq, Hkv, Sq, Sk, D, window, length-bucketed table entry)
SWEEP_CASES = [
    ("fwd", "hd512 causal", 1, 16, 2, 8192, 8192, 512, None, False),
    ("fwd", "hd512 causal 4k", 1, 16, 2, 4096, 4096, 512, None, True),
    ("fwd", "hd256 window1024", 1, 16, 8, 16384, 16384, 256, 1024, False),
    ("fwd", "hd256 window1024 4k", 1, 16, 8, 4096, 4096, 256, 1024, True),
    ("fwd", "hd256 causal", 1, 16, 8, 8192, 8192, 256, None, False),
    ("fwd", "hd256 causal 4k", 1, 16, 8, 4096, 4096, 256, None, True),
    ("fwd", "hd128 causal", 1, 16, 8, 8192, 8192, 128, None, False),
    ("split", "decode hd512", 1, 16, 2, 1, 32768, 512, None, False),
    ("split", "decode hd512 8k", 1, 16, 2, 1, 8192, 512, None, True),
    ("split", "decode hd512 2k", 1, 16, 2, 1, 2048, 512, None, True),
    ("split", "decode hd512 H8/1", 1, 8, 1, 1, 32768, 512, None, False),
    ("split", "decode hd256 w1024", 1, 16, 8, 1, 32768, 256, 1024, False),
    ("split", "decode hd256 w512 H8/1", 1, 8, 1, 1, 32768, 256, 512, False),
    ("split", "decode hd256", 1, 16, 8, 1, 32768, 256, None, False),
    ("scores", "pattern hd256 w1024", 1, 16, 8, 4096, 4096, 256, 1024, False),
    ("scores", "pattern hd512", 1, 16, 2, 4096, 4096, 512, None, False),
]


def _mode(window):
    return "causal" if window is None else "window"


def _rel(a, b) -> float:
    a, b = a.double(), b.double()
    fin = torch.isfinite(b)
    return ((a[fin] - b[fin]).norm() / b[fin].norm().clamp_min(1e-30)).item()


def sweep(compile_only: bool, out_dir: Path, only: str | None = None) -> list[dict]:
    """Time every candidate config per case; a candidate whose output differs from the first (tested)
    config's by more than 2e-2 relative is rejected. Decode is timed as graph replays over rotated sets. Cases that
    share a table entry (e.g. E2B's and 26B-A4B's sliding decode shapes) get the config with the smallest geometric
    mean of its time over each case's best time, among the configs that ran in all of them.

    ``only``: sweep just the cases whose name contains it; the written table is then the shipped table with
    those cases' entries replaced."""
    _, C, _, _ = _api()
    cap = C.capability_of(torch.device("cuda"))
    rows, table, timings = [], {}, {}
    if only:
        shipped = C.CONFIG_DIR / f"{gpu_slug()}.json"
        if shipped.is_file():
            table = dict(json.loads(shipped.read_text()).get("configs", {}))
    for kind, name, B, Hq, Hkv, Sq, Sk, D, window, bucketed in SWEEP_CASES:
        if only and only not in name:
            continue
        if compile_only:
            Sq, Sk = min(Sq, 256), min(Sk, 1024)
        n_sets = 1
        if kind == "split":
            kv_bytes = 2 * B * Hkv * min(Sk, window or Sk) * D * 2
            n_sets = max(1, min(16, -(-3 * L2_BYTES // kv_bytes)))
        sets = [make_qkv(B, Hq, Hkv, Sq, Sk, D, seed=i) for i in range(n_sets)]
        ref = None
        times = {}
        for cfg in C.GENERATORS[kind](D, 2, cap):
            row = {"case": name, "kind": kind, "cfg": json.dumps(cfg, separators=(",", ":"))}
            try:
                launches = [launch_fn(kind, q, k, v, window, cfg) for q, k, v in sets]
                fn, out = launches[0]
                out.fill_(float("nan"))
                fn()
                torch.cuda.synchronize()
                if compile_only:
                    continue
                if ref is None:
                    ref = out.clone()
                err = _rel(out, ref)
                row["rel_vs_default"] = round(err, 5)
                if not err <= 2e-2:
                    row["error"] = "output differs from the default config"
                    rows.append(row)
                    continue
                if kind == "split":
                    t = _graph_ms([f for f, _ in launches])
                else:
                    t = cuda_time_ms(fn, warmup=2, rep=10)["ms"]
            except Exception as exc:  # a config that fails to compile or launch is reported, not fatal
                row["error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
                rows.append(row)
                continue
            row["ms"] = round(t, 4)
            if kind == "fwd":
                row["TFLOPs"] = round(4 * visible_pairs(Sq, Sk, window) * D * Hq * B / (t * 1e-3) / 1e12, 1)
            elif kind == "split":
                keys = min(Sk, window or Sk)
                row["GBps"] = round(2 * B * Hkv * keys * D * 2 / (t * 1e-3) / 1e9, 1)
            else:
                row["GBps"] = round(B * Hq * Sq * Sk * 2 / (t * 1e-3) / 1e9, 1)
            rows.append(row)
            times[row["cfg"]] = t
        if times:
            timings.setdefault(C.table_key(kind, D, torch.bfloat16, _mode(window), Sk if bucketed else None),
                               []).append(times)
        del sets, ref
        torch.cuda.empty_cache()
    for key, per_case in timings.items():
        common = [c for c in per_case[0] if all(c in times for times in per_case)]
        if not common:
            continue
        score = {c: math.prod(times[c] / min(times.values()) for times in per_case) for c in common}
        best = json.loads(min(common, key=score.get))
        for dt_name in ("bf16", "fp16"):
            table[key.replace("/bf16/", f"/{dt_name}/")] = best
    for key in list(table):
        parts = key.split("/")
        if len(parts) == 4:
            for mode in ("causal", "window", "full"):
                table.setdefault("/".join(parts[:3] + [mode]), table[key])
    if compile_only:
        warm_public()
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        doc = {"what": "attention kernel configs tuned by bench/bench_attention.py --sweep", "gpu": gpu_slug(),
               "configs": table}
        (out_dir / f"{gpu_slug()}.json").write_text(json.dumps(doc, indent=1))
        (out_dir / "attention_sweep.json").write_text(json.dumps(rows, indent=1))
        print_table(rows, ["case", "cfg", "ms", "TFLOPs", "GBps", "rel_vs_default", "error"])
    return rows


def warm_public() -> None:
    """Launch every public-op variant the final table uses once, on small inputs (same specialisation)."""
    from gemma4_fast.kernels.attention import attention, attention_pattern, attention_scores
    for D, Hq, Hkv, W in [(512, 16, 2, None), (256, 16, 8, 1024), (256, 16, 8, None), (256, 8, 1, 512),
                          (512, 8, 1, None)]:
        for sq in (256, 1):
            q, k, v = make_qkv(1, Hq, Hkv, sq, 1024, D)
            attention(q, k, v, scale=1.0, window=W)
            if sq > 1:
                _, lse = attention(q, k, v, scale=1.0, window=W, return_lse=True)
                attention_pattern(q, k, scale=1.0, window=W, lse=lse)
                attention_pattern(q, k, scale=1.0, window=W)
                attention_scores(q, k, scale=1.0, window=W)
    torch.cuda.synchronize()


def _sdpa(q, k, v, window):
    import torch.nn.functional as Fn
    S = q.shape[2]
    if window is None:
        return lambda: Fn.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0, enable_gqa=True)
    i = torch.arange(S, device="cuda")
    d = i[:, None] - i[None, :]
    mask = (d >= 0) & (d < window)
    return lambda: Fn.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0, enable_gqa=True)


def _time_ms(fn, slow=False):
    fn()
    torch.cuda.synchronize()
    return cuda_time_ms(fn, warmup=1 if slow else 3, rep=3 if slow else 15)["ms"]


def _graph_ms(fns) -> float:
    """Median ms of one call, from CUDA-graph replays of all ``fns`` back to back (rotated inputs)."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    return cuda_time_ms(g.replay, warmup=3, rep=20)["ms"] / len(fns)


def decode_rows(ceil: dict, batch: int = 1) -> list[dict]:
    """Public-op decode (Sq = 1) timed as CUDA-graph replays over rotated inputs; GB/s of K/V (+ q, o) read.
    ``batch``: sequences per step, each with its own ``Sk`` keys (the tables' cases are batch 1)."""
    from gemma4_fast.kernels.attention import attention
    rows = []
    for D, Hq, Hkv, Sk, W in [(512, 16, 2, n, None) for n in (2048, 8192, 32768, 131072)] + \
                             [(256, 16, 8, 32768, 1024), (256, 8, 1, 32768, 512), (512, 8, 1, 32768, None)]:
        keys = min(Sk, W or Sk)
        kv_bytes = 2 * batch * Hkv * keys * D * 2
        n_sets = max(1, min(16, -(-3 * L2_BYTES // kv_bytes)))
        sets = [make_qkv(batch, Hq, Hkv, 1, Sk, D, seed=i) for i in range(n_sets)]
        fns = [(lambda q=q, k=k, v=v: attention(q, k, v, scale=1.0, window=W)) for q, k, v in sets]
        t = _graph_ms(fns)
        gbps = (kv_bytes + 2 * batch * Hq * D * 2) / (t * 1e-3) / 1e9
        case = f"decode hd{D} {'full' if W is None else f'w{W}'} Sk={Sk} H{Hq}/{Hkv}"
        rows.append({"case": case + (f" B{batch}" if batch > 1 else ""), "op": "decode", "B": batch, "head_dim": D,
                     "Sk": Sk, "window": W, "Hq": Hq, "Hkv": Hkv, "ms": round(t, 4),
                     "GBps": round(gbps, 1), "pct_copy_bw": round(100 * gbps / (ceil["copy_TBps"] * 1e3), 1),
                     "sets": n_sets})
        print(rows[-1], flush=True)
        del sets, fns
        torch.cuda.empty_cache()
    return rows


def final(out_dir: Path, with_sdpa: bool = True, graphs: bool = True, prefill_only: bool = False) -> list[dict]:
    """The public ops against SDPA. Prefill rows: ``ms`` per call (events around one call after a sync: the
    wrapper's host time counts), ``graph_ms`` from CUDA-graph replays (GPU time, as inside a captured or
    host-ahead forward); causal head_dim-256 rows time SDPA both ways (``speedup`` / ``speedup_graph``).
    ``prefill_only`` stops after the prefill rows and writes ``attention_prefill.json``."""
    from gemma4_fast.kernels.attention import attention, attention_pattern, attention_scores
    rows = []
    ceil = ceilings()
    print("ceilings", ceil, flush=True)
    prefill = [(512, 16, 2, S, None) for S in (4096, 8192, 16384, 32768)]
    prefill += [(256, 16, 8, S, 1024) for S in (4096, 16384)] + [(256, 16, 8, S, None) for S in (4096, 16384)]
    prefill += [(256, 8, 1, 16384, 512), (512, 8, 1, 16384, None)]
    for D, Hq, Hkv, S, W in prefill:
        q, k, v = make_qkv(1, Hq, Hkv, S, S, D)
        flops = 4 * visible_pairs(S, S, W) * D * Hq
        row = {"case": f"prefill hd{D} {'causal' if W is None else f'w{W}'} S={S} H{Hq}/{Hkv}", "op": "prefill",
               "head_dim": D, "S": S, "window": W, "Hq": Hq, "Hkv": Hkv}
        t = _time_ms(lambda: attention(q, k, v, scale=1.0, window=W))
        row.update(ms=round(t, 4), TFLOPs=round(flops / (t * 1e-3) / 1e12, 1))
        if graphs:
            tg = _graph_ms([lambda: attention(q, k, v, scale=1.0, window=W)])
            row.update(graph_ms=round(tg, 4), graph_TFLOPs=round(flops / (tg * 1e-3) / 1e12, 1))
        slow_sdpa = D == 512 and S > 16384
        if with_sdpa and not slow_sdpa:
            try:
                ts = _time_ms(_sdpa(q, k, v, W), slow=D == 512 or W is not None)
                row.update(sdpa_ms=round(ts, 4), sdpa_TFLOPs=round(flops / (ts * 1e-3) / 1e12, 1),
                           speedup=round(ts / t, 2))
                if graphs and D == 256 and W is None:
                    tsg = _graph_ms([_sdpa(q, k, v, W)])
                    row.update(sdpa_graph_ms=round(tsg, 4), speedup_graph=round(tsg / tg, 2))
            except Exception as exc:
                row["sdpa_error"] = f"{type(exc).__name__}"
        rows.append(row)
        print(row, flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    for D, Hq, Hkv, S, W in [(512, 16, 2, 8192, None), (256, 16, 8, 16384, 1024)]:
        q, k, v = make_qkv(1, Hq, Hkv, S, S, D, seed=7)
        t = _time_ms(lambda: attention(q, k, v, scale=1.0, window=W))
        rows.append({"case": f"prefill hd{D} {'causal' if W is None else f'w{W}'} S={S} H{Hq}/{Hkv} (repeat)",
                     "op": "prefill (repeat)", "head_dim": D, "S": S, "window": W, "Hq": Hq, "Hkv": Hkv,
                     "ms": round(t, 4), "TFLOPs": round(4 * visible_pairs(S, S, W) * D * Hq / (t * 1e-3) / 1e12, 1)})
        print(rows[-1], flush=True)
        del q, k, v
    if prefill_only:
        print("wrote", write_results("attention_prefill", rows, out_dir=out_dir, extra={"ceilings": ceil}))
        print_table(rows, ["case", "ms", "TFLOPs", "graph_ms", "graph_TFLOPs", "sdpa_TFLOPs", "speedup",
                           "speedup_graph"])
        return rows
    rows += decode_rows(ceil)
    for D, Hq, Hkv, S, W in [(256, 16, 8, 4096, 1024), (512, 16, 2, 4096, None)]:
        q, k, v = make_qkv(1, Hq, Hkv, S, S, D)
        out_bytes = Hq * S * S * 2
        _, lse = attention(q, k, v, scale=1.0, window=W, return_lse=True)
        for label, fn in [("pattern(lse given)", lambda: attention_pattern(q, k, scale=1.0, window=W, lse=lse)),
                          ("pattern(lse pass)", lambda: attention_pattern(q, k, scale=1.0, window=W)),
                          ("scores", lambda: attention_scores(q, k, scale=1.0, window=W))]:
            t = _time_ms(fn)
            rows.append({"case": f"{label} hd{D} {'causal' if W is None else f'w{W}'} S={S} H{Hq}/{Hkv}",
                         "op": label, "head_dim": D, "Sk": S, "window": W, "Hq": Hq, "Hkv": Hkv, "ms": round(t, 4),
                         "GBps": round(out_bytes / (t * 1e-3) / 1e9, 1),
                         "pct_copy_bw": round(100 * out_bytes / (t * 1e-3) / 1e9 / (ceil["copy_TBps"] * 1e3), 1)})
            print(rows[-1], flush=True)
        del q, k, v, lse
        torch.cuda.empty_cache()
    path = write_results("attention", rows, out_dir=out_dir, extra={"ceilings": ceil})
    print("wrote", path)
    print_table(rows, ["case", "ms", "TFLOPs", "graph_TFLOPs", "sdpa_TFLOPs", "speedup", "speedup_graph", "GBps",
                       "pct_copy_bw"])
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--final", action="store_true")
    ap.add_argument("--no-sdpa", action="store_true")
    ap.add_argument("--prefill-only", action="store_true", help="with --final: the prefill rows only")
    ap.add_argument("--only", default=None, help="sweep only the cases whose name contains this (e.g. decode); "
                    "with --final, 'decode' runs only the decode rows (attention_decode.json)")
    ap.add_argument("--decode-batch", type=int, default=1, help="with --final --only decode: sequences per step "
                    "(rows written to attention_decode_b<N>.json when N > 1)")
    args = ap.parse_args(argv)
    if args.final and args.only not in (None, "decode"):
        ap.error("with --final, --only takes only 'decode'")
    out_dir = Path(os.environ.get("GEMMA4_FAST_RESULTS") or Path(__file__).resolve().parent / "results" / gpu_slug())
    if args.compile_only:
        sweep(True, out_dir)
    if args.sweep:
        sweep(False, out_dir, args.only)
    if args.final and args.only == "decode":
        ceil = ceilings()
        rows = decode_rows(ceil, args.decode_batch)
        name = "attention_decode" + (f"_b{args.decode_batch}" if args.decode_batch > 1 else "")
        print("wrote", write_results(name, rows, out_dir=out_dir, extra={"ceilings": ceil}))
        print_table(rows, ["case", "ms", "GBps", "pct_copy_bw", "sets"])
    elif args.final or not (args.compile_only or args.sweep):
        final(out_dir, with_sdpa=not args.no_sdpa, prefill_only=args.prefill_only)


# ------------------------------------------------------------------ pytest-benchmark suite

needs_cuda = needs_cuda_benchmark()

if needs_cuda is not None:
    import pytest

    @needs_cuda
    @pytest.mark.parametrize("D,Hq,Hkv,S,W", [(512, 16, 2, 4096, None), (256, 16, 8, 16384, 1024),
                                              (256, 16, 8, 4096, None)])
    def test_bench_prefill(benchmark, D, Hq, Hkv, S, W):
        from gemma4_fast.kernels.attention import attention
        q, k, v = make_qkv(1, Hq, Hkv, S, S, D)
        fn = lambda: attention(q, k, v, scale=1.0, window=W)  # noqa: E731
        fn()
        benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=10, warmup_rounds=2)

    @needs_cuda
    @pytest.mark.parametrize("Sk", [8192, 131072])
    def test_bench_decode(benchmark, Sk):
        from gemma4_fast.kernels.attention import attention
        q, k, v = make_qkv(1, 16, 2, 1, Sk, 512)
        fn = lambda: attention(q, k, v, scale=1.0)  # noqa: E731
        fn()
        benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=20, warmup_rounds=3)


if __name__ == "__main__":
    main()
