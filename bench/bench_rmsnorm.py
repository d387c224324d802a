"""RMSNorm benchmark: fused Triton kernels vs HF ``Gemma4RMSNorm`` vs Liger-Kernel, bf16, on CUDA.

Memory-bound: bytes = read x (+ residual) + write y (+ extra outputs); the weight is ignored
(one row). Reported: median ms per call, effective TB/s over those bytes, the ratio to HF, and
the fraction of elements that differ from HF's output.

Two entry points:
  * ``pytest bench/bench_rmsnorm.py`` (pytest-benchmark; skipped without CUDA);
  * ``python bench/bench_rmsnorm.py`` prints a table and writes JSON via ``write_results("rmsnorm", rows)``
    (to $GEMMA4_FAST_RESULTS or bench/results/<gpu>/). ``--sweep`` also times every candidate
    config of ``rms_norm_configs`` and writes the winners as a ``configs/<gpu>.json`` table to
    ``--table-out``.

Timing: each timed region cycles through K rotating input sets (K chosen so the sets exceed
200 MB, beyond L2) for at least 12 calls, CUDA events, median of 15 regions, divided by the calls.
This includes the per-call CPU cost whenever it exceeds the kernel time (small shapes); ``graph_*``
columns replay one call per set from a CUDA graph (GPU time only).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ceilings, cuda_time_ms, gpu_name, gpu_slug, print_table, write_results  # noqa: E402

from gemma4_fast.kernels.rmsnorm import rms_norm, rms_norm_residual  # noqa: E402
from gemma4_fast.kernels.rmsnorm import rmsnorm as rn  # noqa: E402

D_MODEL_SHAPES = [(d, r) for d in (2816, 1536, 5376) for r in (8192, 32768, 131072)]
HEAD_SHAPES = [(d, r) for d in (256, 512) for r in (131072, 524288, 1048576)]
ROTATE_BYTES = 200 * 2**20
EPS = 1e-6


def hf_norm(width: int, weight: torch.Tensor | None):
    from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm
    mod = Gemma4RMSNorm(width, eps=EPS, with_scale=weight is not None).to(weight.device)
    if weight is not None:
        mod.weight.data = weight.clone()
    return mod


def liger_fn() -> Callable | str:
    """Liger's RMSNorm set to Gemma 4's semantics (offset 0, 'gemma' casting: all fp32), or why not."""
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    except Exception as exc:  # optional dependency
        return f"liger unavailable: {type(exc).__name__}: {exc}"
    return lambda x, w: LigerRMSNormFunction.apply(x, w, EPS, 0.0, "gemma", False)


def _sets(n_sets: int, make: Callable[[], Any]) -> list[Any]:
    return [make() for _ in range(n_sets)]


def _n_sets(bytes_per_call: int) -> int:
    return max(2, min(16, math.ceil(ROTATE_BYTES / max(bytes_per_call, 1))))


def time_rotating(fn: Callable[[Any], Any], sets: list[Any], rep: int = 15, min_calls: int = 12) -> dict[str, float]:
    """Median ms of one call, timing ``fn(s)`` cycling through ``sets``, at least ``min_calls``
    calls per region: the first call's launch latency (the GPU idles until it arrives) is spread
    over the region instead of being charged to one or two calls."""
    order = [sets[i % len(sets)] for i in range(max(len(sets), min_calls))]

    def run():
        for s in order:
            fn(s)
    t = cuda_time_ms(run, warmup=2, rep=rep)
    k = len(order)
    return {"ms": t["ms"] / k, "ms_min": t["ms_min"] / k, "ms_max": t["ms_max"] / k}


def time_graph(fn: Callable[[Any], Any], sets: list[Any], rep: int = 15) -> dict[str, float]:
    """Median ms of one call from CUDA-graph replays of one call per set: GPU time without the
    per-call CPU launch cost (which exceeds the kernel time of the smallest shapes)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for s in sets:
            fn(s)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for s in sets:
            fn(s)
    t = cuda_time_ms(graph.replay, warmup=2, rep=rep)
    del graph
    k = len(sets)
    return {"ms": t["ms"] / k, "ms_min": t["ms_min"] / k, "ms_max": t["ms_max"] / k}


