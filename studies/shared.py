"""KVzap-shared search space: the shared trunk's width and depth, the layer embedding's size, learning rate,
epochs, weight decay (defaults: KVzap-MLP's recipe, width hidden/8, one hidden layer, an 8-dim embedding)."""

from __future__ import annotations

from kvzap_lab.studies.space import Float, Int

FIXED: dict = {}  # training uses the process's threads: all cores, or cores / N with --workers N


def space(spec) -> dict:
    """Dimensions for a model ``spec`` (:class:`kvzap_lab.model.ModelSpec`); names are KVzapShared arguments."""
    hidden = spec.hidden_size
    return {
        "width": Int(max(2, hidden // 32), max(4, hidden // 2), log=True, default=max(2, hidden // 8)),
        "embedding_dim": Int(1, 32, log=True, default=8),
        "depth": Int(1, 3, default=1),
        "lr": Float(1e-4, 3e-2, log=True, default=5e-3),
        "epochs": Int(3, 15, log=True, default=15),
        "weight_decay": Float(1e-4, 0.3, log=True, default=0.01),
    }
