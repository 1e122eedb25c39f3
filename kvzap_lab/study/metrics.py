"""The study's decision logic on ``(accuracy, compression)`` points: the scalar reward, the operating point of a
trial's per-task results, the FLOPs limit that makes a trial feasible, the Pareto front, its hypervolume, and the
best point within 1 point of full-cache accuracy (README's headline number)."""

from __future__ import annotations

import numpy as np

from kvzap_lab.stats import compression_ratio
from kvzap_lab.study.config import ACCURACY_TOLERANCE, REWARD_PENALTY

_EPS = 1e-9  # accuracies are means of per-sample scores: a drop of exactly 1 point must count as within it


def reward(accuracy: float, compression: float, full_accuracy: float) -> float:
    """The scalar objective: compression (fraction evicted), minus ``REWARD_PENALTY`` per unit of accuracy lost
    beyond ``ACCURACY_TOLERANCE`` below the full cache."""
    if within_tolerance(accuracy, full_accuracy):
        return compression
    return compression - REWARD_PENALTY * (full_accuracy - accuracy - ACCURACY_TOLERANCE)


def within_tolerance(accuracy: float, full_accuracy: float) -> bool:
    """Whether ``accuracy`` is at most ``ACCURACY_TOLERANCE`` below ``full_accuracy`` (the boundary included)."""
    return full_accuracy - accuracy <= ACCURACY_TOLERANCE + _EPS


def operating_point(per_task: dict, full_mean: float) -> dict:
    """Mean accuracy and compression of ``per_task`` results (``{task: {"accuracy", "compression"}}``), the
    accuracy lost against ``full_mean`` and the compression ratio."""
    accuracy = float(np.mean([r["accuracy"] for r in per_task.values()]))
    compression = float(np.mean([r["compression"] for r in per_task.values()]))
    return {"accuracy": accuracy, "accuracy_drop": full_mean - accuracy, "compression": compression,
            "compression_ratio": compression_ratio(compression)}


def flops_constraint(flops_ratio: float, max_flops_ratio: float) -> float:
    """A trial's constraint value (Optuna's convention: feasible when <= 0): by how much its scorer's FLOPs per
    token, as a fraction of the model's projection FLOPs, exceed the limit."""
    return flops_ratio - max_flops_ratio


def is_feasible(row: dict, max_flops_ratio: float) -> bool:
    """Whether a row's (``{"flops_ratio", ...}``) scorer is within the FLOPs limit. A row without a ``flops_ratio``
    (a trial recorded before the study measured it) counts as feasible."""
    return "flops_ratio" not in row or flops_constraint(row["flops_ratio"], max_flops_ratio) <= 0


def feasible(rows: list[dict], max_flops_ratio: float) -> list[dict]:
    """The rows within the FLOPs limit (:func:`is_feasible`), in order."""
    return [r for r in rows if is_feasible(r, max_flops_ratio)]


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated ``(accuracy, compression)`` points (both maximised; the first of equal
    points), sorted by compression."""
    front = [
        i for i, (a, c) in enumerate(points)
        if not any((a2 >= a and c2 >= c) and (a2 > a or c2 > c) for a2, c2 in points) and (a, c) not in points[:i]
    ]
    return sorted(front, key=lambda i: points[i][1])


def hypervolume(points: list[tuple[float, float]]) -> float:
    """Area dominated by ``(accuracy, compression)`` points above the origin (both in [0, 1])."""
    area, best_accuracy = 0.0, 0.0
    for a, c in sorted(points, key=lambda p: -p[1]):  # sweep from high compression down
        if a > best_accuracy:
            area += (a - best_accuracy) * c
            best_accuracy = a
    return area


def best_at_target(rows: list[dict], full_accuracy: float) -> dict | None:
    """The row (``{"accuracy", "compression", ...}``) of highest compression among those within the accuracy
    tolerance of ``full_accuracy`` (the first of equal ones), or None when none is."""
    ok = [r for r in rows if within_tolerance(r["accuracy"], full_accuracy)]
    return max(ok, key=lambda r: r["compression"]) if ok else None
