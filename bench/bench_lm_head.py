"""LM head with the final logit softcap: one GEMM then one in-place softcap pass, against the GEMM cut into row
chunks whose softcap runs on a side stream while the next chunk's GEMM runs (``gemma4_fast.logits.lm_head_softcap``).

    python bench/bench_lm_head.py [--chunks 1,2,4,8] [--shapes 8192x1536,4096x2816]

Shapes are ``rows x hidden`` with Gemma 4's vocabulary (262144), bf16, cap 30. Each row: median of CUDA-event timings
after warm-up; the GEMM alone and the softcap alone are timed too, so the overlap shows as how much of the softcap
time the chunked call hides. Correctness: the chunked logits against the sequential ones (max abs difference).
Writes ``lm_head.json`` under ``bench/results/<gpu>/`` (or ``$GEMMA4_FAST_RESULTS``).
"""
from __future__ import annotations

import argparse
import statistics

import torch

from common import ceilings, print_table, write_results

VOCAB = 262144
CAP = 30.0


def _time(fn, rep=15, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(rep):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return statistics.median(out)


def main(argv=None):
    from gemma4_fast import ops
    from gemma4_fast.logits import lm_head_softcap

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", default="1,2,4,8")
    ap.add_argument("--shapes", default="8192x1536,4096x2816")
    args = ap.parse_args(argv)
    ceil = ceilings()
    rows = []
    for shape in args.shapes.split(","):
        m, h = (int(v) for v in shape.split("x"))
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(1, m, h, device="cuda", dtype=torch.bfloat16, generator=g)
        w = torch.randn(VOCAB, h, device="cuda", dtype=torch.bfloat16, generator=g) * h ** -0.5 * 8
        out = torch.empty(1, m, VOCAB, device="cuda", dtype=torch.bfloat16)
        flops = 2.0 * m * h * VOCAB

        def gemm():
            torch.matmul(x, w.t(), out=out)

        def softcap():
            ops.logit_softcap(out, CAP, out=out, backend="triton")

        def sequential():
            gemm()
            softcap()

        t_gemm, t_cap, t_seq = _time(gemm), _time(softcap), _time(sequential)
        sequential()
        ref = out.clone()
        for n in (int(v) for v in args.chunks.split(",")):
            t = _time(lambda: lm_head_softcap(x, w, None, CAP, chunks=n, out=out))
            lm_head_softcap(x, w, None, CAP, chunks=n, out=out)
            torch.cuda.synchronize()
            err = (out.float() - ref.float()).abs().max().item()
            rows.append({"rows": m, "hidden": h, "vocab": VOCAB, "chunks": n, "ms": round(t, 4),
                         "gemm_ms": round(t_gemm, 4), "softcap_ms": round(t_cap, 4), "sequential_ms": round(t_seq, 4),
                         "saved_ms": round(t_seq - t, 4), "gemm_TFLOPs": round(flops / t_gemm / 1e9, 1),
                         "max_abs_diff_vs_sequential": err})
        del x, w, out, ref
        torch.cuda.empty_cache()
    path = write_results("lm_head", rows, extra={"ceilings": ceil, "cap": CAP, "dtype": "bfloat16"})
    print(f"wrote {path}")
    print_table(rows, ["rows", "hidden", "chunks", "ms", "sequential_ms", "saved_ms", "gemm_ms", "softcap_ms",
                       "gemm_TFLOPs", "max_abs_diff_vs_sequential"])


if __name__ == "__main__":
    main()
