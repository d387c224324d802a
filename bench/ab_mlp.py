"""A/B of the Gemma 4 MLP's gate and up projections with the activation: cuBLAS ``gate = x Wg^T``, ``up = x Wu^T``
then the fused ``gelu_mul`` (what the fast MLP ran before), against the Hopper kernel that applies the activation in
the GEMMs' epilogue (``kernels/activation/mlp_hopper.py``), every config.

    python bench/ab_mlp.py [--shapes E2B-8k E2B-8k-wide ...] [--rounds 5] [--reps 10] [--configs JSON]

For each shape (rows M, intermediate N, hidden K) it first checks every variant against a float64 reference of
``gelu_tanh(x Wg^T) * (x Wu^T)`` with the three-way rule (HF's bf16 expression is the low-precision baseline; first
256 rows), then times CUDA-graph replays in interleaved rounds (random bf16 inputs, never zeros). Prints and writes
``mlp_ab.json`` (``$GEMMA4_FAST_RESULTS`` or ``bench/results/<gpu>/``): median ms, TFLOP/s (4·M·N·K: both GEMMs)
and the speed-up over the unfused path; ``cublas-gemms`` times the two GEMMs alone.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

from ab_lm_head import three_way_excess
from common import graph_ms, print_table, write_results

SHAPES = {"E2B-8k": (8192, 6144, 1536), "E2B-8k-wide": (8192, 12288, 1536), "E2B-4k": (4096, 6144, 1536),
          "E2B-4k-wide": (4096, 12288, 1536), "26B-4k": (4096, 2112, 2816), "E2B-512": (512, 6144, 1536),
          "E2B-odd": (1000, 6136, 1536)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--configs", default=None, help="JSON list of kernel configs to time instead of the shipped ones")
    args = ap.parse_args()
    from gemma4_fast.kernels.activation import gelu_mul, linear_gelu_mul_naive
    from gemma4_fast.kernels.activation.mlp_hopper import linear_gelu_mul_configs, linear_gelu_mul_fwd

    rows, checks = [], []
    for shape in args.shapes:
        m, n, k = SHAPES[shape]
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
        wg = (torch.randn(n, k, device="cuda", generator=g) * 2 * k ** -0.5).to(torch.bfloat16)
        wu = (torch.randn(n, k, device="cuda", generator=g) * 2 * k ** -0.5).to(torch.bfloat16)
        out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        lin = torch.nn.functional.linear
        variants = {"cublas+gelu_mul": lambda: gelu_mul(lin(x, wg), lin(x, wu)),
                    "cublas-gemms": lambda: (lin(x, wg), lin(x, wu))[0]}
        configs = json.loads(args.configs) if args.configs else linear_gelu_mul_configs()
        for i, cfg in enumerate(configs):
            name = f"fused_c{i}_{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['STAGES']}" + \
                ("_ws" if cfg.get("WS") else "") + ("_coop" if cfg.get("COOP") else "") + \
                (f"_g{cfg['GROUP_M']}" if cfg.get("GROUP_M") else "")
            variants[name] = (lambda c: lambda: linear_gelu_mul_fwd(x, wg, wu, out, c) or out)(cfg)
        r = slice(0, min(m, 256))
        ref = linear_gelu_mul_naive(x[r].double(), wg.double(), wu.double())
        low = linear_gelu_mul_naive(x[r], wg, wu)
        unfused = variants["cublas+gelu_mul"]()
        for name, fn in variants.items():
            if name == "cublas-gemms":
                continue
            out.fill_(float("nan"))
            y = fn()
            bad, err, _ = three_way_excess(y[r], ref, low, atol=2e-3)
            checks.append({"shape": shape, "variant": name, "max_err": round(err.max().item(), 5),
                           "hf_max_err": round((low.double() - ref).abs().max().item(), 5),
                           "ok": not bool(bad.any()), "nan": bool(torch.isnan(y).any().item()),
                           "max_diff_unfused": (y.float() - unfused.float()).abs().max().item(),
                           "equal_unfused": bool(torch.equal(y, unfused))})
        del unfused
        del ref, low
        times = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, fn in variants.items():
                times[name].append(graph_ms(fn, args.reps))
        base = statistics.median(times["cublas+gelu_mul"])
        for name, ts in times.items():
            ms = statistics.median(ts)
            rows.append({"shape": shape, "M": m, "N": n, "K": k, "variant": name, "ms": round(ms, 4),
                         "ms_rounds": [round(t, 4) for t in ts], "tflops": round(4 * m * n * k / ms / 1e9, 1),
                         "x_unfused": round(base / ms, 3)})
        del x, wg, wu, out
        torch.cuda.empty_cache()
    path = write_results("mlp_ab", rows + checks)
    print(f"wrote {path}")
    print_table(checks, ["shape", "variant", "max_err", "hf_max_err", "ok", "nan", "max_diff_unfused", "equal_unfused"])
    print_table(rows, ["shape", "variant", "ms", "tflops", "x_unfused"])


if __name__ == "__main__":
    main()
