"""Shared GPU timing helpers for the bench suites and tuning scripts.

Timing rules (see bench/README.md): CUDA events after warm-up, median of many, random inputs
(never zeros), input rotation when a working set would sit in L2.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def gpu_slug() -> str:
    """Folder-safe GPU name, e.g. 'nvidia-h100-80gb-hbm3'."""
    return "-".join(gpu_name().lower().replace("/", " ").split())


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for mod, dist in (("triton", "triton"), ("transformers", "transformers"), ("transformer_lens", "transformer-lens")):
        try:
            out[mod] = metadata.version(dist)
        except Exception:
            try:
                out[mod] = __import__(mod).__version__
            except Exception:
                out[mod] = "missing"
    out["cuda"] = str(torch.version.cuda)
    return out


def git_commit() -> str:
    """``$GEMMA4_FAST_COMMIT`` when set (a copied tree whose git metadata may be stale), else ``git``'s HEAD."""
    pinned = os.environ.get("GEMMA4_FAST_COMMIT", "").strip()
    if pinned:
        return pinned
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=Path(__file__).resolve().parent, stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def cuda_time_ms(fn: Callable[[], Any], *, warmup: int = 5, rep: int = 30,
                 setup: Callable[[int], None] | None = None) -> dict[str, float]:
    """Median / min / max milliseconds of ``fn()`` over ``rep`` CUDA-event-timed calls after ``warmup``.

    ``setup(i)``, when given, runs before call ``i`` outside the timed region (input rotation).
    """
    for i in range(warmup):
        if setup is not None:
            setup(i)
        fn()
    torch.cuda.synchronize()
    times = []
    for i in range(rep):
        if setup is not None:
            setup(i)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return {"ms": statistics.median(times), "ms_min": min(times), "ms_max": max(times), "rep": rep}


def graph_ms(fn: Callable[[], Any], reps: int = 20) -> float:
    """Mean GPU time (ms) of ``fn`` as a CUDA-graph replay: one eager warm-up, capture, one replay, then ``reps``
    replays between two events (for A/B scripts that compare kernels without the launch's host time)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        g.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / reps


def graph_ms_rounds(runs: dict[str, Callable[[], Any]], rounds: int = 3, reps: int = 20) -> dict[str, list[float]]:
    """``graph_ms`` of every callable of ``runs``, ``rounds`` times, the variants interleaved round by round
    (sustained work heats the GPU, so variants alternate); ``{name: [ms of each round]}``."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            times[name].append(graph_ms(fn, reps))
    return times


def ceilings(size_mb: int = 1024, mm: int = 8192) -> dict[str, float]:
    """Measured copy bandwidth (TB/s, read+write bytes) and bf16 matmul TFLOP/s on the current GPU."""
    n = size_mb * 2**20 // 2
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t = cuda_time_ms(lambda: dst.copy_(src), warmup=3, rep=20)["ms"]
    copy_tbps = 2 * src.numel() * src.element_size() / (t * 1e-3) / 1e12
    a = torch.randn(mm, mm, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(mm, mm, device="cuda", dtype=torch.bfloat16)
    t = cuda_time_ms(lambda: a @ b, warmup=3, rep=10)["ms"]
    mm_tflops = 2 * mm**3 / (t * 1e-3) / 1e12
    del src, dst, a, b
    torch.cuda.empty_cache()
    return {"copy_TBps": round(copy_tbps, 3), "bf16_mm_TFLOPs": round(mm_tflops, 1)}


def needs_cuda_benchmark():
    """pytest mark skipping a benchmark without CUDA or pytest-benchmark; None when pytest is not importable
    (a bench file run as a script)."""
    try:
        import pytest
    except ImportError:
        return None
    try:
        import pytest_benchmark  # noqa: F401
        have = True
    except ImportError:
        have = False
    return pytest.mark.skipif(not (torch.cuda.is_available() and have), reason="needs CUDA and pytest-benchmark")


def write_results(suite: str, rows: Sequence[dict[str, Any]], *, out_dir: str | Path | None = None,
                  extra: dict[str, Any] | None = None) -> Path:
    """Write ``rows`` as ``<out_dir>/<suite>.json`` with GPU name, versions, commit and date.

    ``out_dir`` defaults to $GEMMA4_FAST_RESULTS or ``bench/results/<gpu-slug>``.
    """
    base = Path(out_dir or os.environ.get("GEMMA4_FAST_RESULTS") or RESULTS_DIR / gpu_slug())
    base.mkdir(parents=True, exist_ok=True)
    doc = {"suite": suite, "gpu": gpu_name(), "versions": versions(), "commit": git_commit(),
           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "rows": list(rows)}
    if extra:
        doc.update(extra)
    path = base / f"{suite}.json"
    path.write_text(json.dumps(doc, indent=1))
    return path


def print_table(rows: Sequence[dict[str, Any]], cols: Sequence[str]) -> None:
    """Print rows as a fixed-width table (the last thing a GPU command prints)."""
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) if rows else len(c) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(w) for c, w in zip(cols, widths)))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def l2_bytes() -> int:
    """L2 cache size of the current GPU in bytes (50 MiB, the H100's, when it cannot be read)."""
    try:
        return int(torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size)
    except Exception:
        return 50 * 2**20


def rotation_sets(bytes_per_set: int, *, max_sets: int = 64) -> int:
    """How many input sets to rotate through so that consecutive calls do not find their inputs in L2.

    1 when one set is already larger than twice the L2; otherwise enough sets that one pass over them
    exceeds twice the L2 (at most ``max_sets``).
    """
    budget = 2 * l2_bytes()
    if bytes_per_set >= budget:
        return 1
    return max(2, min(max_sets, -(-budget // max(int(bytes_per_set), 1))))
