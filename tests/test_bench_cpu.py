"""CPU checks of the benchmark tooling in bench/: the suite skips cleanly without a GPU, the ``record``
fixture writes results files, ``bench/report.py`` builds its report from synthetic results (and from
nothing), the model suite's FLOP estimates, and every model-suite workload on a tiny preset on the CPU."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
GPU_NAME = "NVIDIA H100 80GB HBM3"
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnknownMarkWarning")


def _load(name: str, file: str = ""):
    """Import ``bench/<file or name>.py`` as module ``name`` (bench/ goes on sys.path for ``import common``)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{file or name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _cpu_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               GEMMA4_FAST_RESULTS=str(tmp_path / "results"))
    env.pop("GEMMA4_FAST_BENCH_QUICK", None)
    env.update(extra)
    return env


def test_bench_suite_skips_cleanly_without_gpu(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pytest", "bench/", "--benchmark-only", "-q"], cwd=REPO,
                         env=_cpu_env(tmp_path), capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "skipped" in text and "needs CUDA" in text
    for bad in (" error", " failed", " passed"):
        assert bad not in text.splitlines()[-1], text[-2000:]
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())


FAKE_BENCH = '''
import pytest
import torch

BENCH_SUITE = "fake"


def test_rows(record):
    record(what="x", impl="fast", S=8, ms=1.5)
    record({"what": "x", "impl": "sdpa", "S": 8, "ms": 3.0}, t=torch.tensor(2.0), dtype=torch.bfloat16)


@pytest.mark.parametrize("m,i", [pytest.param("b", 0, marks=pytest.mark.model("b")),
                                 pytest.param("a", 1, marks=pytest.mark.model("a")),
                                 pytest.param("b", 2, marks=pytest.mark.model("b"))])
def test_order(record, m, i):
    record(what="order", m=m, i=i)


def test_needs_gpu(gpu):
    raise AssertionError("must be skipped")


def test_timed(cuda_bench):
    raise AssertionError("must be skipped")


@pytest.mark.cuda
def test_marked():
    raise AssertionError("must be skipped")
'''


