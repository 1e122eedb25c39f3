"""The eviction rule's search space, shared by every policy: a KVzap/DMS threshold rule with a global tau, a
tau offset per layer, and the sliding window (the sinks stay at the lab default).

The tau range is read from the training log-scores (their 2nd to 98th percentile, widened to the paper's grid)
because score scales differ between models (the paper uses tau -9...-6 for Llama, -6...-3 for Qwen).
"""

from __future__ import annotations

import math

import numpy as np

from kvzap_lab.policy import DEFAULT_SINKS, DEFAULT_WINDOW, Threshold
from kvzap_lab.studies.space import Float, Int

PAPER_TAUS = {"llama": (-9.0, -8.0, -7.0, -6.0), "qwen2": (-6.0, -5.0, -4.0, -3.0), "qwen3": (-6.0, -5.0, -4.0, -3.0)}
WINDOW_RANGE = (8, 128)  # searched on a log scale: an ordinal knob, so the sampler can learn its trend
MAX_OFFSET = 0.75


def paper_taus(model_type: str) -> tuple[float, ...]:
    """The paper's tau grid for a model family (Llama's for families the paper did not run)."""
    return PAPER_TAUS.get(model_type, PAPER_TAUS["llama"])


def calibrated_taus(scores: np.ndarray, evicted: tuple[float, ...]) -> list[float]:
    """The taus below which the given fractions of ``scores`` (training log-scores) lie, rounded to 0.05."""
    return [round(float(q) * 20) / 20 for q in np.quantile(np.asarray(scores, dtype=np.float64), evicted)]


def space(spec, scores: np.ndarray) -> dict:
    """Rule dimensions for a model ``spec`` (:class:`kvzap_lab.model.ModelSpec`) given training log-scores
    ``scores [n, layers, kv_heads]``: ``tau``, ``tau_offset_{layer}`` for every layer, ``window``."""
    grid = paper_taus(spec.model_type)
    low, high = np.quantile(np.asarray(scores, dtype=np.float64), [0.02, 0.98])
    low, high = math.floor(min(low, min(grid)) * 2) / 2, math.ceil(max(high, max(grid)) * 2) / 2
    dims = {"tau": Float(low, high, default=grid[len(grid) // 2])}
    dims |= {f"tau_offset_{layer}": Float(-MAX_OFFSET, MAX_OFFSET, default=0.0) for layer in range(spec.n_layers)}
    dims["window"] = Int(*WINDOW_RANGE, log=True, default=DEFAULT_WINDOW)
    return dims


def build(values: dict, n_layers: int) -> Threshold:
    """The :class:`Threshold` rule of sampled ``values``: per-layer tau = ``tau + tau_offset_{layer}``."""
    taus = [values["tau"] + values.get(f"tau_offset_{layer}", 0.0) for layer in range(n_layers)]
    return Threshold(tau=taus, window=int(values["window"]), sinks=DEFAULT_SINKS)
