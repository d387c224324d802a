"""How fast can one kernel read the bytes of a decode step at all: a streaming-read floor for the decode rows of
``bench_attention.py --final --only decode``.

    python bench/probe_read_floor.py [--keys 2048 8192 32768 131072] [--heads 2] [--head-dim 512] [--pdl]

For each key count it times, as CUDA-graph replays over rotated buffers (at least three L2s of data, as the decode
rows do), a Triton kernel that only reads ``2 * heads * keys * head_dim`` bf16 elements (K and V of one decode
step; one partial sum per program, many programs, several block sizes, the best kept) and ``torch.sum`` of the same
bytes. The percentage is the decode rows' metric: bytes read / time / the run's copy bandwidth (read + write bytes of
a 1 GiB copy, ``common.ceilings``). ``--pdl`` adds the same kernels launched as programmatic dependent launches
(sm_90): every program lets the next launch start at once and waits for the previous grid before its first load,
which is what a decode kernel that reads what the kernel before it wrote may do at most; the back-to-back launches
of one graph then overlap their launch and ramp-up with the previous kernel's tail. Prints a table and writes
``read_floor.json``.
"""
from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from common import ceilings, graph_ms, l2_bytes, print_table, write_results


@triton.jit
def read_only_fwd_kernel(X, OUT, n, BLOCK: tl.constexpr, ITERS: tl.constexpr, USE_PDL: tl.constexpr = False):
    """Program ``p`` sums ``ITERS`` blocks of ``BLOCK`` elements starting at ``p * ITERS * BLOCK`` into ``OUT[p]``.
    ``USE_PDL``: let the next grid launch now, wait for the previous one before the first load."""
    if USE_PDL:
        gdc_launch_dependents()
        gdc_wait()
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    base = pid.to(tl.int64) * ITERS * BLOCK
    for i in tl.static_range(ITERS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(X + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(OUT + pid, tl.sum(acc, 0))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, nargs="+", default=[2048, 8192, 32768, 131072])
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=512)
    ap.add_argument("--pdl", action="store_true", help="also time the kernels as programmatic dependent launches")
    args = ap.parse_args()
    ceil = ceilings()
    rows = []
    for keys in args.keys:
        n = 2 * args.heads * keys * args.head_dim
        nbytes = 2 * n
        sets = [torch.randn(n, device="cuda", dtype=torch.bfloat16) for _ in range(max(1, min(16, -(-3 * l2_bytes()
                                                                                               // nbytes))))]
        timed = []
        for pdl in (False, True) if args.pdl else (False,):
            best = None
            for block, iters, warps in ((4096, 1, 4), (4096, 4, 8), (8192, 2, 8), (2048, 8, 4), (8192, 8, 8),
                                        (2048, 1, 4), (16384, 1, 8), (8192, 4, 8)):
                out = torch.empty(triton.cdiv(n, block * iters), device="cuda", dtype=torch.float32)
                fns = [(lambda x=x: read_only_fwd_kernel[(triton.cdiv(n, block * iters),)](
                    x, out, n, BLOCK=block, ITERS=iters, USE_PDL=pdl, num_warps=warps, launch_pdl=pdl)) for x in sets]
                t = graph_ms(lambda: [f() for f in fns]) / len(fns)
                if best is None or t < best[0]:
                    best = (t, f"BLOCK {block} x {iters}, {warps} warps")
            timed.append((("triton read, PDL " if pdl else "triton read ") + best[1], best[0]))
        timed.append(("torch.sum", graph_ms(lambda: [x.sum(dtype=torch.float32) for x in sets]) / len(sets)))
        for name, t in timed:
            gbps = nbytes / (t * 1e-3) / 1e9
            rows.append({"keys": keys, "bytes": nbytes, "kernel": name, "us": round(t * 1e3, 2), "GBps": round(gbps, 1),
                         "pct_copy_bw": round(100 * gbps / (ceil["copy_TBps"] * 1e3), 1), "sets": len(sets)})
        del sets
        torch.cuda.empty_cache()
    print("wrote", write_results("read_floor", rows, extra={"ceilings": ceil}))
    print_table(rows, ["keys", "bytes", "kernel", "us", "GBps", "pct_copy_bw", "sets"])


if __name__ == "__main__":
    main()
