"""Compile a Triton kernel for a GPU target without a GPU, to check a config fits the target.

Used by the CPU test suite: every shipped kernel config must compile for A100 (sm_80) and
H100 (sm_90) and fit the per-block shared-memory limit of each.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

#: Maximum shared memory one block may use (opt-in dynamic limit), bytes.
SHARED_LIMIT = {80: 166912, 90: 232448}


@dataclass(frozen=True)
class CompileResult:
    capability: int
    shared: int
    num_warps: int
    fits: bool


def compile_for_target(fn: Any, signature: Mapping[str, str], constexprs: Mapping[str, Any], *,
                       capability: int, num_warps: int = 4, num_stages: int = 2) -> CompileResult:
    """Compile the ``@triton.jit`` function ``fn`` for ``sm_<capability>`` and report its shared memory.

    Args:
        fn: the jitted kernel (not an autotuner: pass ``kernel.fn`` for autotuned/heuristic kernels).
        signature: argument name -> Triton type string (``"*bf16"``, ``"*fp32"``, ``"i32"``, ``"fp32"``,
            ``"constexpr"``), for every argument of ``fn`` in order.
        constexprs: values of the ``constexpr`` arguments.
        capability: 80 (A100) or 90 (H100).
        num_warps, num_stages: launch options of the config.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=dict(signature), constexprs=dict(constexprs))
    out = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                         options={"num_warps": num_warps, "num_stages": num_stages})
    shared = int(out.metadata.shared)
    return CompileResult(capability, shared, int(out.metadata.num_warps), shared <= SHARED_LIMIT[capability])
