"""Helpers shared by the op wrappers: backend detection, config pinning, device guards.

Policy lives in the public wrappers (``<op>(...)``), never in the Triton kernels.
"""
from __future__ import annotations

import functools
import json
import logging
import os
from typing import Any

import torch


_LOGGED: set[str] = set()


def log_once(key: str, msg: str, *args: Any, level: int = logging.INFO) -> None:
    """Log ``msg % args`` on the ``gemma4_fast`` logger the first time ``key`` is seen in this process."""
    if key not in _LOGGED:
        _LOGGED.add(key)
        logging.getLogger("gemma4_fast").log(level, msg, *args)


def interpret_mode() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when the ``triton`` package imports (checked once per process)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def can_launch(t: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on ``t``: a CUDA tensor, or a CPU tensor under the interpreter."""
    if not triton_available():
        return False
    if t.is_cuda:
        return True
    return t.device.type == "cpu" and interpret_mode()


def needs_grad(*tensors: Any) -> bool:
    """True when autograd is recording and any of ``tensors`` requires a gradient."""
    if not torch.is_grad_enabled():
        return False
    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)


class device_of:
    """Context manager making ``t``'s CUDA device current for a launch (multi-GPU safety).

    A no-op on the CPU and when that device is already current (the common single-GPU case, kept cheap
    because every launch goes through it).
    """

    __slots__ = ("_guard",)

    def __init__(self, t: torch.Tensor) -> None:
        self._guard = None
        if t.is_cuda and t.device.index is not None and t.device.index != torch.cuda.current_device():
            self._guard = torch.cuda.device(t.device.index)

    def __enter__(self) -> None:
        if self._guard is not None:
            self._guard.__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self._guard is not None:
            self._guard.__exit__(*exc)


def pinned_config(env_var: str) -> dict[str, int] | None:
    """Parse a pinned kernel config from ``env_var`` (JSON object, e.g. '{"BLOCK_M": 16, "num_warps": 4}').

    Tests pin one config so the interpreter does not sweep autotune candidates.
    Returns None when the variable is unset or empty.
    """
    raw = os.environ.get(env_var, "").strip()
    if not raw:
        return None
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{env_var} must hold a JSON object of kernel meta-parameters, got {raw!r}") from exc
    if not isinstance(cfg, dict):
        raise ValueError(f"{env_var} must hold a JSON object, got {raw!r}")
    return {str(k): int(v) for k, v in cfg.items()}


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (>= 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Multiprocessors of a CUDA ``device`` (read once per device); 4 on other devices (the stand-in the CPU
    interpreter's launch plans use)."""
    if device.type != "cuda":
        return 4
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
