"""Final logit softcap ``cap * tanh(x / cap)`` (Gemma 4's ``final_logit_softcapping``) in one pass, in place.

``logit_softcap(x, cap, out=x)`` runs a Triton kernel on CUDA tensors (or CPU tensors under
``TRITON_INTERPRET=1``): fp32 math, one rounding, one read and one write of x. It runs the reference
``logit_softcap_naive`` (HF's three ops; chunked when writing into ``out``) when gradients are needed, for
non-contiguous tensors or other dtypes, and on devices that cannot launch Triton kernels (each logged once).

``linear_softcap(x, weight, bias, cap)`` is the LM head with the softcap: on an sm_90 GPU one Gluon kernel
(``lm_head_hopper.py``) applies the softcap to the GEMM's accumulator, so the raw logits are never written; elsewhere
the LM head GEMM then ``logit_softcap`` in place.
"""
from .linear import linear_softcap
from .naive import linear_softcap_naive, logit_softcap_naive
from .softcap import logit_softcap

__all__ = ["linear_softcap", "linear_softcap_naive", "logit_softcap", "logit_softcap_naive"]
