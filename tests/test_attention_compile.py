"""Every attention kernel config compiles for the GPUs it is offered on and fits their shared memory.

Compiled on the CPU (no GPU needed) with the specialisation a real launch gets: 16-byte aligned
pointers and strides divisible by 16 (``tt.divisibility``), without which Triton skips the async
copy pipelining and under-reports shared memory. Candidates of the H100 lists are compiled for
sm_90; the A100 lists for sm_80 and sm_90; the tuned table entries for sm_90. The full sweep is
``slow``; the default config of each kind runs always.

The compiles run in a subprocess with ``TRITON_INTERPRET=0`` (under the interpreter, which the CPU
test session turns on, ``@triton.jit`` yields functions the compiler cannot take); this file is also
that subprocess's entry point.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from gemma4_fast.kernels._compile_check import SHARED_LIMIT  # noqa: E402
from gemma4_fast.kernels.attention import configs as C  # noqa: E402

HEAD_DIMS = [64, 128, 256, 512]


def _signature(kernel, dt: str, constexprs: dict) -> dict[str, str]:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ("Q", "K", "V", "O", "OUT"):
            sig[name] = "*" + dt
        elif name in ("LSE", "OP", "MP", "LP"):
            sig[name] = "*fp32"
        elif name == "KPM":
            sig[name] = "*u8"
        elif name == "KVLEN":
            sig[name] = "*i32"
        elif name in ("qk_scale", "cap_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _kernels():
    from gemma4_fast.kernels.attention import fwd, pattern
    return fwd, pattern


def compile_like_launch(kernel, dt: str, constexprs: dict, capability: int, num_warps: int, num_stages: int,
                        descriptors: dict | None = None) -> int:
    """Compile for ``sm_<capability>`` with launch-like alignment; returns shared bytes.

    ``descriptors``: ``{arg name: block shape}`` of arguments passed as tensor descriptors (TMA configs).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = _signature(kernel, dt, constexprs)
    for name, block in (descriptors or {}).items():
        sig[name] = f"tensordesc<{dt}[{','.join(str(b) for b in block)}]>"
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
             if sig[n].startswith("*") or (n.startswith("stride_") and n != "stride_kpmb")}
    out = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs),
                         target=GPUTarget("cuda", capability, 32),
                         options={"num_warps": num_warps, "num_stages": num_stages})
    return int(out.metadata.shared)


