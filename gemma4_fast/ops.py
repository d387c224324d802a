"""Backend dispatch between the Triton ops and their plain PyTorch twins, per call.

Every function here takes a ``backend`` keyword:

- ``"torch"``: the naive twin (``*_naive``), plain PyTorch, any device and dtype, differentiable.
- ``"triton"``: the public Triton op. When the input cannot take it (not on CUDA and the interpreter is
  off, a dtype other than float16/bfloat16/float32) the call runs the naive twin instead and the reason is
  logged once per (op, reason). When autograd needs gradients, ``rms_norm``, ``attention`` and
  ``moe_experts`` (without extra outputs) still run forward on Triton and get their backward by recomputing
  the naive twin (``_NaiveBackward``): fast forwards, exact gradients; the other ops run the naive twin.
  ``rope`` and ``gelu_mul`` do the same.
- ``"auto"``: Triton when the input can take it (a CUDA tensor, or a CPU tensor with
  ``TRITON_INTERPRET=1``), else the naive twin (logged once at debug level).

The kernel packages are looked up at call time (``gemma4_fast.kernels.attention`` / ``.moe`` /
``.rmsnorm`` / ``.rope`` / ``.activation`` / ``.softcap``), so code built on these functions does not change
when a kernel lands or is replaced.
Shapes and dtypes are those of the kernel ops; see their docstrings.
"""
from __future__ import annotations

import importlib
import logging
from typing import Any, Optional, Union

import torch

from gemma4_fast.kernels._common import can_launch, interpret_mode, log_once, needs_grad, triton_available

logger = logging.getLogger("gemma4_fast")

