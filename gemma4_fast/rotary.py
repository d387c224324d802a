"""Fast Gemma 4 text rotary embedding: HF's ``Gemma4TextRotaryEmbedding`` with its tables kept for the default
positions.

Every forward of the text model computes the ``(cos, sin)`` tables of each layer type from its position ids: about
ten small launches and ~0.5 ms of host time per layer type on the GPU machines, before the first layer, with the
GPU idle. When the top-level forward got no position ids, attention mask or cache, ``gemma4_fast.logits`` passes
HF's default positions itself: one kept ``arange(seq)`` tensor per length and device (``positions_for``), announced
with ``default_positions``. For that very tensor the tables depend only on the length, the layer type, the dtype,
the device and the module's inverse frequencies, so ``FastRotaryMixin.forward`` returns the tables of an earlier
call with the same key.

Rules:

- Any other position tensor (given by a caller, a cache's positions, decode steps, a nested call) and stream
  capture run HF's forward.
- The key holds the inverse-frequency buffer's identity, storage and version and the attention scaling, so a
  changed RoPE setup recomputes; the cached tables' version counters are checked on every hit, so an in-place
  edit (a hook on the bridge's ``hook_cos`` / ``hook_sin``) is never served again: the next call recomputes.
- At most ``MAX_ENTRIES`` tables per module (least recently used dropped).

Same parameters and buffers as HF's module (a class swap, see ``gemma4_fast.patch``); returns HF's tensors
``(cos, sin)`` ``[1, seq, head_dim]`` in x's dtype.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from contextvars import ContextVar
from typing import Iterator, Optional

import torch

MAX_ENTRIES = 8
_CACHE = "_g4f_rotary_tables"
_POSITIONS = "_g4f_positions_kept"
_DEFAULT: ContextVar[Optional[torch.Tensor]] = ContextVar("gemma4_fast_default_positions", default=None)


def positions_for(owner: object, length: int, device: torch.device) -> torch.Tensor:
    """HF's default position ids ``arange(length)[None]`` (int64) on ``device``, one tensor kept per length and
    device on ``owner`` (replaced when modified in place)."""
    kept: dict = owner.__dict__.setdefault(_POSITIONS, {})
    key = (length, device)
    hit = kept.get(key)
    if hit is None or hit[0]._version != hit[1]:
        pos = torch.arange(length, device=device)[None]
        hit = kept[key] = (pos, pos._version)
        while len(kept) > MAX_ENTRIES:
            kept.pop(next(iter(kept)))
    return hit[0]


@contextlib.contextmanager
def default_positions(positions: Optional[torch.Tensor]) -> Iterator[None]:
    """Inside the block ``positions`` (from ``positions_for``; None: none) are the text model's default positions."""
    token = _DEFAULT.set(positions)
    try:
        yield
    finally:
        _DEFAULT.reset(token)


class FastRotaryMixin:
    """Forward of ``Gemma4TextRotaryEmbedding`` with the default-position tables kept; see the module docstring."""

    _g4f_backend = "auto"

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, layer_type: Optional[str] = None):
        if position_ids is None or position_ids is not _DEFAULT.get() or (
                x.is_cuda and torch.cuda.is_current_stream_capturing()):
            return super().forward(x, position_ids, layer_type)
        n = position_ids.shape[-1]
        inv_freq = getattr(self, f"{layer_type}_inv_freq")
        key = (layer_type, n, x.dtype, x.device, id(inv_freq), inv_freq.data_ptr(), inv_freq._version,
               getattr(self, f"{layer_type}_attention_scaling"))
        tables: OrderedDict = self.__dict__.setdefault(_CACHE, OrderedDict())
        hit = tables.get(key)
        if hit is not None and hit[0]._version == hit[2] and hit[1]._version == hit[3]:
            tables.move_to_end(key)
            return hit[0], hit[1]
        cos, sin = super().forward(x, position_ids, layer_type)
        tables[key] = (cos, sin, cos._version, sin._version)
        tables.move_to_end(key)
        while len(tables) > MAX_ENTRIES:
            tables.popitem(last=False)
        return cos, sin
