"""A/B of the ``"prologue"`` patch kind on the E2B HF forward (last logits) with prefill graphs, in one process:
three same-seed random-weight bf16 models (patched with the prologue kind on, off, and unpatched on SDPA), warmed up
(graphs captured), then timed in interleaved rounds.

    python bench/ab_prologue.py [--seq 8192] [--rounds 5]

Prints and writes ``prologue_ab.json`` (``$GEMMA4_FAST_RESULTS`` or ``bench/results/<gpu>/``): the median wall time
of each variant (CUDA-synchronised calls), SDPA's, the ratios, and the largest logit difference between variants.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from common import print_table, write_results


def _wall_ms(fn, reps: int = 5) -> float:
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    import gemma4_fast
    from gemma4_fast.models import build_model

    models = {name: build_model("E2B", torch.bfloat16, "cuda", attn_implementation="sdpa")
              for name in ("sdpa", "prologue_on", "prologue_off")}  # same seed: same weights
    for name, on in (("prologue_on", True), ("prologue_off", False)):
        gemma4_fast.patch_model(models[name], backend="triton", prologue=on)
        gemma4_fast.enable_prefill_graphs(models[name])
    ids = torch.randint(4, 260, (1, args.seq), device="cuda")
    ids[0, 0] = 2
    calls = {name: (lambda m: lambda: m(ids, use_cache=False, logits_to_keep=1).logits)(m) for name, m in models.items()}
    times = {name: [] for name in models}
    logits = {}
    with torch.no_grad():
        for name, fn in calls.items():
            for _ in range(3):
                logits[name] = fn().float()
        for _ in range(args.rounds):
            for name, fn in calls.items():
                times[name].append(_wall_ms(fn, 3))
    row = {"S": args.seq, **{f"{k}_ms": round(statistics.median(v), 3) for k, v in times.items()}}
    row["x_sdpa_on"] = round(row["sdpa_ms"] / row["prologue_on_ms"], 3)
    row["x_sdpa_off"] = round(row["sdpa_ms"] / row["prologue_off_ms"], 3)
    row["on_vs_off"] = round(row["prologue_off_ms"] / row["prologue_on_ms"], 4)
    row["max_abs_logit_diff"] = (logits["prologue_on"] - logits["prologue_off"]).abs().max().item()
    row["rounds"] = {k: [round(x, 3) for x in v] for k, v in times.items()}
    path = write_results("prologue_ab", [row])
    print(f"wrote {path}")
    print_table([row], ["S", "sdpa_ms", "prologue_on_ms", "prologue_off_ms", "x_sdpa_on", "x_sdpa_off", "on_vs_off",
                        "max_abs_logit_diff"])


if __name__ == "__main__":
    main()
