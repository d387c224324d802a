"""A/B of the few-row linear (``kernels/gemv``) against ``torch.nn.functional.linear`` (cuBLAS) on Gemma 4's
projection shapes, one row (a decode step, a KV-shared layer cut to the last position), bf16.

    python bench/ab_gemv.py [--rows 1] [--sweep] [--reps 50] [--shapes q_proj down_wide ...]

Each case checks the kernel against float64 (three-way rule against cuBLAS's bf16 result), then times CUDA-graph
replays of each variant with the weights rotated beyond L2 (several copies, one per replay, so every call streams
from HBM as in a forward). ``--sweep`` also times every candidate config (``gemv_configs``) and reports the best.
Prints and writes ``gemv_ab.json`` (``$GEMMA4_FAST_RESULTS`` or ``bench/results/<gpu>/``): µs per call and GB/s of
weight read.
"""
from __future__ import annotations

import argparse

import torch

from common import print_table, write_results

#: (name, N, K): E2B's q / o projections, the double-wide MLP of its KV-shared layers, the per-layer-input gate /
#: projection, and E4B's MLP.
SHAPES = [("q_proj", 2048, 1536), ("o_proj", 1536, 2048), ("gate_up_wide", 12288, 1536),
          ("down_wide", 1536, 12288), ("ple_gate", 256, 1536), ("ple_proj", 1536, 256), ("e4b_gate_up", 10240, 2560),
          ("e4b_down", 2560, 10240)]


def _graph_us(fn, sets: int, reps: int) -> float:
    for i in range(sets):
        fn(i)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(sets):
            fn(i)
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        g.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) * 1e3 / (reps * sets)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--shapes", nargs="+", default=[name for name, _, _ in SHAPES])
    args = ap.parse_args()
    from gemma4_fast.kernels.gemv.gemv import default_config, gemv_configs, gemv_fwd

    rows = []
    for name, n, k in [s for s in SHAPES if s[0] in args.shapes]:
        sets = max(2, (200 << 20) // (n * k * 2))
        ws = [(torch.randn(n, k, device="cuda") * k ** -0.5).to(torch.bfloat16) for _ in range(sets)]
        x = torch.randn(args.rows, k, device="cuda").to(torch.bfloat16)
        y = torch.empty(args.rows, n, device="cuda", dtype=torch.bfloat16)
        ref = torch.nn.functional.linear(x.double(), ws[0].double())
        low = torch.nn.functional.linear(x, ws[0])
        y.fill_(float("nan"))
        gemv_fwd(x, ws[0], None, y, default_config(n, k))
        err = (y.double() - ref).abs()
        ok = bool((err <= 2 * (low.double() - ref).abs() + 1e-3 * ref.abs().max().clamp_min(1)).all())
        variants = {"cublas": None, "gemv_default": default_config(n, k)}
        if args.sweep:
            variants.update({f"c{i}": c for i, c in enumerate(gemv_configs())})
        res = {}
        for vname, cfg in variants.items():
            if cfg is None:
                fn = (lambda i: torch.nn.functional.linear(x, ws[i], out=None))
            else:
                fn = (lambda c: lambda i: gemv_fwd(x, ws[i], None, y, c))(cfg)
            res[vname] = _graph_us(fn, sets, args.reps)
        best = min((v for v in res if v.startswith("c")), key=res.get, default="gemv_default")
        gb = n * k * 2 / 1e3
        row = {"shape": name, "N": n, "K": k, "M": args.rows, "ok": ok, "max_err": round(err.max().item(), 5),
               "cublas_us": round(res["cublas"], 2), "gemv_us": round(res["gemv_default"], 2),
               "cublas_GBps": round(gb / res["cublas"], 1), "gemv_GBps": round(gb / res["gemv_default"], 1),
               "x_cublas": round(res["cublas"] / res["gemv_default"], 3), "default_cfg": variants["gemv_default"]}
        if args.sweep:
            row.update({"best_us": round(res[best], 2), "best_GBps": round(gb / res[best], 1),
                        "best_cfg": variants[best]})
        rows.append(row)
        del ws
        torch.cuda.empty_cache()
    path = write_results("gemv_ab", rows)
    print(f"wrote {path}")
    cols = ["shape", "M", "ok", "cublas_us", "gemv_us", "cublas_GBps", "gemv_GBps", "x_cublas"]
    print_table(rows, cols + (["best_us", "best_GBps", "best_cfg"] if args.sweep else []))


if __name__ == "__main__":
    main()
