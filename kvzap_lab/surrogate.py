"""What every trainable scorer shares: data checks, the sklearn estimator contract, per-layer scoring,
held-out metrics, FLOPs, and tying a trained scorer to the model it was trained for.

A trainable scorer maps the hidden state entering each attention layer to one predicted log KVzip+ score per
KV head: ``fit(X [n, layers, hidden], y [n, layers, kv_heads])``, ``predict(X) -> y`` (numpy or torch in,
same type out), and ``score(hidden [b, t, hidden], layer) -> [b, kv_heads, t]`` for the eviction engine.
Subclasses declare ``param_ranges`` (every constructor parameter and its valid :class:`Interval`: ``fit`` and a
checkpoint load refuse anything else before any work) and implement ``_fit(X, y)``, ``_predict_layer(x [m, hidden]
float32 tensor, layer) -> [m, kv_heads]``, ``flops_per_token()``, ``_learned_shapes()`` and
``_config()``/``_state()``/``_set_state(config, tensors, path)`` for :mod:`kvzap_lab.checkpoint`.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, Iterator

import numpy as np
import torch
from scipy.stats import spearmanr
from sklearn.base import BaseEstimator
from threadpoolctl import threadpool_limits
from torch import Tensor

from kvzap_lab.policy import Scorer, Threshold

MANIFEST_KEYS = ("model_fingerprint", "n_layers", "hidden_size", "n_kv_heads")


class ModelMismatchError(ValueError):
    """A scorer, dataset or checkpoint was made for another model (fingerprint or shapes differ)."""


@dataclass(frozen=True)
class Interval:
    """The valid values of one scorer parameter: ``kind`` (int, float or bool) within ``[low, high]`` (an end is
    excluded when ``low_open`` / ``high_open``); floats must be finite; ``none`` also accepts ``None``."""

    kind: type
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    none: bool = False

    def describe(self) -> str:
        if self.kind is bool:
            text = "a bool"
        else:
            text = f"{'an int' if self.kind is int else 'a finite float'}"
            if math.isinf(self.high):
                text += f" {'>' if self.low_open else '>='} {self.low:g}" if not math.isinf(self.low) else ""
            else:
                text += f" in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        return f"None or {text}" if self.none else text

    def contains(self, value) -> bool:
        if value is None:
            return self.none
        if self.kind is bool:
            return isinstance(value, bool)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer) if self.kind is int else (int, float, np.integer, np.floating)):
            return False
        if not math.isfinite(value):
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below


@dataclass
class Split:
    """A train/test split of (hidden state, log-score) rows: the fields that training reads from a dataset.

    ``X_* [n, layers, hidden]``, ``y_* [n, layers, kv_heads]``; ``manifest`` holds at least ``MANIFEST_KEYS``;
    ``positions_* [n]``: the rows' absolute positions, where known (:class:`kvzap_lab.data.Dataset` has them too);
    ``previous_* [n, K, layers, hidden]``: the hidden states of each row's K previous tokens, where collected.
    """

    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    manifest: dict
    positions_train: np.ndarray | None = None
    positions_test: np.ndarray | None = None
    previous_train: np.ndarray | None = None
    previous_test: np.ndarray | None = None


def synthetic_split(n: int = 5000, n_layers: int = 2, hidden: int = 24, n_kv_heads: int = 2, seed: int = 0,
                    model_fingerprint: str = "synthetic-model") -> Split:
    """A stand-in dataset for tests and benchmarks: per (layer, head) ``y = 2 tanh(2z) + z² - 6 + noise`` with
    ``z`` a random projection of ``X ~ N(0, 1)``, so a linear scorer underfits and an MLP does well. 80/20 split."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, n_layers, hidden)).astype(np.float32)
    z = np.einsum("nlh,lhk->nlk", X, rng.normal(size=(n_layers, hidden, n_kv_heads)) / np.sqrt(hidden))
    y = (2 * np.tanh(2 * z) + z**2 - 6 + 0.1 * rng.normal(size=z.shape)).astype(np.float32)
    cut = int(0.8 * n)
    manifest = dict(model_fingerprint=model_fingerprint, n_layers=n_layers, hidden_size=hidden, n_kv_heads=n_kv_heads)
    return Split(X[:cut], y[:cut], X[cut:], y[cut:], manifest)


