"""Gradient-boosted trees: one scikit-learn HistGradientBoostingRegressor per layer and KV head.

Neither sklearn nor LightGBM fits multi-output targets, so each (layer, head) gets its own model, fitted on a
seeded subset of rows (``max_rows``) with feature subsampling per split (``max_features``) so training takes
minutes. After fitting, the trees are flattened into plain arrays (feature, threshold, children, leaf value),
saved as safetensors (never pickled) and evaluated by a vectorised traversal of all trees at once.

scikit-learn has no public API for the structure of histogram-boosted trees (``GradientBoostingRegressor``'s
public ``tree_`` arrays come with exact splits, ~8x slower to fit here), so :func:`flatten_trees` reads the
fitted predictors' node records: the one place that does, checked field by field, for the scikit-learn range
pinned in pyproject.toml (tested on 1.9). Only fitting touches scikit-learn; a saved scorer needs numpy alone.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.ensemble import HistGradientBoostingRegressor
from torch import Tensor
from tqdm.auto import tqdm

from kvzap_lab.checkpoint import CheckpointError
from kvzap_lab.policy import register_policy
from kvzap_lab.surrogate import Interval, TrainableScorer

_TREE_FIELDS = ("feature", "threshold", "left", "right", "is_leaf", "value")
# scikit-learn's node record fields that flatten_trees reads (sklearn.ensemble._hist_gradient_boosting)
_SKLEARN_NODE_FIELDS = ("feature_idx", "num_threshold", "left", "right", "is_leaf", "value")


def flatten_trees(estimators: list[HistGradientBoostingRegressor]) -> dict[str, np.ndarray]:
    """The trees of one model per KV head as flat node arrays; children and ``roots [heads, trees]`` index them."""
    nodes = {k: [] for k in _TREE_FIELDS}
    roots, offset = [], 0
    for est in estimators:
        head_roots = []
        for rec in _node_records(est):
            head_roots.append(offset)
            nodes["feature"].append(rec["feature_idx"].astype(np.int64))
            nodes["threshold"].append(rec["num_threshold"].astype(np.float64))
            nodes["left"].append(rec["left"].astype(np.int64) + offset)
            nodes["right"].append(rec["right"].astype(np.int64) + offset)
            nodes["is_leaf"].append(rec["is_leaf"].astype(bool))
            nodes["value"].append(rec["value"].astype(np.float64))
            offset += len(rec)
        roots.append(head_roots)
    if len({len(r) for r in roots}) != 1:
        raise RuntimeError("every head must have the same number of trees (early stopping is off)")
    flat = {k: np.concatenate(v) for k, v in nodes.items()}
    flat["roots"] = np.asarray(roots, dtype=np.int64)
    flat["baseline"] = np.asarray([float(np.ravel(est._baseline_prediction)[0]) for est in estimators])
    return flat


def _node_records(est: HistGradientBoostingRegressor) -> list[np.ndarray]:
    """The node record array of each tree of a fitted single-output model (scikit-learn internals, checked)."""
    import sklearn

    try:
        records = [predictors[0].nodes for predictors in est._predictors]
        baseline = est._baseline_prediction
    except AttributeError as err:
        raise RuntimeError(f"scikit-learn {sklearn.__version__} changed its boosted-tree internals ({err}); "
                           "install the version range that pyproject.toml pins") from None
    for rec in records:
        absent = [f for f in _SKLEARN_NODE_FIELDS if f not in (rec.dtype.names or ())]
        if absent:
            raise RuntimeError(f"scikit-learn {sklearn.__version__} tree nodes lack {absent}; install the version "
                               "range that pyproject.toml pins")
    if np.size(baseline) != 1:
        raise RuntimeError(f"expected one baseline per single-output model; got shape {np.shape(baseline)}")
    return records


def predict_trees(trees: dict[str, np.ndarray], x: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Sum of leaf values over each head's trees plus its baseline: ``x [m, hidden]`` -> ``[m, heads]``."""
    out = np.empty((len(x), len(trees["baseline"])))
    for start in range(0, len(x), chunk):
        xb = x[start : start + chunk]
        node = np.broadcast_to(trees["roots"], (len(xb),) + trees["roots"].shape).copy()  # [m, heads, trees]
        rows = np.arange(len(xb))[:, None, None]
        while not (done := trees["is_leaf"][node]).all():
            go_left = xb[rows, trees["feature"][node]] <= trees["threshold"][node]
            child = np.where(go_left, trees["left"][node], trees["right"][node])
            node = np.where(done, node, child)
        out[start : start + chunk] = trees["value"][node].sum(-1) + trees["baseline"]
    return out


