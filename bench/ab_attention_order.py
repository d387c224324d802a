"""A/B of the prefill launch order (``HEADS_INNER`` 1: every head's heaviest query block first; 0: one head after
another), both orders timed as CUDA-graph replays in the same process, interleaved over several rounds.

    python bench/ab_attention_order.py

Prints and writes ``attention_order_ab.json`` (``$GEMMA4_FAST_RESULTS`` or ``bench/results/<gpu>/``): per case the
median graph time of each order, its TFLOP/s over visible pairs, and their ratio. Each order's output is checked
against the other (max abs difference).
"""
from __future__ import annotations

import statistics

import torch

from common import graph_ms, print_table, write_results


CASES = [(512, 16, 2, S, None) for S in (4096, 8192, 16384)] + [(256, 16, 8, S, None) for S in (4096, 16384)] + \
    [(512, 8, 1, S, None) for S in (4096, 8192)] + [(256, 8, 1, 8192, 512)]


def main():
    from gemma4_fast.kernels.attention import api, configs, fwd

    rows = []
    for D, Hq, Hkv, S, W in CASES:
        g = torch.Generator(device="cuda").manual_seed(0)
        q = torch.randn(1, Hq, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
        k = torch.randn(1, Hkv, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(1, Hkv, S, D, device="cuda", dtype=torch.bfloat16, generator=g)
        cfg = configs.select_config("fwd", D, q.dtype, api._mode(W, True), S, q.device)
        outs, times = {}, {0: [], 1: []}
        for order in (0, 1):
            outs[order] = torch.full_like(q, float("nan"))
        for _ in range(3):
            for order in (1, 0):
                c = dict(cfg, HEADS_INNER=order)
                times[order].append(graph_ms(lambda: fwd.attention_fwd(q, k, v, outs[order], None, None, scale=1.0,
                                                                          window=W, softcap=None, causal=True,
                                                                          config=c)))
        pairs = S * W - W * (W - 1) // 2 if W else S * (S + 1) // 2
        flops = 4.0 * pairs * D * Hq
        t0, t1 = statistics.median(times[0]), statistics.median(times[1])
        rows.append({"case": f"hd{D} H{Hq}/{Hkv} S={S}" + (f" w{W}" if W else " causal"), "config": cfg,
                     "blocks_inner_ms": round(t0, 4), "heads_inner_ms": round(t1, 4),
                     "blocks_inner_TFLOPs": round(flops / t0 / 1e9, 1), "heads_inner_TFLOPs": round(flops / t1 / 1e9, 1),
                     "heads_inner_speedup": round(t0 / t1, 3),
                     "max_abs_diff": (outs[0].float() - outs[1].float()).abs().max().item()})
    path = write_results("attention_order_ab", rows)
    print(f"wrote {path}")
    print_table(rows, ["case", "blocks_inner_ms", "heads_inner_ms", "blocks_inner_TFLOPs", "heads_inner_TFLOPs",
                       "heads_inner_speedup", "max_abs_diff"])


if __name__ == "__main__":
    main()