def test_record_fixture_writes_results_and_groups_models(tmp_path):
    bench = tmp_path / "bench"
    bench.mkdir()
    for name in ("conftest.py", "common.py", "pytest.ini"):
        shutil.copy(BENCH / name, bench / name)
    (bench / "bench_fake.py").write_text(FAKE_BENCH)
    out = subprocess.run([sys.executable, "-m", "pytest", str(bench), "-q"], cwd=tmp_path,
                         env=_cpu_env(tmp_path), capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    assert "4 passed, 3 skipped" in text, text[-2000:]
    doc = json.loads((tmp_path / "results" / "fake.json").read_text())
    assert doc["suite"] == "fake" and doc["gpu"] == "cpu" and doc["ceilings"] is None
    assert {"torch", "triton", "transformers", "transformer_lens"} <= set(doc["versions"])
    assert doc["commit"] and doc["date"] and doc["source"] == "pytest bench/"
    rows = doc["rows"]
    assert rows[0] == {"what": "x", "impl": "fast", "S": 8, "ms": 1.5, "test": "test_rows"}
    assert rows[1]["t"] == 2.0 and rows[1]["dtype"] == "torch.bfloat16"
    assert [r["i"] for r in rows if r["what"] == "order"] == [0, 2, 1]
    assert "fake.json: 5 rows" in text


def _synthetic(directory: Path) -> None:
    head = {"gpu": GPU_NAME, "commit": "abc1234", "date": "2026-11-27T00:00:00+00:00",
            "versions": {"torch": "2.11.0", "triton": "3.6.0", "transformers": "5.17.0", "transformer_lens": "4.3.0",
                         "cuda": "13.0"}}
    ceil = {"copy_TBps": 2.95, "bf16_mm_TFLOPs": 790.0}
    rows = []
    for S, base, fast in [(1024, 60.0, 30.0), (4096, 90.0, 45.0)]:
        rows.append(dict(model="E2B", what="hf_forward", impl="sdpa", S=S, ms=base, peak_gib=0.1, flops=4e12))
        rows.append(dict(model="E2B", what="hf_forward", impl="fast", S=S, ms=fast, peak_gib=0.05, flops=4e12,
                         max_rel_diff=0.004))
    rows.append(dict(model="E2B", what="hf_forward", impl="sdpa", S=32768, error="OutOfMemoryError: no room"))
    rows.append(dict(model="E2B", what="bridge_forward", impl="seed", S=1024, ms=80.0, flops=4e12))
    rows.append(dict(model="E2B", what="bridge_hooks_patch", impl="fast", S=1024, ms=40.0, hook_effect=0.3))
    rows.append(dict(model="E2B", what="bridge_generate", impl="fast", S=2048, prompt=2048, new=32, ms=1405.0,
                     tok_s=22.8, bytes=4.5e9 * 32))
    (directory / "model.json").write_text(json.dumps(dict(head, suite="model", rows=rows, ceilings=ceil)))
    (directory / "rmsnorm.json").write_text(json.dumps(dict(head, suite="rmsnorm", rows=[
        dict(kind="norm", impl=i, D=2816, rows=r, ms=m, TBps=t)
        for i, r, m, t in [("hf", 8192, 0.39, 0.23), ("fast", 8192, 0.05, 1.9), ("fast", 32768, 0.17, 2.2)]])))
    (directory / "moe.json").write_text(json.dumps(dict(head, suite="moe", rows=[
        dict(M=m, ours_ms=o, hf_grouped_mm_ms=g, TFLOPs=t)
        for m, o, g, t in [(16, 0.3, 0.74, 2.0), (512, 0.6, 1.1, 80.0)]])))
    (directory / "pytest-benchmark.json").write_text(json.dumps({
        "machine_info": {}, "commit_info": {"id": "abc1234def"}, "datetime": "2026-11-27", "benchmarks": [
            {"name": "t", "fullname": "bench_ceilings.py::test_copy_bandwidth[1024MiB]",
             "stats": {"median": 0.00075, "iqr": 1e-5, "rounds": 10}, "extra_info": {"ms": 0.73, "TBps": 2.94}}]}))
    (directory / "broken.json").write_text("{not json")
    (directory / "empty.json").write_text("")


def test_report_on_synthetic_results(tmp_path, capsys):
    report = _load("report")
    results = tmp_path / "nvidia-h100-80gb-hbm3"
    results.mkdir()
    _synthetic(results)
    assert report.main(["--results", str(results), "--print"]) == 0
    text = (results / "REPORT.md").read_text()
    for needle in (GPU_NAME, "abc1234", "5.17.0", "4.3.0", "790 TFLOP/s", "## Model suite", "## Suite `rmsnorm`",
                   "## Suite `moe`", "## pytest-benchmark runs", "## Missing suites", "`attention`", "`ceilings`",
                   "## Pre-project anchors", "69.05", "2.30×", "OutOfMemoryError", "of mm)", "TBps / copy ceiling",
                   "64.4%", "anchor HF ms", "0.3943", "anchor HF grouped_mm ms", "0.738", "fast hook effect 0.3",
                   "22.8 tok/s", "test_copy_bandwidth[1024MiB]"):
        assert needle in text, needle
    line = next(ln for ln in text.splitlines() if ln.startswith("| E2B | HF forward (last logits) | 1024 |"))
    assert "| 60 | 30 | 2.00× | 69.05 | 2.30× |" in line
    headline = (results / "HEADLINE.md").read_text()
    assert "| E2B | HF forward (last logits) | 1024 | 69.05 | 60 | 30 | 2.30× | 2.00× |" in headline
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].split()[:3] == ["E2B", "generate", "(prompt+32,"] and "2810" in printed[-1]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in text
        return
    for png in ("model_time_vs_seq.png", "model_speedup.png", "rmsnorm_time.png", "moe_time.png"):
        assert (results / png).stat().st_size > 1000, png
        assert f"]({png})" in text
    assert "](model_speedup.png)" in headline or "model_speedup.png)" in headline


def test_report_without_results(tmp_path, capsys):
    report = _load("report")
    assert report.main(["--results", str(tmp_path / "nothing"), "--out", str(tmp_path / "out"), "--print"]) == 0
    text = (tmp_path / "out" / "REPORT.md").read_text()
    assert "No results found" in text and "## Missing suites" in text
    assert "no model-suite rows" in capsys.readouterr().out


