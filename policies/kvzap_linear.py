"""KVzap-linear: one linear map per layer, hidden -> kv_heads, fitted by ridge regression in closed form.

The fitted weights use NVIDIA's KVzap layout (``module_list.{layer}.weight [kv_heads, hidden]`` and ``.bias``),
so checkpoints are interchangeable with kvpress. :class:`KVzapLinear` also holds the network machinery that
KVzap-MLP reuses: ``weights_`` is a list of ``(W [layers, out, in], b [layers, out])``, GELU between them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from kvzap_lab.policy import register_policy
from kvzap_lab.surrogate import TrainableScorer


@register_policy("kvzap_linear", "linear")
class KVzapLinear(TrainableScorer):
    """Ridge regression per layer (``alpha`` as in sklearn's Ridge; the intercept is not penalised)."""

    policy_name = "kvzap_linear"

    def __init__(self, alpha: float = 1.0):
        self.alpha = alpha

    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        x, t = torch.from_numpy(X).double(), torch.from_numpy(y).double()
        x_mean, t_mean = x.mean(0), t.mean(0)  # [L, H], [L, K]
        xc, tc = x - x_mean, t - t_mean
        gram = torch.einsum("nlh,nlg->lhg", xc, xc) + self.alpha * torch.eye(x.shape[2], dtype=x.dtype)
        W = torch.linalg.solve(gram, torch.einsum("nlh,nlk->lhk", xc, tc)).transpose(1, 2)  # [L, K, H]
        b = t_mean - torch.einsum("lkh,lh->lk", W, x_mean)
        self.weights_ = [(W.float(), b.float())]

    def _predict_layer(self, x: Tensor, layer: int) -> Tensor:
        for i, (W, b) in enumerate(self.weights_):
            x = F.gelu(x) if i else x
            x = x @ W[layer].T + b[layer]
        return x

    def flops_per_token(self) -> int:
        """FLOPs (a multiply-add counts 2) to score one token in every layer."""
        return sum(2 * W.shape[0] * W.shape[1] * W.shape[2] for W, _ in self.weights_)

    def _config(self) -> dict:
        depth = len(self.weights_) - 1
        meta = self.trained_for_
        return {
            # kvpress can load depth 0 and 1 (its KVzapModel); deeper MLPs get another model_type so it refuses them
            "model_type": "kvzap" if depth <= 1 else "kvzap_lab_deep_mlp",
            "architectures": ["KVzapModel"],
            "input_dim": meta["hidden_size"],
            "output_dim": meta["n_kv_heads"],
            "hidden_dim": None if depth == 0 else self.weights_[0][0].shape[1],
            "n_modules": meta["n_layers"],
            "depth": depth,
            "dtype": "float32",
        }

    def _state(self) -> dict[str, np.ndarray]:
        depth = len(self.weights_) - 1
        state = {}
        for i, (W, b) in enumerate(self.weights_):
            for layer in range(W.shape[0]):
                key = f"module_list.{layer}" + (f".{2 * i}" if depth else "")
                state[f"{key}.weight"], state[f"{key}.bias"] = W[layer].numpy(), b[layer].numpy()
        return state

    def _set_state(self, config: dict, tensors: dict[str, np.ndarray]) -> None:
        depth, n_modules = config.get("depth", 0 if config["hidden_dim"] is None else 1), config["n_modules"]
        self.weights_ = []
        for i in range(depth + 1):
            keys = [f"module_list.{layer}" + (f".{2 * i}" if depth else "") for layer in range(n_modules)]
            missing = [f"{k}.weight" for k in keys if f"{k}.weight" not in tensors]
            if missing:
                raise ValueError(f"KVzap checkpoint lacks {missing[:3]}{'...' if len(missing) > 3 else ''} for depth {depth}")
            W = torch.stack([torch.from_numpy(tensors[f"{k}.weight"]).float() for k in keys])
            b = torch.stack([torch.from_numpy(tensors[f"{k}.bias"]).float() for k in keys])
            self.weights_.append((W, b))
