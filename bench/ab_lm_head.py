"""A/B of the LM head with the final softcap: cuBLAS GEMM then the one-pass softcap in place (with a bias: what a
TransformerBridge ran before, its LM head carrying a zero bias; without: HF's LM head), against the Hopper kernel
that applies the softcap in the GEMM's epilogue (``kernels/softcap/lm_head_hopper.py``, no bias).

    python bench/ab_lm_head.py [--shapes E2B-8k E2B-4k ...] [--rounds 5] [--reps 10] [--configs JSON]

``--configs`` replaces the kernel's candidate configs (``linear_softcap_configs()``) with a JSON list of configs.

For each shape (rows M, vocabulary N, hidden K) it first checks every variant against a float64 reference of
``cap * tanh((x @ w^T + b) / cap)`` with the three-way rule (HF's LM head and three bf16 softcap ops are the
low-precision baseline; first 256 rows), then times CUDA-graph replays of each variant in interleaved rounds (random
bf16 inputs, never zeros; sustained GEMMs heat the GPU, so variants alternate). Prints and writes ``lm_head_ab.json``
(``$GEMMA4_FAST_RESULTS`` or ``bench/results/<gpu>/``): median ms, TFLOP/s (2·M·N·K) and the speed-up over the
unfused path without bias.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

from common import graph_ms_rounds, print_table, write_results

SHAPES = {"E2B-8k": (8192, 262144, 1536), "E2B-4k": (4096, 262144, 1536), "E2B-1k": (1024, 262144, 1536),
          "E2B-512": (512, 262144, 1536), "26B-4k": (4096, 262144, 2816), "E2B-odd": (1000, 262040, 1536)}
CAP = 30.0


def three_way_excess(fast, ref64, lowp, atol):
    """Elementwise three-way rule: ``(bad, err, bound)``, ``bound = 2 |lowp - ref64| + atol * max(1, max |ref64|)``."""
    err = (fast.double() - ref64).abs()
    bound = 2 * (lowp.double() - ref64).abs() + atol * ref64.abs().max().clamp_min(1.0)
    return err > bound, err, bound


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--configs", default=None, help="JSON list of kernel configs to time instead of the shipped ones")
    args = ap.parse_args()
    from gemma4_fast.kernels.softcap import logit_softcap
    from gemma4_fast.kernels.softcap.lm_head_hopper import linear_softcap_configs, linear_softcap_fwd

    rows, checks = [], []
    for shape in args.shapes:
        m, n, k = SHAPES[shape]
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
        w = (torch.randn(n, k, device="cuda", generator=g) * k ** -0.5 * 4).to(torch.bfloat16)
        b = (torch.randn(n, device="cuda", generator=g) * 2).to(torch.bfloat16)
        out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)

        def unfused(bias):
            y = torch.nn.functional.linear(x, w, bias)
            return logit_softcap(y, CAP, out=y)

        variants = {"cublas+softcap": lambda: unfused(None), "cublas+softcap+bias": lambda: unfused(b)}
        configs = json.loads(args.configs) if args.configs else linear_softcap_configs()
        for i, cfg in enumerate(configs):
            name = f"fused_c{i}_{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['STAGES']}" + \
                ("_ws" if cfg.get("WS") else "") + (f"_g{cfg['GROUP_M']}" if cfg.get("GROUP_M") else "")
            variants[name] = (lambda c: lambda: linear_softcap_fwd(x, w, out, CAP, c) or out)(cfg)
        r = slice(0, min(m, 256))
        for tag, bias in (("", None), ("+bias", b)):
            raw = x[r].double() @ w.double().t() + (0 if bias is None else bias.double())
            ref = CAP * torch.tanh(raw / CAP)
            low = torch.nn.functional.linear(x[r], w, bias)
            low = torch.tanh(low / CAP) * CAP
            for name, fn in variants.items():
                if name.endswith("+bias") != (bias is not None):
                    continue
                out.fill_(float("nan"))
                y = fn()
                bad, err, _ = three_way_excess(y[r], ref, low, atol=2e-3)
                checks.append({"shape": shape, "variant": name, "max_err": round(err.max().item(), 5),
                               "hf_max_err": round((low.double() - ref).abs().max().item(), 5),
                               "ok": not bool(bad.any()), "nan": bool(torch.isnan(y).any().item())})
            del raw, ref, low
        times = graph_ms_rounds(variants, args.rounds, args.reps)
        for name, ts in times.items():
            ms = statistics.median(ts)
            base = statistics.median(times["cublas+softcap"])
            rows.append({"shape": shape, "M": m, "N": n, "K": k, "variant": name, "ms": round(ms, 4),
                         "ms_rounds": [round(t, 4) for t in ts], "tflops": round(2 * m * n * k / ms / 1e9, 1),
                         "x_unfused": round(base / ms, 3)})
        del x, w, b, out
        torch.cuda.empty_cache()
    path = write_results("lm_head_ab", rows + checks)
    print(f"wrote {path}")
    print_table(checks, ["shape", "variant", "max_err", "hf_max_err", "ok", "nan"])
    print_table(rows, ["shape", "variant", "ms", "tflops", "x_unfused"])


if __name__ == "__main__":
    main()