BACKENDS = ("auto", "triton", "torch")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_backend(backend: str) -> str:
    """Return ``backend`` if it is one of ``BACKENDS``; raise ``ValueError`` naming the argument otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def triton_unavailable_reason(t: Optional[torch.Tensor]) -> Optional[str]:
    """Why a Triton kernel cannot run on ``t`` (None when it can): dtype, device or a missing triton."""
    if t is None:
        return "no tensor to place the kernel"
    if not triton_available():
        return "triton is not importable"
    if t.dtype not in KERNEL_DTYPES:
        return f"dtype {str(t.dtype).replace('torch.', '')} unsupported by kernels"
    if not can_launch(t):
        if t.device.type == "cpu" and not interpret_mode():
            return "no CUDA"
        return f"device {t.device} unsupported by kernels"
    return None


def resolve(backend: str, op: str, *tensors: Any, differentiable: bool = False) -> str:
    """The backend that runs ``op`` on ``tensors`` for requested ``backend``: ``"torch"``, ``"triton"``, or
    ``"triton+grad"`` (Triton forward, naive-recompute backward; only when ``differentiable``)."""
    if backend == "torch":
        return "torch"
    check_backend(backend)
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    why = triton_unavailable_reason(first)
    if why is None and needs_grad(*tensors):
        if differentiable:
            return "triton+grad"
        why = "autograd needs gradients"
    if why is None:
        return "triton"
    if backend == "triton":
        log_once(f"fallback:{op}:{why}", f"{op}: backend 'triton' cannot run here ({why}); using the torch op")
    else:
        log_once(f"auto:{op}:{why}", f"{op}: backend 'auto' picked the torch op ({why})", level=logging.DEBUG)
    return "torch"


class _NaiveBackward(torch.autograd.Function):
    """Forward through a Triton op; backward recomputes its naive twin under autograd and differentiates it.

    Only the tensors in ``tensors`` (positional) are differentiable inputs; ``kwargs`` are passed through. The
    output must be a single tensor.
    """

    @staticmethod
    def forward(ctx, fast, naive, kwargs, *tensors):  # type: ignore[override]
        ctx.naive, ctx.kwargs = naive, kwargs
        ctx.save_for_backward(*tensors)
        return fast(*tensors, **kwargs)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[3:]
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(need) if (t is not None and need) else t
                      for t, need in zip(saved, needs)]
            out = ctx.naive(*inputs, **ctx.kwargs)
            wrt = [t for t, need in zip(inputs, needs) if need]
            grads = iter(torch.autograd.grad(out, wrt, grad_out, allow_unused=True))
        return (None, None, None, *[next(grads) if need else None for need in needs])


def _run(pkg: str, name: str, backend: str, tensors: tuple, kwargs: dict):
    """Run op ``name`` of kernel package ``pkg`` on the resolved ``backend``."""
    if backend == "triton+grad":
        return _NaiveBackward.apply(_fn(pkg, name, "triton"), _fn(pkg, name, "torch"), kwargs, *tensors)
    return _fn(pkg, name, backend)(*tensors, **kwargs)


_MODULES: dict[str, Any] = {}


def _module(path: str):
    mod = _MODULES.get(path)
    if mod is None:
        mod = _MODULES[path] = importlib.import_module(path)
    return mod


def _pkg(name: str):
    return _module(f"gemma4_fast.kernels.{name}")


def _fn(pkg: str, name: str, backend: str):
    """The op function (Triton wrapper, or the naive twin for ``"torch"``), read from its package at call
    time (the packages are imported once)."""
    mod = _pkg(pkg)
    if backend == "torch":
        naive = getattr(mod, f"{name}_naive", None)
        if naive is None:
            naive = getattr(_module(f"gemma4_fast.kernels.{pkg}.naive"), name)
        return naive
    return getattr(mod, name)


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float, *, backend: str = "auto",
             return_scale: bool = False, return_normalized: bool = False,
             normalized_dtype: Optional[torch.dtype] = None):
    """``gemma4_fast.kernels.rmsnorm.rms_norm`` or ``rms_norm_naive`` (see there for shapes)."""
    b = resolve(backend, "rms_norm", x, weight, differentiable=not (return_scale or return_normalized))
    return _run("rmsnorm", "rms_norm", b, (x, weight),
                dict(eps=eps, return_scale=return_scale, return_normalized=return_normalized,
                     normalized_dtype=normalized_dtype))


def rms_norm_residual(x: torch.Tensor, residual: torch.Tensor, weight: Optional[torch.Tensor], eps: float, *,
                      next_weight: Optional[torch.Tensor] = None, next_eps: Optional[float] = None,
                      out_scale: Optional[Union[torch.Tensor, float]] = None, x_scale: Optional[float] = None,
                      backend: str = "auto"):
    """``gemma4_fast.kernels.rmsnorm.rms_norm_residual`` or its naive twin: ``residual + rms_norm(x * x_scale,
    weight)`` (HF order), times ``out_scale`` (a one-element tensor, HF's ``*= layer_scalar``, or a float) when
    given, and ``rms_norm(out, next_weight)`` when given. Under autograd the naive twin runs."""
    b = resolve(backend, "rms_norm_residual", x, residual, weight, next_weight)
    return _run("rmsnorm", "rms_norm_residual", b, (x, residual, weight),
                dict(eps=eps, next_weight=next_weight, next_eps=next_eps, out_scale=out_scale, x_scale=x_scale))


def rms_norm_pair_residual(x1: torch.Tensor, x2: torch.Tensor, residual: torch.Tensor, w1: torch.Tensor,
                           w2: torch.Tensor, weight: torch.Tensor, eps1: float, eps2: float, eps: float, *,
                           out_scale: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """``gemma4_fast.kernels.rmsnorm.rms_norm_pair_residual`` or its naive twin: the MoE layer's tail
    ``residual + norm(norm(x1) * w1 + norm(x2) * w2) * weight`` (times ``out_scale``). Under autograd the naive twin
    runs."""
    b = resolve(backend, "rms_norm_pair_residual", x1, x2, residual, w1, w2, weight)
    return _run("rmsnorm", "rms_norm_pair_residual", b, (x1, x2, residual, w1, w2, weight),
                dict(eps1=eps1, eps2=eps2, eps=eps, out_scale=out_scale))


def gelu_mul(gate: torch.Tensor, up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``gemma4_fast.kernels.activation.gelu_mul`` or ``gelu_mul_naive``: ``gelu_tanh(gate) * up``, both
    ``[..., N]``. Under autograd the Triton forward is kept and the backward recomputes the naive op."""
    b = resolve(backend, "gelu_mul", gate, up, differentiable=True)
    return _run("activation", "gelu_mul", b, (gate, up), {})


def linear_gelu_mul(x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, *,
                    backend: str = "auto") -> torch.Tensor:
    """``gemma4_fast.kernels.activation.linear_gelu_mul`` or ``linear_gelu_mul_naive``: the MLP's gate and up
    projections with the activation, ``gelu_tanh(x @ w_gate^T) * (x @ w_up^T)``, ``[..., K] -> [..., N]``. On an
    sm_90 GPU, where the kernel takes the shape, one kernel (``gate`` and ``up`` are never written); elsewhere two
    GEMMs and ``gelu_mul``. The torch twin is HF's expression."""
    b = resolve(backend, "linear_gelu_mul", x, w_gate, w_up)
    return _fn("activation", "linear_gelu_mul", b)(x, w_gate, w_up)


def logit_softcap(x: torch.Tensor, cap: float, *, out: Optional[torch.Tensor] = None,
                  backend: str = "auto") -> torch.Tensor:
    """``gemma4_fast.kernels.softcap.logit_softcap`` or ``logit_softcap_naive``: ``cap * tanh(x / cap)`` on any
    shape, into ``out`` when given (``out=x``: in place). The torch twin is HF's three ops in x's dtype (with
    ``out``: chunk by chunk, bit-identical to HF). Under autograd the naive twin runs."""
    b = resolve(backend, "logit_softcap", x)
    return _fn("softcap", "logit_softcap", b)(x, cap, out=out)


def linear_softcap(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], cap: float, *,
                   backend: str = "auto") -> torch.Tensor:
    """``gemma4_fast.kernels.softcap.linear_softcap`` or ``linear_softcap_naive``: the LM head and the final softcap,
    ``cap * tanh((x @ weight^T + bias) / cap)``, ``[..., K] -> [..., N]``. On an sm_90 GPU one kernel (the raw
    logits are never written); elsewhere the GEMM and the one-pass softcap. The torch twin is HF's LM head and its
    three softcap ops."""
    b = resolve(backend, "linear_softcap", x, weight, bias)
    return _fn("softcap", "linear_softcap", b)(x, weight, bias, cap)


