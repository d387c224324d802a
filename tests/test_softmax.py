"""``softmax_scores``: the Triton row softmax of hook-edited attention scores against ``naive.softmax_scores``.

CPU: Triton interpreter, fp32/fp16, odd row lengths, the one-block and the chunked paths (pinned small
blocks), fully masked rows, NaN-filled outputs; fallbacks; every shipped config compiled for sm_80 / sm_90.
GPU (``cuda``): bf16 by the three-way rule at attention-pattern sizes, and the hooked-scores path of the
attention module.
"""
from __future__ import annotations

import inspect

import pytest
import torch

from gemma4_fast.kernels._common import interpret_mode
from gemma4_fast.kernels._compile_check import compile_for_target, run_without_interpreter
from gemma4_fast.kernels.attention import api, softmax_scores
from gemma4_fast.kernels.attention.naive import softmax_scores as softmax_ref
from gemma4_fast.kernels.attention.softmax import ENV_SOFTMAX, softmax_configs, softmax_scores_fwd_kernel


@pytest.fixture
def cpu_kernel(monkeypatch):
    if not interpret_mode():
        pytest.skip("CPU kernel tests need TRITON_INTERPRET=1 (set by conftest without a GPU)")
    monkeypatch.setattr(api, "_new_empty", lambda shape, dtype, device: torch.full(shape, float("nan"),
                                                                                      dtype=dtype, device=device))


def _scores(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, generator=g) * 4
    n = shape[-1]
    s[0, 0, 1] = float("-inf")
    s[-1, -1, :, : n // 2] = float("-inf")
    return s


@pytest.mark.parametrize("pin", [None, '{"BLOCK_N": 16, "num_warps": 1}'])
@pytest.mark.parametrize("n", [1, 7, 37, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference(cpu_kernel, monkeypatch, pin, n, dtype):
    if pin:
        monkeypatch.setenv(ENV_SOFTMAX, pin)
    s = _scores((2, 3, 5, n)).to(dtype)
    got = softmax_scores(s)
    want = softmax_ref(s.double())
    assert got.dtype == dtype and got.shape == s.shape and not torch.isnan(got).any()
    tol = 1e-6 if dtype == torch.float32 else 1e-3
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    assert (got[0, 0, 1] == 0).all()


def test_non_contiguous_and_fallbacks(cpu_kernel):
    s = _scores((2, 3, 9, 11)).transpose(1, 2)
    torch.testing.assert_close(softmax_scores(s), softmax_ref(s), rtol=1e-6, atol=1e-6)
    leaf = s.clone().requires_grad_(True)
    p = softmax_scores(leaf)
    p.sum().backward()
    assert leaf.grad is not None
    torch.testing.assert_close(softmax_scores(s.double()), softmax_ref(s.double()), rtol=0, atol=0)
    with pytest.raises(ValueError, match="scores must be a tensor"):
        softmax_scores(torch.tensor(1.0))


def _compile_report(capability):
    names = list(inspect.signature(softmax_scores_fwd_kernel.fn).parameters)
    bad, checked = [], 0
    for dtype in ("bf16", "fp32"):
        sig = {"S": f"*{dtype}", "P": f"*{dtype}", "N_COLS": "i32", "stride_s": "i64", "stride_p": "i64",
               "BLOCK_N": "constexpr", "SINGLE": "constexpr"}
        seen = []
        for n in (1, 97, 256, 1024, 4096, 8192, 32768, 131072):
            for cfg in softmax_configs(n):
                for single in (True, False):
                    key = (cfg["BLOCK_N"], cfg["num_warps"], single)
                    if key in seen:
                        continue
                    seen.append(key)
                    checked += 1
                    res = compile_for_target(softmax_scores_fwd_kernel, {k: sig[k] for k in names},
                                             {"BLOCK_N": cfg["BLOCK_N"], "SINGLE": single}, capability=capability,
                                             num_warps=cfg["num_warps"], num_stages=1)
                    if not res.fits:
                        bad.append([dtype, cfg, single, res.shared])
    return {"checked": checked, "bad": bad}


@pytest.mark.parametrize("capability", [80, 90])
def test_configs_compile_and_fit(capability):
    rep = run_without_interpreter(__file__, "_compile_report", capability)
    assert rep["checked"] > 0 and rep["bad"] == [], rep


@pytest.mark.cuda
@pytest.mark.parametrize("n", [1, 513, 4096, 8191, 32768])
def test_gpu_bf16_three_way(n):
    s = _scores((1, 4, 3, n)).cuda()
    ref = softmax_ref(s.double())
    torch_bf16 = softmax_ref(s.bfloat16())
    got = softmax_scores(s.bfloat16())
    assert not torch.isnan(got).any()
    err = (got.double() - ref).abs()
    bound = 2 * (torch_bf16.double() - ref).abs() + 1e-3
    assert (err <= bound).all(), float((err - bound).max())
    torch.testing.assert_close(softmax_scores(s), softmax_ref(s), rtol=1e-5, atol=1e-6)
