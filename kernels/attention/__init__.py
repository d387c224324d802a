"""Gemma 4 attention: sliding window, softcap, GQA, head_dim up to 512, hook entry points.

Public (Triton-backed) API, see ``api.py``: ``attention``, ``attention_lse``, ``attention_scores``,
``attention_pattern``, ``pattern_apply``, ``softmax_scores``. Plain PyTorch references mirroring HF's
``eager_attention_forward`` (see ``naive.py``): ``attention_naive``, ``attention_scores_naive``,
``attention_pattern_naive``, ``pattern_apply_naive``, plus ``visible_mask``.
"""
from .api import (MAX_HEAD_DIM, attention, attention_lse, attention_pattern, attention_scores, pattern_apply,
                  softmax_scores)
from .naive import (attention_naive, attention_pattern_naive, attention_scores_naive, pattern_apply_naive,
                    visible_mask)

__all__ = [
    "attention", "attention_lse", "attention_scores", "attention_pattern", "pattern_apply", "softmax_scores",
    "attention_naive", "attention_scores_naive", "attention_pattern_naive", "pattern_apply_naive",
    "visible_mask", "MAX_HEAD_DIM",
]
