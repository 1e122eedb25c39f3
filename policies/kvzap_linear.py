"""KVzap-linear: one linear map per layer, hidden -> kv_heads, fitted by ridge regression in closed form.

The fitted maps are kvpress's ``KVzapModel`` modules exactly (``nn.Linear`` per layer, or Linear-GELU-Linear for
KVzap-MLP), so a checkpoint predicts the same in kvpress (:mod:`kvzap_lab.checkpoint`). :class:`KVzapLinear` also
holds the network machinery that KVzap-MLP reuses: ``weights_`` is a list of ``(W [layers, out, in],
b [layers, out])``, GELU between them; :meth:`KVzapLinear.fused_weights` hands one or two maps to the eviction
engine's fused scoring.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from kvzap_lab import checkpoint
from kvzap_lab.policy import register_policy
from kvzap_lab.surrogate import Interval, TrainableScorer


@register_policy("kvzap_linear", "linear")
class KVzapLinear(TrainableScorer):
    """Ridge regression per layer (``alpha`` as in sklearn's Ridge; the intercept is not penalised)."""

    policy_name = "kvzap_linear"
    param_ranges = {"alpha": Interval(float, 0.0)}

    def __init__(self, alpha: float = 1.0):
        self.alpha = alpha

    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        maps = [self._ridge(torch.from_numpy(X[:, layer]).double(), torch.from_numpy(y[:, layer]).double())
                for layer in range(X.shape[1])]  # one layer at a time: X in float64 would not fit a real model's data
        self.weights_ = [(torch.stack([W for W, _ in maps]).float(), torch.stack([b for _, b in maps]).float())]

    def _ridge(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Ridge of ``t [n, K]`` on ``x [n, H]`` with an unpenalised intercept -> ``W [K, H]``, ``b [K]``."""
        x_mean, t_mean = x.mean(0), t.mean(0)
        xc = x - x_mean
        gram = xc.T @ xc + self.alpha * torch.eye(x.shape[1], dtype=x.dtype)
        W = torch.linalg.solve(gram, xc.T @ (t - t_mean)).T
        return W, t_mean - W @ x_mean

    def _predict_layer(self, x: Tensor, layer: int) -> Tensor:
        for i, (W, b) in enumerate(self.weights_):
            x = F.gelu(x) if i else x
            x = x @ W[layer].T + b[layer]
        return x

    def fused_weights(self) -> list[tuple[Tensor, Tensor]] | None:
        """``weights_`` for the fused KVzap kernel: one map (linear) or two (MLP of depth 1); None for deeper MLPs."""
        self._check_fitted()
        return self.weights_ if len(self.weights_) <= 2 else None

    def flops_per_token(self) -> int:
        """FLOPs (a multiply-add counts 2) to score one token in every layer."""
        return sum(2 * W.shape[0] * W.shape[1] * W.shape[2] for W, _ in self.weights_)

    def _learned_shapes(self) -> dict:
        W_first, W_last = self.weights_[0][0], self.weights_[-1][0]
        return {"n_layers": W_first.shape[0], "hidden_size": W_first.shape[2], "n_kv_heads": W_last.shape[1]}

    def _config(self) -> dict:
        shapes, depth = self._learned_shapes(), len(self.weights_) - 1
        hidden_dim = None if depth == 0 else self.weights_[0][0].shape[1]
        config = checkpoint.kvzap_config(shapes["hidden_size"], shapes["n_kv_heads"], hidden_dim, shapes["n_layers"], depth)
        return config | {"kvzap_lab": {"depth": depth}}

    def _state(self) -> dict[str, Tensor]:
        return checkpoint.kvzap_state(self.weights_)

    def _set_state(self, config: dict, tensors: dict[str, Tensor], path) -> None:
        self.weights_ = checkpoint.kvzap_weights(config, tensors, path)
