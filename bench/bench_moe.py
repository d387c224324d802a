"""Benchmark (and tune) the Gemma 4 26B-A4B expert block: ``moe_experts`` vs HF's experts implementations.

Shape: E=128 experts, top-8, H=2816, I=704, bf16, random weights and random (uniform-ish) routing.

Script mode::

    python bench/bench_moe.py                 # M sweep: ours, HF grouped_mm / batched_mm / eager, floors;
                                              # writes moe.json
    python bench/bench_moe.py --tune          # first time every candidate tile config per M (CUDA-graph
                                              # replays), write moe_tuned_configs.json (copy it into
                                              # kernels/moe/configs/ under configs.table_name(...))
    python bench/bench_moe.py --host          # also host microseconds per call at M=1

Columns: ``*_ms`` one call timed with events and a sync after each call (how the HF anchors were
taken: host overhead shows when the GPU work is short); ``*_pipelined_ms`` back-to-back calls, mean;
``ours_graph_ms`` CUDA-graph replay (GPU time alone). ``floor_ms`` = max(bytes of the experts hit /
measured copy rate, FLOPs / measured bf16 matmul rate).

Results go to $GEMMA4_FAST_RESULTS or bench/results/<gpu>/ (``write_results``). As a pytest-benchmark
suite (``python -m pytest bench/bench_moe.py``) it is skipped without CUDA or the plugin.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ceilings, cuda_time_ms, gpu_name, print_table, write_results  # noqa: E402

E, K, H, I = 128, 8, 2816, 704
M_SWEEP = (1, 2, 4, 8, 16, 64, 256, 512, 1024, 4096, 16384)
EXPERT_BYTES = (2 * I * H + H * I) * 2
FLOPS_PER_PAIR = 2 * H * 2 * I + 2 * I * H


def make_weights(device="cuda", dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    gu = torch.randn(E, 2 * I, H, device=device, dtype=dtype, generator=g) * H ** -0.5
    dn = torch.randn(E, H, I, device=device, dtype=dtype, generator=g) * I ** -0.5
    return gu, dn


def make_inputs(num_tokens, device="cuda", dtype=torch.bfloat16, seed=1):
    g = torch.Generator(device=device).manual_seed(seed + num_tokens)
    x = torch.randn(num_tokens, H, device=device, dtype=dtype, generator=g)
    scores = torch.rand(num_tokens, E, device=device, generator=g)
    w, idx = scores.topk(K, dim=-1)
    w = (w + 0.1) / (w + 0.1).sum(-1, keepdim=True)
    return x, idx, w


def hf_experts(impl, gu, dn):
    """HF ``Gemma4TextExperts`` sharing our weight tensors, with ``experts_implementation = impl``."""
    from transformers.models.gemma4.configuration_gemma4 import Gemma4TextConfig
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextExperts

    cfg = Gemma4TextConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, top_k_experts=K,
                           enable_moe_block=True, vocab_size=64, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1, head_dim=16, intermediate_size=32)
    cfg._experts_implementation = impl
    with torch.device("meta"):
        mod = Gemma4TextExperts(cfg)
    mod.gate_up_proj = torch.nn.Parameter(gu, requires_grad=False)
    mod.down_proj = torch.nn.Parameter(dn, requires_grad=False)
    return mod


def graph_time_ms(fn, rep=50, launches=1):
    """Median ms of ``fn`` from replays of a CUDA graph holding ``launches`` calls (launch gaps removed)."""
    fn()
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            fn()
    ms = cuda_time_ms(graph.replay, warmup=3, rep=rep)["ms"] / launches
    del graph
    return ms


def pipelined_ms(fn, calls=50):
    """Mean ms per call of ``calls`` back-to-back calls between two events (host cost overlaps GPU work)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def host_overhead_us(gu, dn, calls=300):
    """Host microseconds per call (no sync inside the loop, GPU far ahead is impossible at M=1)."""
    from gemma4_fast.kernels.moe import moe_experts
    from gemma4_fast.kernels.moe.experts import launch_sum

    x, idx, w = make_inputs(1)
    rows = torch.randn(K, H, device="cuda", dtype=x.dtype)
    y = torch.empty(1, H, device="cuda", dtype=x.dtype)
    grouped = hf_experts("grouped_mm", gu, dn)
    out = {}
    for name, fn in (("moe_experts", lambda: moe_experts(x, idx, w, gu, dn)),
                     ("one_triton_launch", lambda: launch_sum(rows, idx, w, y, num_experts=E, apply_weight=False)),
                     ("torch_empty", lambda: torch.empty(K, H, device="cuda", dtype=x.dtype)),
                     ("hf_grouped_mm", lambda: grouped(x, idx, w))):
        with torch.no_grad():
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            out[name] = (time.perf_counter() - t) / calls * 1e6
            torch.cuda.synchronize()
    return out


