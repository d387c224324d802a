"""Sweep of the fused query/key norm + RoPE pass (``kernels.rope.rms_norm_rope``) over its configs, at the E2B
shapes of a prefill, against a device copy of the same bytes.

    cd bench && python bench_rope.py [--seq 8192 4096] [--json PATH]

Cases (bf16, x a contiguous ``[1, S, H, D]`` projection output, cos/sin ``[1, S, D]``): the query of a sliding
layer (8 heads of 256), of a full layer (8 heads of 512), and the single key head of each. Every config of
``rope_configs(D)`` (plus the shipped ``default_config``) is timed as CUDA-graph replays (``common.graph_ms``) and
checked against the torch reference (``rms_norm_rope_naive``: max |diff| at most one bf16 ulp of the output). Reported
per case: the default's time, the best config and its time, and both as GB/s of the bytes read and written
(x, the output, the cos/sin tables) next to ``torch.clone`` of x (read + write of x).
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from common import git_commit, gpu_name, graph_ms, versions
from gemma4_fast.kernels.rope.naive import rms_norm_rope_naive
from gemma4_fast.kernels.rope.rope import default_config, rope_configs, rope_fwd

CASES = (("q sliding", 8, 256), ("q full", 8, 512), ("k sliding", 1, 256), ("k full", 1, 512))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, nargs="+", default=[8192, 4096])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for S in args.seq:
        for name, H, D in CASES:
            x = torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16)
            w = torch.rand(D, device="cuda", dtype=torch.bfloat16) + 0.5
            ang = torch.arange(S, device="cuda")[:, None] * torch.rand(D // 2, device="cuda")[None]
            cos = torch.cat([ang.cos(), ang.cos()], -1)[None].to(torch.bfloat16)
            sin = torch.cat([ang.sin(), ang.sin()], -1)[None].to(torch.bfloat16)
            ref = rms_norm_rope_naive(x.float(), w.float(), cos.float(), sin.float(), eps=1e-6)
            out = torch.empty_like(x)
            nbytes = 2 * x.numel() * 2 + 2 * cos.numel() * 2
            copy_ms = graph_ms(lambda: x.clone())
            default = default_config(D, S, H)
            configs = [default] + [c for c in rope_configs(D) if c != default]
            times = {}
            for cfg in configs:
                def run(cfg=cfg):
                    rope_fwd(x, None, cos, sin, out, None, cfg, norm_weight=w, eps=1e-6)
                out.fill_(float("nan"))
                run()
                err = (out.float() - ref).abs().max().item()
                tol = ref.abs().max().item() * 2.0 ** -7
                if not err <= tol:
                    raise AssertionError(f"{name} S={S} {cfg}: max |diff| {err} > {tol}")
                times[json.dumps(cfg, sort_keys=True)] = graph_ms(run)
            best = min(times, key=times.get)
            d_ms = times[json.dumps(default, sort_keys=True)]
            row = {"case": name, "S": S, "H": H, "D": D, "bytes": nbytes, "copy_ms": copy_ms,
                   "copy_gbs": 2 * x.numel() * 2 / copy_ms / 1e6, "default": default, "default_ms": d_ms,
                   "default_gbs": nbytes / d_ms / 1e6, "best": json.loads(best), "best_ms": times[best],
                   "best_gbs": nbytes / times[best] / 1e6, "all_ms": times}
            rows.append(row)
            print(f"{name:10s} S={S:5d}: default {d_ms * 1e3:7.1f} us ({row['default_gbs']:5.0f} GB/s)  best "
                  f"{times[best] * 1e3:7.1f} us ({row['best_gbs']:5.0f} GB/s) {best}  clone {copy_ms * 1e3:6.1f} us "
                  f"({row['copy_gbs']:5.0f} GB/s)", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": gpu_name(), "commit": git_commit(), "versions": versions(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    os.environ.pop("GEMMA4_FAST_ROPE_CONFIG", None)
    main()
