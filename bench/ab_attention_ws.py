"""A/B of the warp-specialized head_dim-256 Hopper kernel (``kernels/attention/hopper_ws.py``) against the
lockstep Hopper kernel (``attention_hopper_rows_fwd_kernel``), the portable Triton kernel and SDPA, with a
correctness check against a float64 reference first; ``--hd512``: the warp-specialized head_dim-512 kernel (a score
warpgroup, two output warpgroups) against ``attention_hopper_fwd_kernel``.

    python bench/ab_attention_ws.py [--check-only] [--hd512]

Correctness: odd lengths, windows (1, 64, 512), chunked prefill (Sq < Sk), GQA 1-8, batch 2 with HF's transposed
layout, K is V, one-row queries, the LSE, every config into NaN-filled outputs; the three-way rule against the bf16
PyTorch reference (fast error <= 2 x torch bf16 error + 2**-7 max |ref|). Timing: CUDA-graph replays in one process,
interleaved over three rounds, TFLOP/s over visible pairs. Writes ``attention_ws_ab.json`` (``$GEMMA4_FAST_RESULTS``
or ``bench/results/<gpu>/``).
"""
from __future__ import annotations

import statistics
import sys

import torch

from ab_attention_hopper import _inputs, portable_cfg
from common import graph_ms_rounds, print_table, write_results

CHECKS = [  # B, Hq, Hkv, Sq, Sk, window, hf_layout, k_is_v
    (1, 8, 1, 1000, 1000, None, True, False), (1, 8, 1, 1000, 1000, 512, True, False),
    (2, 8, 4, 333, 333, None, True, False), (1, 4, 4, 96, 1111, 64, False, True),
    (1, 2, 1, 7, 7, None, False, False), (1, 2, 1, 1, 517, None, False, False),
    (1, 4, 2, 129, 129, 1, False, False), (1, 4, 1, 300, 1300, None, True, False),
    (1, 16, 8, 4096, 4096, None, True, False)]
TIMES = [(16, 8, 4096, None), (16, 8, 8192, None), (16, 8, 16384, None), (8, 1, 8192, 512), (16, 8, 16384, 1024)]


def check(head_dim=256):
    """fp64 checks of every config of the warp-specialized kernel at ``head_dim`` (256: ``CHECKS``, 512:
    ``CHECKS512``), into NaN-filled outputs; returns ``(rows, all passed)``."""
    from gemma4_fast.kernels.attention import hopper_ws as W
    from gemma4_fast.kernels.attention.naive import attention_naive

    cases, cfgs, launch = ((CHECKS, W.ws_configs(), W.attention_hopper_ws_fwd) if head_dim == 256 else
                           (CHECKS512, W.ws512_configs(), W.attention_hopper_ws512_fwd))
    rows, ok = [], True
    for B, Hq, Hkv, Sq, Sk, win, hf, kv in cases:
        q32, k32, v32 = _inputs(head_dim, B, Hq, Hkv, Sq, Sk, hf, kv)
        q, k = q32.to(torch.bfloat16), k32.to(torch.bfloat16)
        v = k if kv else v32.to(torch.bfloat16)
        scale = head_dim ** -0.5
        ref, ref_lse = attention_naive(q.double(), k.double(), v.double(), scale=scale, window=win, return_lse=True)
        tb = attention_naive(q, k, v, scale=scale, window=win)
        e_t = (tb.double() - ref).abs().max().item()
        atol = 2 ** -7 * ref.abs().max().item()
        for i, cfg in enumerate(cfgs):
            o = torch.full((B, Sq, Hq, head_dim), float("nan"), device="cuda", dtype=torch.bfloat16).permute(0, 2, 1, 3)
            lse = torch.full((B, Hq, Sq), float("nan"), device="cuda")
            launch(q, k, v, o, lse, scale=scale, window=win, config=cfg)
            torch.cuda.synchronize()
            e = (o.double() - ref).abs().max().item()
            lse_err = (lse.double() - ref_lse).abs().max().item()
            passed = e <= 2 * e_t + atol and lse_err < 1e-3 and not torch.isnan(o).any().item()
            ok &= passed
            rows.append({"case": f"hd{head_dim} B{B} H{Hq}/{Hkv} Sq{Sq} Sk{Sk} w{win} hf{int(hf)} kv{int(kv)}",
                         "cfg": i, "err_ws": e, "err_torch_bf16": e_t, "lse_err": lse_err, "pass": passed})
    print_table(rows, ["case", "cfg", "err_ws", "err_torch_bf16", "lse_err", "pass"])
    return rows, ok


