"""Random eviction: i.i.d. standard-normal scores from a seeded generator (a floor every policy must beat)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from kvzap_lab.policy import Scorer, TopK, register_policy


@register_policy("random")
@dataclass
class RandomScorer(Scorer):
    """Scores ``[b, kv_heads, t]`` drawn from N(0, 1); the same ``seed`` gives the same sequence of calls."""

    seed: int = 0
    default_rule = TopK()
    _generator: torch.Generator = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        self._generator = torch.Generator().manual_seed(self.seed)

    def score(self, hidden: Tensor, layer: int, *, keys=None, values=None, positions=None) -> Tensor:
        if keys is None:
            raise ValueError("RandomScorer needs keys [b, kv_heads, t, head_dim] to know the number of KV heads")
        b, h, t, _ = keys.shape
        return torch.randn(b, h, t, generator=self._generator).to(keys.device)
