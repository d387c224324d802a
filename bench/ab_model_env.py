"""Same-machine A/B of whole-model rows under different environment settings (e.g. a pinned kernel config), with
the variants interleaved round by round: machine-to-machine spread (2-5 %) is larger than most single-kernel changes
show at model level, so a change is judged against its baseline on one GPU, in one process.

    python bench/ab_model_env.py --variant base 'GEMMA4_FAST_LINEAR_SOFTCAP_CONFIG={"WS": 0, ...}' --variant new '' \
        [--preset E2B] [--seq 4096 8192] [--what forward cache_resid] [--rounds 5] [--calls 5]

Each ``--variant NAME SETTINGS`` sets ``VAR=VALUE`` pairs (separated by ``;``; empty: the defaults) in
``os.environ`` before its calls; kernels that read their pinned config per call (``pinned_config``) follow it. The
bridge (fast kernels, prefill graphs, random bf16 weights of the preset) is built once. A round times ``--calls``
calls of each variant (CUDA events around each call) after dropping every captured graph and two untimed calls (the
eager warm-up and the capture), so each variant replays graphs captured under its own settings; the row keeps the
median over all of a variant's timed calls and each round's median. Writes ``model_env_ab.json`` (``$GEMMA4_FAST_RESULTS`` or
``bench/results/<gpu>/``).
"""
from __future__ import annotations

import argparse
import os
import statistics

import torch

from common import print_table, write_results


def _settings(text: str) -> dict[str, str]:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        key, _, value = part.partition("=")
        out[key.strip()] = value
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", nargs=2, action="append", metavar=("NAME", "SETTINGS"), required=True)
    ap.add_argument("--preset", default="E2B")
    ap.add_argument("--seq", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--what", nargs="+", choices=("forward", "cache_resid"), default=["forward", "cache_resid"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=5)
    args = ap.parse_args()
    import gemma4_fast
    from gemma4_fast.models import build_model, offline_tokenizer
    from transformer_lens.model_bridge import TransformerBridge

    model = build_model(args.preset, torch.bfloat16, "cuda", attn_implementation="eager",
                        experts_implementation="grouped_mm")
    bridge = TransformerBridge.boot_transformers(f"google/gemma-4-{args.preset}", hf_model=model,
                                                 tokenizer=offline_tokenizer())
    gemma4_fast.enable_fast_kernels(bridge, True)
    graphs = gemma4_fast.enable_prefill_graphs(bridge)
    variants = {name: _settings(text) for name, text in args.variant}
    saved = {k: os.environ.get(k) for v in variants.values() for k in v}

    def use(settings: dict[str, str]) -> None:
        for key in saved:
            if key in settings and settings[key] != "":
                os.environ[key] = settings[key]
            else:
                os.environ.pop(key, None)

    rows = []
    for s in args.seq:
        ids = torch.randint(4, 260000, (1, s), device="cuda")
        ids[0, 0] = 2
        calls = {"forward": lambda: bridge(ids),
                 "cache_resid": lambda: bridge.run_with_cache(
                     ids, names_filter=lambda n: n.endswith("hook_resid_post"))}
        for what in args.what:
            fn = calls[what]
            times: dict[str, list[list[float]]] = {name: [] for name in variants}
            with torch.no_grad():
                for name, settings in variants.items():
                    use(settings)
                    for _ in range(2):
                        fn()
                for _ in range(args.rounds):
                    for name, settings in variants.items():
                        use(settings)
                        graphs.clear()
                        fn()
                        fn()
                        torch.cuda.synchronize()
                        each = []
                        for _ in range(args.calls):
                            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                            start.record()
                            out = fn()
                            end.record()
                            torch.cuda.synchronize()
                            del out
                            each.append(start.elapsed_time(end))
                        times[name].append(each)
            base = None
            for name, rounds in times.items():
                flat = [t for r in rounds for t in r]
                ms = statistics.median(flat)
                base = base or ms
                rows.append({"preset": args.preset, "what": what, "S": s, "variant": name, "settings": variants[name],
                             "ms": round(ms, 3), "round_ms": [round(statistics.median(r), 3) for r in rounds],
                             "x_first": round(base / ms, 4)})
    use({})
    for key, value in saved.items():
        if value is not None:
            os.environ[key] = value
    path = write_results("model_env_ab", rows)
    print(f"wrote {path}")
    print_table(rows, ["preset", "what", "S", "variant", "ms", "x_first", "round_ms"])


if __name__ == "__main__":
    main()