def compile_hopper(head_dim: int, dt: str, cfg: dict, *, binary: bool = False):
    """Compile, for sm_90, the Gluon kernel that ``attention_hopper_fwd`` launches for ``head_dim`` and ``cfg`` (at
    head_dim 256 the warp-specialized kernel of ``hopper_ws.py`` for ``WS`` configs, else the rows kernel; at head_dim
    512 the warp-specialized score / output kernel for ``WS`` configs (separate K and V), else the kernel with the
    ring depths the launcher would cut to), with the descriptors a launch over HF's layout passes (q / o views of
    ``[B, S, H, D]``, k / v ``[B, H, S, D]``); returns shared bytes (``binary``: the compiled kernel's cubin too)."""
    import torch
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from gemma4_fast.kernels.attention import hopper as H

    dtype = torch.bfloat16 if dt == "bf16" else torch.float16
    q = torch.empty(1, 256, 8, head_dim, dtype=dtype).permute(0, 2, 1, 3)
    k = torch.empty(1, 1, 256, head_dim, dtype=dtype)
    kv_same = bool(cfg.get("KV_SAME", 0))
    options = {"num_warps": H.NUM_WARPS}
    if head_dim <= 256 and cfg.get("WS"):
        from gemma4_fast.kernels.attention import hopper_ws as W

        kernel, rows, bn = W.attention_hopper_ws_fwd_kernel, 64, cfg["BLOCK_N"]
        ce = dict(HEAD_DIM=head_dim, BLOCK_N=bn, K_STAGES=cfg.get("K_STAGES", 2), V_STAGES=cfg.get("V_STAGES", 2))
        options = {"num_warps": W.WS_NUM_WARPS, "maxnreg": W.WS_MAXNREG}
    elif head_dim <= 256:
        kernel, rows, bn = H.attention_hopper_rows_fwd_kernel, H.ROWS_BLOCK_M, cfg["BLOCK_N"]
        ce = dict(HEAD_DIM=head_dim, BLOCK_M=rows, BLOCK_N=bn, WRITE_LSE=True)
    elif cfg.get("WS") and not kv_same:
        from gemma4_fast.kernels.attention import hopper_ws as W

        wcfg = {**W.ws512_configs()[0], **{k: v for k, v in cfg.items() if k == "Q_SPLIT"}}
        kernel, bn, qs = W.attention_hopper_ws512_fwd_kernel, wcfg["BLOCK_N"], wcfg.get("Q_SPLIT", 1)
        ce = dict(BLOCK_N=bn, K_STAGES=wcfg["K_STAGES"], V_STAGES=wcfg["V_STAGES"], Q_SPLIT=qs)
        descs = dict(q_desc=H._descriptor(q, 64, head_dim // qs), k_desc=H._descriptor(k, bn, head_dim // qs),
                     v_desc=H._descriptor(k, bn, 256))
        sig = {n: native_specialize_impl(BaseBackend, descs[n], False, True, True)[0] if n in descs else
               "constexpr" if n in ce else "*bf16" if n == "O" else "*fp32" if n == "LSE" else
               "fp32" if n == "qk_scale" else "i32" for n in kernel.arg_names}
        src = GluonASTSource(fn=kernel, signature=sig,
                             constexprs={(kernel.arg_names.index(n),): v for n, v in ce.items()})
        out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4,
                                                                             "maxnreg": W.WS512_MAXNREG})
        return (int(out.metadata.shared), out.asm["cubin"]) if binary else int(out.metadata.shared)
    else:
        kernel, rows = H.attention_hopper_fwd_kernel, H.BLOCK_M
        bn = cfg.get("KV_BLOCK_N", cfg["BLOCK_N"]) if kv_same else cfg["BLOCK_N"]
        ce = dict(HEAD_DIM=head_dim, BLOCK_M=rows, BLOCK_N=bn, KV_SAME=kv_same,
                  KV_STAGES=H._stages(head_dim, bn, cfg.get("KV_STAGES", 3), 1),
                  K_STAGES=H._stages(head_dim, bn, cfg.get("K_STAGES", 2), 2),
                  V_STAGES=H._stages(head_dim, bn, cfg.get("V_STAGES", 2), 2), WRITE_LSE=True)
    descs = dict(q_desc=H._descriptor(q, rows), k_desc=H._descriptor(k, bn), v_desc=H._descriptor(k, bn),
                 o_desc=H._descriptor(q, rows))
    sig = {}
    for name in kernel.arg_names:
        if name in descs:
            sig[name] = native_specialize_impl(BaseBackend, descs[name], False, True, True)[0]
        else:
            sig[name] = "constexpr" if name in ce else "*fp32" if name == "LSE" else \
                "fp32" if name == "qk_scale" else "i32"
    src = GluonASTSource(fn=kernel, signature=sig, constexprs={(kernel.arg_names.index(n),): v for n, v in ce.items()})
    out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    return (int(out.metadata.shared), out.asm["cubin"]) if binary else int(out.metadata.shared)


def _flags(dt: str) -> dict:
    return dict(HAS_SOFTCAP=False, HAS_KPM=True, KV_SAME=False, DOT_PRECISION="ieee" if dt == "fp32" else "tf32",
                WHILE_LOOP=False)


