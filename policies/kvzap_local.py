"""KVzap-local: KVzap-MLP whose hidden units also see the ``context`` tokens before the scored one, through a
causal depthwise convolution.

A pair's KVzip+ importance depends on what the token means in its phrase (the second half of a name, a digit of
a number), which the hidden state of the token alone carries only in part. Per layer, the first map projects
each token's hidden state to ``width`` units (``p_t = W1 h_t + b1``, KVzap-MLP's first map), each unit mixes its
own projections of the token and of the ``k = context`` tokens before it (``z_t = sum_j c_j * p_(t-j)``, weights
``c [width, k + 1]``, starting at ``c_0 = 1`` and the others 0, so training starts from the plain MLP), then
GELU and the output map ``width -> kv_heads``. With ``context`` 0 this is KVzap-MLP exactly (same training, same
predictions; the engine then runs it through the fused kernel).

Causal: a token's score depends on itself and the ``k`` tokens before it only, and is computed once when it
arrives. The engine passes ``score(..., previous=[b, k, hidden])``, the hidden states of the ``k`` tokens before
the first new one (zeros before the start of the sequence and on left padding; the
:class:`~kvzap_lab.policy.Scorer` hook ``context``). Training rows carry the same: ``fit(X, y,
previous=[n, K, layers, hidden])`` with ``K >= context`` (a dataset collected with ``--neighbours K``; the last
``context`` are read; zeros before the context's first token).

FLOPs per token and layer: ``H * width + width * (k + 1) + width * kv_heads`` multiply-adds, with each token's
projection computed once (the cost of a kernel that keeps the last ``k`` projections). ``score()`` recomputes the
projections of the ``k`` previous tokens at every call: ``(t + k) / t`` times the first map for ``t`` new tokens.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from kvzap_lab.checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointError, _positive_int, check_weights
from kvzap_lab.policies.kvzap_mlp import KVzapMLP, StandardisedRows, fit_per_layer, init_maps
from kvzap_lab.policy import register_policy
from kvzap_lab.surrogate import Interval, TrainableScorer, check_training_data, limited_threads, training_facts

MODEL_TYPE = "kvzap_lab_local_mlp"
MAX_CONTEXT = 64
KEYS = ("W1", "b1", "conv", "W2", "b2")


def _expected_shapes(n_layers: int, hidden: int, kv_heads: int, width: int, context: int) -> dict:
    return {"W1": (n_layers, width, hidden), "b1": (n_layers, width), "conv": (n_layers, width, context + 1),
            "W2": (n_layers, kv_heads, width), "b2": (n_layers, kv_heads)}


def _forward_all_layers(w: dict[str, Tensor], windows: Tensor) -> Tensor:
    """``windows [batch, k + 1, layers, H]`` (oldest first, the scored token last) -> ``[batch, layers, kv_heads]``."""
    p = torch.einsum("btli,lwi->btlw", windows, w["W1"]) + w["b1"]
    z = torch.einsum("btlw,lwt->blw", p, w["conv"].flip(-1))  # conv[..., j]: the token j steps back
    return torch.einsum("blw,lkw->blk", F.gelu(z), w["W2"]) + w["b2"]


@register_policy("kvzap_local", "local")
class KVzapLocal(TrainableScorer):
    """KVzap-MLP over the scored token and its ``context`` previous tokens (a causal depthwise convolution of the
    first map's outputs, see the module docstring); ``width`` defaults to hidden/8, the other parameters are
    KVzap-MLP's recipe (one hidden layer); ``n_threads`` caps the thread count while training."""

    policy_name = "kvzap_local"
    param_ranges = {k: v for k, v in KVzapMLP.param_ranges.items() if k != "depth"} | {
        "context": Interval(int, 0, MAX_CONTEXT)
    }
    study_neighbours = 8  # the study collects each row's 8 previous hidden states (studies/local.py searches k <= 8)

    def __init__(
        self,
        context: int = 4,
        width: int | None = None,
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
        self.context = context  # also the Scorer hook: how many previous hidden states score() reads
        self.width = width
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

    # ------------------------------------------------------------------------------------------- fitting
    def fit(self, X, y, *, manifest: dict | None = None, model=None, positions=None, previous=None):
        """Fit on ``X [n, layers, hidden]``, ``y [n, layers, kv_heads]`` and each row's previous hidden states
        ``previous [n, K, layers, hidden]`` (``K >= context``, oldest first); returns ``self``."""
        self._check_params()
        X, y = check_training_data(X, y, manifest)
        previous = self._previous(previous, X)
        self.trained_for_ = training_facts(X, y, manifest)
        with limited_threads(self.n_threads):
            self._fit(X, y, previous)
        return self

    def _previous(self, previous, X: np.ndarray) -> Tensor:
        """The last ``context`` of each row's previous hidden states, checked against ``X``: ``[n, context, L, H]``,
        a view in the given dtype (float16 and bfloat16 stay so: batches are converted to float32 as they are read)."""
        if self.context == 0:
            return torch.zeros(len(X), 0, *X.shape[1:])
        if previous is None:
            raise ValueError(f"kvzap_local reads each row's {self.context} previous hidden states: previous=[n, >= "
                             f"{self.context}, layers, hidden] (a dataset collected with --neighbours {self.context} or more)")
        shape = tuple(previous.shape)
        if len(shape) != 4 or shape[0] != len(X) or shape[2:] != X.shape[1:] or shape[1] < self.context:
            raise ValueError(f"previous must be [n, >= {self.context}, layers, hidden] = [{len(X)}, >= {self.context}, "
                             f"{X.shape[1]}, {X.shape[2]}] (context {self.context}); got {list(shape)}")
        previous = torch.as_tensor(previous)[:, shape[1] - self.context :]
        if not previous.is_floating_point() or not torch.isfinite(previous).all():
            raise ValueError("previous must hold finite floats (hidden states); clean the dataset")
        return previous

    def _fit(self, X: np.ndarray, y: np.ndarray, previous: Tensor) -> None:
        _, n_layers, hidden = X.shape
        width = self.width or max(1, hidden // 8)
        generator = torch.Generator().manual_seed(self.seed)
        data = StandardisedRows.split(X, y, self.validation_fraction, generator)
        ts, before = data.ts, previous
        (W1, b1), (W2, b2) = init_maps(n_layers, [hidden, width, y.shape[2]], generator)
        conv = torch.zeros(n_layers, width, self.context + 1)
        conv[..., 0] = 1.0
        w = {"W1": W1, "b1": b1, "conv": conv.requires_grad_(self.context > 0), "W2": W2, "b2": b2}

        def windows(rows: Tensor) -> Tensor:  # standardised [len(rows), k + 1, L, H]
            seq = torch.cat([before[rows].float(), data.x[rows, None].float()], dim=1)
            return (seq - data.x_mean) / data.x_std

        trained = [key for key in KEYS if w[key].requires_grad]  # with context 0 the convolution is the identity
        best, best_loss = fit_per_layer(
            self, [w[key] for key in trained], data.train, generator,
            lambda rows: F.mse_loss(_forward_all_layers(w, windows(rows)), ts[rows]),
            lambda: ((_forward_all_layers(w, windows(data.val)) - ts[data.val]) ** 2).mean(dim=(0, 2)),
        )
        w |= dict(zip(trained, best))
        self.validation_mse_ = best_loss.tolist()  # per layer, in standardised target units
        (W1, b1), (W2, b2) = KVzapMLP._fold_standardisation([(w["W1"], w["b1"]), (w["W2"], w["b2"])], data.x_mean,
                                                            data.x_std, data.t_mean, data.t_std)
        self.weights_ = {"W1": W1, "b1": b1, "conv": w["conv"].detach().contiguous(), "W2": W2, "b2": b2}

    # ------------------------------------------------------------------------------------------- scoring
    def _score_windows(self, seq: Tensor, layer: int) -> Tensor:
        """``seq [m, k + t, H]`` float32 (the ``k`` previous tokens, then ``t`` scored ones) -> ``[m, t, kv_heads]``."""
        w = self.weights_
        p = seq @ w["W1"][layer].T + w["b1"][layer]  # [m, k + t, width]
        kernel = w["conv"][layer].flip(-1)[:, None]  # [width, 1, k + 1], oldest tap first
        z = F.conv1d(p.transpose(1, 2), kernel, groups=kernel.shape[0]).transpose(1, 2)  # [m, t, width]
        return F.gelu(z) @ w["W2"][layer].T + w["b2"][layer]

    def predict(self, X, *, positions=None, previous=None):
        """Predicted log-scores ``[n, layers, kv_heads]`` for ``X [n, layers, hidden]`` and ``previous [n, K, layers,
        hidden]`` as in :meth:`fit` (numpy in -> numpy out)."""
        self._check_fitted()
        is_numpy = not isinstance(X, Tensor)
        X_np, _ = check_training_data(X)
        self._check_hidden(X_np.shape[-1], X_np.shape[1])
        before, x = self._previous(previous, X_np), torch.from_numpy(X_np)
        with torch.no_grad():
            y = torch.stack([self._score_windows(torch.cat([before[:, :, layer].float(), x[:, layer, None]], 1), layer)[:, 0]
                             for layer in range(x.shape[1])], dim=1)
        return y.numpy() if is_numpy else y.to(X.device)

    def score(self, hidden: Tensor, layer: int, *, keys=None, values=None, positions=None, previous=None) -> Tensor:
        """Predicted log KVzip+ of the new tokens: ``hidden [b, t, H]`` and ``previous [b, context, H]`` (the hidden
        states of the ``context`` tokens before them, as the engine passes them) -> ``[b, kv_heads, t]``."""
        self._check_fitted()
        self._check_hidden(hidden.shape[-1], None, layer)
        b, t, h = hidden.shape
        if self.context:
            if previous is None or tuple(previous.shape) != (b, self.context, h):
                raise ValueError(f"kvzap_local scores from the {self.context} previous hidden states: score(hidden, layer, "
                                 f"previous=[{b}, {self.context}, {h}]); got {None if previous is None else list(previous.shape)}")
            hidden = torch.cat([previous.to(hidden.dtype), hidden], dim=1)
        with torch.no_grad():
            out = self._score_windows(hidden.detach().float().cpu(), layer)
        return out.transpose(1, 2).to(hidden.device)

    def fused_weights(self) -> list[tuple[Tensor, Tensor]] | None:
        """With ``context`` 0 the scorer is a KVzap-MLP: its two maps for the fused kernel; None otherwise."""
        self._check_fitted()
        w = self.weights_
        return [(w["W1"], w["b1"]), (w["W2"], w["b2"])] if self.context == 0 else None

    def flops_per_token(self) -> int:
        """FLOPs (a multiply-add counts 2) to score one token in every layer: both maps and the convolution, each
        token's projection counted once."""
        n_layers, width, hidden = self.weights_["W1"].shape
        kv_heads, taps = self.weights_["W2"].shape[1], self.weights_["conv"].shape[2]
        return 2 * n_layers * width * (hidden + taps + kv_heads)

    # ------------------------------------------------------------------------------------------- checkpoint
    def _learned_shapes(self) -> dict:
        n_layers, _, hidden = self.weights_["W1"].shape
        return {"n_layers": n_layers, "hidden_size": hidden, "n_kv_heads": self.weights_["W2"].shape[1]}

    def _config(self) -> dict:
        n_layers, width, hidden = self.weights_["W1"].shape
        return {"model_type": MODEL_TYPE, "n_modules": n_layers, "input_dim": hidden,
                "output_dim": self.weights_["W2"].shape[1], "hidden_dim": width, "context": self.context}

    def _state(self) -> dict[str, Tensor]:
        return {k: v.detach().float().clone() for k, v in self.weights_.items()}

    def _set_state(self, config: dict, tensors: dict[str, Tensor], path) -> None:
        config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
        if config.get("model_type") != MODEL_TYPE:
            raise CheckpointError(f"{config_path}: model_type {config.get('model_type')!r} is not a local-context "
                                  f"scorer's ({MODEL_TYPE!r}); load it with the policy that wrote it")
        if config.get("context") != self.context:
            raise CheckpointError(f"{config_path}: context {config.get('context')!r} differs from the scorer's "
                                  f"parameter context {self.context}")
        dims = [_positive_int(config, key, config_path) for key in ("n_modules", "input_dim", "output_dim", "hidden_dim")]
        expected = _expected_shapes(*dims, self.context)
        if set(tensors) != set(expected):
            raise CheckpointError(f"{weights_path} does not fit {config_path}: tensors {sorted(tensors)}, expected "
                                  f"{sorted(expected)}")
        for key, shape in expected.items():
            if tuple(tensors[key].shape) != shape:
                raise CheckpointError(f"{weights_path}: {key} has shape {list(tensors[key].shape)}, but {config_path} "
                                      f"makes it {list(shape)}")
        check_weights(tensors, str(weights_path))
        self.weights_ = {k: tensors[k].float().contiguous() for k in KEYS}
