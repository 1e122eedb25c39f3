"""Gradient-boosted trees: one scikit-learn HistGradientBoostingRegressor per layer and KV head.

Neither sklearn nor LightGBM fits multi-output targets, so each (layer, head) gets its own model, fitted on a
seeded subset of rows (``max_rows``) with feature subsampling per split (``max_features``) so training takes
minutes. After fitting, the trees are flattened into plain arrays (feature, threshold, children, leaf value),
saved as safetensors (never pickled) and evaluated by a vectorised traversal of all trees at once.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.ensemble import HistGradientBoostingRegressor
from torch import Tensor
from tqdm.auto import tqdm

from kvzap_lab.policy import register_policy
from kvzap_lab.surrogate import TrainableScorer

_TREE_FIELDS = ("feature", "threshold", "left", "right", "is_leaf", "value")


def flatten_trees(estimators: list[HistGradientBoostingRegressor]) -> dict[str, np.ndarray]:
    """The trees of one model per KV head as flat node arrays; children and ``roots [heads, trees]`` index them."""
    nodes = {k: [] for k in _TREE_FIELDS}
    roots, offset = [], 0
    for est in estimators:
        head_roots = []
        for (predictor,) in est._predictors:
            rec = predictor.nodes
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

    def _config(self) -> dict:
        return {"model_type": "kvzap_lab_gbdt", "n_modules": len(self.trees_)}

    def _state(self) -> dict[str, np.ndarray]:
        return {f"layer{layer}.{k}": v for layer, trees in enumerate(self.trees_) for k, v in trees.items()}

    def _set_state(self, config: dict, tensors: dict[str, np.ndarray]) -> None:
        keys = _TREE_FIELDS + ("roots", "baseline")
        try:
            self.trees_ = [{k: tensors[f"layer{layer}.{k}"] for k in keys} for layer in range(config["n_modules"])]
        except KeyError as err:
            raise ValueError(f"boosted-tree checkpoint lacks tensor {err}") from None


def _max_depth(trees: dict[str, np.ndarray]) -> int:
    """Depth of the deepest leaf over all trees of one layer."""
    depth = np.zeros(len(trees["feature"]), dtype=np.int64)
    for node in range(len(depth)):  # children always come after their parent in sklearn's node arrays
        if not trees["is_leaf"][node]:
            depth[trees["left"][node]] = depth[trees["right"][node]] = depth[node] + 1
    return int(depth.max())
