"""Gemma 4 split across GPUs with the fast kernels: seed vs fast bridge, per-GPU memory, cache placement.

    python bench/multi_gpu.py [--presets 26B-A4B 31B] [--seq 1024 4096] [--n-devices 2]

For each preset a random-weight bf16 model is built directly across the GPUs (``build_model_split``: whole
decoder layers per device, accelerate dispatch as ``from_pretrained(device_map=...)`` gives), a seed
TransformerBridge is booted on it (HF delegation, eager), timed, then switched to the fast kernels with
``enable_fast_kernels`` and timed again. Checks, printed and written to ``multi_gpu.json``:

- every decoder layer's modules run on their own device, fast (the patch report);
- ``run_with_cache``: each ``blocks.i.hook_resid_post`` lives on the device of layer i;
- ``run_with_hooks`` with a pattern-zeroing hook changes the logits; ``generate`` runs with the KV cache;
- logits of the split fast bridge equal those of the same weights on one GPU (when they fit on one GPU).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import time

import torch


def _peak(n: int) -> list[float]:
    return [round(torch.cuda.max_memory_allocated(i) / 2**30, 2) for i in range(n)]


def _reset(n: int) -> None:
    for i in range(n):
        torch.cuda.reset_peak_memory_stats(i)


def _time(fn, n_dev: int, rounds: int = 3) -> float:
    fn()
    for i in range(n_dev):
        torch.cuda.synchronize(i)
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        for i in range(n_dev):
            torch.cuda.synchronize(i)
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def run_preset(name: str, seqs: list[int], n_dev: int, tok) -> list[dict]:
    import gemma4_fast
    from transformer_lens.model_bridge import TransformerBridge

    rows: list[dict] = []
    model = gemma4_fast.build_model_split(name, torch.bfloat16, device_map="balanced", n_devices=n_dev,
                                          attn_implementation="eager", experts_implementation="grouped_mm")
    placement = sorted({str(d) for d in model.hf_device_map.values()})
    layer_dev = {int(k.split(".")[2]): v for k, v in model.hf_device_map.items() if k.startswith("model.layers.")}
    print(f"== {name}: placement {placement}, layers per device "
          f"{ {d: sum(1 for v in layer_dev.values() if v == d) for d in set(layer_dev.values())} }")
    single = torch.cuda.get_device_properties(0).total_memory
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    state = ({k: v.detach().to("cpu") for k, v in model.state_dict().items()} if size < 0.7 * single else None)
    bridge = TransformerBridge.boot_transformers(name, hf_model=model, tokenizer=tok)
    emb_dev = model.get_input_embeddings().weight.device
    gen = torch.Generator().manual_seed(0)
    for mode in ("seed", "fast"):
        if mode == "fast":
            report = gemma4_fast.enable_fast_kernels(bridge, True)
            counts = report.patch.counts()
            print(f"   fast: {report.summary()}; patched {counts}")
        for s in seqs:
            ids = torch.randint(4, 260, (1, s), generator=gen)
            ids[0, 0] = 2
            ids = ids.to(emb_dev)
            _reset(n_dev)
            try:
                with torch.no_grad():
                    ms = _time(lambda: bridge(ids), n_dev)
                row = {"preset": name, "impl": mode, "S": s, "what": "bridge_forward", "ms": round(ms, 2),
                       "peak_gib_per_gpu": _peak(n_dev)}
            except torch.cuda.OutOfMemoryError as exc:
                row = {"preset": name, "impl": mode, "S": s, "what": "bridge_forward", "error": str(exc)[:200]}
            torch.cuda.empty_cache()
            print("  ", row)
            rows.append(row)
    s = min(seqs)
    ids = torch.randint(4, 260, (1, s), generator=gen)
    ids[0, 0] = 2
    ids = ids.to(emb_dev)
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_resid_post"))
        wrong = [(i, str(cache[f"blocks.{i}.hook_resid_post"].device), str(dev)) for i, dev in layer_dev.items()
                 if cache[f"blocks.{i}.hook_resid_post"].device != torch.device(dev if not isinstance(dev, int)
                                                                                 else f"cuda:{dev}")]
        zero = lambda t, hook: t * 0  # noqa: E731
        patched = bridge.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.hook_pattern", zero)])
        text = bridge.generate("The capital of", max_new_tokens=8, do_sample=False, verbose=False)
    check = {"preset": name, "what": "checks", "cache_on_layer_device": not wrong, "misplaced": wrong[:3],
             "pattern_edit_changes_logits": bool((patched - logits).abs().max() > 0),
             "generate_ok": isinstance(text, str), "devices": placement}
    if state is not None:
        del bridge, model
        gc.collect()
        torch.cuda.empty_cache()
        model = gemma4_fast.build_model(name, torch.bfloat16, "cuda:0", attn_implementation="eager",
                                        experts_implementation="grouped_mm")
        model.load_state_dict(state)
        del state
        bridge = TransformerBridge.boot_transformers(name, hf_model=model, tokenizer=tok)
        gemma4_fast.enable_fast_kernels(bridge, True)
        with torch.no_grad():
            ref = bridge(ids.to("cuda:0"))
        check["single_gpu_max_abs_diff"] = float((logits.to(ref.device).float() - ref.float()).abs().max())
        check["single_gpu_logit_scale"] = float(ref.float().abs().max())
        del ref
    else:
        check["single_gpu_max_abs_diff"] = "not run: the model does not fit one GPU"
    print("  ", check)
    rows.append(check)
    del bridge, model, logits, cache, patched
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--presets", nargs="+", default=["26B-A4B", "31B"])
    ap.add_argument("--seq", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--n-devices", type=int, default=2)
    args = ap.parse_args()
    n = torch.cuda.device_count()
    if n < args.n_devices:
        raise SystemExit(f"needs {args.n_devices} GPUs, {n} visible")
    import gemma4_fast
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    from common import write_results

    tok = gemma4_fast.offline_tokenizer()
    rows: list[dict] = []
    for name in args.presets:
        rows.extend(run_preset(name, args.seq, args.n_devices, tok))
    path = write_results("multi_gpu", rows, extra={"n_devices": args.n_devices,
                                                   "gpus": [torch.cuda.get_device_name(i) for i in range(n)]})
    print(json.dumps(rows, indent=None)[:200], "->", path)


if __name__ == "__main__":
    main()
