"""``boot_transformers(..., fast_kernels=...)``: TransformerBridge boot with the fast-kernels flag.

``install_boot_flag()`` (run by ``import gemma4_fast``) makes ``TransformerBridge.boot_transformers`` accept
the same ``fast_kernels`` / ``fast_backend`` / ``prefill_graphs`` keywords; without them TransformerLens behaves exactly as before.
"""
from __future__ import annotations

import functools
import types
from typing import Any

from .fast import disable_fast_kernels, enable_fast_kernels, fast_kernels_report

_ORIGINAL_ATTR = "_g4f_original_boot"


def _original_boot():
    from transformer_lens.model_bridge import TransformerBridge

    boot = getattr(TransformerBridge, _ORIGINAL_ATTR, None)
    return boot if boot is not None else TransformerBridge.boot_transformers


def _attach_report(bridge: Any) -> None:
    bridge.__dict__["fast_kernels_report"] = types.MethodType(fast_kernels_report, bridge)


def boot_transformers(model_name: str, *, fast_kernels: bool | str = "auto", fast_backend: str = "auto",
                      prefill_graphs: bool | int = False, **kwargs: Any):
    """Boot a TransformerBridge (same arguments as ``TransformerBridge.boot_transformers``: ``hf_model=``,
    ``tokenizer=``, ``device=``, ``dtype=``, ``device_map=`` / ``n_devices=``, ...) and put it on the fast
    kernels.

    Args:
        model_name: HF name or local path, as for TransformerBridge.
        fast_kernels: ``"auto"`` (default): Triton kernels when the model is a Gemma 4 on CUDA with a supported
            dtype, else HF delegation with one logged line saying why; ``True``: the same but raises
            ``FastKernelsUnavailable`` when the fast path cannot run; ``False``: the seed behaviour.
        fast_backend: ``"auto"`` | ``"triton"`` | ``"torch"`` — ``"torch"`` runs the fast modules on the
            plain-PyTorch ops (hook semantics on the CPU).
        prefill_graphs: also ``gemma4_fast.enable_prefill_graphs(bridge)`` when the fast kernels are on (per-layer
            CUDA graphs of repeated same-shape forwards; an int sets how many shapes keep their graphs). Ignored
            (with the fast kernels' own logged reason) when the bridge stays on HF delegation.
    Returns:
        an ordinary ``TransformerBridge``; ``bridge.fast_kernels_report()`` says what runs where.
    """
    if fast_kernels not in (True, False, "auto"):
        raise ValueError(f"fast_kernels must be True, False or 'auto', got {fast_kernels!r}")
    bridge = _original_boot()(model_name, **kwargs)
    _attach_report(bridge)
    if fast_kernels is not False:
        report = enable_fast_kernels(bridge, fast_kernels, backend=fast_backend)
        if prefill_graphs and report.enabled:
            from ..graphs import enable_prefill_graphs

            enable_prefill_graphs(bridge, 2 if prefill_graphs is True else int(prefill_graphs))
    return bridge


def install_boot_flag() -> None:
    """Let ``TransformerBridge.boot_transformers`` take ``fast_kernels=`` / ``fast_backend=`` / ``prefill_graphs=``
    (idempotent)."""
    from transformer_lens.model_bridge import TransformerBridge

    if getattr(TransformerBridge, _ORIGINAL_ATTR, None) is not None:
        return
    original = TransformerBridge.boot_transformers
    setattr(TransformerBridge, _ORIGINAL_ATTR, staticmethod(original))

    @functools.wraps(original)
    def boot_with_flag(*args: Any, **kwargs: Any):
        if not {"fast_kernels", "fast_backend", "prefill_graphs"} & kwargs.keys():
            return original(*args, **kwargs)
        return boot_transformers(*args, **kwargs)

    TransformerBridge.boot_transformers = staticmethod(boot_with_flag)


__all__ = ["boot_transformers", "install_boot_flag", "enable_fast_kernels", "disable_fast_kernels"]