def model_facts(manifest: dict | None) -> dict:
    """``{model_fingerprint, n_layers, hidden_size, n_kv_heads}`` from a dataset manifest, as far as it has them:
    flat keys, or :mod:`kvzap_lab.data`'s ``model.fingerprint`` and ``shapes.{layers, hidden, kv_heads}``."""
    manifest = manifest or {}
    model, shapes = manifest.get("model") or {}, manifest.get("shapes") or {}
    nested = {"model_fingerprint": model.get("fingerprint"), "n_layers": shapes.get("layers"),
              "hidden_size": shapes.get("hidden"), "n_kv_heads": shapes.get("kv_heads")}
    facts = {k: manifest.get(k, nested[k]) for k in MANIFEST_KEYS}
    return {k: v for k, v in facts.items() if v is not None}


def check_training_data(X, y=None, manifest: dict | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Validate ``X [n, layers, hidden]`` and ``y [n, layers, kv_heads]`` (finite, consistent with each other and
    with the dataset ``manifest`` if given); return them as float32 numpy arrays."""
    X = _as_numpy(X, "X")
    if X.ndim != 3 or X.shape[0] == 0:
        raise ValueError(f"X must be hidden states [n > 0, layers, hidden]; got shape {X.shape}")
    if y is not None:
        y = _as_numpy(y, "y")
        if y.ndim != 3 or y.shape[:2] != X.shape[:2]:
            raise ValueError(f"y must be log-scores [n, layers, kv_heads] matching X [n, layers, hidden] {X.shape}; got {y.shape}")
    if manifest is not None:
        facts = model_facts(manifest)
        expected = {"n_layers": X.shape[1], "hidden_size": X.shape[2]} | ({"n_kv_heads": y.shape[2]} if y is not None else {})
        wrong = {k: (facts[k], v) for k, v in expected.items() if k in facts and facts[k] != v}
        if wrong:
            detail = ", ".join(f"{k}: model has {m}, data has {d}" for k, (m, d) in wrong.items())
            raise ModelMismatchError(f"training data does not match the model of its manifest ({detail})")
    return X, y


def training_facts(X: np.ndarray, y: np.ndarray, manifest: dict | None) -> dict:
    """A fitted scorer's ``trained_for_``: the model fingerprint of the dataset ``manifest`` (None if unknown) and the
    shapes of ``X [n, layers, hidden]`` and ``y [n, layers, kv_heads]``."""
    return {"model_fingerprint": model_facts(manifest).get("model_fingerprint"), "n_layers": X.shape[1],
            "hidden_size": X.shape[2], "n_kv_heads": y.shape[2]}


def _as_numpy(a, name: str) -> np.ndarray:
    a = a.detach().cpu().float().numpy() if isinstance(a, Tensor) else np.asarray(a, dtype=np.float32)
    bad = ~np.isfinite(a)
    if bad.any():
        where = np.argwhere(bad)[0].tolist()
        raise ValueError(f"{name} contains {int(bad.sum())} NaN/inf values (first at index {where}); clean the dataset")
    return a


@contextmanager
def limited_threads(n: int | None) -> Iterator[None]:
    """Run with at most ``n`` torch and OpenMP/BLAS threads (``None``: leave the defaults)."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with threadpool_limits(limits=n):
            yield
    finally:
        torch.set_num_threads(before)


def projection_flops_per_token(config) -> int:
    """FLOPs per token of a decoder's linear projections (q, k, v, o and the gated MLP) over all layers.

    ``config`` is a transformers config (``hidden_size``, heads, ``intermediate_size``, ``num_hidden_layers``).
    """
    hidden, heads = config.hidden_size, config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    mlp = 3 * hidden * config.intermediate_size
    return 2 * (attention + mlp) * config.num_hidden_layers


def r2_spearman_mse(y_true, y_pred) -> dict:
    """Held-out fit per layer: ``{"r2": [layers], "spearman": [layers], "mse": [layers]}`` over all tokens and
    KV heads of each layer; R² is the squared Pearson correlation, as the KVzap paper reports."""
    y_true, y_pred = np.asarray(y_true, np.float64), np.asarray(y_pred, np.float64)
    out = {"r2": [], "spearman": [], "mse": []}
    for layer in range(y_true.shape[1]):
        t, p = y_true[:, layer].ravel(), y_pred[:, layer].ravel()
        out["r2"].append(float(np.corrcoef(t, p)[0, 1] ** 2) if t.std() > 0 and p.std() > 0 else 0.0)
        out["spearman"].append(float(spearmanr(t, p).statistic) if t.std() > 0 and p.std() > 0 else 0.0)
        out["mse"].append(float(np.mean((t - p) ** 2)))
    return out


def is_trainable(factory) -> bool:
    """Whether a policy's factory (:func:`kvzap_lab.policy.resolve_policy`) is a :class:`TrainableScorer` class."""
    return isinstance(factory, type) and issubclass(factory, TrainableScorer)


class TrainableScorer(Scorer, BaseEstimator):
    """Base of the KVzap-linear, KVzap-MLP and boosted-tree scorers (sklearn estimator + policy scorer).

    Adds to :class:`~kvzap_lab.policy.Scorer`'s hooks: ``fit``, ``predict``, ``save``, ``load`` (a classmethod)
    and ``policy_name`` (the name the study files its runs under); ``check_model`` checks the model this scorer
    was trained for; the default rule is a :class:`~kvzap_lab.policy.Threshold` on the predicted log KVzip+.
    """

    policy_name: ClassVar[str]
    default_rule: ClassVar[Threshold] = Threshold()
    param_ranges: ClassVar[dict[str, Interval]]
    study_neighbours: ClassVar[int] = 0  # > 0: the study's dataset stores each row's that many previous hidden states
    n_threads: int | None = None  # threads while fitting (None: the process's torch setting); a constructor param where tunable

    def _check_params(self) -> None:
        """Raise a ValueError naming the first parameter outside its valid range (see ``param_ranges``)."""
        for name, value in self.get_params().items():
            valid = self.param_ranges[name]
            if not valid.contains(value):
                raise ValueError(f"{type(self).__name__}: {name} must be {valid.describe()}; got {value!r}")

    def fit(self, X, y, *, manifest: dict | None = None, model=None, positions=None, previous=None):
        """Fit on ``X [n, layers, hidden]``, ``y [n, layers, kv_heads]``; ``manifest`` (from the dataset) ties the
        scorer to its model. Validates the parameters first; returns ``self``. ``model``, ``positions [n]`` (the
        rows' absolute positions, :class:`kvzap_lab.data.Dataset`'s ``positions_*``) and ``previous [n, K, layers,
        hidden]`` (each row's K previous hidden states, ``previous_*``) are for scorers that read more than the
        hidden state (KVzap-rich, KVzap-local); a scorer of the hidden state alone ignores them."""
        self._check_params()
        X, y = check_training_data(X, y, manifest)
        self.trained_for_ = training_facts(X, y, manifest)
        with limited_threads(self.n_threads):
            self._fit(X, y)
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "trained_for_"):
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit(X, y) or load a checkpoint first")

    def predict(self, X, *, positions=None, previous=None):
        """Predicted log-scores ``[n, layers, kv_heads]`` for ``X [n, layers, hidden]`` (numpy in -> numpy out);
        ``positions [n]`` and ``previous`` as in :meth:`fit` (ignored by a scorer of the hidden state alone)."""
        self._check_fitted()
        is_numpy = not isinstance(X, Tensor)
        X_np, _ = check_training_data(X)
        self._check_hidden(X_np.shape[-1], X_np.shape[1])
        x = torch.from_numpy(X_np)
        with torch.no_grad():
            y = torch.stack([self._predict_layer(x[:, layer], layer) for layer in range(x.shape[1])], dim=1)
        return y.numpy() if is_numpy else y.to(X.device)

    def score(self, hidden: Tensor, layer: int, *, keys=None, values=None, positions=None) -> Tensor:
        """Predicted log KVzip+ of the new tokens: ``hidden [b, t, hidden]`` -> ``[b, kv_heads, t]``."""
        self._check_fitted()
        self._check_hidden(hidden.shape[-1], None, layer)
        b, t, h = hidden.shape
        with torch.no_grad():
            out = self._predict_layer(hidden.detach().reshape(b * t, h).float().cpu(), layer)
        return out.reshape(b, t, -1).transpose(1, 2).to(hidden.device)

    def _check_hidden(self, hidden_size: int, n_layers: int | None, layer: int = 0) -> None:
        meta = self.trained_for_
        if hidden_size != meta["hidden_size"] or (n_layers is not None and n_layers != meta["n_layers"]):
            raise ModelMismatchError(
                f"{type(self).__name__} was trained for hidden size {meta['hidden_size']} and {meta['n_layers']} layers; "
                f"got hidden size {hidden_size}" + (f" and {n_layers} layers" if n_layers is not None else "")
            )
        if not 0 <= layer < meta["n_layers"]:
            raise ValueError(f"layer {layer} out of range: the scorer has {meta['n_layers']} layers")

    def _learned_shapes(self) -> dict:
        """``{n_layers, n_kv_heads}`` and, where the learned state fixes it, ``hidden_size`` (or its lower bound
        ``min_hidden_size``), read from the learned attributes."""
        raise NotImplementedError

    def _check_trained_for(self, trained_for, where) -> None:
        """Raise a CheckpointError naming ``where`` unless ``trained_for`` holds the model facts and they fit the
        learned state (set by ``_set_state``)."""
        from kvzap_lab.checkpoint import CheckpointError

        if not isinstance(trained_for, dict):
            raise CheckpointError(f"{where}: no trained_for entry with {', '.join(MANIFEST_KEYS[1:])}")
        for key in MANIFEST_KEYS[1:]:
            value = trained_for.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CheckpointError(f"{where}: trained_for.{key} must be an int >= 1; got {value!r}")
        shapes = self._learned_shapes()
        wrong = [f"{k} {trained_for[k]} vs {v} in the weights" for k, v in shapes.items() if k in trained_for and trained_for[k] != v]
        if shapes.get("min_hidden_size", 0) > trained_for["hidden_size"]:
            wrong.append(f"hidden_size {trained_for['hidden_size']} vs features up to {shapes['min_hidden_size'] - 1} in the weights")
        if wrong:
            raise CheckpointError(f"{where} does not fit its weights: {'; '.join(wrong)}")

    def check_model(self, model) -> None:
        """Raise :class:`ModelMismatchError` unless ``model`` is the one (or has the shapes) this scorer was trained for."""
        from kvzap_lab.model import describe, fingerprint

        self._check_fitted()
        spec, meta = describe(model), self.trained_for_
        shapes = {"n_layers": spec.n_layers, "hidden_size": spec.hidden_size, "n_kv_heads": spec.n_kv_heads}
        wrong = [f"{k}: scorer {meta[k]}, model {v}" for k, v in shapes.items() if meta[k] != v]
        if wrong:
            raise ModelMismatchError(f"{type(self).__name__} was trained for another model ({'; '.join(wrong)})")
        if meta.get("model_fingerprint") and meta["model_fingerprint"] != fingerprint(model):
            raise ModelMismatchError(
                f"{type(self).__name__} was trained for model fingerprint {meta['model_fingerprint']}, "
                f"this model's is {fingerprint(model)}: retrain the scorer on this model's oracle dataset"
            )

    def save(self, path) -> None:
        """Write the fitted scorer to directory ``path`` (config.json + safetensors; no pickle)."""
        from kvzap_lab.checkpoint import save_scorer

        self._check_fitted()
        save_scorer(self, path)

    @classmethod
    def load(cls, path, model=None):
        """Read a scorer saved by :meth:`save` (or an official KVzap checkpoint); with ``model``, check it matches.
        A checkpoint of another scorer family raises a :class:`~kvzap_lab.checkpoint.CheckpointError` (a ValueError:
        a CLI's one-line error)."""
        from kvzap_lab.checkpoint import CheckpointError, load_scorer

        scorer = load_scorer(path)
        if type(scorer) is not cls:
            raise CheckpointError(f"{path} holds a {type(scorer).__name__}, not a {cls.__name__}: load it as "
                                  f"policy {scorer.policy_name!r}")
        if model is not None:
            scorer.check_model(model)
        return scorer
