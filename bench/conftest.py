"""Fixtures and session plumbing of the pytest-benchmark suites in ``bench/``.

Run from the repository root: ``python -m pytest bench/ --benchmark-only`` (``bench/pytest.ini`` makes
pytest collect ``bench_*.py``). Without CUDA every GPU benchmark is skipped with its reason and pytest
exits 0. ``--bench-quick`` (or ``GEMMA4_FAST_BENCH_QUICK=1``) asks the suites for their short plan.

Fixtures:

- ``gpu`` (session): ``torch.device("cuda")``; skips the item when no GPU is visible.
- ``ceilings`` (session): ``{"copy_TBps", "bf16_mm_TFLOPs"}`` measured once by ``common.ceilings()``;
  written into every results file of the session (measured at session end if no item asked earlier).
- ``record`` (function): ``record(row=None, **fields)`` adds one row (a dict of JSON values) to the
  suite of the item's module (``bench_<suite>.py`` gives ``<suite>``; a module-level ``BENCH_SUITE``
  string overrides it). At session end each suite with rows is written as ``<suite>.json`` through
  ``common.write_results`` into ``$GEMMA4_FAST_RESULTS`` or ``bench/results/<gpu-slug>/`` (a file is
  replaced whole: point ``GEMMA4_FAST_RESULTS`` elsewhere for partial runs).
- ``cuda_bench`` (function): ``cuda_bench(fn, ...)`` times ``fn`` through pytest-benchmark (pedantic,
  warm-up rounds, a device synchronisation inside every timed call) and with CUDA events in the same
  calls, optionally also with ``common.cuda_time_ms``; fills ``benchmark.extra_info`` and records the
  row. See :class:`CudaBench`.

Markers: ``cuda`` (skipped without a GPU, as in ``tests/``) and ``model(name)``: items of one model run
next to each other (in their file order otherwise), so a suite that keeps one model alive at a time
builds each model once.
"""
from __future__ import annotations

import math
import numbers
import os
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import common  # noqa: E402  (bench/common.py)

QUICK_ENV = "GEMMA4_FAST_BENCH_QUICK"
NO_GPU_REASON = "needs CUDA (no GPU visible): GPU benchmarks run only on a CUDA machine"


def quick_mode() -> bool:
    """Whether the short plan was asked for (``--bench-quick`` or ``GEMMA4_FAST_BENCH_QUICK=1``)."""
    return os.environ.get(QUICK_ENV, "").strip().lower() in ("1", "true", "yes")


class _State:
    """Rows recorded this session, per suite, and the measured ceilings."""

    def __init__(self) -> None:
        self.rows: dict[str, list[dict[str, Any]]] = {}
        self.ceilings: Optional[dict[str, float]] = None
        self.ceilings_error: Optional[str] = None
        self.written: list[tuple[Path, int]] = []


_STATE = pytest.StashKey[_State]()


def _state(config: pytest.Config) -> _State:
    state = config.stash.get(_STATE, None)
    if state is None:
        state = _State()
        config.stash[_STATE] = state
    return state


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gemma4-fast bench")
    group.addoption("--bench-quick", action="store_true", default=False,
                    help="short plan of every suite (fewer sizes and rounds); same as GEMMA4_FAST_BENCH_QUICK=1")


def pytest_configure(config: pytest.Config) -> None:
    _state(config)
    if config.getoption("bench_quick", default=False):
        os.environ[QUICK_ENV] = "1"


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason=NO_GPU_REASON)
        for item in items:
            if item.get_closest_marker("cuda") is not None:
                item.add_marker(skip)
    buckets: list[list[pytest.Item]] = []
    where: dict[Any, int] = {}
    for item in items:
        marker = item.get_closest_marker("model")
        key = (str(item.path), str(marker.args[0])) if marker is not None and marker.args else id(item)
        if key not in where:
            where[key] = len(buckets)
            buckets.append([])
        buckets[where[key]].append(item)
    items[:] = [item for bucket in buckets for item in bucket]


