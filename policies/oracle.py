"""The oracle: KVzip+ itself. Looks up precomputed log KVzip+ scores by absolute position.

The caller sets the scores of the current sample with :meth:`OracleScorer.set_scores` before prefilling it.
Positions the oracle did not score (e.g. the question after the context) get ``missing`` (default +inf: kept).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from kvzap_lab.policy import OracleTableScorer, Threshold, register_policy


@register_policy("oracle", "kvzip_plus")
@dataclass
class OracleScorer(OracleTableScorer):
    """Returns ``scores[b, layer, :, positions]`` from a ``[b, layers, kv_heads, n_positions]`` table."""

    missing: float = math.inf
    default_rule = Threshold(tau=-6.0)
    _table: Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def set_scores(self, scores: Tensor) -> None:
        """Set the oracle table: ``[layers, kv_heads, n]`` for one sample or ``[b, layers, kv_heads, n]``."""
        scores = torch.as_tensor(scores, dtype=torch.float32)
        if scores.dim() == 3:
            scores = scores[None]
        if scores.dim() != 4:
            raise ValueError(f"oracle scores are [layers, kv_heads, n] or [b, layers, kv_heads, n]; got {tuple(scores.shape)}")
        self._table = scores

    def score(self, hidden: Tensor, layer: int, *, keys=None, values=None, positions=None) -> Tensor:
        if self._table is None:
            raise RuntimeError("OracleScorer has no scores: call set_scores(oracle_scores) for the current sample first")
        if positions is None:
            raise ValueError("OracleScorer needs positions [b, t] to look scores up")
        table = self._table.to(positions.device)
        b, n_layers, h, n = table.shape
        if positions.shape[0] != b or not 0 <= layer < n_layers:
            raise ValueError(f"oracle table is for batch {b} and {n_layers} layers; got batch {positions.shape[0]}, layer {layer}")
        idx = positions.long().clamp(0, n - 1)[:, None, :].expand(-1, h, -1)
        out = table[:, layer].gather(-1, idx)
        return out.masked_fill((positions >= n)[:, None, :] | (positions < 0)[:, None, :], self.missing)
