"""KVzap-local search space: how many previous tokens each hidden unit mixes in (the ``architecture`` dimension:
``context``, 0 being KVzap-MLP itself), then KVzap-MLP's width, learning rate, epochs and weight decay (defaults: 4
previous tokens, width hidden/8, the paper's recipe). The study collects its dataset with 8 neighbours per row
(``KVzapLocal.study_neighbours``): ``context`` goes up to 8."""

from __future__ import annotations

from kvzap_lab.studies.mlp import space as mlp_space
from kvzap_lab.studies.space import Choice

FIXED: dict = {}  # training uses the process's threads: all cores, or cores / N with --workers N
CONTEXTS = (0, 1, 2, 4, 8)


def space(spec) -> dict:
    """Dimensions for a model ``spec`` (:class:`kvzap_lab.model.ModelSpec`); names are KVzapLocal arguments."""
    mlp = {k: v for k, v in mlp_space(spec).items() if k != "depth"}  # one hidden layer: the convolution's
    return {"context": Choice(CONTEXTS, default=4)} | mlp
