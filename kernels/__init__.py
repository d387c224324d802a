"""Pure ops for Gemma 4 (no model knowledge): ``attention``, ``moe``, ``rmsnorm``, ``rope``,
``activation`` (fused ``gelu_tanh(gate) * up``) and ``softcap`` (the final logit softcap, in place).

Installed as ``gemma4_fast.kernels``. Each op folder holds ``naive.py`` (the plain PyTorch
reference, naming the HF function it mirrors) beside its Triton file(s).
"""
