"""StreamingLLM: keep the attention sinks and the most recent tokens, evict everything else.

The score is the absolute position (recency). Under the default rule (``TopK(budget=0)``) every pair that leaves
the window is evicted, which is StreamingLLM with ``sinks + window`` tokens; under ``TopK(budget=k)`` the ``k``
most recent pairs beyond the window stay too, which is StreamingLLM with a window of ``window + k``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from kvzap_lab.policy import Scorer, TopK, register_policy


@register_policy("streaming_llm")
@dataclass
class StreamingLLMScorer(Scorer):
    """Scores ``[b, kv_heads, t]`` = absolute position of each new token."""

    default_rule = TopK(budget=0)

    def score(self, hidden: Tensor, layer: int, *, keys=None, values=None, positions=None) -> Tensor:
        if keys is None or positions is None:
            raise ValueError("StreamingLLMScorer needs keys [b, kv_heads, t, d] and positions [b, t]")
        return positions.to(keys.device).float()[:, None, :].expand(-1, keys.shape[1], -1)
