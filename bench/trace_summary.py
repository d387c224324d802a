"""Where the wall time of one profiled call goes that no kernel covers: read a chrome trace written by
``bench/profile_forward.py --trace`` (its last ``profiled_call`` annotation: the call after the profiler's
start-up) and print the host time before the first kernel, the idle gaps between
kernels (largest first, with the kernel that ended each), and the time from the last kernel to the end of the
last host op.

    python bench/trace_summary.py TRACE.json[.gz] [--gaps 12] [--min-gap-us 5]
"""
from __future__ import annotations

import argparse
import gzip
import json


def _load(path: str) -> list[dict]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    return [e for e in events if e.get("ph") == "X" and "dur" in e]


def summarize(path: str, n_gaps: int = 12, min_gap_us: float = 5.0) -> dict:
    events = _load(path)
    marks = [e["ts"] for e in events if e.get("cat") == "user_annotation" and e.get("name") == "profiled_call"]
    start = max(marks) if marks else min(e["ts"] for e in events)
    events = [e for e in events if e["ts"] >= start]
    gpu = sorted((e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    host = [e for e in events if e.get("cat") in ("cpu_op", "cuda_runtime", "cuda_driver", "user_annotation")]
    t0 = start
    host_end = max(e["ts"] + e["dur"] for e in host)
    busy, gaps, end, prev = 0.0, [], gpu[0]["ts"], None
    for e in gpu:
        if e["ts"] > end + min_gap_us:
            gaps.append((e["ts"] - end, (end - t0) / 1e3, prev["name"] if prev else "", e["name"]))
        busy += max(0.0, e["ts"] + e["dur"] - max(e["ts"], end))
        if e["ts"] + e["dur"] > end:
            end, prev = e["ts"] + e["dur"], e
    out = {"to_first_kernel_ms": (gpu[0]["ts"] - t0) / 1e3, "gpu_span_ms": (end - gpu[0]["ts"]) / 1e3,
           "gpu_busy_ms": busy / 1e3, "gaps_ms": sum(g[0] for g in gaps) / 1e3,
           "after_last_kernel_ms": max(0.0, host_end - end) / 1e3, "total_ms": (max(host_end, end) - t0) / 1e3}
    print(" ".join(f"{k}={v:.3f}" for k, v in out.items()))
    for dur, at, before, after in sorted(gaps, reverse=True)[:n_gaps]:
        print(f"  gap {dur / 1e3:.3f} ms at +{at:.2f} ms: after {before[:50]!r} before {after[:50]!r}")
    pre = sorted((e for e in host if e["ts"] < gpu[0]["ts"] and e.get("cat") == "cpu_op"), key=lambda e: -e["dur"])
    print("  longest host ops before the first kernel: " + ", ".join(
        f"{e['name']} {e['dur'] / 1e3:.2f}" for e in pre[:8]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--gaps", type=int, default=12)
    ap.add_argument("--min-gap-us", type=float, default=5.0)
    args = ap.parse_args()
    summarize(args.trace, args.gaps, args.min_gap_us)


if __name__ == "__main__":
    main()
