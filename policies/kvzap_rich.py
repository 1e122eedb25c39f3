"""KVzap-rich: KVzap-MLP over the hidden state *and* what the engine already holds for the pair: its key, its
value, ‖W_O,h v‖ per query head and its position.

KVzip+ importance is how well later queries find a pair (its key) times how much its value moves the output
(‖W_O,h v‖ / ‖h‖). KVzap's per-layer MLP reads only the hidden state ``h`` entering the layer (after the input
norm), so it must re-derive both from ``h`` and has no idea where the token sits. This family appends to ``h``
(``features``, any of, joined with ``+``):

- ``key``: the post-RoPE key ``[kv_heads * head_dim]``. The pre-RoPE key is a linear map of ``h``, nothing new;
  the rotation by the token's position is;
- ``value``: the value ``[kv_heads * head_dim]`` (a linear map of ``h``: a cheaper start for the MLP only);
- ``wo_norm``: ``log ‖W_O,h v‖`` for every query head ``[heads]``, exact, through the Gram matrix
  ``W_O,hᵀ W_O,h [head_dim, head_dim]`` (quadratic in ``h``: out of reach of the first linear map);
- ``log_position``: ``log(1 + position)`` (absolute position in the forward pass).

``score()`` computes them from the ``keys``, ``values`` and ``positions`` the engine passes, so nothing changes in
the engine: a token's score depends on its own pair only, it is causal and scored once, in prefill and decoding.
At fit time the same features come from the dataset's hidden states, its rows' positions and the model's own
attention modules (``fit(X, y, model=, positions=)``; :func:`attention_inputs`); ``predict(X, positions=)`` needs the
model too (given to ``fit`` or ``load(path, model=)``). The network is KVzap-MLP's (per-layer GELU MLP, inputs
standardised and folded into the first map; same recipe), over ``hidden + extra`` inputs.

Cost per token and layer on top of KVzap-MLP: the wider first map (``extra * width`` multiply-adds) and, with
``wo_norm``, ``heads * head_dim * (head_dim + 1)`` for the quadratic forms (:meth:`KVzapRich.flops_per_token`).
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
from torch import Tensor

from kvzap_lab import checkpoint
from kvzap_lab.checkpoint import CONFIG_NAME, WEIGHTS_NAME, CheckpointError
from kvzap_lab.policies.kvzap_mlp import KVzapMLP
from kvzap_lab.policy import register_policy
from kvzap_lab.surrogate import ModelMismatchError, TrainableScorer, check_training_data, limited_threads, model_facts

FEATURES = ("key", "value", "wo_norm", "log_position")
_RECIPE = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in list(inspect.signature(KVzapMLP).parameters.values())]
MODEL_TYPE = "kvzap_lab_rich_mlp"
GRAM_KEY = "wo_gram"  # [layers, heads, head_dim, head_dim] in the checkpoint


def parse_features(text) -> tuple[str, ...]:
    """``"key+wo_norm"`` -> ``("key", "wo_norm")`` (``""`` or ``"none"``: the hidden state alone); raises a
    ValueError naming an unknown or repeated feature."""
    if not isinstance(text, str):
        raise ValueError(f"features is a string of {'+'.join(FEATURES)} joined with '+'; got {text!r}")
    names = tuple(name for name in text.split("+") if name) if text != "none" else ()
    unknown = [name for name in names if name not in FEATURES]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"features: {'unknown ' + repr(unknown[0]) if unknown else 'a feature named twice'} in "
                         f"{text!r}; give any of {', '.join(FEATURES)} joined with '+' (or 'none')")
    return names


class FeatureSet:
    """``param_ranges`` entry of ``features`` (the :class:`~kvzap_lab.surrogate.Interval` interface)."""

    def describe(self) -> str:
        return f"any of {', '.join(FEATURES)} joined with '+' (or 'none')"

    def contains(self, value) -> bool:
        try:
            parse_features(value)
        except ValueError:
            return False
        return True


def attention_inputs(model, layer: int, hidden: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """The key (post-RoPE) and value that attention ``layer`` of ``model`` makes of each row of ``hidden [n, H]``
    (the hidden state after the layer's input norm) at absolute ``positions [n]``: ``([n, kv_heads, head_dim],
    [n, kv_heads, head_dim])``, float32, what the engine passes to ``score()``. Each row runs as a one-token
    sequence through the module itself (its projections, norms and RoPE)."""
    from kvzap_lab.model import attention_modules, attention_override

    module, captured = attention_modules(model)[layer], {}

    def capture(module, query, key, value, attention_mask, base, **kwargs):
        captured["kv"] = key, value
        return base(module, query, key, value, attention_mask, **kwargs)

    param = next(model.parameters())
    x, ids = hidden[:, None].to(param.device, param.dtype), positions.long()[:, None].to(param.device)
    rope_args = (model.config.layer_types[layer],) if model.config.model_type == "gemma3_text" else ()
    with torch.no_grad(), attention_override(model, {layer: capture}):
        module(hidden_states=x, position_embeddings=model.model.rotary_emb(x, ids, *rope_args), attention_mask=None)
    key, value = captured["kv"]  # [n, kv_heads, 1, head_dim]
    return key[:, :, 0].float().cpu(), value[:, :, 0].float().cpu()


def output_gram(model) -> Tensor:
    """``W_O,hᵀ W_O,h`` of every layer and query head: ``[layers, heads, head_dim, head_dim]`` float32."""
    from kvzap_lab.model import attention_modules, describe, output_projection_per_head

    spec = describe(model)
    grams = []
    for module in attention_modules(model):
        W = output_projection_per_head(module, spec.n_heads, spec.head_dim).detach().float().cpu()  # [heads, H, d]
        grams.append(W.transpose(1, 2) @ W)
    return torch.stack(grams)


def pair_features(features: tuple[str, ...], hidden: Tensor, keys: Tensor, values: Tensor, positions: Tensor,
                  gram: Tensor | None) -> Tensor:
    """The scorer's input rows of one layer: ``hidden [m, H]``, ``keys``/``values [m, kv_heads, d]``, ``positions
    [m]``, ``gram [heads, d, d]`` (for ``wo_norm``) -> ``[m, H + extra]`` (``features`` in :data:`FEATURES` order)."""
    m = hidden.shape[0]
    parts = [hidden.float()]
    for name in FEATURES:
        if name not in features:
            continue
        if name == "key":
            parts.append(keys.reshape(m, -1).float())
        elif name == "value":
            parts.append(values.reshape(m, -1).float())
        elif name == "wo_norm":
            v = values.float().repeat_interleave(gram.shape[0] // values.shape[1], dim=1)  # [m, heads, d]
            parts.append(0.5 * torch.log(torch.einsum("mhd,hde,mhe->mh", v, gram, v).clamp_min(1e-12)))
        else:
            parts.append(torch.log1p(positions.float().clamp_min(0))[:, None])
    return torch.cat(parts, dim=1)


def extra_width(features: tuple[str, ...], n_heads: int, n_kv_heads: int, head_dim: int) -> int:
    """How many inputs ``features`` add to the hidden state."""
    sizes = {"key": n_kv_heads * head_dim, "value": n_kv_heads * head_dim, "wo_norm": n_heads, "log_position": 1}
    return sum(sizes[name] for name in features)


@register_policy("kvzap_rich", "rich")
class KVzapRich(TrainableScorer):
    """Per-layer MLP over the hidden state plus ``features`` of the pair (``"key+value+wo_norm+log_position"``
    or any part, see the module docstring); the other parameters are KVzap-MLP's (``width`` defaults to
    hidden/8 of the model). The fitted network is a :class:`KVzapMLP` over the input rows (``mlp_``); this is
    not a KVzap-MLP itself (kvpress export and fine-tuning, which feed hidden states alone, refuse it)."""

    policy_name = "kvzap_rich"
    param_ranges = KVzapMLP.param_ranges | {"features": FeatureSet()}
    model_ = None  # the model whose attention makes rows of hidden states (fit, or load(path, model=)); not saved

    def __init__(self, features: str = "key+log_position", **recipe):
        self.features = features
        unknown = sorted(set(recipe) - {p.name for p in _RECIPE})
        if unknown:
            raise TypeError(f"KVzapRich() got unexpected keyword arguments {unknown}")
        for parameter in _RECIPE:  # KVzap-MLP's parameters and defaults, declared once (in KVzapMLP)
            setattr(self, parameter.name, recipe.get(parameter.name, parameter.default))

    # The signature sklearn's get_params, checkpoints and the study read: features, then KVzap-MLP's parameters.
    __init__.__signature__ = inspect.Signature(
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
         inspect.Parameter("features", inspect.Parameter.POSITIONAL_OR_KEYWORD, default="key+log_position", annotation=str),
         *_RECIPE]
    )

    # ------------------------------------------------------------------------------------------- fitting
    def fit(self, X, y, *, manifest: dict | None = None, model=None, positions=None, previous=None):
        """Fit on ``X [n, layers, hidden]`` and ``y [n, layers, kv_heads]`` of ``model``'s oracle dataset, with the
        rows' absolute ``positions [n]``; returns ``self``."""
        from kvzap_lab.model import describe, fingerprint

        self._check_params()
        if model is None:
            raise ValueError("kvzap_rich computes each row's key, value and ‖W_O v‖ with the model's attention: "
                             "fit(X, y, model=..., positions=...) (on the command line: --model)")
        X, y = check_training_data(X, y, manifest)
        spec = describe(model)
        if (spec.n_layers, spec.hidden_size, spec.n_kv_heads) != (X.shape[1], X.shape[2], y.shape[2]):
            raise ModelMismatchError(f"kvzap_rich: the data has {X.shape[1]} layers, hidden {X.shape[2]} and "
                                     f"{y.shape[2]} KV heads; the model {spec.n_layers}, {spec.hidden_size} and "
                                     f"{spec.n_kv_heads} (fit it on every layer of the model's dataset)")
        wanted = model_facts(manifest).get("model_fingerprint")
        if wanted is not None and wanted != fingerprint(model):
            raise ModelMismatchError(f"kvzap_rich: the data was collected on model fingerprint {wanted}; the model given "
                                     f"has {fingerprint(model)}")
        self.model_ = model
        self.gram_ = output_gram(model)
        self.trained_for_ = {"model_fingerprint": wanted} | dict(
            n_layers=X.shape[1], hidden_size=X.shape[2], n_kv_heads=y.shape[2]
        )
        width = self.width or max(1, spec.hidden_size // 8)
        with limited_threads(self.n_threads):
            self._fit_mlp(self._rows(X, positions), y, width)
        return self

    def _fit_mlp(self, rows: np.ndarray, y: np.ndarray, width: int) -> None:
        """KVzap-MLP's training on the input rows ``[n, layers, H + extra]``: sets ``mlp_``, ``validation_mse_``."""
        self.mlp_ = self._mlp(width)
        self.mlp_._fit(rows, y)
        self.validation_mse_ = self.mlp_.validation_mse_

    def _mlp(self, width: int | None) -> KVzapMLP:
        params = self.get_params() | {"width": width}
        del params["features"]
        return KVzapMLP(**params)

    def _rows(self, X: np.ndarray, positions) -> np.ndarray:
        """Training rows ``[n, layers, H + extra]`` float16 of hidden states ``X`` at ``positions``: half the memory
        of float32, so that a real model's 1e5 rows x 30 layers fit beside ``X`` (KVzap-MLP's fit computes in
        float32 batch by batch)."""
        x, positions = self._checked(X, positions)
        rows = None
        for layer in range(x.shape[1]):
            features = self._layer_rows(x[:, layer], layer, positions)
            if not torch.isfinite(features.half()).all():
                raise ValueError(f"kvzap_rich: layer {layer}'s features exceed float16's range (|x| > 65504); "
                                 "such hidden states or keys are out of what this family can fit")
            if rows is None:
                rows = np.empty((x.shape[0], x.shape[1], features.shape[1]), np.float16)
            rows[:, layer] = features.numpy()
        return rows

    def _checked(self, X: np.ndarray, positions) -> tuple[Tensor, Tensor]:
        """``X`` as a tensor and ``positions [n]`` as int64, checked against each other."""
        if positions is None:
            raise ValueError("kvzap_rich needs each row's absolute position: positions=[n] (the dataset's positions_*)")
        positions = torch.as_tensor(np.asarray(positions)).long().reshape(-1)
        if len(positions) != X.shape[0]:
            raise ValueError(f"positions must hold one position per row: {X.shape[0]}; got {len(positions)}")
        return torch.from_numpy(X), positions

    def _layer_rows(self, x: Tensor, layer: int, positions: Tensor) -> Tensor:
        """Input rows ``[n, H + extra]`` float32 of layer ``layer`` for its hidden states ``x [n, H]``, through ``model_``."""
        keys, values = attention_inputs(self.model_, layer, x, positions)
        return pair_features(self._features(), x, keys, values, positions, self.gram_[layer])

    def _features(self) -> tuple[str, ...]:
        return parse_features(self.features)

    # ------------------------------------------------------------------------------------------- scoring
    def predict(self, X, *, positions=None, previous=None):
        """Predicted log-scores ``[n, layers, kv_heads]`` for ``X [n, layers, hidden]`` at ``positions [n]``
        (numpy in -> numpy out); needs the model (given to ``fit`` or ``load(path, model=)``)."""
        self._check_fitted()
        if self.model_ is None:
            raise ValueError("kvzap_rich predicts from hidden states through the model's attention: load it with "
                             "load(path, model=...) (score() needs no model)")
        is_numpy = not isinstance(X, Tensor)
        X_np, _ = check_training_data(X)
        self._check_hidden(X_np.shape[-1], X_np.shape[1])
        x, positions = self._checked(X_np, positions)
        with torch.no_grad():
            y = torch.stack([self._predict_layer(self._layer_rows(x[:, layer], layer, positions), layer)
                             for layer in range(x.shape[1])], dim=1)
        return y.numpy() if is_numpy else y.to(X.device)

    def score(self, hidden: Tensor, layer: int, *, keys=None, values=None, positions=None) -> Tensor:
        """Predicted log KVzip+ of the new pairs: ``hidden [b, t, H]``, ``keys``/``values [b, kv_heads, t, d]``
        (post-RoPE, as the engine passes them), ``positions [b, t]`` -> ``[b, kv_heads, t]``."""
        self._check_fitted()
        self._check_hidden(hidden.shape[-1], None, layer)
        if keys is None or values is None or positions is None:
            raise ValueError("kvzap_rich scores from the pair's key, value and position: score(hidden, layer, "
                             "keys=, values=, positions=)")
        b, t, h = hidden.shape
        flat = lambda kv: kv.detach().float().cpu().transpose(1, 2).reshape(b * t, kv.shape[1], kv.shape[3])
        with torch.no_grad():
            rows = pair_features(self._features(), hidden.detach().reshape(b * t, h).float().cpu(), flat(keys),
                                 flat(values), positions.detach().reshape(b * t).cpu(), self.gram_[layer])
            out = self._predict_layer(rows, layer)
        return out.reshape(b, t, -1).transpose(1, 2).to(hidden.device)

    def _predict_layer(self, x: Tensor, layer: int) -> Tensor:
        return self.mlp_._predict_layer(x, layer)

    def flops_per_token(self) -> int:
        """FLOPs (a multiply-add counts 2) to score one token in every layer: the MLP over ``H + extra`` inputs and,
        with ``wo_norm``, one quadratic form per query head (``d² + d`` multiply-adds) and its log."""
        mlp = self.mlp_.flops_per_token()
        if "wo_norm" not in self._features():
            return mlp
        n_layers, heads, d, _ = self.gram_.shape
        return mlp + n_layers * heads * (2 * (d * d + d) + 1)

    # ------------------------------------------------------------------------------------------- checkpoint
    def _learned_shapes(self) -> dict:
        n_layers, heads, d, _ = self.gram_.shape
        weights = self.mlp_.weights_
        n_kv_heads = weights[-1][0].shape[1]
        extra = extra_width(self._features(), heads, n_kv_heads, d)
        return {"n_layers": n_layers, "hidden_size": weights[0][0].shape[2] - extra, "n_kv_heads": n_kv_heads}

    def _config(self) -> dict:
        n_layers, heads, d, _ = self.gram_.shape
        W0, Wn = self.mlp_.weights_[0][0], self.mlp_.weights_[-1][0]
        return {"model_type": MODEL_TYPE, "n_modules": n_layers, "input_dim": W0.shape[2], "output_dim": Wn.shape[1],
                "hidden_dim": W0.shape[1], "n_heads": heads, "head_dim": d,
                "kvzap_lab": {"depth": len(self.mlp_.weights_) - 1}}

    def _state(self) -> dict[str, Tensor]:
        return checkpoint.kvzap_state(self.mlp_.weights_) | {GRAM_KEY: self.gram_.clone()}

    def _set_state(self, config: dict, tensors: dict[str, Tensor], path) -> None:
        config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
        if config.get("model_type") != MODEL_TYPE:
            raise CheckpointError(f"{config_path}: model_type {config.get('model_type')!r} is not a rich-input scorer's "
                                  f"({MODEL_TYPE!r}); load it with the policy that wrote it")
        tensors = dict(tensors)
        gram = tensors.pop(GRAM_KEY, None)
        n_layers, heads, d = (checkpoint._positive_int(config, key, config_path) for key in ("n_modules", "n_heads", "head_dim"))
        if gram is None or tuple(gram.shape) != (n_layers, heads, d, d):
            raise CheckpointError(f"{weights_path}: {GRAM_KEY} must have shape {[n_layers, heads, d, d]} (from "
                                  f"{config_path}); got {None if gram is None else list(gram.shape)}")
        checkpoint.check_weights({GRAM_KEY: gram}, str(weights_path))
        mlp = self._mlp(config.get("hidden_dim"))
        mlp.weights_ = checkpoint.kvzap_weights(config | {"model_type": "kvzap"}, tensors, path)
        self.mlp_, self.gram_ = mlp, gram.float().contiguous()

    @classmethod
    def load(cls, path, model=None):
        """Read a scorer saved by :meth:`save`; with ``model``, check it matches and keep it for :meth:`predict`."""
        scorer = super().load(path, model=model)
        scorer.model_ = model
        return scorer