def _graph_fields(fn: Callable[[Any], Any], sets: list[Any], nbytes: int) -> dict[str, Any]:
    try:
        t = time_graph(fn, sets)
    except Exception as exc:
        return {"graph_error": repr(exc)[:300]}
    return {"graph_ms": round(t["ms"], 5), "graph_TBps": round(nbytes / (t["ms"] * 1e-3) / 1e12, 3)}


def _row(kind: str, impl: str, D: int, rows: int, nbytes: int, t: dict[str, float], **extra) -> dict[str, Any]:
    return {"kind": kind, "impl": impl, "D": D, "rows": rows, "bytes": nbytes, "ms": round(t["ms"], 5),
            "ms_min": round(t["ms_min"], 5), "ms_max": round(t["ms_max"], 5),
            "TBps": round(nbytes / (t["ms"] * 1e-3) / 1e12, 3), **extra}


def bench_plain(D: int, rows: int, sweep: bool, dtype=torch.bfloat16) -> list[dict[str, Any]]:
    esz = torch.empty((), dtype=dtype).element_size()
    nbytes = 2 * rows * D * esz
    sets = _sets(_n_sets(nbytes), lambda: torch.randn(rows, D, device="cuda", dtype=dtype))
    w = (torch.randn(D, device="cuda") * 0.5 + 1.0).to(dtype)
    hf = hf_norm(D, w)
    out: list[dict[str, Any]] = []
    with torch.no_grad():
        ref = hf(sets[0])
        fast = rms_norm(sets[0], w)
        cfg = rn.pick_config(sets[0], D, rows)
        mism = (fast != ref).float().mean().item()
        t_hf = time_rotating(lambda x: hf(x), sets)
        out.append(_row("norm", "hf", D, rows, nbytes, t_hf, **_graph_fields(lambda x: hf(x), sets, nbytes)))
        t_fast = time_rotating(lambda x: rms_norm(x, w), sets)
        out.append(_row("norm", "fast", D, rows, nbytes, t_fast, x_hf=round(t_hf["ms"] / t_fast["ms"], 2),
                        mismatch_vs_hf=mism, config=json.dumps(cfg, sort_keys=True),
                        **_graph_fields(lambda x: rms_norm(x, w), sets, nbytes)))
        lig = liger_fn()
        if callable(lig):
            try:
                lmis = (lig(sets[0], w) != ref).float().mean().item()
                t = time_rotating(lambda x: lig(x, w), sets)
                out.append(_row("norm", "liger", D, rows, nbytes, t, x_hf=round(t_hf["ms"] / t["ms"], 2),
                                mismatch_vs_hf=lmis, **_graph_fields(lambda x: lig(x, w), sets, nbytes)))
            except Exception as exc:
                out.append({"kind": "norm", "impl": "liger", "D": D, "rows": rows, "error": repr(exc)[:300]})
        else:
            out.append({"kind": "norm", "impl": "liger", "D": D, "rows": rows, "error": lig})
        if sweep:
            y = torch.empty_like(sets[0])
            for c in rn.rms_norm_configs(D):
                t = time_rotating(lambda x, c=c: rn.rms_norm_fwd(x, w, EPS, y, None, None, c), sets)
                out.append(_row("sweep", "fast_cfg", D, rows, nbytes, t, config=json.dumps(c, sort_keys=True),
                                x_hf=round(t_hf["ms"] / t["ms"], 2)))
    del sets, ref, fast
    torch.cuda.empty_cache()
    return out


