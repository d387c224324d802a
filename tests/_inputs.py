"""Shared test inputs (imported by the test modules; ``tests/conftest.py`` puts ``tests/`` on ``sys.path``)."""
from __future__ import annotations

import torch


def left_padded(batch: int, seq: int, pads=(0, 3, 6), seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention_mask)`` ``[batch, seq]``: random ids in [3, 300), row ``b`` left-padded by
    ``pads[b % len(pads)]`` positions (mask 0, id 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (batch, seq), generator=g)
    am = torch.ones_like(ids)
    for b in range(batch):
        am[b, : pads[b % len(pads)]] = 0
    return ids.masked_fill(am == 0, 0), am