def _compile_cfg(kind: str, head_dim: int, dt: str, cfg: dict, capability: int) -> int:
    fwd, pattern = _kernels()
    bd = C.block_d(head_dim)
    if kind == "combine":
        bdc = min(bd, cfg.get("COMBINE_D", bd))
        bs = cfg.get("BLOCK_S", 128)
        ce = dict(HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_DC=bdc, BLOCK_R=16, BLOCK_S=bs,
                  CHUNK_S=cfg.get("COMBINE_S", max(1, min(bs, 8192 // bdc))), WRITE_LSE=True, USE_PDL=capability == 90)
        return compile_like_launch(fwd.attention_combine_kernel, dt, ce, capability, 4 if bdc >= 256 else 2, 1)
    if kind == "fwd" and cfg.get("HOPPER"):
        assert capability == 90, "the Hopper kernel is offered on sm_90 only"
        return compile_hopper(head_dim, dt, cfg)
    if kind == "fwd":
        bdv, bm, bn = min(cfg.get("BLOCK_DV", bd), bd), cfg["BLOCK_M"], cfg["BLOCK_N"]
        ce = dict(HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_DV=bdv, BLOCK_M=bm, BLOCK_N=bn, WRITE_O=True, WRITE_LSE=True,
                  USE_TMA=bool(cfg.get("TMA", 0)), FOLD_SCALE=bool(cfg.get("FOLD", 1)), **_flags(dt))
        descs = None
        if ce["USE_TMA"]:
            descs = {"Q": [1, 1, bm, bd], "K": [1, 1, bn, bd], "V": [1, 1, bn, bdv], "O": [1, 1, bm, bdv]}
        return compile_like_launch(fwd.attention_fwd_kernel, dt, ce, capability, cfg["num_warps"],
                                   cfg["num_stages"], descs)
    elif kind == "split":
        ce = dict(HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_R=fwd.split_rows(8, 1), BLOCK_N=cfg["BLOCK_N"],
                  HAS_KVLEN=True, USE_PDL=capability == 90, **_flags(dt))
        kernel = fwd.attention_split_fwd_kernel
        if cfg.get("KEYS_AS_ROWS"):
            from gemma4_fast.kernels.attention.decode import attention_decode_fwd_kernel as kernel
    else:
        ce = dict(HEAD_DIM=head_dim, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                  BLOCK_DK=min(cfg["BLOCK_DK"], bd), PATTERN=True, **_flags(dt))
        ce.pop("KV_SAME")
        ce.pop("WHILE_LOOP")
        kernel = pattern.attention_scores_fwd_kernel
    return compile_like_launch(kernel, dt, ce, capability, cfg["num_warps"], cfg["num_stages"])


def _targets(kind, head_dim, elem, cfg):
    """Targets a config is offered on: sm_90 for H100-list-only configs, else sm_80 and sm_90."""
    gen = C.GENERATORS[kind]
    in80 = cfg in gen(head_dim, elem, 80)
    return [80, 90] if in80 else [90]


def _all_cases():
    for kind, gen in C.GENERATORS.items():
        for d in HEAD_DIMS:
            for dt, elem in (("bf16", 2), ("fp32", 4)):
                seen = []
                for cap in (90, 80):
                    for cfg in gen(d, elem, cap):
                        if cfg not in seen:
                            seen.append(cfg)
                            yield kind, d, dt, cfg


def _check_many(jobs):
    """Compile ``[(kind, d, dt, cfg, capability), ...]`` in a non-interpreted subprocess; assert fits."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    res = subprocess.run([sys.executable, __file__, json.dumps(jobs)], env=env, capture_output=True, text=True,
                         timeout=3000)
    assert res.returncode == 0, res.stderr[-3000:]
    shared = json.loads(res.stdout.strip().splitlines()[-1])
    too_big = [(job, sh) for job, sh in zip(jobs, shared) if sh > SHARED_LIMIT[job[4]]]
    assert not too_big, f"configs over the shared-memory limit: {too_big}"


def _check(kind, d, dt, cfg, targets):
    _check_many([(kind, d, dt, cfg, cap) for cap in targets])


def test_default_configs_compile():
    jobs = [("fwd", 256, "bf16", C.attention_fwd_configs(256, 2, 90)[0], 90),
            ("fwd", 512, "bf16", C.attention_fwd_configs(512, 2, 90)[0], 90),
            ("fwd", 512, "bf16", C.portable_config(512, 2, 90), 90),
            ("fwd", 512, "bf16", C.attention_fwd_configs(512, 2, 80)[0], 80),
            ("split", 512, "bf16", C.attention_split_configs(512, 2, 90)[0], 90),
            ("split", 512, "bf16", C.attention_split_configs(512, 2, 80)[0], 80),
            ("scores", 512, "bf16", C.attention_scores_configs(512, 2, 80)[0], 80),
            ("combine", 512, "bf16", {}, 80), ("combine", 512, "bf16", {}, 90),
            ("combine", 512, "bf16", {"COMBINE_D": 64, "BLOCK_S": 512}, 80),
            ("combine", 512, "bf16", {"COMBINE_D": 128, "BLOCK_S": 256}, 90),
            ("combine", 512, "bf16", {"COMBINE_D": 64, "BLOCK_S": 128}, 90),
            ("combine", 512, "bf16", {"COMBINE_D": 64, "BLOCK_S": 256, "COMBINE_S": 16}, 80)]
    jobs += [("fwd", 512, "bf16", {"HOPPER": 1, "WS": 1, "BLOCK_N": 32, "Q_SPLIT": qs}, 90) for qs in (1, 2)]
    _check_many(jobs)


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(C.GENERATORS))
def test_every_candidate_compiles(kind):
    jobs = [(k, d, dt, cfg, cap) for k, d, dt, cfg in _all_cases() if k == kind
            for cap in _targets(k, d, 4 if dt == "fp32" else 2, cfg)]
    _check_many(jobs)


@pytest.mark.slow
def test_tuned_tables_compile():
    jobs = []
    for path in sorted(C.CONFIG_DIR.glob("*.json")):
        doc = json.loads(path.read_text())
        hopper = "h100" in path.name or "h200" in path.name
        for key, cfg in doc.get("configs", {}).items():
            kind, bd, dt = key.split("/")[:3]
            jobs += [(kind, int(bd), dt, cfg, cap) for cap in ([90] if hopper else [80, 90])]
    if jobs:
        _check_many(list({json.dumps(j): j for j in jobs}.values()))


if __name__ == "__main__":
    print(json.dumps([_compile_cfg(kind, d, dt, cfg, cap) for kind, d, dt, cfg, cap in json.loads(sys.argv[1])]))