def _reps(num_tokens):
    return 50 if num_tokens <= 1024 else 20


# --------------------------------------------------------------------------------------------- tuning


def _try_time(fn, m, cfg, launches=1):
    try:
        return graph_time_ms(fn, rep=max(10, _reps(m) // 2), launches=launches)
    except Exception as exc:
        print(f"tune: M={m} {cfg} failed: {exc!r}"[:300], flush=True)
        return None


def tune(ms, gu, dn, deadline, out_dir=None, block_ms=None):
    """Per M: time each candidate GEMM tile alone (CUDA-graph replays), then the best pair per BLOCK_M
    end to end; keep the fastest. Returns ``({M: config}, log)``."""
    from gemma4_fast.kernels.moe import configs
    from gemma4_fast.kernels.moe.experts import launch_down, launch_gate_up, make_route, moe_experts_fwd

    table, log = {}, []
    for m in ms:
        if time.time() > deadline:
            print(f"tune: deadline reached before M={m}", flush=True)
            break
        x, idx, w = make_inputs(m)
        h = torch.empty(m * K, I, device="cuda", dtype=x.dtype)
        rows = torch.empty(m * K, H, device="cuda", dtype=x.dtype)
        y = torch.empty(m, H, device="cuda", dtype=x.dtype)
        by_bm = {}
        for c in configs.config_candidates(m, K, E):
            if block_ms and c["BLOCK_M"] not in block_ms:
                continue
            gus, dns = by_bm.setdefault(c["BLOCK_M"], ([], []))
            if c["gate_up"] not in gus:
                gus.append(c["gate_up"])
            if c["down"] not in dns:
                dns.append(c["down"])
        launches = 10 if m <= 64 else (4 if m <= 1024 else 1)
        best = None
        for bm, (gus, dns) in by_bm.items():
            route = make_route(idx, E, bm)
            t_gu, t_dn = [], []
            for c in gus:
                if time.time() < deadline:
                    t = _try_time(lambda: launch_gate_up(x, gu, h, route, cfg=c), m, c, launches)
                    if t is not None:
                        t_gu.append((t, c))
            for c in dns:
                if time.time() < deadline:
                    t = _try_time(lambda: launch_down(h, dn, rows, w, route, cfg=c, mul_weight=True), m, c, launches)
                    if t is not None:
                        t_dn.append((t, c))
            if not t_gu or not t_dn:
                continue
            gu_best, dn_best = min(t_gu, key=lambda t: t[0]), min(t_dn, key=lambda t: t[0])
            cfg = {"BLOCK_M": bm, "gate_up": gu_best[1], "down": dn_best[1]}
            total = _try_time(lambda: moe_experts_fwd(x, idx, w, gu, dn, config=cfg, y=y, h=h, rows=rows,
                                                      return_expert_outputs=False), m, cfg, launches)
            if total is None:
                continue
            log.append({"M": m, "BLOCK_M": bm, "gate_up_ms": [round(t, 4) for t, _ in t_gu],
                        "down_ms": [round(t, 4) for t, _ in t_dn], "best_gate_up_ms": gu_best[0],
                        "best_down_ms": dn_best[0], "total_ms": total, "config": cfg})
            print(f"tune M={m} BM={bm}: gate_up {gu_best[0]:.4f} ms {gu_best[1]}  down {dn_best[0]:.4f} ms "
                  f"{dn_best[1]}  total {total:.4f} ms", flush=True)
            if best is None or total < best[0]:
                best = (total, cfg)
        if best is not None:
            table[m] = best[1]
        if out_dir is not None:
            (out_dir / "moe_tuned_configs.json").write_text(json.dumps(table_doc(table), indent=1))
    return table, log


def table_doc(table):
    return {"E": E, "H": H, "I": I, "top_k": K, "dtype": "bfloat16", "device": gpu_name(),
            "how": "python bench/bench_moe.py --tune (keys: tokens T, looked up by next power of two)",
            "configs": {str(m): c for m, c in sorted(table.items())}}


# ---------------------------------------------------------------------------------------------- bench


def bench(ms, gu, dn, deadline, hf_impls=("grouped_mm", "batched_mm", "eager"), out_dir=None):
    from gemma4_fast.kernels.moe import moe_experts

    hf = {impl: hf_experts(impl, gu, dn) for impl in hf_impls}
    ceil = ceilings()
    print(f"ceilings: {ceil}", flush=True)
    rows = []
    for m in ms:
        if time.time() > deadline:
            print(f"bench: deadline reached before M={m}", flush=True)
            break
        x, idx, w = make_inputs(m)
        hit = int(torch.unique(idx).numel())
        flops = FLOPS_PER_PAIR * m * K
        bytes_min = hit * EXPERT_BYTES + 2 * m * H * 2
        floor_ms = max(bytes_min / (ceil["copy_TBps"] * 1e12), flops / (ceil["bf16_mm_TFLOPs"] * 1e12)) * 1e3
        ours = cuda_time_ms(lambda: moe_experts(x, idx, w, gu, dn), warmup=5, rep=_reps(m))["ms"]
        ours_pipe = pipelined_ms(lambda: moe_experts(x, idx, w, gu, dn), calls=_reps(m))
        try:
            graph = graph_time_ms(lambda: moe_experts(x, idx, w, gu, dn), rep=_reps(m))
        except Exception as exc:
            print(f"bench: CUDA graph at M={m} failed: {exc!r}"[:300], flush=True)
            graph = float("inf")
        row = {"M": m, "ours_ms": ours, "ours_pipelined_ms": ours_pipe, "ours_graph_ms": graph, "floor_ms": floor_ms,
               "experts_hit": hit, "graph_TFLOPs": flops / (graph * 1e-3) / 1e12,
               "graph_weight_TBps": hit * EXPERT_BYTES / (graph * 1e-3) / 1e12}
        with torch.no_grad():
            y = moe_experts(x, idx, w, gu, dn)
            for impl, mod in hf.items():
                if impl == "batched_mm" and m * K * EXPERT_BYTES * 2 / 3 > 8e9:
                    continue
                if impl == "eager" and m > 4096:
                    continue
                reps = 5 if impl == "eager" else _reps(m)
                try:
                    row[f"hf_{impl}_ms"] = cuda_time_ms(lambda: mod(x, idx, w), warmup=2, rep=reps)["ms"]
                    if impl == "grouped_mm":
                        row["hf_grouped_mm_pipelined_ms"] = pipelined_ms(lambda: mod(x, idx, w), calls=_reps(m))
                        ref = mod(x, idx, w).float()
                        row["rel_vs_hf"] = ((y.float() - ref).norm() / ref.norm()).item()
                except Exception as exc:
                    row[f"hf_{impl}_ms"] = None
                    row[f"hf_{impl}_error"] = repr(exc)[:200]
                torch.cuda.empty_cache()
        if row.get("hf_grouped_mm_ms"):
            row["speedup_vs_grouped_mm"] = row["hf_grouped_mm_ms"] / ours
            row["speedup_pipelined"] = row["hf_grouped_mm_pipelined_ms"] / ours_pipe
        rows.append(row)
        print(json.dumps(row), flush=True)
        if out_dir is not None:
            (out_dir / "moe_partial.json").write_text(json.dumps(rows, indent=1))
    return rows, ceil


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tune", action="store_true", help="tune the tile configs first (and bench with them)")
    ap.add_argument("--ms", default=",".join(map(str, M_SWEEP)), help="comma-separated token counts")
    ap.add_argument("--budget-s", type=float, default=1e9, help="stop starting new work after this many seconds")
    ap.add_argument("--tune-share", type=float, default=0.6, help="fraction of the budget for tuning")
    ap.add_argument("--hf", default="grouped_mm,batched_mm,eager", help="HF implementations to time")
    ap.add_argument("--host", action="store_true", help="also measure host microseconds per call at M=1")
    ap.add_argument("--block-m", default="", help="tune only these BLOCK_M values (comma-separated)")
    args = ap.parse_args(argv)
    t0 = time.time()
    ms = [int(v) for v in args.ms.split(",") if v]
    gu, dn = make_weights()
    out_dir = Path(os.environ.get("GEMMA4_FAST_RESULTS") or Path(__file__).resolve().parent / "results"
                   / "-".join(gpu_name().lower().split()))
    out_dir.mkdir(parents=True, exist_ok=True)
    extra = {}
    if args.tune:
        from gemma4_fast.kernels.moe import configs

        table, log = tune(ms, gu, dn, t0 + args.budget_s * args.tune_share, out_dir,
                          block_ms={int(v) for v in args.block_m.split(",") if v})
        doc = table_doc(table)
        (out_dir / "moe_tuned_configs.json").write_text(json.dumps(doc, indent=1))
        (out_dir / "moe_tune_log.json").write_text(json.dumps(log, indent=1))
        dest = configs.CONFIG_DIR / configs.table_name(E, I, H, gpu_name())
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(json.dumps(doc, indent=1))
        configs.load_table.cache_clear()
        extra["tuned_configs"] = doc["configs"]
    rows, ceil = bench(ms, gu, dn, t0 + args.budget_s, tuple(v for v in args.hf.split(",") if v), out_dir)
    extra.update({"ceilings": ceil, "shape": {"E": E, "top_k": K, "H": H, "I": I, "dtype": "bfloat16"}})
    if args.host:
        extra["host_us_per_call_M1"] = host_overhead_us(gu, dn)
        print(f"host us/call at M=1: {extra['host_us_per_call_M1']}")
    path = write_results("moe", rows, extra=extra)
    print(f"wrote {path}")
    print_table(rows, ["M", "ours_ms", "ours_pipelined_ms", "ours_graph_ms", "hf_grouped_mm_ms",
                       "hf_grouped_mm_pipelined_ms", "hf_batched_mm_ms", "hf_eager_ms", "floor_ms", "graph_TFLOPs",
                       "graph_weight_TBps", "speedup_vs_grouped_mm", "speedup_pipelined", "rel_vs_hf"])


# ------------------------------------------------------------------------------------- pytest-benchmark

try:
    import pytest_benchmark  # noqa: F401
    pytestmark = pytest.mark.cuda
except ImportError:
    pytestmark = [pytest.mark.cuda, pytest.mark.skip(reason="needs pytest-benchmark")]


@pytest.fixture(scope="module")
def weights():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return make_weights()


@pytest.mark.parametrize("num_tokens", [1, 16, 512, 4096])
def test_bench_moe_experts(benchmark, weights, num_tokens):
    from gemma4_fast.kernels.moe import moe_experts

    gu, dn = weights
    x, idx, w = make_inputs(num_tokens)

    def run():
        moe_experts(x, idx, w, gu, dn)
        torch.cuda.synchronize()

    benchmark(run)


@pytest.mark.parametrize("num_tokens", [1, 16, 512, 4096])
def test_bench_hf_grouped_mm(benchmark, weights, num_tokens):
    gu, dn = weights
    mod = hf_experts("grouped_mm", gu, dn)
    x, idx, w = make_inputs(num_tokens)

    def run():
        with torch.no_grad():
            mod(x, idx, w)
        torch.cuda.synchronize()

    benchmark(run)


if __name__ == "__main__":
    main()
