"""Compute floor of one full Gemma 4 text forward: counted FLOPs over a peak TFLOP/s, for the real presets.

Scope. ``python bench/floors.py --preset E2B --seq 1024 4096 8192 [--batch 1] [--tflops 786]
[--logits last|all] [--json PATH]`` prints a markdown table (one row per preset and length) of

- matmul TFLOP: every projection, MLP, MoE router and expert, Per-Layer-Embedding (PLE) and LM-head
  matmul, counted exactly by ``torch.utils.flop_counter.FlopCounterMode`` on HF's own
  ``Gemma4ForCausalLM`` (``Gemma4UnifiedForCausalLM`` for 12B) built on the ``meta`` device (no memory);
- attention-core TFLOP: q.k^T and p.v over visible (query, key) pairs only, added analytically per
  layer as ``4 * B * Hq * D * pairs`` (2 FLOPs per multiply-add, two products) with ``Hq``, ``D`` and the
  window read from the config (per-layer ``head_dim``: ``global_head_dim`` on full layers) and
  ``pairs(Sq, Sk, W) = sum over query positions i in [Sk - Sq, Sk) of min(i + 1, W)`` (HF semantics: key j
  is visible to query i iff 0 <= i - j < W; W = infinity on full layers);
- their sum, and the floor in ms at ``--tflops`` (default 786: the bf16 8192^3 matmul rate measured on an H100 in
  ``bench/results/anchors-h100-2026-11-23.json``).

How. The forward runs ``model(input_ids, use_cache=False, logits_to_keep=1 or 0)`` on meta tensors. A
meta forward with ``sdpa`` fails (HF's mask builder calls ``.item()`` on the position ids), so the config
names a private attention function registered in HF's ``AttentionInterface``: it returns zeros of the
output's shape (HF then builds no mask at all) and records each layer's query/key shapes, which give the
query rows each layer really ran; the counter therefore sees no attention core to exclude (any
attention-kernel entries it did report would be dropped). What the counter sees follows HF exactly:
KV-shared layers (E2B/E4B ``num_kv_shared_layers``) have no k/v projections, and with ``--logits last``
HF runs the KV-shared layers on the last position only (``_maybe_slice_kv_shared_inputs``, transformers >= 5.23;
5.17 runs them on every position), so their
projections, MLPs and attention cost one row each.

MoE experts (26B-A4B). HF's ``eager`` experts loop needs ``nonzero()`` (fails on meta) and
``grouped_mm`` runs on meta but FlopCounterMode has no formula for ``_grouped_mm`` (it would count 0), so
the counted model uses HF's ``batched_mm`` experts: a ``bmm`` per (token, chosen expert), which is exactly
``top_k * (2*H*2I + 2*I*H)`` per token. That count is checked against this formula, and the formula
replaces it (with a message) if HF ever counts something else. The router linear (``2*H*E`` per token)
is an ordinary counted ``mm``.

Limits. Only matmul and attention-core FLOPs: norms, RoPE, softmax, GELU, softcapping, routing and
embedding gathers are left out (a floor, not an estimate of runtime); compute only, no memory traffic.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AttentionInterface

from gemma4_fast.models import model_class, text_config
from gemma4_fast.presets import REAL_PRESETS, get_preset

NULL_ATTENTION = "gemma4_fast_floors_null"
_CALLS: list[tuple[int, int, int, int, int, int]] = []


def _null_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Record (layer, B, Hq, Sq, Sk, D) and return zeros shaped like HF's attention output [B, Sq, Hq, Dv]."""
    B, Hq, Sq, D = query.shape
    _CALLS.append((module.layer_idx, B, Hq, Sq, key.shape[-2], D))
    return query.new_zeros(B, Sq, Hq, value.shape[-1]), None


AttentionInterface.register(NULL_ATTENTION, _null_attention)


def _prefix_pairs(n: int, window: int | None) -> int:
    """Visible pairs of the first ``n`` query rows of a causal mask starting at position 0."""
    if window is None or n <= window:
        return n * (n + 1) // 2
    return window * (window + 1) // 2 + (n - window) * window


def visible_pairs(sq: int, sk: int, window: int | None = None) -> int:
    """Visible (query, key) pairs of the last ``sq`` queries over ``sk`` keys, causal, within ``window``."""
    return _prefix_pairs(sk, window) - _prefix_pairs(sk - sq, window)


def _layer_shape(cfg: Any, i: int) -> tuple[int, int, int | None]:
    """(query heads, head dim, window or None) of layer ``i`` from the config (transformers 5.23 folds
    ``global_head_dim`` into ``per_layer_config[i].head_dim`` of full layers)."""
    layer = cfg.per_layer_config[i]
    sliding = cfg.layer_types[i] == "sliding_attention"
    return layer.num_attention_heads, layer.head_dim, cfg.sliding_window if sliding else None


