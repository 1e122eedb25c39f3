"""Padding of token rows into one batch: the one place the lab pads (left for generation, right for scoring and
training)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, *, side: str = "right", device=None) -> tuple[Tensor, Tensor]:
    """Pad token lists to the longest one.

    Args:
        rows: ``b`` lists of token ids (any lengths, empty ones too).
        pad_id: the value written at padded places.
        side: ``"left"`` (real tokens end every row, as generation wants) or ``"right"``.
        device: where the tensors go.
    Returns:
        ``(ids [b, n] long, real [b, n] bool)``, ``real`` True on the row's own tokens.
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right'; got {side!r}")
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    real = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        if len(row):
            span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
            ids[i, span] = torch.as_tensor(list(row), dtype=torch.long)
            real[i, span] = True
    return ids.to(device), real.to(device)
