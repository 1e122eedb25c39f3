"""KNorm: keys with a small L2 norm tend to draw more attention, so the score is the negative key norm."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kvzap_lab.policy import Scorer, TopK, register_policy


@register_policy("knorm")
@dataclass
class KNormScorer(Scorer):
    """Scores ``[b, kv_heads, t]`` = -||k|| of each post-RoPE key."""

    default_rule = TopK()

    def score(self, hidden: Tensor, layer: int, *, keys=None, values=None, positions=None) -> Tensor:
        if keys is None:
            raise ValueError("KNormScorer needs keys [b, kv_heads, t, head_dim]")
        return -keys.float().norm(dim=-1)