def bench_residual(D: int, rows: int, dtype=torch.bfloat16) -> list[dict[str, Any]]:
    esz = torch.empty((), dtype=dtype).element_size()
    nbytes = 4 * rows * D * esz
    sets = _sets(_n_sets(nbytes), lambda: (torch.randn(rows, D, device="cuda", dtype=dtype),
                                           torch.randn(rows, D, device="cuda", dtype=dtype)))
    w = (torch.randn(D, device="cuda") * 0.5 + 1.0).to(dtype)
    w2 = (torch.randn(D, device="cuda") * 0.5 + 1.0).to(dtype)
    post, pre = hf_norm(D, w), hf_norm(D, w2)

    def hf_path(s):
        o = s[1] + post(s[0])
        return o, pre(o)

    out: list[dict[str, Any]] = []
    with torch.no_grad():
        ro, rn_ = hf_path(sets[0])
        fo, fn_ = rms_norm_residual(sets[0][0], sets[0][1], w, next_weight=w2)
        mism = max((fo != ro).float().mean().item(), (fn_ != rn_).float().mean().item())
        t_hf = time_rotating(hf_path, sets)
        out.append(_row("residual+next", "hf", D, rows, nbytes, t_hf, **_graph_fields(hf_path, sets, nbytes)))
        fast = lambda s: rms_norm_residual(s[0], s[1], w, next_weight=w2)  # noqa: E731
        t = time_rotating(fast, sets)
        out.append(_row("residual+next", "fast", D, rows, nbytes, t, x_hf=round(t_hf["ms"] / t["ms"], 2),
                        mismatch_vs_hf=mism, config=json.dumps(rn.pick_config(sets[0][0], D, rows), sort_keys=True),
                        **_graph_fields(fast, sets, nbytes)))
    del sets
    torch.cuda.empty_cache()
    return out


def best_table(rows: list[dict[str, Any]], margin: float = 0.03) -> dict[str, dict[str, int]]:
    """Per (BLOCK_N, row bucket): the fastest swept config, kept when it beats the default by ``margin``."""
    table: dict[str, dict[str, int]] = {}
    for D, n in {(r["D"], r["rows"]) for r in rows if r.get("kind") == "sweep"}:
        sw = [r for r in rows if r.get("kind") == "sweep" and r["D"] == D and r["rows"] == n]
        default = json.dumps(rn.default_config(D, n), sort_keys=True)
        best = min(sw, key=lambda r: r["ms"])
        base = next((r for r in sw if r["config"] == default), None)
        if base is not None and best["ms"] < base["ms"] * (1 - margin):
            table[f"{rn.next_power_of_2(D)}:{rn.row_bucket(n)}"] = json.loads(best["config"])
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", action="store_true", help="also time every candidate config")
    ap.add_argument("--table-out", default="", help="write the swept winners as a configs/<gpu>.json table")
    ap.add_argument("--budget-s", type=float, default=float(os.environ.get("RMSNORM_BENCH_BUDGET_S", 150)))
    ap.add_argument("--quick", action="store_true", help="one row count per width")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to time")
        return 0
    t0 = time.time()
    ceil = ceilings()
    print("ceilings", ceil, flush=True)
    shapes = [(d, r, "norm") for d, r in D_MODEL_SHAPES + HEAD_SHAPES]
    shapes += [(d, r, "residual") for d, r in D_MODEL_SHAPES]
    if args.quick:
        shapes = [s for s in shapes if s[1] in (32768, 524288)]
    rows: list[dict[str, Any]] = []
    skipped = []
    for D, n, kind in shapes:
        if time.time() - t0 > args.budget_s:
            skipped.append(f"{kind}:{D}x{n}")
            continue
        rows += bench_plain(D, n, args.sweep) if kind == "norm" else bench_residual(D, n)
        last = [r for r in rows if r.get("impl") == "fast"][-1]
        print(f"{kind} D={D} rows={n}: fast {last['TBps']} TB/s, x{last.get('x_hf')} vs HF "
              f"({time.time() - t0:.0f}s)", flush=True)
    table = best_table(rows) if args.sweep else {}
    extra = {"ceilings": ceil, "skipped_over_budget": skipped, "tuned_table": table,
             "method": "CUDA events, median of 15 regions of >= 12 calls over K rotating input sets "
                       "(>200 MB), per call; graph_*: CUDA-graph replay of one call per set"}
    path = write_results("rmsnorm", rows, extra=extra)
    if args.table_out:
        Path(args.table_out).write_text(json.dumps(
            {"gpu": gpu_name(), "source": "bench/bench_rmsnorm.py --sweep", "configs": table}, indent=1))
    print(f"wrote {path}; skipped: {skipped or 'none'}")
    best_sweep: dict[tuple[int, int], dict[str, Any]] = {}
    for r in rows:
        if r.get("kind") == "sweep":
            k = (r["D"], r["rows"])
            if k not in best_sweep or r["ms"] < best_sweep[k]["ms"]:
                best_sweep[k] = r
    table_rows = []
    for r in rows:
        if r.get("kind") == "sweep" or "error" in r:
            continue
        r2 = dict(r)
        b = best_sweep.get((r["D"], r["rows"]))
        if r["impl"] == "fast" and b is not None:
            r2["best_TBps"] = b["TBps"]
        r2["pct_copy"] = round(100 * r["TBps"] / ceil["copy_TBps"], 1)
        table_rows.append(r2)
    print_table(table_rows, ["kind", "D", "rows", "impl", "ms", "TBps", "pct_copy", "x_hf", "graph_TBps",
                             "best_TBps", "mismatch_vs_hf"])
    return 0