def forward_flops(preset: str, seq: int, batch: int = 1, logits: str = "last") -> dict[str, Any]:
    """Counted matmul FLOPs, analytic attention-core FLOPs and their parts for one forward of ``preset``."""
    cfg = text_config(preset)
    cfg._attn_implementation = NULL_ATTENTION
    cfg._experts_implementation = "batched_mm"
    with torch.device("meta"):
        model = model_class(preset)(cfg).eval()
        ids = torch.zeros(batch, seq, dtype=torch.long)
    _CALLS.clear()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(input_ids=ids, use_cache=False, logits_to_keep=1 if logits == "last" else 0)
    counts = counter.get_flop_counts()
    matmul = sum(v for op, v in counts["Global"].items() if "attention" not in str(op))
    by_suffix = {s: sum(sum(ops.values()) for name, ops in counts.items() if name.endswith(s))
                 for s in (".lm_head", ".experts")}
    core = 0
    rows_per_layer: list[int] = []
    for layer, B, Hq, Sq, Sk, D in _CALLS:
        hq, d, window = _layer_shape(cfg, layer)
        if (Hq, D, Sk) != (hq, d, seq):
            raise RuntimeError(f"layer {layer}: ran Hq={Hq} D={D} Sk={Sk}, config says Hq={hq} D={d} Sk={seq}")
        core += 4 * B * hq * d * visible_pairs(Sq, Sk, window)
        rows_per_layer.append(Sq)
    notes: list[str] = []
    if getattr(cfg, "enable_moe_block", False):
        H, I, E, k = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.top_k_experts
        analytic = batch * sum(rows_per_layer) * k * (2 * H * 2 * I + 2 * I * H)
        if by_suffix[".experts"] != analytic:
            notes.append(f"experts counted {by_suffix['.experts']:.4g}, replaced by analytic {analytic:.4g}")
            matmul += analytic - by_suffix[".experts"]
            by_suffix[".experts"] = analytic
        notes.append(f"experts: top-{k} of {E}, counted via HF batched_mm (= analytic); router 2*H*E per token")
    shared = getattr(cfg, "num_kv_shared_layers", 0) or 0
    if shared:
        notes.append(f"{shared} KV-shared layers skip k/v projections"
                     + (f"; they ran {min(rows_per_layer[-shared:])} row(s) (HF slices them to the kept logits)"
                        if logits == "last" else ""))
    return {"preset": get_preset(preset).name, "batch": batch, "seq": seq, "logits": logits,
            "matmul_flops": matmul, "lm_head_flops": by_suffix[".lm_head"], "experts_flops": by_suffix[".experts"],
            "attn_core_flops": core, "total_flops": matmul + core, "layer_rows": rows_per_layer, "notes": notes}


def floor_rows(presets: list[str], seqs: list[int], batch: int, logits: str, tflops: float) -> list[dict[str, Any]]:
    """One row per (preset, seq), with ``floor_ms`` at ``tflops``; unavailable presets are skipped with a message."""
    rows = []
    for preset in presets:
        for seq in seqs:
            try:
                row = forward_flops(preset, seq, batch, logits)
            except RuntimeError as exc:
                if "gemma4_unified" not in str(exc):
                    raise
                print(f"skipping {preset}: {exc}", file=sys.stderr)
                break
            row["tflops_peak"] = tflops
            row["floor_ms"] = row["total_flops"] / (tflops * 1e12) * 1e3
            rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table (TFLOP with 3 decimals), then each preset's notes once."""
    head = ("| preset | B | S | logits | matmul TFLOP | of which lm_head | of which experts | attn-core TFLOP "
            "| total TFLOP | floor ms @ {:g} TFLOP/s |")
    lines = [head.format(rows[0]["tflops_peak"] if rows else 0), "|" + " --- |" * 10]
    for r in rows:
        t = [f"{r[k] / 1e12:.3f}" if r[k] else "-" for k in ("matmul_flops", "lm_head_flops", "experts_flops",
                                                              "attn_core_flops", "total_flops")]
        lines.append(f"| {r['preset']} | {r['batch']} | {r['seq']} | {r['logits']} | " + " | ".join(t)
                     + f" | {r['floor_ms']:.3f} |")
    seen: set[str] = set()
    for r in rows:
        if r["preset"] not in seen and r["notes"]:
            seen.add(r["preset"])
            lines.append(f"\n{r['preset']}: " + "; ".join(r["notes"]))
    lines.append("\nmatmul: FlopCounterMode on HF's model (meta device); attn-core: 4*B*Hq*D*visible pairs per "
                 "layer; norms, RoPE, softmax, activations and gathers excluded.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", nargs="+", default=["E2B"], help=f"real presets: {', '.join(REAL_PRESETS)}")
    ap.add_argument("--seq", nargs="+", type=int, default=[1024, 4096, 8192])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tflops", type=float, default=786.0, help="peak TFLOP/s the floor divides by")
    ap.add_argument("--logits", choices=("last", "all"), default="last")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = ap.parse_args(argv)
    rows = floor_rows(args.preset, args.seq, args.batch, args.logits, args.tflops)
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
