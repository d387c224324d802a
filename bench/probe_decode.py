"""Decode (Sq = 1) kernels side by side: the split kernel (query rows as the MMA rows) against the keys-as-rows
kernel (``KEYS_AS_ROWS``), several configs each, at the decode rows of ``bench_attention.py --final --only decode``.

    python bench/probe_decode.py [--keys 2048 8192 32768 131072] [--rounds 2] [--profile] [--decompose]

Every candidate is launched through ``fwd.attention_split_fwd`` (split or decode kernel + combine kernel), checked
against an fp32 reference of the same inputs (``rel`` = ||out - ref|| / ||ref||; bf16 rounding alone gives ~3e-3) and
timed as CUDA-graph replays over rotated input sets (at least three L2s of K / V), rounds interleaved. The percentage
is the decode rows' metric: K / V (+ q, o) bytes / time / the run's copy bandwidth. A plan's ``PDL`` (1 / 0) turns
the programmatic dependent launch of the combine on / off. ``--profile`` adds per-kernel GPU times (torch.profiler;
with PDL the combine's time includes its wait for the split grid) of the fastest candidate of each family. Writes
``decode_probe.json``.
"""
from __future__ import annotations

import argparse
import json

import torch

from common import ceilings, graph_ms, l2_bytes, print_table, write_results

FAMILIES = {
    "split": [dict(BLOCK_N=16, num_warps=4, num_stages=3), dict(BLOCK_N=32, num_warps=8, num_stages=3)],
    "keys_as_rows": [dict(BLOCK_N=32, num_warps=4, num_stages=3, KEYS_AS_ROWS=1),
                     dict(BLOCK_N=32, num_warps=8, num_stages=3, KEYS_AS_ROWS=1),
                     dict(BLOCK_N=64, num_warps=4, num_stages=1, KEYS_AS_ROWS=1)],
}
PLANS = [dict(MIN_BLOCKS=mb, MAX_SPLITS=ms, COMBINE_D=cd, COMBINE_S=cs, PDL=pdl) for mb in (2, 4, 8) for ms in (64, 128)
         for cd in (32, 64, 128) for cs in (64, 128) for pdl in (0, 1) if cd * cs <= 8192]


def _cases(keys):
    out = [(512, 16, 2, n, None, False) for n in keys]
    out += [(512, 8, 1, 32768, None, False), (256, 8, 1, 32768, 512, False), (512, 16, 2, 8192, None, True),
            (512, 16, 2, 32768, None, True)]
    return out


