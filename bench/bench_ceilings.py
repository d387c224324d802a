"""Ceilings probe as a benchmark: device-to-device copy bandwidth and bf16 matmul throughput.

Rows of the ``ceilings`` suite (``what`` as in the pre-project anchors): ``copy_bw`` (``dst.copy_(src)`` of
a random bf16 buffer of ``MiB`` mebibytes; ``TBps`` counts bytes read plus bytes written) and ``bf16_mm``
(``a @ b`` of random ``n x n`` bf16 matrices; ``tflops`` = 2 n^3 / t). Every buffer is far larger than the
L2 cache, so no input rotation is needed. The session's ``ceilings`` fixture (``common.ceilings()``: a
1 GiB copy and an 8192^3 product) is what every suite's fractions divide by; these rows show the spread
over sizes and repeat that measurement under pytest-benchmark.
"""
from __future__ import annotations

import os

import pytest
import torch

BENCH_SUITE = "ceilings"
QUICK = os.environ.get("GEMMA4_FAST_BENCH_QUICK", "").strip().lower() in ("1", "true", "yes")
COPY_MIB = (1024,) if QUICK else (256, 1024, 4096)
MM_N = (8192,) if QUICK else (4096, 8192, 16384)


@pytest.mark.parametrize("mib", COPY_MIB, ids=lambda m: f"{m}MiB")
def test_copy_bandwidth(cuda_bench, mib):
    n = mib * 2**20 // 2
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    cuda_bench(lambda: dst.copy_(src), rounds=10, warmup_rounds=3, rep=20, nbytes=2 * n * src.element_size(),
               what="copy_bw", MiB=mib, dtype="bfloat16")


@pytest.mark.parametrize("n", MM_N, ids=lambda n: f"n{n}")
def test_bf16_matmul(cuda_bench, n):
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    cuda_bench(lambda: a @ b, rounds=10, warmup_rounds=3, rep=20, flops=2.0 * n**3, what="bf16_mm", n=n,
               dtype="bfloat16")