def _json_value(v: Any) -> Any:
    """``v`` as a JSON value: one-element tensors and numbers as numbers (NaN as null), others as text."""
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, (str, bool)) or v is None:
        return v
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real):
        v = float(v)
        return None if math.isnan(v) else v
    if isinstance(v, dict):
        return {str(k): _json_value(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_value(x) for x in v]
    return str(v)


class Recorder:
    """``record(row=None, **fields)``: append one row to ``suite``; returns the stored dict."""

    def __init__(self, state: _State, suite: str, test: str) -> None:
        self.state, self.suite, self.test = state, suite, test

    def __call__(self, row: Optional[dict[str, Any]] = None, **fields: Any) -> dict[str, Any]:
        out = {str(k): _json_value(v) for k, v in {**(row or {}), **fields}.items()}
        out.setdefault("test", self.test)
        self.state.rows.setdefault(self.suite, []).append(out)
        return out


def suite_of(module: Any) -> str:
    """Suite name of a bench module: its ``BENCH_SUITE``, else the file name without ``bench_``."""
    name = getattr(module, "BENCH_SUITE", None)
    if name:
        return str(name)
    stem = Path(getattr(module, "__file__", "bench")).stem
    return stem[len("bench_"):] if stem.startswith("bench_") else stem


try:
    import pytest_benchmark  # noqa: F401
except ImportError:
    @pytest.fixture
    def benchmark():
        """Stand-in when pytest-benchmark is not installed: the item is skipped."""
        pytest.skip("needs pytest-benchmark (pip install -e '.[bench]')")


@pytest.fixture(scope="session")
def gpu() -> torch.device:
    """The CUDA device; the item is skipped when none is visible."""
    if not torch.cuda.is_available():
        pytest.skip(NO_GPU_REASON)
    return torch.device("cuda", torch.cuda.current_device())


@pytest.fixture(scope="session")
def ceilings(request: pytest.FixtureRequest, gpu: torch.device) -> dict[str, float]:
    """Measured copy bandwidth (TB/s, read + write) and bf16 matmul TFLOP/s of this GPU, once a session."""
    state = _state(request.config)
    if state.ceilings is None:
        state.ceilings = common.ceilings()
    return state.ceilings


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Recorder:
    """Row recorder of the item's suite (written at session end through ``common.write_results``)."""
    return Recorder(_state(request.config), suite_of(request.module), request.node.name)


class CudaBench:
    """Times one GPU callable for a benchmark item and records the row.

    ``cuda_bench(fn, *, setup=None, rounds=20, warmup_rounds=3, rep=0, warmup=3, flops=None, nbytes=None,
    memory=False, record=True, **fields) -> dict``

    - ``fn()``: the work (its result is dropped at once, so large outputs do not pile up).
    - ``setup(i)``: runs before call ``i`` outside every timed region (rotate input sets with it).
    - pytest-benchmark times ``rounds`` calls after ``warmup_rounds`` (pedantic mode, one call a round);
      each call ends with ``torch.cuda.synchronize()`` so the wall clock covers the GPU work, and CUDA
      events around each call give ``ms`` (median), ``ms_min``, ``ms_max``.
    - ``rep > 0`` also runs ``common.cuda_time_ms(fn, warmup=warmup, rep=rep, setup=setup)``; its median
      becomes ``ms`` and the in-call median is kept as ``ms_in_call``.
    - ``flops`` / ``nbytes`` (per call) give ``tflops`` / ``TBps`` and their fractions of the session's
      measured ceilings (``frac_mm``, ``frac_bw``).
    - ``memory=True`` adds ``peak_gib``: the peak allocation during the timed calls above what was
      allocated before (weights and inputs excluded).
    - ``fields``: identity of the row (``what``, ``impl``, sizes, ...). The row also lands in
      ``benchmark.extra_info``.
    """

    def __init__(self, benchmark: Any, recorder: Recorder, ceilings: dict[str, float]) -> None:
        self.benchmark, self.recorder, self.ceilings = benchmark, recorder, ceilings

    def __call__(self, fn: Callable[[], Any], *, setup: Optional[Callable[[int], Any]] = None, rounds: int = 20,
                 warmup_rounds: int = 3, rep: int = 0, warmup: int = 3, flops: Optional[float] = None,
                 nbytes: Optional[float] = None, memory: bool = False, record: bool = True,
                 **fields: Any) -> dict[str, Any]:
        times: list[float] = []
        counter = iter(range(1 << 62))

        def prepare():
            if setup is not None:
                setup(next(counter))

        def target() -> None:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize()
            del out
            times.append(start.elapsed_time(end))

        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        if memory:
            torch.cuda.reset_peak_memory_stats()
        self.benchmark.pedantic(target, setup=prepare, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30 if memory else None
        samples = times[warmup_rounds:] if len(times) > warmup_rounds else times
        row: dict[str, Any] = dict(fields)
        row.update(ms=statistics.median(samples), ms_min=min(samples), ms_max=max(samples), rounds=len(samples))
        if rep > 0:
            t = common.cuda_time_ms(fn, warmup=warmup, rep=rep, setup=setup)
            row.update(ms_in_call=row["ms"], ms=t["ms"], ms_min=t["ms_min"], ms_max=t["ms_max"], rep=rep)
        stats = getattr(getattr(self.benchmark, "stats", None), "stats", None)
        if stats is not None:
            row["wall_ms"] = float(stats.median) * 1e3
        secs = row["ms"] * 1e-3
        if flops:
            row["flops"] = float(flops)
            row["tflops"] = flops / secs / 1e12
            if self.ceilings.get("bf16_mm_TFLOPs"):
                row["frac_mm"] = row["tflops"] / self.ceilings["bf16_mm_TFLOPs"]
        if nbytes:
            row["bytes"] = float(nbytes)
            row["TBps"] = nbytes / secs / 1e12
            if self.ceilings.get("copy_TBps"):
                row["frac_bw"] = row["TBps"] / self.ceilings["copy_TBps"]
        if peak is not None:
            row["peak_gib"] = peak
        row = {k: _json_value(v) for k, v in row.items()}
        self.benchmark.extra_info.update(row)
        return self.recorder(row) if record else row


@pytest.fixture
def cuda_bench(benchmark: Any, record: Recorder, ceilings: dict[str, float]) -> CudaBench:
    """A :class:`CudaBench` bound to this item's ``benchmark`` and suite (needs CUDA)."""
    return CudaBench(benchmark, record, ceilings)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    state = session.config.stash.get(_STATE, None)
    if state is None or not any(state.rows.values()):
        return
    if state.ceilings is None and torch.cuda.is_available():
        try:
            state.ceilings = common.ceilings()
        except Exception as exc:
            state.ceilings_error = f"{type(exc).__name__}: {exc}"
    for suite, rows in state.rows.items():
        if not rows:
            continue
        extra = {"ceilings": state.ceilings, "source": "pytest bench/", "quick": quick_mode(),
                 "pytest_exitstatus": int(exitstatus)}
        if state.ceilings_error:
            extra["ceilings_error"] = state.ceilings_error
        state.written.append((common.write_results(suite, rows, extra=extra), len(rows)))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    state = terminalreporter.config.stash.get(_STATE, None)
    if state is None or not state.written:
        return
    terminalreporter.section("gemma4-fast bench results")
    for path, n in state.written:
        terminalreporter.write_line(f"{path}: {n} rows")
