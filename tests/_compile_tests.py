"""Shared compile-and-fit tests for the kernel test modules.

A module defines ``_compile_report(capability, candidates) -> {"checked": int, "bad": list}`` (compiling its
kernel configs for a GPU target without a GPU; it runs in a subprocess without the Triton interpreter) and takes its
two tests from ``compile_fit_tests(__file__)``: the configs the op uses by default on sm_80 and sm_90, and (marked
slow) every candidate the generators offer.
"""
from __future__ import annotations

import pytest

from gemma4_fast.kernels._compile_check import run_without_interpreter

CAPABILITIES = (80, 90)


def compile_fit_tests(path: str):
    """``(test_default_configs_compile_and_fit, test_candidate_configs_compile_and_fit)`` for the module at ``path``."""

    def check(capability: int, candidates: bool) -> None:
        rep = run_without_interpreter(path, "_compile_report", capability, candidates)
        assert rep["checked"] > 0 and rep["bad"] == [], rep

    @pytest.mark.parametrize("capability", CAPABILITIES)
    def test_default_configs_compile_and_fit(capability):
        check(capability, False)

    @pytest.mark.slow
    @pytest.mark.parametrize("capability", CAPABILITIES)
    def test_candidate_configs_compile_and_fit(capability):
        check(capability, True)

    return test_default_configs_compile_and_fit, test_candidate_configs_compile_and_fit
