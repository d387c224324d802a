"""Profile one model forward on the GPU: where host and device time go, and any host syncs.

    python bench/profile_forward.py --preset E2B --seq 1024 [--fast] [--rows 25]

Prints the top ops by self CPU time and by self CUDA time, the number of device-to-host syncs, the
wall time per forward, and every fallback line the fast path logs.
"""
from __future__ import annotations

import argparse
import logging
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="E2B")
    ap.add_argument("--seq", type=int, nargs="+", default=[1024])
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--fast", action="store_true")
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="LOG %(name)s: %(message)s")
    import gemma4_fast
    from gemma4_fast.models import build_model

    model = build_model(args.preset, torch.bfloat16, "cuda", attn_implementation=args.attn,
                        experts_implementation="grouped_mm", num_hidden_layers=args.layers)
    if args.fast:
        print(gemma4_fast.patch_model(model, backend="triton").counts())
    for s in args.seq:
        ids = torch.randint(4, 260, (1, s), device="cuda")
        with torch.no_grad():
            for _ in range(3):
                model(ids, use_cache=False, logits_to_keep=1)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(5):
                model(ids, use_cache=False, logits_to_keep=1)
            torch.cuda.synchronize()
            wall = (time.perf_counter() - t0) / 5 * 1e3
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                model(ids, use_cache=False, logits_to_keep=1)
                torch.cuda.synchronize()
        ka = prof.key_averages()
        syncs = sum(e.count for e in ka if e.key in ("cudaStreamSynchronize", "cudaDeviceSynchronize")
                    or "DtoH" in e.key or e.key == "aten::item" or e.key == "aten::_local_scalar_dense")
        print(f"== {args.preset} S={s} fast={args.fast}: {wall:.2f} ms/forward, host syncs/items {syncs}")
        print(ka.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
        print(ka.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))


if __name__ == "__main__":
    main()
