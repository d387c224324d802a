"""Launch configs for the grouped expert matmuls: per-device JSON tables, a default rule, a pin.

A config is ``{"BLOCK_M": m, "gate_up": {...}, "down": {...}}``: ``BLOCK_M`` is shared by both GEMMs
(they read the same token/expert alignment); each GEMM entry holds ``BLOCK_N``, ``BLOCK_K``,
``GROUP_M``, ``num_warps`` and ``num_stages``.

Lookup order (``get_config``):

1. ``GEMMA4_FAST_MOE_CONFIG`` (JSON object of ints, e.g. ``{"BLOCK_M": 16, "BLOCK_N": 16,
   "BLOCK_K": 16, "num_warps": 4, "num_stages": 1}``) pins one config for both GEMMs (tests).
2. A tuned table ``configs/E=<E>,N=<I>,H=<H>,device_name=<GPU name>.json`` (spaces -> ``_``), keyed by
   the token count ``T`` rounded up to a power of two (the largest key when ``T`` exceeds all keys).
   Tables are tuned at the model's top-k (8 for 26B-A4B). Regenerate on the target GPU with
   ``python bench/bench_moe.py --tune`` (writes ``moe_tuned_configs.json`` under the results folder;
   copy it into ``kernels/moe/configs/`` under the name above).
3. ``default_config``: a size rule (decode tiles for a handful of rows per expert, wgmma-sized tiles
   for prefill).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from .._common import next_power_of_2, pinned_config

PIN_ENV = "GEMMA4_FAST_MOE_CONFIG"
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
GEMM_KEYS = ("BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages")


def table_name(num_experts: int, inter: int, hidden: int, device_name: str) -> str:
    """File name of the tuned table for one expert shape and GPU."""
    return f"E={num_experts},N={inter},H={hidden},device_name={device_name.replace(' ', '_')}.json"


@functools.lru_cache(maxsize=None)
def load_table(num_experts: int, inter: int, hidden: int, device_name: str) -> dict[int, dict[str, Any]] | None:
    """The tuned ``{T: config}`` table for this shape and GPU, or None when none ships."""
    path = CONFIG_DIR / table_name(num_experts, inter, hidden, device_name)
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    return {int(k): v for k, v in doc["configs"].items()}


def _gemm(block_n: int, block_k: int, group_m: int, warps: int, stages: int) -> dict[str, int]:
    return dict(zip(GEMM_KEYS, (block_n, block_k, group_m, warps, stages)))


def default_config(num_tokens: int, top_k: int, num_experts: int) -> dict[str, Any]:
    """Config used when no table ships for the GPU/shape: chosen from rows per expert."""
    rows_per_expert = num_tokens * top_k / max(num_experts, 1)
    if rows_per_expert <= 2:
        return {"BLOCK_M": 16, "gate_up": _gemm(32, 128, 1, 4, 4), "down": _gemm(64, 64, 1, 4, 4)}
    if rows_per_expert <= 24:
        return {"BLOCK_M": 32, "gate_up": _gemm(64, 64, 1, 4, 4), "down": _gemm(64, 64, 1, 4, 4)}
    return {"BLOCK_M": 64, "gate_up": _gemm(64, 64, 8, 4, 4), "down": _gemm(128, 64, 8, 4, 4)}


def config_candidates(num_tokens: int, top_k: int, num_experts: int) -> list[dict[str, Any]]:
    """Candidate configs the tuner times for one token count (shared-memory safe on sm_80 and sm_90)."""
    rows_per_expert = num_tokens * top_k / max(num_experts, 1)
    out: list[dict[str, Any]] = []
    if rows_per_expert <= 2:
        for gu in (_gemm(32, 128, 1, 4, 4), _gemm(32, 256, 1, 4, 3), _gemm(16, 256, 1, 4, 4),
                   _gemm(64, 128, 1, 4, 4), _gemm(32, 64, 1, 4, 6)):
            for dn in (_gemm(64, 64, 1, 4, 4), _gemm(32, 64, 1, 4, 4), _gemm(128, 64, 1, 4, 4),
                       _gemm(64, 128, 1, 4, 3)):
                out.append({"BLOCK_M": 16, "gate_up": gu, "down": dn})
        return out
    block_ms = (16, 32, 64) if rows_per_expert <= 24 else (64, 128)
    for bm in block_ms:
        if bm <= 32:
            gus = (_gemm(32, 128, 1, 4, 4), _gemm(64, 64, 1, 4, 4), _gemm(64, 128, 1, 4, 3))
            dns = (_gemm(64, 64, 1, 4, 4), _gemm(128, 64, 1, 4, 4), _gemm(64, 128, 1, 4, 3))
        elif bm == 64:
            gus = (_gemm(64, 64, 8, 4, 4), _gemm(128, 64, 8, 8, 3), _gemm(64, 128, 8, 4, 3))
            dns = (_gemm(128, 64, 8, 4, 4), _gemm(256, 64, 8, 8, 3), _gemm(128, 128, 8, 8, 3))
        else:
            gus = (_gemm(64, 64, 8, 8, 4), _gemm(128, 64, 8, 8, 3), _gemm(64, 128, 8, 8, 3),
                   _gemm(128, 64, 8, 8, 4), _gemm(128, 64, 16, 8, 3))
            dns = (_gemm(128, 64, 8, 8, 4), _gemm(256, 64, 8, 8, 3), _gemm(128, 128, 8, 8, 3),
                   _gemm(256, 64, 8, 8, 4), _gemm(256, 64, 16, 8, 3))
        if rows_per_expert >= 64:
            gus += _WIDE[bm]["gate_up"]
            dns += _WIDE[bm]["down"]
        out.extend({"BLOCK_M": bm, "gate_up": gu, "down": dn} for gu in gus for dn in dns)
    return out


#: Extra tiles the tuner times for prefill sizes (>= 64 rows per expert): deeper pipelines, wider groups,
#: 32-wide K steps for the short down GEMM (K = I = 704).
_WIDE = {
    64: {"gate_up": (_gemm(128, 64, 8, 4, 4), _gemm(128, 64, 16, 8, 4), _gemm(64, 64, 8, 4, 5)),
         "down": (_gemm(256, 64, 8, 8, 4), _gemm(128, 64, 8, 4, 5), _gemm(256, 32, 8, 8, 5))},
    128: {"gate_up": (_gemm(128, 64, 4, 8, 4), _gemm(128, 64, 2, 8, 4), _gemm(128, 64, 1, 8, 4),
                      _gemm(128, 64, 32, 8, 4), _gemm(128, 32, 8, 8, 6), _gemm(64, 64, 8, 4, 4)),
          "down": (_gemm(256, 64, 4, 8, 4), _gemm(256, 64, 2, 8, 4), _gemm(256, 64, 1, 8, 4),
                   _gemm(256, 64, 32, 8, 4), _gemm(256, 32, 8, 8, 6), _gemm(128, 64, 8, 4, 4))},
}


def pinned() -> dict[str, Any] | None:
    """The config pinned by ``GEMMA4_FAST_MOE_CONFIG`` (same tiles for both GEMMs), or None."""
    raw = pinned_config(PIN_ENV)
    if raw is None:
        return None
    if "BLOCK_M" not in raw:
        raise ValueError(f"{PIN_ENV} must name BLOCK_M, got {raw}")
    gemm = {"BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 1, "num_warps": 4, "num_stages": 2}
    gemm.update({k: v for k, v in raw.items() if k in GEMM_KEYS})
    return {"BLOCK_M": raw["BLOCK_M"], "gate_up": dict(gemm), "down": dict(gemm)}


def for_element_size(config: dict[str, Any], element_size: int) -> dict[str, Any]:
    """Scale a 2-byte (bf16/fp16) config to wider elements: ``BLOCK_K`` shrinks (>= 16) so each pipeline
    stage, hence shared memory, stays the size the config was tuned and checked at."""
    if element_size <= 2:
        return config
    shrink = element_size // 2
    return {"BLOCK_M": config["BLOCK_M"],
            **{g: dict(config[g], BLOCK_K=max(16, config[g]["BLOCK_K"] // shrink)) for g in ("gate_up", "down")}}


def get_config(num_tokens: int, top_k: int, num_experts: int, inter: int, hidden: int,
               device_name: str | None, *, element_size: int = 2) -> dict[str, Any]:
    """Pinned config, else the tuned table's bucket, else ``default_config``; scaled to ``element_size``
    bytes per input element (tables and the default rule are for bf16/fp16)."""
    pin = pinned()
    if pin is not None:
        return pin
    table = load_table(num_experts, inter, hidden, device_name) if device_name else None
    if table:
        bucket = next_power_of_2(max(num_tokens, 1))
        keys = sorted(table)
        key = next((k for k in keys if k >= bucket), keys[-1])
        return for_element_size(table[key], element_size)
    return for_element_size(default_config(num_tokens, top_k, num_experts), element_size)


def shipped_configs() -> list[dict[str, Any]]:
    """Every distinct config in the shipped tables plus the default rule's (for the compile test)."""
    seen: dict[str, dict[str, Any]] = {}
    for path in sorted(CONFIG_DIR.glob("*.json")):
        for cfg in json.loads(path.read_text())["configs"].values():
            seen[json.dumps(cfg, sort_keys=True)] = cfg
    for tokens in (1, 16, 4096):
        cfg = default_config(tokens, 8, 128)
        seen[json.dumps(cfg, sort_keys=True)] = cfg
    return list(seen.values())


