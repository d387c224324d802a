"""The ``gemma4-fast`` command line (also ``python -m gemma4_fast``).

- ``gemma4-fast demo``: boot a TransformerBridge on a Gemma 4 model (default: an embedded tiny random model,
  fully offline), run ``run_with_cache`` on a prompt and print a short report.
- ``gemma4-fast presets``: list the presets with their shapes and parameter counts.
- ``gemma4-fast info``: versions, device and which kernel backend would run.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Sequence

import torch

DEFAULT_PROMPT = "The quick brown fox jumps over the lazy dog because"


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gemma4-fast", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="boot a hooked Gemma 4 bridge and print a short report")
    demo.add_argument("--model", default="tiny-moe",
                      help="a preset name (tiny ones run offline with random weights) or a local checkpoint path")
    demo.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    demo.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: fp32 on CPU, bf16 on GPU)")
    demo.add_argument("--seq-len", type=int, default=None,
                      help="run on a random token sequence of this length instead of the prompt")
    demo.add_argument("--prompt", default=DEFAULT_PROMPT)
    demo.add_argument("--fast-kernels", default="auto", choices=["auto", "true", "false"],
                      help="use the fast kernels: auto (CUDA if present), true (required), false (HF delegation)")
    demo.add_argument("--top-k", type=int, default=5)
    demo.add_argument("--generate", type=int, default=0, metavar="N",
                      help="also greedy-generate N tokens with bridge.generate (CUDA-graph decode on the fast path)")
    sub.add_parser("presets", help="list the presets")
    sub.add_parser("info", help="versions, device and kernel backend")
    return ap


def _flag(value: str):
    return {"auto": "auto", "true": True, "false": False}[value]


def cmd_demo(args: argparse.Namespace) -> int:
    from . import boot_transformers
    from .models import build_model, load_model, load_tokenizer, offline_tokenizer, resolve_dtype
    from .presets import PRESETS

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(args.dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    t0 = time.perf_counter()
    if args.model in PRESETS or args.model.lower() in {k.lower() for k in PRESETS}:
        model = build_model(args.model, dtype=dtype, device=device, seed=0)
        tokenizer = offline_tokenizer()
        source = f"preset {args.model} (random weights, offline byte-level tokenizer)"
    else:
        model = load_model(args.model, dtype=dtype, device=device)
        tokenizer = load_tokenizer(args.model)
        source = f"checkpoint {args.model}"
    bridge = boot_transformers(args.model, hf_model=model, tokenizer=tokenizer, device=device, dtype=dtype,
                               fast_kernels=_flag(args.fast_kernels))
    t_boot = time.perf_counter() - t0
    if args.seq_len:
        g = torch.Generator().manual_seed(0)
        vocab = min(int(model.config.get_text_config().vocab_size), len(tokenizer))
        tokens = torch.randint(4, vocab, (1, args.seq_len), generator=g)
        tokens[0, 0] = tokenizer.bos_token_id
        tokens = tokens.to(device)
    else:
        tokens = bridge.to_tokens(args.prompt)
    with torch.no_grad():
        bridge(tokens)  # warm-up (kernel compilation, caches)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        logits, cache = bridge.run_with_cache(tokens)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t_run = time.perf_counter() - t1
    report = getattr(bridge, "fast_kernels_report", None)
    path = report().summary() if callable(report) else "HF delegation (seed TransformerBridge)"
    print("gemma4-fast demo")
    print(f"  model      : {source}, {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} params")
    print(f"  device     : {device} ({torch.cuda.get_device_name(device) if device.startswith('cuda') else 'CPU'}), {dtype}")
    print(f"  path       : {path}")
    print(f"  tokens     : {tuple(tokens.shape)}")
    names = list(cache.keys())
    print(f"  hooks      : {len(names)} cached activations, e.g.")
    wanted = ["hook_embed", "blocks.0.hook_resid_post", "blocks.0.attn.hook_pattern", "blocks.0.attn.hook_attn_scores",
              "blocks.0.ln1.hook_scale", "blocks.0.attn.hook_rot_q"]
    for name in [n for n in wanted if n in cache] or names[:4]:
        print(f"    {name:34s} {tuple(cache[name].shape)}")
    last = logits[0, -1].float()
    probs = torch.softmax(last, -1)
    top = torch.topk(probs, k=min(args.top_k, probs.numel()))
    toks = ", ".join(f"{int(i)}:{tokenizer.decode([int(i)])!r} {p:.3f}" for p, i in zip(top.values.tolist(), top.indices.tolist()))
    print(f"  next token : {toks}")
    print(f"  wall time  : boot {t_boot:.2f} s, run_with_cache {t_run * 1e3:.1f} ms")
    if args.generate > 0:
        kw = dict(max_new_tokens=args.generate, do_sample=False, stop_at_eos=False, verbose=False)
        bridge.generate(tokens, **kw)  # warm-up (compilation, graph capture)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        out = bridge.generate(tokens, **kw)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t_gen = time.perf_counter() - t2
        new = out[0, tokens.shape[-1]:].tolist()
        print(f"  generate   : {len(new)} tokens in {t_gen * 1e3:.1f} ms ({len(new) / t_gen:.1f} tok/s, prefill "
              f"included): {new[:12]}{' ...' if len(new) > 12 else ''}")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from .models import count_parameters
    from .presets import PRESETS

    for name, p in PRESETS.items():
        t = p.text
        try:
            n = f"{count_parameters(p) / 1e9:.2f}B" if not p.tiny else f"{count_parameters(p):,}"
        except RuntimeError as exc:
            n = f"n/a ({exc})"
        print(f"{name:20s} {p.family:14s} hidden {t['hidden_size']:5d} layers {t['num_hidden_layers']:3d} "
              f"heads {t['num_attention_heads']:3d} window {t['sliding_window']:5d} params {n}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    import transformers

    from .kernels._common import triton_available

    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        print(f"transformer-lens {version('transformer-lens')}")
    except PackageNotFoundError:
        print("transformer-lens is not installed")
    print(f"triton available: {triton_available()}")
    if torch.cuda.is_available():
        print(f"CUDA: {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))}):"
              " fast kernels run on Triton")
    else:
        print("CUDA: not available: the bridge stays on HF delegation (fast_kernels='auto')")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("gemma4_fast").setLevel(logging.INFO)
    args = _parser().parse_args(argv)
    from .bridge_integration import FastKernelsUnavailable

    try:
        return {"demo": cmd_demo, "presets": cmd_presets, "info": cmd_info}[args.command](args)
    except (FastKernelsUnavailable, FileNotFoundError) as exc:
        print(f"gemma4-fast: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