class _Skip:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` launches nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def decompose(keys) -> None:
    """Graph-replay time of the shipped decode step, of its split kernel alone and of its combine kernel alone (the
    other replaced by a no-op launch; the combine then reads stale partials), hd512 16q/2kv; ``decode_split.json``."""
    from gemma4_fast.kernels.attention import api, decode, fwd
    rows = []
    ceil = ceilings()
    for Sk in keys:
        kv_bytes = 2 * 2 * Sk * 512 * 2
        n_sets = max(1, min(16, -(-3 * l2_bytes() // kv_bytes)))
        sets = [tuple(torch.randn(1, h, s, 512, device="cuda", dtype=torch.bfloat16) for h, s in ((16, 1), (2, Sk),
                                                                                                  (2, Sk)))
                for _ in range(n_sets)]

        def step():
            for q, k, v in sets:
                api.attention(q, k, v, scale=1.0)
        row = {"Sk": Sk, "sets": n_sets}
        saved = (fwd.attention_split_fwd_kernel, decode.attention_decode_fwd_kernel, fwd.attention_combine_kernel)
        for name, patch in (("step", {}), ("split_only", {"attention_combine_kernel": _Skip()}),
                            ("combine_only", {"attention_split_fwd_kernel": _Skip(),
                                              "attention_decode_fwd_kernel": _Skip()})):
            for attr, val in patch.items():
                setattr(decode if attr == "attention_decode_fwd_kernel" else fwd, attr, val)
            try:
                row[name + "_us"] = round(min(graph_ms(step, reps=20) for _ in range(3)) / n_sets * 1e3, 2)
            finally:
                fwd.attention_split_fwd_kernel, decode.attention_decode_fwd_kernel, fwd.attention_combine_kernel = saved
        row["pct_copy_bw"] = round(100 * kv_bytes / (row["step_us"] * 1e-6) / (ceil["copy_TBps"] * 1e12), 1)
        rows.append(row)
        print(row, flush=True)
        del sets
        torch.cuda.empty_cache()
    print("wrote", write_results("decode_split", rows, extra={"ceilings": ceil}))
    print_table(rows, ["Sk", "step_us", "split_only_us", "combine_only_us", "pct_copy_bw", "sets"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, nargs="+", default=[2048, 8192, 32768, 131072])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--decompose", action="store_true",
                    help="only the shipped config: the whole step, the split kernel alone and the combine alone")
    args = ap.parse_args()
    if args.decompose:
        decompose(args.keys)
        return
    from gemma4_fast.kernels.attention import configs as C
    from gemma4_fast.kernels.attention import fwd
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    ceil = ceilings()
    rows = []
    for D, Hq, Hkv, Sk, W, same in _cases(args.keys):
        keys = min(Sk, W or Sk)
        kv_bytes = (1 if same else 2) * Hkv * keys * D * 2
        n_sets = max(1, min(16, -(-3 * l2_bytes() // kv_bytes)))
        gen = torch.Generator(device="cuda").manual_seed(0)
        sets = []
        for _ in range(n_sets):
            q = torch.randn(1, Hq, 1, D, device="cuda", dtype=torch.bfloat16, generator=gen)
            k = torch.randn(1, Hkv, Sk, D, device="cuda", dtype=torch.bfloat16, generator=gen)
            v = k if same else torch.randn(1, Hkv, Sk, D, device="cuda", dtype=torch.bfloat16, generator=gen)
            sets.append((q, k, v, torch.empty_like(q)))
        q, k, v, _ = sets[0]
        from gemma4_fast.kernels.attention.naive import attention_naive
        ref = attention_naive(q.float(), k.float(), v.float(), scale=1.0, window=W)
        shipped = C.select_config("split", D, torch.bfloat16, "causal" if W is None else "window", Sk,
                                  torch.device("cuda"))
        cands = [("shipped", dict(shipped))]
        for fam, cfgs in FAMILIES.items():
            for cfg in cfgs:
                for plan in PLANS:
                    cands.append((fam, {**cfg, **plan}))
        case = f"hd{D} {'full' if W is None else f'w{W}'} Sk={Sk} H{Hq}/{Hkv}{' K=V' if same else ''}"
        timed = []
        for fam, cfg in cands:
            def launch(cfg=cfg):
                for qq, kk, vv, oo in sets:
                    fwd.attention_split_fwd(qq, kk, vv, oo, None, None, scale=1.0, window=W, softcap=None,
                                            causal=True, config=cfg, sm_count=sm,
                                            new_empty=lambda s, d, dev: torch.empty(s, dtype=d, device=dev))
            row = {"case": case, "family": fam, "cfg": json.dumps(cfg, separators=(",", ":"))}
            try:
                sets[0][3].fill_(float("nan"))
                launch()
                torch.cuda.synchronize()
                out = sets[0][3].float()
                row["rel"] = round(((out - ref).norm() / ref.norm()).item(), 5)
                if not row["rel"] <= 1e-2:
                    row["error"] = "wrong output"
                    rows.append(row)
                    continue
            except Exception as exc:  # a config that fails to compile or launch is reported, not fatal
                row["error"] = f"{type(exc).__name__}: {str(exc)[:100]}"
                rows.append(row)
                continue
            timed.append((row, launch))
        for _ in range(args.rounds):
            for row, launch in timed:
                row.setdefault("us_rounds", []).append(round(graph_ms(launch, reps=10) / n_sets * 1e3, 2))
        for row, launch in timed:
            row["us"] = min(row["us_rounds"])
            gbps = (kv_bytes + 2 * Hq * D * 2) / (row["us"] * 1e-6) / 1e9
            row["pct_copy_bw"] = round(100 * gbps / (ceil["copy_TBps"] * 1e3), 1)
            rows.append(row)
        if args.profile and timed:
            for fam in FAMILIES:
                best = min((r for r in timed if r[0]["family"] == fam), key=lambda r: r[0]["us"], default=None)
                if best is None:
                    continue
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        best[1]()
                    torch.cuda.synchronize()
                kern = {e.key: round(e.device_time_total / max(1, e.count), 2) for e in prof.key_averages()
                        if e.device_time_total > 0}
                best[0]["kernel_us"] = kern
                print(case, fam, kern, flush=True)
        del sets
        torch.cuda.empty_cache()
        best = {}
        for r in rows:
            if r["case"] == case and "us" in r:
                f = r["family"]
                if f not in best or r["us"] < best[f]["us"]:
                    best[f] = r
        for r in best.values():
            print(case, r["family"], r["cfg"], r["us"], r["pct_copy_bw"], flush=True)
        write_results("decode_probe", rows, extra={"ceilings": ceil})
    print("wrote", write_results("decode_probe", rows, extra={"ceilings": ceil}))
    print_table([r for r in rows if "us" in r], ["case", "family", "cfg", "us", "pct_copy_bw", "rel"])


if __name__ == "__main__":
    main()
