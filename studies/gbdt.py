"""Boosted-trees search space: leaves, depth, learning rate, iterations, row and feature subsampling."""

from __future__ import annotations

from kvzap_lab.studies.space import Float, Int

FIXED = {"n_threads": 1}


def space(spec) -> dict:
    """Dimensions for a model ``spec``; names are GBDTScorer arguments (``max_rows`` is the row subsample)."""
    return {
        "max_leaf_nodes": Int(4, 64, log=True, default=31),
        "max_depth": Int(2, 16, default=16),  # 31 leaves rarely need more than 16 levels
        "learning_rate": Float(0.01, 0.3, log=True, default=0.1),
        "max_iter": Int(10, 200, log=True, default=100),
        "max_rows": Int(1_000, 50_000, log=True, default=50_000),
        "max_features": Float(0.1, 1.0, default=0.5),
    }
