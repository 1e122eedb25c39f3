"""KVzap-shared: one GELU MLP for all layers, told which layer it scores by a learned layer embedding.

KVzap trains a separate network per layer, so each layer's weights see only that layer's rows. Here the trunk
(hidden -> width -> ... -> width, GELU) is shared by every layer, so every weight is trained on ``layers`` times
more rows; what differs between layers is small:

- the input is the hidden state standardised with its own layer's mean and std (hidden-state scales grow
  through a model, a shared first map cannot absorb that);
- a layer embedding ``e_l`` (size ``embedding_dim``) sets a per-unit gain and shift of every hidden layer
  (FiLM: ``gelu((1 + g_l) * (W x + b) + s_l)``, ``[g_l, s_l] = A e_l + c``). Concatenating ``e_l`` to the input
  would only shift the first pre-activation by a per-layer constant; the gain also lets each layer rescale, or
  switch off, shared units, for ``width`` multiplies per hidden layer per token;
- the output map (width -> kv_heads) is per layer: the KV heads of different layers are different heads, so a
  shared output would make the trunk encode each head's identity, and it costs only ``kv_heads * width``
  parameters per layer. Targets are standardised per (layer, head) while training and the scaling is folded
  into this map, so it emits raw log KVzip+ scores.

Trained like KVzap-MLP (AdamW, cosine schedule, gradient clipping, early stopping on a validation split carved
from the training rows), on the mean loss over all layers. A token's score depends on its own hidden state only,
so the scorer is causal and scores each token once, in prefill and in decoding.

For a given layer, the standardisation, the gains and the shifts are constants, so they fold into that layer's
maps: at inference the scorer *is* a per-layer MLP of the same width and depth (``maps_``, KVzap-MLP's layout),
with KVzap-MLP's FLOPs per token, and at depth 1 the engine runs it through the fused KVzap kernel. Sharing saves
parameters (what is trained and saved: ``weights_``), not FLOPs: every shared weight sees every layer's rows.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from kvzap_lab.checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointError, _positive_int, check_weights
from kvzap_lab.policies.kvzap_mlp import KVzapMLP, StandardisedRows
from kvzap_lab.policy import register_policy
from kvzap_lab.surrogate import Interval, TrainableScorer

MODEL_TYPE = "kvzap_lab_shared_mlp"


def _depth(w: dict[str, Tensor]) -> int:
    return sum(key.startswith("trunk.") for key in w) // 2


def _film(w: dict[str, Tensor], i: int, embedding: Tensor) -> tuple[Tensor, Tensor]:
    """Gain and shift ``[n, width]`` of hidden layer ``i`` for layer embeddings ``embedding [n, E]``."""
    return (embedding @ w[f"film.{i}.weight"].T + w[f"film.{i}.bias"]).chunk(2, dim=-1)


def _forward(w: dict[str, Tensor], x: Tensor, layers: Tensor) -> Tensor:
    """Standardised ``x [b, n, hidden]`` of layers ``layers [n]`` -> ``[b, n, kv_heads]`` (head map applied)."""
    embedding = w["embedding"][layers]  # [n, E]
    for i in range(_depth(w)):
        gain, shift = _film(w, i, embedding)
        x = F.gelu((1 + gain) * (x @ w[f"trunk.{i}.weight"].T + w[f"trunk.{i}.bias"]) + shift)
    return torch.einsum("bnw,nkw->bnk", x, w["head.weight"][layers]) + w["head.bias"][layers]


def fold(w: dict[str, Tensor]) -> list[tuple[Tensor, Tensor]]:
    """Each layer's standardisation, gains and shifts folded into its own maps: ``[(W [layers, out, in],
    b [layers, out]), ...]`` with GELU between (KVzap-MLP's ``weights_`` layout), predicting what :func:`_forward`
    predicts from raw hidden states."""
    n_layers = w["embedding"].shape[0]
    maps, scale, offset = [], 1 / w["x_std"], -w["x_mean"] / w["x_std"]  # the first map's input: x * scale + offset
    for i in range(_depth(w)):
        gain, shift = _film(w, i, w["embedding"])  # [layers, width] each
        W, b = w[f"trunk.{i}.weight"].expand(n_layers, -1, -1), w[f"trunk.{i}.bias"]
        if i == 0:
            W, b = W * scale[:, None, :], b + torch.einsum("loi,li->lo", W, offset)
        maps.append(((1 + gain)[:, :, None] * W, (1 + gain) * b + shift))
    maps.append((w["head.weight"], w["head.bias"]))
    return [(W.detach().contiguous(), b.detach().contiguous()) for W, b in maps]


def _expected_shapes(n_layers: int, hidden: int, kv_heads: int, width: int, embedding_dim: int, depth: int) -> dict:
    """Every tensor of a fitted scorer and its shape."""
    shapes = {"x_mean": (n_layers, hidden), "x_std": (n_layers, hidden), "embedding": (n_layers, embedding_dim),
              "head.weight": (n_layers, kv_heads, width), "head.bias": (n_layers, kv_heads)}
    for i in range(depth):
        shapes |= {f"trunk.{i}.weight": (width, hidden if i == 0 else width), f"trunk.{i}.bias": (width,),
                   f"film.{i}.weight": (2 * width, embedding_dim), f"film.{i}.bias": (2 * width,)}
    return shapes


@register_policy("kvzap_shared", "shared")
class KVzapShared(TrainableScorer):
    """One MLP shared by all layers with a layer embedding; ``width`` defaults to hidden/8 (KVzap-MLP's), ``depth``
    is the number of hidden layers, ``embedding_dim`` the layer embedding's size; ``n_threads`` caps the thread
    count while training (``None``: the process's torch setting)."""

    policy_name = "kvzap_shared"
    param_ranges = KVzapMLP.param_ranges | {"embedding_dim": Interval(int, 1)}  # KVzap-MLP's training recipe

    def __init__(
        self,
        width: int | None = None,
        embedding_dim: int = 8,
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
        self.embedding_dim = embedding_dim
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

    def _init_weights(self, shapes: dict, generator: torch.Generator) -> dict[str, Tensor]:
        """nn.Linear's default init for the maps; FiLM starts at zero (gain 1, shift 0); embedding ~ N(0, 1)."""
        weights = {}
        for key, shape in shapes.items():
            if key.startswith(("trunk.", "head.")):
                fan_in = shapes[key.rsplit(".", 1)[0] + ".weight"][-1]
                weights[key] = (torch.rand(shape, generator=generator) * 2 - 1) / math.sqrt(fan_in)
            elif key.startswith("film."):
                weights[key] = torch.zeros(shape)
            elif key == "embedding":
                weights[key] = torch.randn(shape, generator=generator)
        return {k: v.requires_grad_() for k, v in weights.items()}

    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        _, n_layers, hidden = X.shape
        width = self.width or max(1, hidden // 8)
        generator = torch.Generator().manual_seed(self.seed)
        data = StandardisedRows.split(X, y, self.validation_fraction, generator)
        train, val, ts, xs = data.train, data.val, data.ts, data.xs
        layers = torch.arange(n_layers)
        shapes = _expected_shapes(n_layers, hidden, y.shape[2], width, self.embedding_dim, self.depth)
        weights = self._init_weights(shapes, generator)
        optimizer = torch.optim.AdamW(weights.values(), lr=self.lr, weight_decay=self.weight_decay)
        steps_per_epoch = math.ceil(len(train) / self.batch_size)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.epochs * steps_per_epoch)
        best, best_loss, stale = {k: v.detach().clone() for k, v in weights.items()}, math.inf, 0
        for _ in tqdm(range(self.epochs), desc="kvzap_shared epochs", disable=not self.verbose):
            shuffled = train[torch.randperm(len(train), generator=generator)]
            for start in range(0, len(shuffled), self.batch_size):
                rows = shuffled[start : start + self.batch_size]
                loss = F.mse_loss(_forward(weights, xs(rows), layers), ts[rows])
                optimizer.zero_grad()
                loss.backward()
                torch.nn.utils.clip_grad_norm_(list(weights.values()), self.grad_clip)
                optimizer.step()
                schedule.step()
            with torch.no_grad():
                val_loss = ((_forward(weights, xs(val), layers) - ts[val]) ** 2).mean().item()
            if val_loss < best_loss:
                best, best_loss, stale = {k: v.detach().clone() for k, v in weights.items()}, val_loss, 0
            else:
                stale += 1
                if stale >= self.patience:
                    break
        self.validation_mse_ = best_loss  # mean over layers and heads, in standardised target units
        head_weight = best["head.weight"] * data.t_std[:, :, None]  # fold the target scaling into the per-layer output
        head_bias = best["head.bias"] * data.t_std + data.t_mean
        shared = best | {"x_mean": data.x_mean, "x_std": data.x_std, "head.weight": head_weight, "head.bias": head_bias}
        self.weights_ = {k: v.contiguous() for k, v in shared.items()}
        self.maps_ = fold(self.weights_)

    def _predict_layer(self, x: Tensor, layer: int) -> Tensor:
        for i, (W, b) in enumerate(self.maps_):
            x = (F.gelu(x) if i else x) @ W[layer].T + b[layer]
        return x

    def fused_weights(self) -> list[tuple[Tensor, Tensor]] | None:
        """The folded per-layer maps for the fused KVzap kernel at depth 1 (two maps, GELU between); None deeper."""
        self._check_fitted()
        return self.maps_ if len(self.maps_) == 2 else None

    def flops_per_token(self) -> int:
        """FLOPs (a multiply-add counts 2) to score one token in every layer, through the folded maps."""
        return sum(2 * W.shape[0] * W.shape[1] * W.shape[2] for W, _ in self.maps_)

    def _shapes(self) -> dict:
        w = self.weights_
        n_layers, kv_heads, width = w["head.weight"].shape
        return {"n_layers": n_layers, "hidden_size": w["x_mean"].shape[1], "n_kv_heads": kv_heads, "width": width,
                "embedding_dim": w["embedding"].shape[1], "depth": _depth(w)}

    def _learned_shapes(self) -> dict:
        return {k: v for k, v in self._shapes().items() if k in ("n_layers", "hidden_size", "n_kv_heads")}

    def _config(self) -> dict:
        s = self._shapes()
        return {"model_type": MODEL_TYPE, "n_modules": s["n_layers"], "input_dim": s["hidden_size"],
                "output_dim": s["n_kv_heads"], "hidden_dim": s["width"], "embedding_dim": s["embedding_dim"],
                "depth": s["depth"]}

    def _state(self) -> dict[str, Tensor]:
        return {k: v.detach().float().clone() for k, v in self.weights_.items()}

    def _set_state(self, config: dict, tensors: dict[str, Tensor], path) -> None:
        config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
        if config.get("model_type") != MODEL_TYPE:
            raise CheckpointError(f"{config_path}: model_type {config.get('model_type')!r} is not a shared-across-layers "
                                  f"scorer's ({MODEL_TYPE!r}); load it with the policy that wrote it")
        dims = [_positive_int(config, key, config_path)
                for key in ("n_modules", "input_dim", "output_dim", "hidden_dim", "embedding_dim", "depth")]
        expected = _expected_shapes(*dims[:3], *dims[3:])
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise CheckpointError(f"{weights_path} does not fit {config_path} (depth {dims[-1]}): missing "
                                  f"{missing[:3]}, unexpected {unexpected[:3]}")
        for key, shape in expected.items():
            if tuple(tensors[key].shape) != shape:
                raise CheckpointError(f"{weights_path}: {key} has shape {list(tensors[key].shape)}, but {config_path} "
                                      f"makes it {list(shape)}")
        check_weights(tensors, str(weights_path))
        if not (tensors["x_std"] > 0).all():
            raise CheckpointError(f"{weights_path}: x_std holds values <= 0 (a standard deviation); the file is corrupted")
        self.weights_ = {k: tensors[k].float().contiguous() for k in expected}
        self.maps_ = fold(self.weights_)