def timing():
    from gemma4_fast.kernels.attention import fwd, hopper
    from gemma4_fast.kernels.attention import hopper_ws as W

    rows = []
    for Hq, Hkv, S, win in TIMES:
        q, k, v = (t.to(torch.bfloat16) for t in _inputs(256, 1, Hq, Hkv, S, S, True, False))
        cfg = portable_cfg(256, win, S, q)
        outs = {}

        def out(name):
            outs[name] = torch.full((1, S, Hq, 256), float("nan"), device="cuda", dtype=q.dtype).permute(0, 2, 1, 3)
            return outs[name]
        runs = {"portable": (lambda o: lambda: fwd.attention_fwd(q, k, v, o, None, None, scale=1.0, window=win,
                                                                 softcap=None, causal=True, config=cfg))(out("portable")),
                "rows": (lambda o: lambda: hopper.attention_hopper_fwd(q, k, v, o, None, scale=1.0, window=win,
                                                                       config={"BLOCK_N": 64}))(out("rows"))}
        for i, wcfg in enumerate(W.ws_configs()):
            runs[f"ws{i}"] = (lambda o, c: lambda: W.attention_hopper_ws_fwd(q, k, v, o, None, scale=1.0, window=win,
                                                                             config=c))(out(f"ws{i}"), wcfg)
        if win is None:
            runs["sdpa"] = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                    enable_gqa=True)
        times = graph_ms_rounds(runs)
        pairs = S * win - win * (win - 1) // 2 if win else S * (S + 1) // 2
        flops = 4.0 * pairs * 256 * Hq
        ts = statistics.median(times["sdpa"]) if "sdpa" in times else None
        for name in runs:
            t = statistics.median(times[name])
            rows.append({"case": f"hd256 H{Hq}/{Hkv} S={S}" + (f" w{win}" if win else " causal"), "kernel": name,
                         "ms": round(t, 4), "TFLOPs": round(flops / t / 1e9, 1), "vs_sdpa": ts and round(ts / t, 3),
                         "max_abs_diff_vs_portable": None if name in ("portable", "sdpa") else
                         (outs[name].float() - outs["portable"].float()).abs().max().item()})
    print_table(rows, ["case", "kernel", "ms", "TFLOPs", "vs_sdpa", "max_abs_diff_vs_portable"])
    return rows


CHECKS512 = [  # B, Hq, Hkv, Sq, Sk, window, hf_layout, k_is_v
    (1, 8, 1, 1000, 1000, None, True, False), (1, 4, 2, 63, 63, None, False, False),
    (1, 2, 1, 7, 7, None, False, True), (2, 4, 2, 300, 300, None, True, False),
    (1, 4, 1, 100, 1000, None, False, False), (1, 2, 1, 1, 517, None, False, False),
    (1, 4, 1, 700, 700, 129, True, False), (1, 4, 2, 200, 200, 1, False, False),
    (1, 16, 2, 4096, 4096, None, True, False)]
TIMES512 = [(16, 2, S) for S in (4096, 8192, 16384, 32768)] + [(8, 1, 8192)]


def timing512():
    from gemma4_fast.kernels.attention import hopper
    from gemma4_fast.kernels.attention import hopper_ws as W

    rows = []
    for Hq, Hkv, S in TIMES512:
        q, k, v = (t.to(torch.bfloat16) for t in _inputs(512, 1, Hq, Hkv, S, S, True, False))
        outs = {}

        def out(name):
            outs[name] = torch.full((1, S, Hq, 512), float("nan"), device="cuda", dtype=q.dtype).permute(0, 2, 1, 3)
            return outs[name]
        runs = {"hopper": (lambda o: lambda: hopper.attention_hopper_fwd(q, k, v, o, None, scale=1.0, window=None,
                                                                         config={"BLOCK_N": 32}))(out("hopper"))}
        for i, wcfg in enumerate(W.ws512_configs()):
            runs[f"ws{i}"] = (lambda o, c: lambda: W.attention_hopper_ws512_fwd(q, k, v, o, None, scale=1.0,
                                                                                window=None, config=c))(out(f"ws{i}"), wcfg)
        times = graph_ms_rounds(runs)
        flops = 4.0 * S * (S + 1) // 2 * 512 * Hq
        for name in runs:
            t = statistics.median(times[name])
            rows.append({"case": f"hd512 H{Hq}/{Hkv} S={S} causal", "kernel": name, "ms": round(t, 4),
                         "TFLOPs": round(flops / t / 1e9, 1),
                         "max_abs_diff_vs_hopper": (outs[name].float() - outs["hopper"].float()).abs().max().item()})
    print_table(rows, ["case", "kernel", "ms", "TFLOPs", "max_abs_diff_vs_hopper"])
    return rows


def main():
    if "--hd512" in sys.argv:
        checks, ok = check(512)
        rows = [] if "--check-only" in sys.argv or not ok else timing512()
        path = write_results("attention_ws512_ab", checks + rows)
        print(f"wrote {path}; checks {'passed' if ok else 'FAILED'}")
        return
    checks, ok = check()
    rows = [] if "--check-only" in sys.argv or not ok else timing()
    path = write_results("attention_ws_ab", checks + rows)
    print(f"wrote {path}; checks {'passed' if ok else 'FAILED'}")


if __name__ == "__main__":
    main()
