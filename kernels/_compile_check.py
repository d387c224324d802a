"""Compile a Triton kernel for a GPU target without a GPU, to check a config fits the target.

Used by the CPU test suite: every shipped kernel config must compile for A100 (sm_80) and
H100 (sm_90) and fit the per-block shared-memory limit of each.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

#: Maximum shared memory one block may use (opt-in dynamic limit), bytes.
SHARED_LIMIT = {80: 166912, 90: 232448}


@dataclass(frozen=True)
class CompileResult:
    capability: int
    shared: int
    num_warps: int
    fits: bool


def compile_for_target(fn: Any, signature: Mapping[str, str], constexprs: Mapping[str, Any], *,
                       capability: int, num_warps: int = 4, num_stages: int = 2,
                       divisible: Iterable[str] = ()) -> CompileResult:
    """Compile the ``@triton.jit`` function ``fn`` for ``sm_<capability>`` and report its shared memory.

    Args:
        fn: the jitted kernel (not an autotuner: pass ``kernel.fn`` for autotuned/heuristic kernels).
        signature: argument name -> Triton type string (``"*bf16"``, ``"*fp32"``, ``"i32"``, ``"fp32"``,
            ``"constexpr"``), for every argument of ``fn`` in order.
        constexprs: values of the ``constexpr`` arguments.
        capability: 80 (A100) or 90 (H100).
        num_warps, num_stages: launch options of the config.
        divisible: names of pointer/integer arguments to compile as 16-divisible, as the JIT specializes them
            on the GPU (aligned pointers, sizes that are multiples of 16). Without such hints Triton does not
            pipeline the loads and under-counts shared memory.

    Needs real ``@triton.jit`` kernels: under ``TRITON_INTERPRET=1`` call it through
    :func:`run_without_interpreter`.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = list(signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in divisible}
    src = ASTSource(fn=fn, signature=dict(signature), constexprs=dict(constexprs), attrs=attrs)
    out = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                         options={"num_warps": num_warps, "num_stages": num_stages})
    shared = int(out.metadata.shared)
    return CompileResult(capability, shared, int(out.metadata.num_warps), shared <= SHARED_LIMIT[capability])


def run_without_interpreter(path: str, function: str, *args: Any, timeout: float = 900) -> Any:
    """Call ``function(*args)`` from the Python file ``path`` in a subprocess with ``TRITON_INTERPRET=0`` (the file's
    folder first on ``sys.path``, as when it runs as a script, so its sibling helper modules import).

    Kernels decorated while the interpreter is on cannot be compiled for a GPU target, so compile checks of a
    test session that runs kernels under the interpreter go through here. ``args`` and the return value must
    be JSON-serialisable; a failing subprocess raises ``RuntimeError`` with the end of its stderr.
    """
    code = ("import json, os, runpy, sys; sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[1]))); "
            "m = runpy.run_path(sys.argv[1]); print(json.dumps(m[sys.argv[2]](*json.loads(sys.argv[3]))))")
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", code, path, function, json.dumps(list(args))], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{function} in {path} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
