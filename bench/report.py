"""Build ``REPORT.md``, ``HEADLINE.md`` and PNG plots from saved benchmark results (runs on the CPU).

Usage::

    python bench/report.py [--gpu SLUG] [--results DIR] [--pytest-json FILE ...] [--anchors FILE]
                           [--out DIR] [--no-plots] [--print]

Inputs, each optional (a missing suite is listed as missing, never an error):

- ``<DIR>/<suite>.json`` written by ``bench/common.write_results`` (``suite``, ``gpu``, ``versions``,
  ``commit``, ``date``, ``rows`` and, from ``pytest bench/``, the measured ``ceilings``);
- pytest-benchmark JSON (``--benchmark-json`` / ``--benchmark-autosave`` files) found in ``DIR`` or
  named with ``--pytest-json``;
- the pre-project anchors, ``bench/results/anchors-*.json`` (or ``--anchors``).

``DIR`` is ``--results``, else ``bench/results/<--gpu>``, else the folder of the visible GPU, else the
only (or most recently written) folder under ``bench/results/``. Outputs go to ``--out`` (default
``DIR``): ``REPORT.md`` (provenance, ceilings, the model suite beside its baselines and anchors, one table
per other suite, every figure with its fraction of the measured ceiling, the anchors in full),
``HEADLINE.md`` (the short table and plot for the top-level README), and with matplotlib
``model_time_vs_seq.png``, ``model_speedup.png`` and ``<suite>_time.png``. ``--print`` prints the short
table last on stdout.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import sys
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
EXPECTED_SUITES = ("model", "ceilings", "attention", "moe", "rmsnorm")
BASELINES = ("sdpa", "seed")
FAST = "fast"
WORKLOADS = {
    "hf_forward": "HF forward (last logits)",
    "hf_forward_full_logits": "HF forward (all logits)",
    "bridge_forward": "bridge forward",
    "bridge_cache_resid": "run_with_cache (resid_post)",
    "bridge_cache_all": "run_with_cache (all hooks)",
    "bridge_hooks_patch": "run_with_hooks (pattern patch)",
    "bridge_generate": "generate (prompt+32, 1 hook)",
    "hf_generate": "HF generate (prompt+32)",
    "hf_generate_graph": "gemma4_fast.generate, CUDA-graph decode (prompt+32)",
    "hf_forward_graph": "HF forward (last logits), prefill graphs",
    "bridge_forward_graph": "bridge forward, prefill graphs",
    "bridge_cache_resid_graph": "run_with_cache (resid_post), prefill graphs",
}
# impl -> the workload its rows are shown as (beside the same baseline rows), with impl "fast"
VARIANTS = {"graph": "_graph"}
# our workload -> (anchor 'what', constraints on the anchor row), first match wins
ANCHOR_WHAT: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "hf_forward": [("hf_forward", {"impl": "sdpa"}), ("hf_forward_experts", {"impl": "grouped_mm"})],
    "hf_forward_full_logits": [("hf_sdpa_forward_full_logits", {})],
    "bridge_forward": [("bridge_forward", {})],
    "bridge_cache_resid": [("bridge_cache_resid", {})],
    "bridge_cache_all": [("bridge_cache_all", {})],
    "bridge_generate": [("bridge_generate", {"kv_cache": True})],
}
# op suites: (anchor 'what', {row key: anchor key}, constraints on the anchor, column label)
OP_ANCHORS: dict[str, list[tuple[str, dict[str, str], dict[str, Any], str]]] = {
    "rmsnorm": [("hf_rmsnorm", {"rows": "rows", "D": "d"}, {}, "anchor HF ms")],
    "moe": [("experts", {"M": "M"}, {"impl": "grouped_mm"}, "anchor HF grouped_mm ms"),
            ("experts", {"M": "M"}, {"impl": "eager"}, "anchor HF eager ms")],
    "attention": [("sdpa_sliding_mask", {"S": "S", "window": "W", "head_dim": "hd"}, {}, "anchor sdpa masked ms"),
                  ("sdpa_causal", {"S": "S", "head_dim": "hd"}, {}, "anchor sdpa causal ms"),
                  ("sdpa_causal", {"S": "S", "hd": "hd"}, {}, "anchor sdpa causal ms")],
}
HIDDEN = {"test", "impl_detail", "fast_report", "ms_min", "ms_max", "rounds", "rep", "wall_ms", "ms_in_call",
          "flops", "bytes", "config", "preset"}
SIZE_KEYS = ("S", "M", "num_tokens", "tokens", "rows", "N", "n", "MiB", "seq")
MEASURE_NAMES = {"ms", "flops", "bytes", "rounds", "rep", "peak_gib", "tok_s", "tflops", "TBps", "error",
                 "hook_effect", "generated", "hook_calls_per_generate", "cached_tensors", "experts_hit"}


# ----------------------------------------------------------------------------------------------- loading

def read_json(path: Path) -> Optional[Any]:
    try:
        text = path.read_text()
        if not text.strip():
            return None
        return json.loads(text)
    except (OSError, ValueError) as exc:
        print(f"report: skipping {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


def is_results_doc(doc: Any) -> bool:
    return isinstance(doc, dict) and isinstance(doc.get("rows"), list) and "suite" in doc


def is_pytest_doc(doc: Any) -> bool:
    return isinstance(doc, dict) and isinstance(doc.get("benchmarks"), list)


def load_dir(directory: Path, extra_pytest: Sequence[Path] = ()) -> tuple[dict[str, dict], list[tuple[Path, dict]]]:
    """``({suite: doc}, [(path, pytest-benchmark doc)])`` of the JSON files in ``directory``."""
    suites: dict[str, dict] = {}
    pytest_docs: list[tuple[Path, dict]] = []
    files = sorted(directory.glob("*.json")) if directory.is_dir() else []
    for path in [*files, *extra_pytest]:
        doc = read_json(path)
        if is_results_doc(doc):
            suites[str(doc["suite"])] = doc
        elif is_pytest_doc(doc):
            pytest_docs.append((path, doc))
    return suites, pytest_docs


def load_anchors(path: Optional[Path]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Anchor rows (``s`` turned into ``ms``) and the file's header (gpu, date, versions, notes)."""
    if path is None:
        found = sorted(RESULTS.glob("anchors-*.json"))
        path = found[-1] if found else None
    doc = read_json(path) if path is not None and path.is_file() else None
    if not isinstance(doc, dict):
        return [], {}
    rows = []
    for r in doc.get("results", []):
        r = dict(r)
        if "ms" not in r and isinstance(r.get("s"), (int, float)):
            r["ms"] = r["s"] * 1e3
        rows.append(r)
    head = {k: v for k, v in doc.items() if k != "results"}
    head["path"] = str(path)
    return rows, head


