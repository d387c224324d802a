"""Kernel configs for the attention kernels: candidate generators, tuned tables, pinning.

Three kernel families, each with a named generator of candidate configs and one pinning variable
(a JSON object of meta-parameters, e.g. ``'{"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4,
"num_stages": 1}'``) that overrides everything (the CPU tests pin small tiles):

- ``attention_fwd_configs`` (prefill kernel ``attention_fwd_kernel``): ``BLOCK_M`` query rows,
  ``BLOCK_N`` keys per step; pinned by ``GEMMA4_FAST_ATTN_CONFIG``.
- ``attention_split_configs`` (decode / short-query kernel ``attention_split_fwd_kernel``):
  ``BLOCK_N`` keys per step; pinned by ``GEMMA4_FAST_ATTN_SPLIT_CONFIG``.
- ``attention_scores_configs`` (scores / pattern emission ``attention_scores_fwd_kernel``):
  ``BLOCK_M`` x ``BLOCK_N`` tiles, ``BLOCK_DK`` head-dim chunk; pinned by
  ``GEMMA4_FAST_ATTN_SCORES_CONFIG``.

Selection (``select_config``): pinned config, else the per-device tuned table
``configs/<gpu-slug>.json`` (written by ``bench/bench_attention.py --tune``), keyed
``"<kind>/<block_d>/<dtype>/<mode>"`` with an optional ``"/<length bucket>"`` refinement, else the
generator's first candidate for the device's compute capability. Autotuning at run time is avoided:
a head_dim-512 kernel compiles for seconds per candidate.

The generators take the compute capability: the H100 lists hold head_dim 256/512 configs whose
shared memory (up to ~224 KB) exceeds the A100's 164 KB; every other list is the A100-safe one.
``tests/test_attention_compile.py`` compiles every candidate for the targets it is offered on (sm_90
for the H100 lists, sm_80 and sm_90 for the rest) and checks it fits.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Optional

import torch

from .._common import next_power_of_2, pinned_config

ENV_FWD = "GEMMA4_FAST_ATTN_CONFIG"
ENV_SPLIT = "GEMMA4_FAST_ATTN_SPLIT_CONFIG"
ENV_SCORES = "GEMMA4_FAST_ATTN_SCORES_CONFIG"

CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def _cfg(bm: int, bn: int, warps: int, stages: int, dv: int = 0, min_blocks: int = 0,
         tma: bool = False, hopper: bool = False) -> dict[str, int]:
    cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "num_warps": warps, "num_stages": stages}
    if hopper:
        cfg["HOPPER"] = 1
    if dv:
        cfg["BLOCK_DV"] = dv
    if min_blocks:
        cfg["MIN_BLOCKS"] = min_blocks
    if tma:
        cfg["TMA"] = 1
    return cfg


def block_d(head_dim: int) -> int:
    """Padded head dim the kernels work on: the next power of two, at least 16 (``tl.dot``'s minimum)."""
    return max(16, next_power_of_2(head_dim))


def heads_inner_default(head_dim: int, window: Optional[int], causal: bool, sq: int) -> bool:
    """Launch order of a prefill when its config does not set ``HEADS_INNER``: every head's heaviest query block
    first (True) for causal launches without a window at head_dim <= 256 and up to 8192 queries, else one head's
    query blocks after another. Measured on the H100 (``bench/ab_attention_order.py``, both orders as graph
    replays in one process): head_dim 256 causal 16q/8kv 1.17x at 4k and 0.99x at 16k; head_dim 512 (column
    split) 0.94-0.99x at 4k-16k with 16q/2kv; a 512-key window 0.97x. Short causal launches at head_dim 256
    otherwise end on the long blocks of the last heads (about 1.3x the ideal time at 4k in a list-scheduling
    model); head_dim 512 keeps a head's K/V in L2 across its query blocks."""
    return causal and window is None and head_dim <= 256 and sq <= 8192


def attention_fwd_configs(head_dim: int, elem_bytes: int = 2, capability: int = 90) -> list[dict[str, int]]:
    """Candidate prefill configs for ``head_dim``, element size (2: bf16/fp16, 4: fp32) and compute
    capability (90: H100, 228 KB shared; anything else: the A100's 164 KB), best guess first.

    ``BLOCK_M`` query rows and ``BLOCK_N`` keys per step; ``BLOCK_DV`` (when set, < padded head dim)
    splits the output columns over programs that each recompute ``q @ k^T``; ``TMA: 1`` (Hopper lists
    only) moves Q/K/V/O through the copy engine (tensor descriptors; the launcher falls back to pointer
    loads for tensors the engine cannot address); ``FOLD: 0`` turns off the scale-into-exponent fold;
    ``HEADS_INNER`` (0 / 1) fixes the launch order (``attention_fwd_kernel``; the public op sets it from
    ``heads_inner_default`` when the config does not); ``HOPPER: 1`` (head_dim 512, H100 list first) runs the
    Gluon kernel of ``hopper.py`` (64 query rows, 8 warps, ``BLOCK_N`` keys per step, no column split; with
    K is V ``KV_BLOCK_N`` keys and a ring of ``KV_STAGES`` tiles) where ``hopper.hopper_unsupported`` accepts
    the call, else the list's first portable config; ``WS: 1`` (H100 lists first) runs the warp-specialized Gluon
    kernels of ``hopper_ws.py`` instead: at head_dim 256 128 query rows, a producer warp, two consumer warpgroups;
    at head_dim 512 with separate K and V a score warpgroup and two output warpgroups. The register accumulator is
    ``BLOCK_M x BLOCK_DV`` fp32 over ``32 * num_warps`` threads: head_dim 512 with ``BLOCK_M = 128`` needs
    ``BLOCK_DV = 256`` (128 registers a thread with 8 warps, no spills), and the Q tile (``BLOCK_M x 512``, 128 KB)
    stays in shared memory beside the K/V stages, which is why those configs are H100-only.
    """
    bd = block_d(head_dim)
    if elem_bytes >= 4:
        if bd <= 128:
            return [_cfg(32, 32, 4, 1), _cfg(16, 16, 4, 1)]
        return [_cfg(16, 16, 4, 1), _cfg(16, 32, 4, 1)]
    if bd <= 64:
        return [_cfg(128, 64, 4, 3), _cfg(128, 128, 8, 3), _cfg(64, 64, 4, 3)]
    if bd <= 128:
        base = [_cfg(128, 64, 8, 3), _cfg(128, 128, 8, 2), _cfg(64, 64, 4, 3), _cfg(128, 32, 4, 3)]
        if capability == 90:
            base += [_cfg(128, 128, 8, 2, tma=True)]
        return base
    if bd <= 256:
        if capability == 90:
            return [dict(_cfg(128, 64, 8, 2, hopper=True), WS=1), _cfg(128, 64, 8, 2), _cfg(128, 32, 8, 2),
                    _cfg(128, 32, 8, 3), _cfg(64, 64, 4, 2),
                    _cfg(128, 64, 8, 1), _cfg(128, 64, 8, 2, tma=True), _cfg(64, 64, 4, 3, tma=True)]
        return [_cfg(128, 32, 8, 2), _cfg(128, 64, 8, 2), _cfg(64, 64, 4, 2), _cfg(128, 64, 8, 1)]
    if capability == 90:
        return [dict(_cfg(64, 32, 8, 1, hopper=True), KV_BLOCK_N=64, KV_STAGES=2, WS=1), _cfg(128, 32, 8, 2, 256),
                _cfg(128, 16, 8, 3, 256), _cfg(128, 64, 8, 1, 256), _cfg(64, 32, 8, 2), _cfg(64, 32, 4, 2, 256),
                _cfg(128, 32, 8, 2, 256, tma=True), _cfg(64, 32, 4, 3, 256, tma=True)]
    return [_cfg(64, 32, 4, 2, 256), _cfg(128, 16, 8, 1, 256), _cfg(64, 32, 8, 2), _cfg(64, 16, 8, 3)]


def portable_config(head_dim: int, elem_bytes: int = 2, capability: int = 90) -> dict[str, int]:
    """First candidate of ``attention_fwd_configs`` that runs on the portable kernel (where a ``HOPPER`` config
    does not apply to a call)."""
    return next(c for c in attention_fwd_configs(head_dim, elem_bytes, capability) if not c.get("HOPPER"))


def attention_split_configs(head_dim: int, elem_bytes: int = 2, capability: int = 90) -> list[dict[str, int]]:
    """Candidate configs of the split-key (decode) kernel: ``BLOCK_N`` keys per step, warps, pipeline
    depth, and launcher keys: ``MIN_BLOCKS`` (fewest key blocks per split, default 4), ``MAX_SPLITS`` (most
    splits per KV head, default 128), ``PROGRAMS_PER_SM`` (split programs per SM over all (batch, KV head) pairs,
    default 4), ``COMBINE_D`` (output columns per program of the combine kernel, default the padded head dim),
    ``COMBINE_S`` (splits the combine kernel reads per step, default all of them up to 8192 partial elements),
    ``PDL`` (0: plain launch of the combine on sm_90). ``KEYS_AS_ROWS: 1`` runs
    ``decode.attention_decode_fwd_kernel`` (keys as the MMA rows: warpgroup MMAs for ``v^T @ p^T`` on sm_90).

    The head_dim-512 list leads with the H100's decode winners of ``bench/probe_decode.py``: one wave of programs
    (``PROGRAMS_PER_SM: 1``), every split combined in one step."""
    bd = block_d(head_dim)
    if elem_bytes >= 4:
        return [_cfg(0, 16, 4, 1), _cfg(0, 32, 4, 1)]
    if bd <= 128:
        return [_cfg(0, 64, 4, 3), _cfg(0, 128, 4, 2), _cfg(0, 32, 4, 4), _cfg(0, 64, 4, 3, min_blocks=8)]
    if bd <= 256:
        return [_cfg(0, 32, 4, 3), _cfg(0, 64, 4, 2), _cfg(0, 64, 8, 3), _cfg(0, 32, 4, 3, min_blocks=8),
                dict(_cfg(0, 32, 4, 3), COMBINE_D=128),
                dict(_cfg(0, 32, 4, 3, min_blocks=2), MAX_SPLITS=256, COMBINE_D=128),
                dict(_cfg(0, 16, 4, 3, min_blocks=2), MAX_SPLITS=256, COMBINE_D=32),
                dict(_cfg(0, 16, 4, 3, min_blocks=2), MAX_SPLITS=256, PROGRAMS_PER_SM=1, COMBINE_D=64),
                dict(_cfg(0, 32, 4, 3, min_blocks=2), KEYS_AS_ROWS=1, MAX_SPLITS=256, PROGRAMS_PER_SM=1, COMBINE_D=64)]
    one_wave = dict(MIN_BLOCKS=2, MAX_SPLITS=256, PROGRAMS_PER_SM=1)
    return [dict(_cfg(0, 32, 4, 3), KEYS_AS_ROWS=1, COMBINE_D=64, **one_wave),
            dict(_cfg(0, 32, 4, 3), KEYS_AS_ROWS=1, COMBINE_D=128, **one_wave),
            dict(_cfg(0, 32, 4, 3), KEYS_AS_ROWS=1, COMBINE_D=64, MIN_BLOCKS=2, MAX_SPLITS=256, PROGRAMS_PER_SM=2),
            dict(_cfg(0, 32, 8, 3), COMBINE_D=64, **one_wave), dict(_cfg(0, 16, 4, 3), COMBINE_D=64, **one_wave),
            dict(_cfg(0, 16, 4, 3), COMBINE_D=64, MIN_BLOCKS=2, MAX_SPLITS=256, PROGRAMS_PER_SM=2),
            dict(_cfg(0, 16, 4, 3), COMBINE_D=128), dict(_cfg(0, 16, 4, 2, min_blocks=2), MAX_SPLITS=512, COMBINE_D=64)]


def attention_scores_configs(head_dim: int, elem_bytes: int = 2, capability: int = 90) -> list[dict[str, int]]:
    """Candidate configs of the scores / pattern kernel (``BLOCK_DK``: head-dim chunk per dot)."""
    bd = block_d(head_dim)
    dk = min(bd, 64 if elem_bytes >= 4 else 128)
    if elem_bytes >= 4:
        return [dict(_cfg(32, 32, 4, 1), BLOCK_DK=dk)]
    return [dict(_cfg(128, 64, 8, 2), BLOCK_DK=dk), dict(_cfg(64, 64, 4, 2), BLOCK_DK=dk),
            dict(_cfg(128, 128, 8, 2), BLOCK_DK=dk)]


GENERATORS = {"fwd": attention_fwd_configs, "split": attention_split_configs,
              "scores": attention_scores_configs}
PIN_ENV = {"fwd": ENV_FWD, "split": ENV_SPLIT, "scores": ENV_SCORES}


def length_bucket(n: int) -> int:
    """Power-of-two bucket of a key length, clamped to [1024, 65536]."""
    return min(max(next_power_of_2(n), 1024), 65536)


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


def table_key(kind: str, head_dim: int, dtype: torch.dtype, mode: str, length: Optional[int] = None) -> str:
    """Key of the tuned table: ``kind/block_d/dtype/mode[/length bucket]``; mode is causal/window/full."""
    key = f"{kind}/{block_d(head_dim)}/{dtype_name(dtype)}/{mode}"
    return key if length is None else f"{key}/{length_bucket(length)}"


@functools.lru_cache(maxsize=None)
def _table(slug: str) -> dict[str, dict[str, int]]:
    path = CONFIG_DIR / f"{slug}.json"
    if not path.is_file():
        return {}
    doc = json.loads(path.read_text())
    return {k: {kk: int(vv) for kk, vv in v.items()} for k, v in doc.get("configs", {}).items()}


def _device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    return "-".join(torch.cuda.get_device_name(device).lower().replace("/", " ").split())


def capability_of(device: torch.device) -> int:
    """90 for Hopper, else the A100-class default 80 (the CPU interpreter counts as 90)."""
    if device.type != "cuda":
        return 90
    major, minor = torch.cuda.get_device_capability(device)
    return 90 if (major, minor) == (9, 0) else 80


def select_config(kind: str, head_dim: int, dtype: torch.dtype, mode: str, length: int,
                  device: torch.device) -> dict[str, int]:
    """Config for one launch: pinned (env var, overriding the default's fields), tuned table for the
    device, or the generator's first candidate for the device's capability (cached per key: this runs
    on every call, ahead of the launch)."""
    pinned = pinned_config(PIN_ENV[kind])
    if pinned is not None:
        default = dict(GENERATORS[kind](head_dim, dtype.itemsize, capability_of(device))[0])
        default.pop("BLOCK_DV", None)
        default.pop("HOPPER", None)
        default.update(pinned)
        return default
    return dict(_lookup(kind, head_dim, dtype, mode, length_bucket(length), device))


@functools.lru_cache(maxsize=1024)
def _lookup(kind: str, head_dim: int, dtype: torch.dtype, mode: str, bucket: int,
            device: torch.device) -> dict[str, int]:
    table = _table(_device_slug(device))
    for key in (table_key(kind, head_dim, dtype, mode, bucket), table_key(kind, head_dim, dtype, mode)):
        if key in table:
            return dict(table[key])
    return dict(GENERATORS[kind](head_dim, dtype.itemsize, capability_of(device))[0])
