"""KVzap-MLP: per layer hidden -> width (hidden/8) -> kv_heads with GELU, trained with MSE on log-scores.

AdamW, cosine schedule, gradient clipping, batch 512 (the paper's recipe). All layers train at once as one
batched einsum; each layer keeps its own best epoch on a validation split carved from the training data
(early stopping when no layer improved for ``patience`` epochs). Inputs and targets are standardised during
training and the scaling is folded back into the first and last linear maps, so the result is a plain
Linear-GELU-Linear per layer, kvpress's ``KVzapModel`` module exactly (``depth`` > 1 stacks more hidden layers;
kvpress has no such model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from kvzap_lab.policies.kvzap_linear import KVzapLinear
from kvzap_lab.policy import register_policy
from kvzap_lab.surrogate import Interval


def _forward_all_layers(weights: list, x: torch.Tensor) -> torch.Tensor:
    """``x [batch, layers, in]`` through every layer's network at once -> ``[batch, layers, kv_heads]``."""
    for i, (W, b) in enumerate(weights):
        x = torch.einsum("bli,loi->blo", F.gelu(x) if i else x, W) + b
    return x


def _mean_std(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation (+1e-6) over rows of ``x [n, ...]``; two passes, faster than ``Tensor.std``."""
    mean = x.mean(0)
    return mean, (x - mean).square().mean(0).sqrt() + 1e-6


@dataclass
class StandardisedRows:
    """The rows of a fit: a seeded validation split, and the statistics of the training rows that standardise
    hidden states per layer (``x_mean``, ``x_std [L, H]``) and targets per layer and head (``t_mean``, ``t_std
    [L, K]``); ``ts`` are all targets standardised. Hidden states are standardised per batch (:meth:`xs`): a
    real model's dataset (1e5 rows x 30 layers x 576) would otherwise hold several float32 copies of X at once;
    for the same reason ``x`` may be float16 (statistics and batches are computed in float32)."""

    x: Tensor
    train: Tensor
    val: Tensor
    x_mean: Tensor
    x_std: Tensor
    t_mean: Tensor
    t_std: Tensor
    ts: Tensor

    @classmethod
    def split(cls, X: np.ndarray, y: np.ndarray, validation_fraction: float, generator: torch.Generator) -> "StandardisedRows":
        """Carve ``validation_fraction`` of ``X [n, L, H]`` / ``y [n, L, K]`` (at least one row) with ``generator``."""
        n, n_layers = X.shape[:2]
        order = torch.randperm(n, generator=generator)
        n_val = max(1, int(round(n * validation_fraction)))
        if n - n_val < 1:
            raise ValueError(f"{n} training rows are too few to carve a validation split of {validation_fraction}")
        val, train = order[:n_val], order[n_val:]
        x, t = torch.from_numpy(X), torch.from_numpy(y)
        per_layer = [_mean_std(x[train, layer].float()) for layer in range(n_layers)]  # layer by layer: one copy of X
        x_mean, x_std = torch.stack([m for m, _ in per_layer]), torch.stack([s for _, s in per_layer])
        t_mean, t_std = _mean_std(t[train])
        return cls(x, train, val, x_mean, x_std, t_mean, t_std, (t - t_mean) / t_std)

    def xs(self, rows: Tensor) -> Tensor:
        """Standardised hidden states of ``rows``: ``[len(rows), L, H]`` float32 (``x`` may be float16)."""
        return (self.x[rows].float() - self.x_mean) / self.x_std


def init_maps(n_layers: int, dims: list[int], generator: torch.Generator) -> list[tuple[Tensor, Tensor]]:
    """Per-layer maps ``[(W [layers, out, in], b [layers, out])]`` between ``dims``, nn.Linear's default init."""
    weights = []
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        bound = 1 / math.sqrt(d_in)
        W = (torch.rand(n_layers, d_out, d_in, generator=generator) * 2 - 1) * bound
        b = (torch.rand(n_layers, d_out, generator=generator) * 2 - 1) * bound
        weights.append((W.requires_grad_(), b.requires_grad_()))
    return weights


def fit_per_layer(recipe, params: list[Tensor], train: Tensor, generator: torch.Generator, batch_loss: Callable,
                  validation_loss: Callable) -> tuple[list[Tensor], Tensor]:
    """KVzap-MLP's training recipe over per-layer ``params`` (each ``[layers, ...]``): AdamW, cosine schedule,
    gradient clipping, shuffled batches of the ``train`` row indices (``batch_loss(rows)`` -> scalar); after every
    epoch each layer keeps its values of the epoch with its best ``validation_loss() -> [layers]``; stops when no
    layer improved for ``patience`` epochs. ``recipe`` holds the settings (a KVzap-MLP-like scorer: ``lr``,
    ``weight_decay``, ``epochs``, ``batch_size``, ``grad_clip``, ``patience``, ``verbose``). Returns the best
    values (in ``params`` order) and the best validation loss per layer."""
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    steps_per_epoch = math.ceil(len(train) / recipe.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=recipe.epochs * steps_per_epoch)
    best = [p.detach().clone() for p in params]
    best_loss = torch.full((params[0].shape[0],), math.inf)
    stale = 0
    for _ in tqdm(range(recipe.epochs), desc=f"{recipe.policy_name} epochs", disable=not recipe.verbose):
        shuffled = train[torch.randperm(len(train), generator=generator)]
        for start in range(0, len(shuffled), recipe.batch_size):
            loss = batch_loss(shuffled[start : start + recipe.batch_size])
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
            optimizer.step()
            schedule.step()
        with torch.no_grad():
            val_loss = validation_loss()  # [L]
            improved = val_loss < best_loss
            for p, kept in zip(params, best):
                kept[improved] = p[improved]
            best_loss = torch.minimum(best_loss, val_loss)
        stale = 0 if improved.any() else stale + 1
        if stale >= recipe.patience:
            break
    return best, best_loss


@register_policy("kvzap_mlp", "mlp")
class KVzapMLP(KVzapLinear):
    """Per-layer MLP scorer; ``width`` defaults to hidden/8, ``depth`` is the number of hidden layers;
    ``n_threads`` caps the thread count while training (``None``: the process's torch setting)."""

    policy_name = "kvzap_mlp"
    param_ranges = {
        "width": Interval(int, 1, none=True),
        "depth": Interval(int, 1),
        "lr": Interval(float, 0.0, low_open=True),
        "weight_decay": Interval(float, 0.0),
        "epochs": Interval(int, 1),
        "batch_size": Interval(int, 1),
        "grad_clip": Interval(float, 0.0, low_open=True),
        "validation_fraction": Interval(float, 0.0, 1.0, low_open=True, high_open=True),
        "patience": Interval(int, 1),
        "seed": Interval(int, 0),
        "n_threads": Interval(int, 1, none=True),
        "verbose": Interval(bool),
    }

    def __init__(
        self,
        width: int | None = None,
        depth: int = 1,
        lr: float = 5e-3,
        weight_decay: float = 0.01,
        epochs: int = 15,
        batch_size: int = 512,
        grad_clip: float = 1.0,
        validation_fraction: float = 0.05,
        patience: int = 3,
        seed: int = 0,
        n_threads: int | None = None,
        verbose: bool = False,
    ):
        self.width = width
        self.depth = depth
        self.lr = lr
        self.weight_decay = weight_decay
        self.epochs = epochs
        self.batch_size = batch_size
        self.grad_clip = grad_clip
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.seed = seed
        self.n_threads = n_threads
        self.verbose = verbose

    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        _, n_layers, hidden = X.shape
        width = self.width or max(1, hidden // 8)
        generator = torch.Generator().manual_seed(self.seed)
        data = StandardisedRows.split(X, y, self.validation_fraction, generator)
        ts, xs = data.ts, data.xs
        weights = init_maps(n_layers, [hidden] + [width] * self.depth + [y.shape[2]], generator)
        best, best_loss = fit_per_layer(
            self, [p for pair in weights for p in pair], data.train, generator,
            lambda rows: F.mse_loss(_forward_all_layers(weights, xs(rows)), ts[rows]),
            lambda: ((_forward_all_layers(weights, xs(data.val)) - ts[data.val]) ** 2).mean(dim=(0, 2)),
        )
        self.validation_mse_ = best_loss.tolist()  # per layer, in standardised target units
        best = list(zip(best[0::2], best[1::2]))
        self.weights_ = self._fold_standardisation(best, data.x_mean, data.x_std, data.t_mean, data.t_std)

    @staticmethod
    def _fold_standardisation(weights: list, x_mean, x_std, t_mean, t_std) -> list:
        """Rewrite the first map to take raw hidden states and the last to emit raw log-scores."""
        W0, b0 = weights[0]
        W0 = W0 / x_std[:, None, :]
        b0 = b0 - torch.einsum("loi,li->lo", W0, x_mean)
        folded = [(W0, b0)] + weights[1:]
        Wn, bn = folded[-1]
        folded[-1] = (Wn * t_std[:, :, None], bn * t_std + t_mean)
        return [(W.contiguous(), b.contiguous()) for W, b in folded]