_GU_SIG = dict(x_ptr="*bf16", w_ptr="*bf16", h_ptr="*bf16", sorted_ids_ptr="*i32", expert_ids_ptr="*i32",
               ntpp_ptr="*i32", idx_ptr="*i64", numel="i32", top_k="i32", N="i32", K="i32", num_m_blocks="i32",
               num_experts="i32", stride_xm="i32", stride_xk="constexpr", stride_we="i32", stride_wn="i32",
               stride_wk="constexpr", stride_hm="i32")
_DN_SIG = dict(h_ptr="*bf16", w_ptr="*bf16", out_ptr="*bf16", topk_w_ptr="*fp32", sorted_ids_ptr="*i32",
               expert_ids_ptr="*i32", ntpp_ptr="*i32", idx_ptr="*i64", numel="i32", N="i32", K="i32",
               num_m_blocks="i32", num_experts="i32", stride_hm="i32", stride_we="i32", stride_wn="i32",
               stride_wk="constexpr", stride_om="i32")
_NOT_DIV16 = {"numel", "top_k", "num_m_blocks"}


def compile_config(config: dict[str, Any], capability: int, *, hidden: int = 2816, inter: int = 704,
                   hinted: bool = True, fused_route: bool = False, dtype: str = "bf16") -> dict[str, int]:
    """Compile both GEMM kernels of ``config`` for ``sm_<capability>``; shared bytes per kernel.

    ``dtype`` is the Triton element type of x and the weights (``"bf16"``, ``"fp16"``, ``"fp32"``);
    for fp32 the config is first scaled with ``for_element_size`` as ``moe_experts`` does.

    ``hinted`` compiles as the JIT specializes on the GPU (unit strides constant, pointers and sizes
    16-divisible); without those hints Triton does not pipeline the loads and shared memory is
    under-counted. ``fused_route`` compiles the decode variant (routing in registers, 128 pairs, 128
    experts). Needs real ``@triton.jit`` kernels (``TRITON_INTERPRET`` unset).
    """
    from .._compile_check import compile_for_target
    from .experts import moe_experts_down_fwd_kernel, moe_experts_gate_up_fwd_kernel

    if dtype == "fp32":
        config = for_element_size(config, 4)
    out = {}
    for key, kernel, sig, k_dim, extra in (
        ("gate_up", moe_experts_gate_up_fwd_kernel, _GU_SIG, hidden, {"stride_xk": 1}),
        ("down", moe_experts_down_fwd_kernel, _DN_SIG, inter, {"MUL_WEIGHT": True}),
    ):
        c = config[key]
        consts = dict(extra, stride_wk=1, BLOCK_M=config["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"],
                      GROUP_M=c["GROUP_M"], EVEN_K=k_dim % c["BLOCK_K"] == 0,
                      PRECISION="ieee" if dtype == "fp32" else "tf32",
                      FUSED_ROUTE=fused_route, ROUTE_N=128 if fused_route else 16, ROUTE_E=128 if fused_route else 16)
        full = {k: v.replace("bf16", dtype) for k, v in sig.items()}
        full.update({k: "constexpr" for k in consts})
        hints = [n for n, t in full.items() if t != "constexpr" and n not in _NOT_DIV16] if hinted else []
        out[key] = compile_for_target(kernel, full, consts, capability=capability, num_warps=c["num_warps"],
                                      num_stages=c["num_stages"], divisible=hints).shared
    return out
