"""Helpers shared by the op wrappers: backend detection, config pinning, device guards.

Policy lives in the public wrappers (``<op>(...)``), never in the Triton kernels.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
from typing import Any, Iterator

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


def triton_available() -> bool:
    """True when the ``triton`` package imports."""
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


@contextlib.contextmanager
def device_of(t: torch.Tensor) -> Iterator[None]:
    """Make ``t``'s CUDA device current for the launch (multi-GPU safety); no-op on the CPU."""
    if t.is_cuda:
        with torch.cuda.device(t.device):
            yield
    else:
        yield


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