def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, eps: float,
                  backend: str = "auto") -> torch.Tensor:
    """A query/key head norm (``Gemma4RMSNorm`` with scale) followed by RoPE: ``rope(rms_norm(x, weight, eps), cos,
    sin)``, x ``[B, S, H, D]``. ``"torch"`` runs the norm's naive twin and HF's ``apply_rotary_pos_emb`` (what the
    two modules run); the Triton op (``gemma4_fast.kernels.rope.rms_norm_rope``) does both in one pass, with a
    naive-recompute backward when autograd needs gradients. Inputs the RoPE kernel rejects take the torch ops,
    logged once."""
    b = resolve(backend, "rms_norm_rope", x, weight, cos, sin, differentiable=True)
    if b != "torch":
        why = _pkg("rope").unsupported_reason(x, cos, sin)
        if why is not None:
            level = logging.INFO if backend == "triton" else logging.DEBUG
            log_once(f"fallback:rms_norm_rope:{why}", f"rms_norm_rope: backend {backend!r} cannot run the kernel "
                     f"({why}); using the torch ops", level=level)
            b = "torch"
    if b == "torch":
        return rope(rms_norm(x, weight, eps, backend="torch"), cos, sin, backend="torch")
    return _run("rope", "rms_norm_rope", b, (x, weight, cos, sin), {"eps": eps})


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, window: Optional[int],
              softcap: Optional[float], causal: bool = True, key_padding_mask: Optional[torch.Tensor] = None,
              return_lse: bool = False, backend: str = "auto", kv_lens: Optional[torch.Tensor] = None):
    """``attention`` / ``attention_naive``: q ``[B,Hq,Sq,D]``, k/v ``[B,Hkv,Sk,D]``, queries at the end
    (of the first ``kv_lens[b]`` keys when given: ``[B]`` int32, decode on a preallocated cache)."""
    b = resolve(backend, "attention", q, k, v, differentiable=not return_lse)
    kw = dict(scale=scale, window=window, softcap=softcap, causal=causal, key_padding_mask=key_padding_mask,
              return_lse=return_lse)
    if kv_lens is not None:
        kw["kv_lens"] = kv_lens
    return _run("attention", "attention", b, (q, k, v), kw)


