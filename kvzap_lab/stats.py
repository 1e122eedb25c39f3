"""Reporting arithmetic every report shares (evaluate's records, tables and plots, the study's): confidence
intervals on accuracies, and compression as a ratio.

An accuracy over ``n`` samples gets a Wilson score interval (Wilson 1927), which stays inside [0, 1] and keeps
a sensible width at 0/n and n/n, where the normal approximation collapses to a point. A sample's score may be a
fraction (RULER's multi-value and variable-tracking scores, token accuracy): a score in [0, 1] with mean p has
variance at most p(1 - p), the variance of a 0/1 score, so the interval computed from the mean is conservative.
"""

from __future__ import annotations

import math
from statistics import NormalDist


def wilson_interval(accuracy: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval ``(low, high)`` of an accuracy measured on ``n`` samples.

    Args:
        accuracy: the mean score, in [0, 1].
        n: the number of samples (``n = 0`` gives ``(0.0, 1.0)``: nothing is known).
        confidence: the coverage, e.g. 0.95.
    Raises:
        ValueError: an accuracy outside [0, 1], a negative ``n`` or a confidence outside (0, 1).
    """
    if not 0.0 <= accuracy <= 1.0 or n < 0 or not 0.0 < confidence < 1.0:
        raise ValueError(f"need 0 <= accuracy <= 1, n >= 0 and 0 < confidence < 1; got {accuracy}, {n}, {confidence}")
    if n == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    denominator = 1 + z * z / n
    centre = (accuracy + z * z / (2 * n)) / denominator
    half = z * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n)) / denominator
    # The interval holds the estimate; min/max only absorb rounding at 0/n and n/n (1e-17 off the bounds).
    return min(accuracy, max(0.0, centre - half)), max(accuracy, min(1.0, centre + half))


def format_interval(accuracy: float, n: int) -> str:
    """``0.950 [0.764, 0.991]``: an accuracy and its 95 % Wilson interval, as tables print it."""
    low, high = wilson_interval(accuracy, n)
    return f"{accuracy:.3f} [{low:.3f}, {high:.3f}]"


def compression_ratio(compression: float) -> float:
    """``1 / (1 - compression)``: 0.75 of the pairs evicted is 4x."""
    return 1.0 / max(1.0 - compression, 1e-9)