def pick_dir(args: argparse.Namespace) -> Path:
    if args.results:
        return Path(args.results)
    if args.gpu:
        return RESULTS / args.gpu
    try:
        import torch
        if torch.cuda.is_available():
            sys.path.insert(0, str(BENCH_DIR))
            from common import gpu_slug
            return RESULTS / gpu_slug()
    except Exception:
        pass
    dirs = [d for d in RESULTS.iterdir() if d.is_dir() and any(d.glob("*.json"))] if RESULTS.is_dir() else []
    if not dirs:
        return RESULTS / "unknown-gpu"
    return max(dirs, key=lambda d: max(f.stat().st_mtime for f in d.glob("*.json")))


# ----------------------------------------------------------------------------------------- formatting

def fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if v == 0:
            return "0"
        if abs(v) >= 10 ** digits or abs(v) < 1e-3:
            return f"{v:.{digits - 1}e}"
        return f"{v:.{digits}g}"
    text = str(v).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 80 else text[:77] + "..."


def pct(v: Optional[float]) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(c if isinstance(c, str) else fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    out = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------- ceilings

def find_ceilings(suites: dict[str, dict], anchors: list[dict]) -> tuple[dict[str, float], str]:
    """Measured ceilings and where they came from: a results file's ``ceilings``, else the ceilings
    suite's 1 GiB copy / 8192^3 product, else the anchors."""
    for name in ("model", *sorted(suites)):
        c = suites.get(name, {}).get("ceilings")
        if isinstance(c, dict) and c.get("copy_TBps") and c.get("bf16_mm_TFLOPs"):
            return {"copy_TBps": float(c["copy_TBps"]), "bf16_mm_TFLOPs": float(c["bf16_mm_TFLOPs"])}, \
                f"measured with the `{name}` results ({suites[name].get('date', '?')})"
    rows = suites.get("ceilings", {}).get("rows", [])
    bw = [r["TBps"] for r in rows if r.get("what") == "copy_bw" and r.get("TBps")]
    mm = [r["tflops"] for r in rows if r.get("what") == "bf16_mm" and r.get("tflops")]
    if bw and mm:
        return {"copy_TBps": max(bw), "bf16_mm_TFLOPs": max(mm)}, "best of the `ceilings` suite rows"
    a_bw = [r.get("TBps") for r in anchors if r.get("what") == "copy_bw" and r.get("TBps")]
    a_mm = [r.get("tflops") for r in anchors if r.get("what") == "bf16_mm" and r.get("tflops")]
    if a_bw and a_mm:
        return ({"copy_TBps": float(a_bw[0]), "bf16_mm_TFLOPs": float(a_mm[0])},
                "the pre-project anchors (none measured here)")
    return {}, "none available"


# ------------------------------------------------------------------------------------------ model suite

def match_anchor(anchors: list[dict], model: str, what: str, S: Any, new: Any = None) -> Optional[dict]:
    for a_what, cons in ANCHOR_WHAT.get(what, []):
        for a in anchors:
            if a.get("what") != a_what or "error" in a or "ms" not in a:
                continue
            if any(a.get(k) != v for k, v in cons.items()) or a.get("model") not in (None, model):
                continue
            if a.get("S", a.get("prompt")) != S or (new is not None and a.get("new") not in (None, new)):
                continue
            return a
    return None


def model_groups(rows: list[dict]) -> list[tuple[tuple[str, str, Any], dict[str, dict]]]:
    """Rows grouped by (model, what, S) in first-seen order: ``{impl: row}`` (the last row of each wins); a group
    whose only rows were variants (e.g. a run of graph rows alone) is dropped, its variant group kept."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if "what" not in r or "impl" not in r:
            continue
        groups.setdefault((r.get("model"), r["what"], r.get("S")), {})[r["impl"]] = r
    for (model, what, S), impls in list(groups.items()):
        for impl, suffix in VARIANTS.items():
            if impl in impls:
                variant = {i: r for i, r in impls.items() if i in BASELINES}
                variant[FAST] = impls.pop(impl)
                groups[(model, what + suffix, S)] = variant
    return [(key, impls) for key, impls in groups.items() if impls]


def ms_of(row: Optional[dict]) -> Optional[float]:
    if not row or "error" in row:
        return None
    v = row.get("ms")
    return float(v) if isinstance(v, (int, float)) else None


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a and b else None


def model_rows(suite: dict, anchors: list[dict], ceil: dict[str, float]) -> list[dict[str, Any]]:
    """One dict per (model, workload, S): baseline / fast / anchor times, speed-ups, fractions, checks."""
    out = []
    for (model, what, S), impls in model_groups(suite.get("rows", [])):
        base_impl = next((i for i in BASELINES if i in impls), None)
        base, fast = impls.get(base_impl) if base_impl else None, impls.get(FAST)
        any_row = fast or base or next(iter(impls.values()))
        anchor = match_anchor(anchors, model, what, S, any_row.get("new"))
        fast_ms, base_ms = ms_of(fast), ms_of(base)
        anchor_ms = float(anchor["ms"]) if anchor else None
        entry: dict[str, Any] = {
            "model": model, "what": what, "workload": WORKLOADS.get(what, what), "S": S, "baseline": base_impl,
            "base_ms": base_ms, "fast_ms": fast_ms, "x_base": ratio(base_ms, fast_ms),
            "anchor_ms": anchor_ms, "x_anchor": ratio(anchor_ms, fast_ms), "anchor": anchor,
            "peak": [(r or {}).get("peak_gib") for r in (fast, base, anchor)],
            "errors": {i: r["error"] for i, r in impls.items() if "error" in r},
        }
        best = fast if fast_ms else base
        if best and best.get("flops") and ms_of(best):
            tflops = best["flops"] / (ms_of(best) * 1e-3) / 1e12
            entry["perf"] = f"{tflops:.1f} TFLOP/s ({pct(ratio(tflops, ceil.get('bf16_mm_TFLOPs')))} of mm)"
        elif best and best.get("bytes") and ms_of(best):
            tbps = best["bytes"] / (ms_of(best) * 1e-3) / 1e12
            tok_s = best.get("tok_s") or (best.get("new", 0) / (ms_of(best) * 1e-3))
            share = pct(ratio(tbps, ceil.get("copy_TBps")))
            entry["perf"] = f"{tok_s:.1f} tok/s; weights {tbps:.2f} TB/s ({share} of copy)"
        checks = []
        if fast and fast.get("max_rel_diff") is not None:
            checks.append(f"logits rel diff {fmt(fast['max_rel_diff'], 2)}")
        for i, r in impls.items():
            if r.get("hook_effect") is not None:
                checks.append(f"{i} hook effect {fmt(r['hook_effect'], 2)}")
        entry["checks"] = "; ".join(checks)
        out.append(entry)
    models = {m: i for i, m in enumerate(dict.fromkeys(e["model"] for e in out))}
    works = {w: i for i, w in enumerate(WORKLOADS)}
    out.sort(key=lambda e: (models[e["model"]], works.get(e["what"], len(works)),
                            e["S"] if isinstance(e["S"], (int, float)) else 0))
    return out


def model_section(entries: list[dict], anchor_head: dict) -> list[str]:
    date = anchor_head.get("date", "pre-project")
    header = ["model", "workload", "S", "baseline", "baseline ms", "fast ms", "× baseline", f"anchor ms ({date})",
              "× anchor", "fast throughput (share of ceiling)", "peak GiB fast / base / anchor", "checks"]
    rows = []
    for e in entries:
        err = e["errors"]
        fast_cell = fmt(e["fast_ms"]) if e["fast_ms"] else ("error: " + fmt(err[FAST]) if FAST in err else "–")
        base_cell = fmt(e["base_ms"]) if e["base_ms"] else (
            "error: " + fmt(err[e["baseline"]]) if e["baseline"] in err else "–")
        rows.append([fmt(e["model"]), e["workload"], fmt(e["S"]), fmt(e["baseline"]), base_cell, fast_cell,
                     _x(e["x_base"]), fmt(e["anchor_ms"]), _x(e["x_anchor"]), e.get("perf", "–"),
                     " / ".join(fmt(p, 3) for p in e["peak"]), e["checks"] or "–"])
    return [md_table(header, rows)]


def _x(v: Optional[float]) -> str:
    return "–" if v is None else f"{v:.2f}×"


def headline(entries: list[dict], anchor_head: dict) -> tuple[list[str], list[list[str]]]:
    header = ["model", "workload", "S", f"anchor ms ({anchor_head.get('date', 'pre-project')})", "baseline ms",
              "fast ms", "× anchor", "× baseline"]
    rows = [[fmt(e["model"]), e["workload"], fmt(e["S"]), fmt(e["anchor_ms"]), fmt(e["base_ms"]), fmt(e["fast_ms"]),
             _x(e["x_anchor"]), _x(e["x_base"])] for e in entries]
    return header, rows


# ------------------------------------------------------------------------------------------ op suites

def is_measure(key: str, value: Any) -> bool:
    if key in MEASURE_NAMES or isinstance(value, float):
        return True
    low = key.lower()
    return low.endswith(("_ms", "tbps", "tflops", "_s", "_error", "_gib")) or \
        low.startswith(("frac_", "ms_", "max_rel", "rel_", "x_", "speedup", "pct_", "best_"))


def columns_of(rows: list[dict]) -> tuple[list[str], list[str]]:
    """(identity columns, measurement columns) in first-seen order, hidden ones left out."""
    ident: list[str] = []
    meas: list[str] = []
    for r in rows:
        for k, v in r.items():
            if k in HIDDEN or k in ident or k in meas:
                continue
            (meas if is_measure(k, v) else ident).append(k)
    return ident, meas


def op_anchor_cells(suite: str, row: dict, anchors: list[dict]) -> dict[str, Optional[float]]:
    out: dict[str, Optional[float]] = {}
    for a_what, keymap, cons, label in OP_ANCHORS.get(suite, []):
        if label in out and out[label] is not None:
            continue
        out.setdefault(label, None)
        if not all(k in row and row[k] is not None for k in keymap):
            continue
        for a in anchors:
            if a.get("what") == a_what and "ms" in a and all(a.get(ak) == row[rk] for rk, ak in keymap.items()) \
                    and all(a.get(k) == v for k, v in cons.items()):
                out[label] = float(a["ms"])
                break
    return out


def op_section(suite: str, doc: dict, anchors: list[dict], ceil: dict[str, float]) -> list[str]:
    rows = [r for r in doc.get("rows", []) if isinstance(r, dict)]
    if not rows:
        return ["(no rows)"]
    ident, meas = columns_of(rows)
    if ceil:
        meas = [k for k in meas if k not in ("frac_bw", "frac_mm")]
    anchor_cells = [op_anchor_cells(suite, r, anchors) for r in rows]
    anchor_cols = [c for c in dict.fromkeys(k for cells in anchor_cells for k, v in cells.items() if v is not None)]
    header: list[str] = [*ident]
    for k in meas:
        header.append(k)
        low = k.lower()
        if low.endswith("tbps") and ceil.get("copy_TBps"):
            header.append(f"{k} / copy ceiling")
        elif low.endswith("tflops") and ceil.get("bf16_mm_TFLOPs"):
            header.append(f"{k} / mm ceiling")
    header += anchor_cols
    table = []
    for r, cells in zip(rows, anchor_cells):
        line = [fmt(r.get(k)) for k in ident]
        for k in meas:
            v = r.get(k)
            line.append(fmt(v))
            low = k.lower()
            if low.endswith("tbps") and ceil.get("copy_TBps"):
                line.append(pct(v / ceil["copy_TBps"]) if isinstance(v, (int, float)) else "–")
            elif low.endswith("tflops") and ceil.get("bf16_mm_TFLOPs"):
                line.append(pct(v / ceil["bf16_mm_TFLOPs"]) if isinstance(v, (int, float)) else "–")
        line += [fmt(cells.get(c)) for c in anchor_cols]
        table.append(line)
    return [md_table(header, table)]


def pytest_section(docs: list[tuple[Path, dict]], ceil: dict[str, float]) -> list[str]:
    out = []
    for path, doc in docs:
        ci = doc.get("commit_info", {}) or {}
        out.append(f"`{path.name}` ({doc.get('datetime', '?')}, commit {str(ci.get('id', '?'))[:10]}"
                   f"{', dirty' if ci.get('dirty') else ''}; wall-clock statistics of synchronised calls, "
                   "CUDA-event median from `extra_info`)\n")
        rows = []
        for b in doc["benchmarks"]:
            st, ex = b.get("stats", {}) or {}, b.get("extra_info", {}) or {}
            frac = ex.get("frac_mm") if ex.get("frac_mm") is not None else ex.get("frac_bw")
            if frac is None and ex.get("TBps") and ceil.get("copy_TBps"):
                frac = ex["TBps"] / ceil["copy_TBps"]
            rows.append([fmt(b.get("fullname", b.get("name"))), fmt(_ms(st.get("median"))), fmt(_ms(st.get("iqr"))),
                         fmt(st.get("rounds")), fmt(ex.get("ms")), fmt(ex.get("TBps")), fmt(ex.get("tflops")),
                         pct(frac)])
        out.append(md_table(["benchmark", "median wall ms", "IQR ms", "rounds", "CUDA-event ms", "TB/s",
                             "TFLOP/s", "share of ceiling"], rows))
        out.append("")
    return out


def _ms(v: Any) -> Optional[float]:
    return float(v) * 1e3 if isinstance(v, (int, float)) else None


def anchors_section(anchors: list[dict]) -> list[str]:
    keys: list[str] = []
    for r in anchors:
        for k in r:
            if k not in keys and k != "s":
                keys.append(k)
    return [md_table(keys, [[fmt(r.get(k), 4) if k != "error" else fmt(r.get(k), 4)[:60] for k in keys]
                            for r in anchors])]


# ---------------------------------------------------------------------------------------------- plots

def _plt():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except Exception:
        return None


def plot_model(entries: list[dict], suite: dict, anchors: list[dict], out: Path) -> list[Path]:
    plt = _plt()
    if plt is None:
        return []
    made = []
    rows = [r for r in suite.get("rows", []) if "error" not in r and isinstance(r.get("ms"), (int, float))]
    panels: dict[tuple, dict[str, list]] = {}
    for r in rows:
        if str(r.get("what", "")).endswith("_generate"):
            continue
        panels.setdefault((r.get("model"), r["what"]), {}).setdefault(r["impl"], []).append((r["S"], r["ms"]))
    panels = {k: v for k, v in panels.items() if len({s for pts in v.values() for s, _ in pts}) >= 2}
    if panels:
        n = len(panels)
        cols = min(3, n)
        nrows = -(-n // cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
        for ax, ((model, what), impls) in zip(axes.flat, panels.items()):
            for impl, pts in impls.items():
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
            a_pts = sorted((s, a["ms"]) for s in sorted({s for pts in impls.values() for s, _ in pts})
                           for a in [match_anchor(anchors, model, what, s)] if a)
            if a_pts:
                ax.plot([p[0] for p in a_pts], [p[1] for p in a_pts], "x--", color="gray", label="anchor")
            _time_axes(ax, f"{model}: {WORKLOADS.get(what, what)}", "sequence length", 9)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.tight_layout()
        made.append(_save(fig, plt, out / "model_time_vs_seq.png"))
    bars = [e for e in entries if e["x_base"] or e["x_anchor"]]
    if bars:
        fig, ax = plt.subplots(figsize=(8, 0.32 * len(bars) + 1.4))
        labels = [f"{e['model']} {WORKLOADS.get(e['what'], e['what'])} S={e['S']}" for e in bars]
        ys = list(range(len(bars)))
        ax.barh([y - 0.2 for y in ys], [e["x_anchor"] or 0 for e in bars], height=0.4, label="vs pre-project anchor")
        ax.barh([y + 0.2 for y in ys], [e["x_base"] or 0 for e in bars], height=0.4, label="vs baseline, same run")
        ax.axvline(1.0, color="black", lw=0.8)
        ax.set_yticks(ys)
        ax.set_yticklabels(labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("speed-up of the fast path (×)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        made.append(_save(fig, plt, out / "model_speedup.png"))
    return made


def plot_op(suite: str, doc: dict, out: Path) -> Optional[Path]:
    """Time against the first size column, one line per ``impl`` (or per ``*_ms`` column), one panel per
    combination of the other identity columns (at most 12); several rows at one size (a config sweep) plot
    their best, labelled "best of N"."""
    plt = _plt()
    rows = [r for r in doc.get("rows", []) if isinstance(r, dict) and "error" not in r]
    if plt is None or not rows:
        return None
    ident, _ = columns_of(rows)
    x = next((k for k in SIZE_KEYS if k in ident and all(isinstance(r.get(k), (int, float)) for r in rows
                                                         if k in r)), None)
    if x is None:
        return None
    long_form = "impl" in ident and any(isinstance(r.get("ms"), (int, float)) for r in rows)
    wide = [k for k in dict.fromkeys(k for r in rows for k in r) if k.endswith("_ms") and k not in HIDDEN]
    if not long_form and not wide:
        return None
    group_keys = [k for k in ident if k not in (x, "impl", "test")]
    panels: dict[tuple, dict[str, list]] = {}
    for r in rows:
        if x not in r:
            continue
        key = tuple(r.get(k) for k in group_keys)
        series = panels.setdefault(key, {})
        if long_form:
            if isinstance(r.get("ms"), (int, float)):
                series.setdefault(str(r.get("impl")), []).append((r[x], r["ms"]))
        else:
            for k in wide:
                if isinstance(r.get(k), (int, float)) and math.isfinite(r[k]):
                    series.setdefault(k[:-3], []).append((r[x], r[k]))
    panels = dict(list((k, v) for k, v in panels.items() if v)[:12])
    if not panels:
        return None
    n = len(panels)
    cols = min(3, n)
    nrows = -(-n // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.4 * nrows), squeeze=False)
    for ax, (key, series) in zip(axes.flat, panels.items()):
        for name, pts in series.items():
            by_x: dict[Any, list[float]] = {}
            for xv, yv in pts:
                by_x.setdefault(xv, []).append(yv)
            most = max(len(v) for v in by_x.values())
            xs = sorted(by_x)
            label = name if most == 1 else f"{name} (best of {most})"
            ax.plot(xs, [min(by_x[xv]) for xv in xs], marker="o", label=label)
        _time_axes(ax, ", ".join(f"{k}={v}" for k, v in zip(group_keys, key) if v is not None) or suite, x, 8)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, plt, out / f"{suite}_time.png")


def _time_axes(ax: Any, title: str, xlabel: str, title_size: int) -> None:
    """Log-log time axes (x base 2, y in ms) with a grid and a legend."""
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_title(title, fontsize=title_size)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("ms")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def _save(fig: Any, plt: Any, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------- report

def provenance(suites: dict[str, dict]) -> list[str]:
    keys = ("torch", "triton", "transformers", "transformer_lens", "cuda")
    rows = []
    for name in sorted(suites):
        d = suites[name]
        v = d.get("versions", {}) or {}
        rows.append([name, fmt(len(d.get("rows", []))), fmt(d.get("date")), fmt(d.get("commit")),
                     *(fmt(v.get(k)) for k in keys), fmt(d.get("source", "script"))])
    return [md_table(["suite", "rows", "date (UTC)", "commit", *keys, "source"], rows)]


def rel_link(path: Path, base: Path) -> str:
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return path.name


def build(directory: Path, out: Path, pytest_json: Sequence[Path] = (), anchors_path: Optional[Path] = None,
          plots: bool = True) -> dict[str, Any]:
    """Write REPORT.md / HEADLINE.md (and plots) into ``out``; returns what was written and the short table."""
    suites, pytest_docs = load_dir(directory, pytest_json)
    anchors, anchor_head = load_anchors(anchors_path)
    ceil, ceil_src = find_ceilings(suites, anchors)
    out.mkdir(parents=True, exist_ok=True)
    gpus = sorted({str(d.get("gpu")) for d in suites.values() if d.get("gpu")})
    gpu = ", ".join(gpus) or directory.name
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    lines = [f"# Benchmark report: {gpu}", "",
             f"Generated {now} by `python bench/report.py` from `{rel_link(directory, REPO)}/`. Random-weight "
             "models and random inputs; times are medians of CUDA-event-timed calls after warm-up.", ""]
    if not suites and not pytest_docs:
        lines += ["No results found. Run `bash bench/run_all.sh` on a GPU (see `bench/README.md`).", ""]
    if suites:
        lines += ["## Provenance", "", *provenance(suites), ""]
    lines += ["## Ceilings", ""]
    if ceil:
        lines.append(f"Copy {ceil['copy_TBps']:.3g} TB/s (bytes read + written), bf16 matmul "
                     f"{ceil['bf16_mm_TFLOPs']:.4g} TFLOP/s; source: {ceil_src}. "
                     "Every fraction below divides by these.")
    else:
        lines.append("No ceilings measured and no anchors found: fractions are left out.")
    lines.append("")
    made: list[Path] = []
    entries: list[dict] = []
    if "model" in suites:
        entries = model_rows(suites["model"], anchors, ceil)
        lines += ["## Model suite: fast path, its baseline in the same run, and the pre-project anchors", "",
                  "Baseline: HF `sdpa` for HF forwards (MoE experts on HF `grouped_mm`), the seed TransformerBridge "
                  "(eager attention) for bridge workloads. `×` = baseline or anchor time over fast time. Throughput: "
                  "estimated matmul + attention FLOPs over the time (generate: decoded tokens per second and "
                  "estimated weight bytes read per token). Peak GiB: allocation above the resident model. Checks: "
                  "last-position logits of fast vs baseline; how much the pattern-patching hook moved them.", "",
                  *model_section(entries, anchor_head), ""]
        if plots:
            made += plot_model(entries, suites["model"], anchors, out)
            lines += [f"![{p.stem}]({p.name})" for p in made] + [""]
    for name in sorted(suites):
        if name == "model":
            continue
        lines += [f"## Suite `{name}`", "", *op_section(name, suites[name], anchors, ceil), ""]
        if plots:
            p = plot_op(name, suites[name], out)
            if p is not None:
                made.append(p)
                lines += [f"![{p.stem}]({p.name})", ""]
    if pytest_docs:
        lines += ["## pytest-benchmark runs", "", *pytest_section(pytest_docs, ceil)]
    missing = [s for s in EXPECTED_SUITES if s not in suites]
    if missing:
        lines += ["## Missing suites", "", "No results file for: " + ", ".join(f"`{s}`" for s in missing) + ".", ""]
    if anchors:
        lines += [f"## Pre-project anchors ({anchor_head.get('gpu', '?')}, {anchor_head.get('date', '?')})", "",
                  f"From `{rel_link(Path(anchor_head['path']), REPO)}`: torch {anchor_head.get('torch', '?')}, "
                  f"transformers {anchor_head.get('transformers', '?')}, transformer_lens "
                  f"{anchor_head.get('transformer_lens', '?')}.", "", *anchors_section(anchors), ""]
    if plots and _plt() is None:
        lines += ["(matplotlib is not installed: no plots were drawn.)", ""]
    report = out / "REPORT.md"
    report.write_text("\n".join(lines))
    h_header, h_rows = headline(entries, anchor_head)
    head_lines = [f"Gemma 4 on {gpu} (random weights, bf16; {suites.get('model', {}).get('date', 'no date')}, "
                  f"commit {suites.get('model', {}).get('commit', '?')}); full report: "
                  f"[{rel_link(report, REPO)}]({rel_link(report, REPO)})", ""]
    head_lines += [md_table(h_header, h_rows) if h_rows else "No model-suite results yet.", ""]
    head_lines += [f"![{p.stem}]({rel_link(p, REPO)})" for p in made if p.name.startswith("model_")]
    headline_path = out / "HEADLINE.md"
    headline_path.write_text("\n".join(head_lines) + "\n")
    return {"report": report, "headline": headline_path, "plots": made, "short": (h_header, h_rows),
            "suites": sorted(suites), "missing": missing}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", help="results folder name under bench/results/ (e.g. nvidia-h100-80gb-hbm3)")
    ap.add_argument("--results", help="results folder (overrides --gpu)")
    ap.add_argument("--pytest-json", nargs="*", default=[], help="pytest-benchmark JSON files to include")
    ap.add_argument("--anchors", help="anchors JSON (default: the newest bench/results/anchors-*.json)")
    ap.add_argument("--out", help="output folder (default: the results folder)")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    ap.add_argument("--print", action="store_true", help="print the short model table last")
    args = ap.parse_args(argv)
    directory = pick_dir(args)
    out = Path(args.out) if args.out else directory
    res = build(directory, out, [Path(p) for p in args.pytest_json], Path(args.anchors) if args.anchors else None,
                plots=not args.no_plots)
    print(f"report: {res['report']} (suites: {', '.join(res['suites']) or 'none'}; missing: "
          f"{', '.join(res['missing']) or 'none'}; plots: {len(res['plots'])})")
    if args.print:
        header, rows = res["short"]
        print(text_table(header, rows) if rows else "no model-suite rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