def attention_scores(q: torch.Tensor, k: torch.Tensor, *, scale: float, window: Optional[int],
                     softcap: Optional[float], causal: bool = True,
                     key_padding_mask: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """``attention_scores`` / ``attention_scores_naive``: ``[B,Hq,Sq,Sk]`` scores, masked with -inf."""
    b = resolve(backend, "attention_scores", q, k)
    return _fn("attention", "attention_scores", b)(q, k, scale=scale, window=window, softcap=softcap,
                                                   causal=causal, key_padding_mask=key_padding_mask)


def attention_pattern(q: torch.Tensor, k: torch.Tensor, *, scale: float, window: Optional[int],
                      softcap: Optional[float], causal: bool = True,
                      key_padding_mask: Optional[torch.Tensor] = None, lse: Optional[torch.Tensor] = None,
                      backend: str = "auto") -> torch.Tensor:
    """``attention_pattern`` / ``attention_pattern_naive``: ``[B,Hq,Sq,Sk]`` probabilities."""
    b = resolve(backend, "attention_pattern", q, k)
    return _fn("attention", "attention_pattern", b)(q, k, scale=scale, window=window, softcap=softcap,
                                                    causal=causal, key_padding_mask=key_padding_mask, lse=lse)


def pattern_apply(pattern: torch.Tensor, v: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``pattern_apply`` / ``pattern_apply_naive``: ``pattern @ v`` with GQA, ``[B,Hq,Sq,D]``."""
    b = resolve(backend, "pattern_apply", pattern, v)
    return _fn("attention", "pattern_apply", b)(pattern, v)


def softmax_scores(scores: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """``softmax_scores``: fp32 softmax over the last dim, all -inf rows give zeros."""
    b = resolve(backend, "softmax_scores", scores)
    return _fn("attention", "softmax_scores", b)(scores)


def moe_router(x: torch.Tensor, proj_weight: torch.Tensor, scale: torch.Tensor, per_expert_scale: torch.Tensor, *,
               top_k: int, eps: float, backend: str = "auto"):
    """``moe_router`` / ``moe_router_naive``: ``(probs [T,E] fp32, top_k_weights [T,k], top_k_index [T,k])``."""
    b = resolve(backend, "moe_router", x, proj_weight, scale, per_expert_scale)
    return _fn("moe", "moe_router", b)(x, proj_weight, scale, per_expert_scale, top_k=top_k, eps=eps)


def moe_experts(x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                gate_up_proj: torch.Tensor, down_proj: torch.Tensor, *, return_expert_outputs: bool = False,
                backend: str = "auto"):
    """``moe_experts`` / ``moe_experts_naive``: ``y [T,H]`` or ``(y, expert_outputs [T,k,H])``."""
    b = resolve(backend, "moe_experts", x, top_k_weights, gate_up_proj, down_proj,
                differentiable=not return_expert_outputs)
    return _run("moe", "moe_experts", b, (x, top_k_index, top_k_weights, gate_up_proj, down_proj),
                dict(return_expert_outputs=return_expert_outputs))


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """RoPE ``x * cos + rotate_half(x) * sin``: x ``[B, S, H, D]``, cos/sin ``[B|1, S, D]`` (x's dtype).

    ``"torch"`` calls HF's own ``apply_rotary_pos_emb(x, cos, sin, unsqueeze_dim=2)`` (bit-identical to
    the HF module); the Triton op (``gemma4_fast.kernels.rope.rope``, fp32 math rounded once, contiguous
    output) runs otherwise, with a naive-recompute backward when autograd needs gradients. Inputs the
    kernel rejects (odd or > 1024 head dim, cos/sin of another dtype, shape or device) take HF's call,
    logged once.
    """
    b = resolve(backend, "rope", x, cos, sin, differentiable=True)
    if b != "torch":
        why = _pkg("rope").unsupported_reason(x, cos, sin)
        if why is not None:
            level = logging.INFO if backend == "triton" else logging.DEBUG
            log_once(f"fallback:rope:{why}", f"rope: backend {backend!r} cannot run the kernel ({why}); using the "
                     "torch op", level=level)
            b = "torch"
    if b == "torch":
        from transformers.models.gemma4.modeling_gemma4 import apply_rotary_pos_emb

        return apply_rotary_pos_emb(x, cos, sin, unsqueeze_dim=2)
    return _run("rope", "rope", b, (x, cos, sin), {})