# --------------------------------------------------------------------------------------------
# pytest-benchmark suite (fixtures from bench/conftest.py: ``cuda_bench`` times and records a row)
# --------------------------------------------------------------------------------------------

def _rotating(make: Callable[[], Any], nbytes: int):
    sets = _sets(_n_sets(nbytes), make)
    cur = {"s": sets[0]}

    def setup(i: int) -> None:
        cur["s"] = sets[i % len(sets)]
    return cur, setup


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["fast", "hf", "liger"])
@pytest.mark.parametrize("D,rows", [(2816, 32768), (1536, 131072), (5376, 8192), (256, 524288), (512, 131072)])
def test_bench_rms_norm(cuda_bench, impl, D, rows):
    nbytes = 2 * rows * D * 2
    cur, setup = _rotating(lambda: torch.randn(rows, D, device="cuda", dtype=torch.bfloat16), nbytes)
    w = torch.randn(D, device="cuda", dtype=torch.bfloat16)
    if impl == "fast":
        fn = lambda: rms_norm(cur["s"], w)  # noqa: E731
    elif impl == "hf":
        mod = hf_norm(D, w)
        fn = lambda: mod(cur["s"])  # noqa: E731
    else:
        lig = liger_fn()
        if not callable(lig):
            pytest.skip(lig)
        fn = lambda: lig(cur["s"], w)  # noqa: E731
    with torch.no_grad():
        cuda_bench(fn, setup=setup, nbytes=nbytes, what="norm", impl=impl, D=D, rows=rows, dtype="bf16")


@pytest.mark.cuda
@pytest.mark.parametrize("impl", ["fast", "hf"])
@pytest.mark.parametrize("D,rows", [(2816, 32768), (5376, 8192)])
def test_bench_rms_norm_residual(cuda_bench, impl, D, rows):
    nbytes = 4 * rows * D * 2
    cur, setup = _rotating(lambda: (torch.randn(rows, D, device="cuda", dtype=torch.bfloat16),
                                    torch.randn(rows, D, device="cuda", dtype=torch.bfloat16)), nbytes)
    w, w2 = (torch.randn(D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    if impl == "fast":
        fn = lambda: rms_norm_residual(cur["s"][0], cur["s"][1], w, next_weight=w2)  # noqa: E731
    else:
        post, pre = hf_norm(D, w), hf_norm(D, w2)
        fn = lambda: pre(cur["s"][1] + post(cur["s"][0]))  # noqa: E731
    with torch.no_grad():
        cuda_bench(fn, setup=setup, nbytes=nbytes, what="residual+next", impl=impl, D=D, rows=rows,
                   dtype="bf16")


if __name__ == "__main__":
    sys.exit(main())
