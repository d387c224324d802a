"""Few-row linear ``y = x @ weight^T (+ bias)`` for one to four rows (decode steps, the KV-shared layers HF cuts to
the last position): ``gemv`` streams the weight once at close to the memory bandwidth, where cuBLAS's small-M
kernels reach about 55 % of it on Gemma 4's projections. It runs a Triton kernel on CUDA tensors (or CPU tensors
under ``TRITON_INTERPRET=1``) and ``torch.nn.functional.linear`` otherwise (logged once with the reason).
"""
from .gemv import MAX_ROWS, gemv
from .naive import gemv_naive

__all__ = ["gemv", "gemv_naive", "MAX_ROWS"]
