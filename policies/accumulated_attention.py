"""Accumulated attention (H2O/TOVA-like): a pair's score is the attention mass it has received so far.

New pairs start at 0; the engine adds, at every step, the attention each held pair receives (summed over the
query heads of its KV group), because ``accumulates_attention`` is True.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kvzap_lab.policy import Scorer, TopK, register_policy


@register_policy("accumulated_attention")
@dataclass
class AccumulatedAttentionScorer(Scorer):
    """Initial scores ``[b, kv_heads, t]`` of zeros; the engine accumulates attention on top."""

    accumulates_attention = True
    default_rule = TopK()

    def score(self, hidden: Tensor, layer: int, *, keys=None, values=None, positions=None) -> Tensor:
        if keys is None:
            raise ValueError("AccumulatedAttentionScorer needs keys [b, kv_heads, t, head_dim]")
        b, h, t, _ = keys.shape
        return torch.zeros(b, h, t, device=keys.device)