def test_rotation_sets_and_attention_pairs(monkeypatch):
    common = _load("common")
    monkeypatch.setattr(common, "l2_bytes", lambda: 50 * 2**20)
    assert common.rotation_sets(200 * 2**20) == 1
    assert common.rotation_sets(10 * 2**20) == 10
    assert common.rotation_sets(1024) == 64
    bm = _load("bench_model")
    for S, W in [(10, None), (10, 4), (7, 7), (3, 8), (1, 1)]:
        brute = sum(1 for i in range(S) for j in range(i + 1) if W is None or i - j < W)
        assert bm.attention_pairs(S, W) == brute


def test_graph_rows_warm_up_through_the_capture():
    """A prefill-graph forward captures on its second call: both calls are warm-up, every timed round replays."""
    bm = _load("bench_model")
    for what in ("bridge_forward", "hf_forward", "bridge_cache_resid"):
        for S in (1024, 8192, 32768):
            assert bm.timing(what, S, "graph")["warmup_rounds"] >= 2
            assert bm.timing(what, S, "fast")["rounds"] == bm.timing(what, S, "graph")["rounds"]
    assert bm.timing("bridge_forward", 8192, "fast")["warmup_rounds"] == 1


def test_flop_estimates_of_real_presets():
    import gemma4_fast

    bm = _load("bench_model")
    e2b = gemma4_fast.build_model("E2B", dtype=torch.bfloat16, device="meta")
    a4b = gemma4_fast.build_model("26B-A4B", dtype=torch.bfloat16, device="meta")
    assert 1.7e9 < bm.active_linear_params(e2b) < 2.1e9
    assert 2.8e9 < bm.active_linear_params(a4b) < 3.4e9
    full1, full4 = bm.forward_flops(e2b, 1024, 1024), bm.forward_flops(e2b, 4096, 4096)
    # exact counts (torch's FLOP counter on HF's own forward, bench/floors.py): 4.8188e12 and 20.087e12
    assert full1 == pytest.approx(4.8188e12, rel=1e-4) and full4 == pytest.approx(20.087e12, rel=1e-4)
    f1 = bm.forward_flops(e2b, 1024, 1)
    if bm.hf_trims_kv_shared(e2b):  # the 20 KV-shared layers run the last position only
        assert f1 == pytest.approx(1.2510e12, rel=1e-4)
    else:
        assert full1 - f1 == pytest.approx(2.0 * 262_144 * 1536 * 1023)
    assert 4e9 < bm.decode_bytes_per_token(e2b) < 5e9


def test_model_suite_plan_is_ordered_and_complete():
    bm = _load("bench_model")
    plan = bm.plan_summary()
    assert ("hf_forward", "E2B", 1024) in plan and ("bridge_generate", "E2B", bm.GEN_PROMPT) in plan
    first = {}
    for i, (_, model, _) in enumerate(plan):
        first.setdefault(model, i)
    assert list(first) == [m for m in bm.MODEL_ORDER if m in first]
    for what in bm.PLAN:
        ids = [p.id for p in bm.params(what)]
        assert len(ids) == len(set(ids))


def test_model_suite_workloads_on_tiny_cpu(monkeypatch):
    bm = _load("bench_model")
    monkeypatch.setattr(bm, "GEN_NEW", 2)
    case = bm.ModelCase("tiny-ple-kv-shared", device="cpu", dtype=torch.float32, backend="torch", experts="eager")
    S = 12
    results = {}
    try:
        for what in bm.PLAN:
            kind = "bridge" if what.startswith("bridge") else "hf"
            for impl in bm.IMPLS[kind]:
                try:
                    work = bm.make_work(case, what, S, impl)
                except pytest.skip.Exception as exc:
                    assert impl == "fast" and "gemma4_fast.patch" in str(exc)
                    continue
                work.setup(1)
                work.fn()
                extra = work.check()
                assert work.fields["what"] == what and work.fields["impl"] == impl and work.fields["S"] == S
                assert (work.flops or 0) > 0 or (work.nbytes or 0) > 0
                results[(what, impl)] = extra
    finally:
        case.close()
    assert results[("bridge_generate", "seed")] == {"hook_calls_per_generate": 2, "generated": 2}
    assert results[("bridge_hooks_patch", "seed")]["hook_effect"] == 0.0
    if ("hf_forward", "fast") in results:
        assert results[("hf_forward", "fast")]["max_rel_diff"] < 1e-4
        assert results[("bridge_forward", "fast")]["max_rel_diff"] < 1e-4
        assert results[("bridge_hooks_patch", "fast")]["hook_effect"] > 1e-3
        assert results[("bridge_generate", "fast")]["hook_calls_per_generate"] == 2