@register_policy("gbdt")
class GBDTScorer(TrainableScorer):
    """Boosted trees per layer and KV head, trained on at most ``max_rows`` seeded rows with ``n_threads`` OpenMP
    threads (one avoids the huge slowdowns of OpenMP on busy machines; raise it on a dedicated many-core box)."""

    policy_name = "gbdt"
    param_ranges = {
        "max_iter": Interval(int, 1),
        "learning_rate": Interval(float, 0.0, low_open=True),
        "max_leaf_nodes": Interval(int, 2),
        "max_depth": Interval(int, 1, none=True),
        "min_samples_leaf": Interval(int, 1),
        "l2_regularization": Interval(float, 0.0),
        "max_features": Interval(float, 0.0, 1.0, low_open=True),
        "max_rows": Interval(int, 1),
        "seed": Interval(int, 0),
        "n_threads": Interval(int, 1, none=True),
        "verbose": Interval(bool),
    }

    def __init__(
        self,
        max_iter: int = 100,
        learning_rate: float = 0.1,
        max_leaf_nodes: int = 31,
        max_depth: int | None = None,
        min_samples_leaf: int = 20,
        l2_regularization: float = 0.0,
        max_features: float = 0.5,
        max_rows: int = 50_000,
        seed: int = 0,
        n_threads: int = 1,
        verbose: bool = False,
    ):
        self.max_iter = max_iter
        self.learning_rate = learning_rate
        self.max_leaf_nodes = max_leaf_nodes
        self.max_depth = max_depth
        self.min_samples_leaf = min_samples_leaf
        self.l2_regularization = l2_regularization
        self.max_features = max_features
        self.max_rows = max_rows
        self.seed = seed
        self.n_threads = n_threads
        self.verbose = verbose

    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        rng = np.random.default_rng(self.seed)
        rows = np.sort(rng.choice(len(X), size=min(len(X), self.max_rows), replace=False))
        n_layers, n_heads = y.shape[1], y.shape[2]
        self.trees_ = []
        progress = tqdm(total=n_layers * n_heads, desc="gbdt (layer, head) models", disable=not self.verbose)
        for layer in range(n_layers):
            estimators = []
            for head in range(n_heads):
                est = HistGradientBoostingRegressor(
                    max_iter=self.max_iter,
                    learning_rate=self.learning_rate,
                    max_leaf_nodes=self.max_leaf_nodes,
                    max_depth=self.max_depth,
                    min_samples_leaf=self.min_samples_leaf,
                    l2_regularization=self.l2_regularization,
                    max_features=self.max_features,
                    early_stopping=False,
                    random_state=int(rng.integers(2**31)),
                )
                estimators.append(est.fit(X[rows, layer], y[rows, layer, head]))
                progress.update()
            self.trees_.append(flatten_trees(estimators))
        progress.close()

    def _predict_layer(self, x: Tensor, layer: int) -> Tensor:
        return torch.from_numpy(predict_trees(self.trees_[layer], x.double().numpy())).float()

    def flops_per_token(self) -> int:
        """Comparisons per token over all layers (one per tree level visited, at the deepest path: an upper bound)."""
        total = 0
        for trees in self.trees_:
            depth = _max_depth(trees)
            total += trees["roots"].size * depth
        return total

    def _learned_shapes(self) -> dict:
        used = max(int(trees["feature"][~trees["is_leaf"]].max(initial=-1)) for trees in self.trees_)
        return {"n_layers": len(self.trees_), "n_kv_heads": self.trees_[0]["roots"].shape[0], "min_hidden_size": used + 1}

    def _config(self) -> dict:
        return {"model_type": "kvzap_lab_gbdt", "n_modules": len(self.trees_)}

    def _state(self) -> dict[str, np.ndarray]:
        return {f"layer{layer}.{k}": v for layer, trees in enumerate(self.trees_) for k, v in trees.items()}

    def _set_state(self, config: dict, tensors: dict, path) -> None:
        weights_path = path / "model.safetensors"
        n = config.get("n_modules")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise CheckpointError(f"{path / 'config.json'}: n_modules must be an int >= 1; got {n!r}")
        keys = _TREE_FIELDS + ("roots", "baseline")
        expected = {f"layer{layer}.{k}" for layer in range(n) for k in keys}
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        if missing or unexpected:
            raise CheckpointError(f"{weights_path} does not fit n_modules {n}: missing {missing[:3]}, unexpected {unexpected[:3]}")
        trees = [{k: tensors[f"layer{layer}.{k}"].numpy() for k in keys} for layer in range(n)]
        for layer, t in enumerate(trees):
            _check_trees(t, f"{weights_path} (layer {layer})")
        if len({t["roots"].shape[0] for t in trees}) != 1:
            raise CheckpointError(f"{weights_path}: the layers have different numbers of KV heads")
        self.trees_ = trees


def _check_trees(trees: dict[str, np.ndarray], where: str) -> None:
    """Raise a CheckpointError unless the flat arrays form trees that :func:`predict_trees` can walk."""
    n = len(trees["feature"])
    if any(trees[k].shape != (n,) for k in _TREE_FIELDS) or trees["roots"].ndim != 2 or trees["baseline"].shape != trees["roots"].shape[:1]:
        raise CheckpointError(f"{where}: tree arrays of inconsistent shapes")
    inner = ~trees["is_leaf"].astype(bool)
    nodes = np.arange(n)
    children_ok = all(((trees[k][inner] > nodes[inner]) & (trees[k][inner] < n)).all() for k in ("left", "right"))
    if not (children_ok and (trees["feature"][inner] >= 0).all() and ((trees["roots"] >= 0) & (trees["roots"] < n)).all()):
        raise CheckpointError(f"{where}: tree arrays point outside their nodes (corrupted)")


def _max_depth(trees: dict[str, np.ndarray]) -> int:
    """Depth of the deepest leaf over all trees of one layer."""
    depth = np.zeros(len(trees["feature"]), dtype=np.int64)
    for node in range(len(depth)):  # children always come after their parent in sklearn's node arrays
        if not trees["is_leaf"][node]:
            depth[trees["left"][node]] = depth[trees["right"][node]] = depth[node] + 1
    return int(depth.max())
