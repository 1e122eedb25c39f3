"""KVzap-linear search space: the ridge penalty alpha."""

from __future__ import annotations

from kvzap_lab.studies.space import Float

FIXED: dict = {}


def space(spec) -> dict:
    """Dimensions for a model ``spec``; names are KVzapLinear arguments."""
    return {"alpha": Float(1e-3, 1e4, log=True, default=1.0)}