class _FakeEvent:
    def __init__(self, enable_timing: bool = False) -> None:
        self.t = 0.0

    def record(self) -> None:
        import time
        self.t = time.perf_counter()

    def elapsed_time(self, end: "_FakeEvent") -> float:
        return (end.t - self.t) * 1e3


class _FakeBenchmark:
    """pytest-benchmark's pedantic contract: setup() before each call, warm-up calls, then timed rounds."""

    def __init__(self) -> None:
        self.extra_info: dict = {}
        self.stats = None
        self.calls = 0

    def pedantic(self, target, setup=None, rounds=1, warmup_rounds=0, iterations=1):
        from types import SimpleNamespace
        import time
        times = []
        for i in range(warmup_rounds + rounds):
            if setup is not None:
                setup()
            t = time.perf_counter()
            target()
            self.calls += 1
            if i >= warmup_rounds:
                times.append(time.perf_counter() - t)
        self.stats = SimpleNamespace(stats=SimpleNamespace(median=sorted(times)[len(times) // 2]))


def test_cuda_bench_row_logic_with_a_stand_in_device(monkeypatch):
    conf = _load("bench_conftest", "conftest")
    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: None)
    alloc = {"now": 100 * 2**30, "peak": 102 * 2**30}
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a: alloc["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: alloc["peak"])
    monkeypatch.setattr(conf.common, "cuda_time_ms",
                        lambda fn, warmup, rep, setup: {"ms": 2.0, "ms_min": 1.5, "ms_max": 3.0, "rep": rep})
    state = conf._State()
    seen = []
    bench = _FakeBenchmark()
    cb = conf.CudaBench(bench, conf.Recorder(state, "s", "t"), {"copy_TBps": 3.0, "bf16_mm_TFLOPs": 800.0})
    row = cb(lambda: torch.ones(3), setup=seen.append, rounds=4, warmup_rounds=2, flops=8e11, nbytes=3e9,
             memory=True, what="w", S=7)
    assert bench.calls == 6 and seen == list(range(6))
    assert row["rounds"] == 4 and row["what"] == "w" and row["S"] == 7 and row["test"] == "t"
    assert 0 <= row["ms_min"] <= row["ms"] <= row["ms_max"] and row["wall_ms"] >= 0
    assert row["peak_gib"] == pytest.approx(2.0)
    secs = row["ms"] * 1e-3
    assert row["tflops"] == pytest.approx(8e11 / secs / 1e12) and row["frac_mm"] == pytest.approx(row["tflops"] / 800)
    assert row["TBps"] == pytest.approx(3e9 / secs / 1e12) and row["frac_bw"] == pytest.approx(row["TBps"] / 3)
    assert bench.extra_info["ms"] == row["ms"] and state.rows["s"] == [row]
    row2 = cb(lambda: None, rep=10, what="w2")
    assert row2["ms"] == 2.0 and row2["rep"] == 10 and "ms_in_call" in row2 and "peak_gib" not in row2
    assert conf.suite_of(type("M", (), {"__file__": "/x/bench_attention.py"})) == "attention"


def test_report_groups_a_run_of_graph_rows_alone():
    """A model run selecting only prefill-graph rows (no baseline, no eager fast row) still reports them."""
    report = _load("report")
    rows = [{"model": "E2B", "what": "hf_forward", "S": 8192, "impl": "graph", "ms": 27.8},
            {"model": "E2B", "what": "bridge_forward", "S": 8192, "impl": "graph", "ms": 84.3}]
    groups = report.model_groups(rows)
    assert [key for key, _ in groups] == [("E2B", "hf_forward_graph", 8192), ("E2B", "bridge_forward_graph", 8192)]
    out = report.model_rows({"rows": rows}, [], {})
    assert [(r["what"], r["fast_ms"], r["base_ms"]) for r in out] == [("hf_forward_graph", 27.8, None),
                                                                       ("bridge_forward_graph", 84.3, None)]
