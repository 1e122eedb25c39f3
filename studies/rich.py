"""KVzap-rich search space: which of the pair's features join the hidden state (the ``architecture`` dimension:
``features``, ``none`` being KVzap-MLP itself), then KVzap-MLP's width, depth, learning rate, epochs and weight
decay (defaults: post-RoPE key and log position, width hidden/8, one hidden layer, the paper's recipe)."""

from __future__ import annotations

from kvzap_lab.studies.mlp import space as mlp_space
from kvzap_lab.studies.space import Choice

FIXED: dict = {}  # training uses the process's threads: all cores, or cores / N with --workers N
FEATURE_SETS = ("key+log_position", "key", "log_position", "wo_norm+log_position", "key+wo_norm+log_position",
                "key+value+wo_norm+log_position", "none")


def space(spec) -> dict:
    """Dimensions for a model ``spec`` (:class:`kvzap_lab.model.ModelSpec`); names are KVzapRich arguments."""
    return {"features": Choice(FEATURE_SETS, default="key+log_position")} | mlp_space(spec)
