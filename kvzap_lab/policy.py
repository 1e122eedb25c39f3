"""The policy API: a scorer says how important each new KV pair is, a rule turns stored scores into keep/evict.

A :class:`Policy` is ``(name, scorer, rule)``; the eviction engine, evaluation, the environment and the studies
all take one. Both halves are small, kvpress-press-sized objects:

- a **scorer** is a :class:`Scorer`: ``score(hidden, layer, *, keys, values, positions) -> [b, kv_heads, t]`` for
  the ``t`` new tokens of one layer (higher = more important; KVzap predicts log KVzip+), plus optional hooks
  with defaults (:class:`Scorer` lists them): ``accumulates_attention``, ``context``, ``default_rule``,
  ``check_model``, ``fused_weights``; :class:`OracleTableScorer` adds ``set_scores`` for scorers that read the oracle table of
  the current batch; :class:`kvzap_lab.surrogate.TrainableScorer` adds ``fit``/``predict``/``save``/``load``
  and the study's ``policy_name``. A plain class with ``score()`` (and ``accumulates_attention``) that does
  not subclass :class:`Scorer` works too: :class:`ScorerAdapter` gives it the defaults.
- a **rule** implements ``keep(scores, layer, valid) -> bool [b, kv_heads, n]`` over the held pairs that are
  outside the sliding window and not sinks (the engine never offers those to the rule). Rules here:
  :class:`Threshold` (one global tau, a tau per layer, or a tau per layer and KV head; :func:`calibrate` picks
  tau for a target compression on held-out scores) and :class:`TopK` (a budget per KV head, or across the
  heads of a layer, AdaKV-style).

Policies are found by name with :func:`get_policy`: built-ins (``policies/*.py``), anything decorated with
:func:`register_policy`, the entry-point group ``kvzap_lab.policies``, or ``path/to/file.py:ClassName``.
A registered object is a scorer class (or any callable returning a scorer); its scorer's ``default_rule`` is
the rule used when ``get_policy`` is given none.

``get_policy`` also takes ``rule=``, ``checkpoint=`` (a directory written by a trainable scorer's ``save``) and
``model=`` (checked against the checkpoint's model fingerprint); ``register_policy`` accepts several names
(aliases such as ``mlp`` for ``kvzap_mlp``).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Callable, ClassVar, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
from torch import Tensor

ENTRY_POINT_GROUP = "kvzap_lab.policies"
FILE_MODULE_PREFIX = "kvzap_lab_user_policy_"  # sys.modules names of policy files loaded by path
DEFAULT_WINDOW = 32  # the test bed's contexts are short; KVzap uses 128 on 8B models
DEFAULT_SINKS = 4
DEFAULT_BUDGET = 64  # TopK pairs per KV head beyond sinks and window
_BUILTIN_MODULES = (
    "kvzap_linear",
    "kvzap_mlp",
    "kvzap_shared",
    "kvzap_rich",
    "kvzap_local",
    "gbdt",
    "oracle",
    "random",
    "streaming_llm",
    "knorm",
    "accumulated_attention",
)


@runtime_checkable
class Rule(Protocol):
    """Keep decisions for held pairs outside the ``window`` most recent tokens and the first ``sinks`` tokens.

    ``scores`` and ``valid`` are ``[b, kv_heads, n]`` (``valid`` False on padding); returns a bool keep mask.
    """

    window: int
    sinks: int

    def keep(self, scores: Tensor, layer: int, valid: Tensor) -> Tensor: ...


def _check_rule_args(scores: Tensor, valid: Tensor, window: int, sinks: int) -> None:
    if window < 0 or sinks < 0:
        raise ValueError(f"window and sinks must be >= 0, got window={window}, sinks={sinks}")
    if scores.dim() != 3 or valid.shape != scores.shape:
        raise ValueError(
            f"keep() takes scores and valid of the same shape [batch, kv_heads, n]; "
            f"got scores {tuple(scores.shape)}, valid {tuple(valid.shape)}"
        )


@dataclass(frozen=True)
class Threshold:
    """Keep pairs whose score is >= tau (KVzap/DMS rule).

    ``tau`` is a float (global), a sequence with one tau per layer, or a ``[layers][kv_heads]`` nested sequence.
    """

    tau: float | Sequence[float] | Sequence[Sequence[float]] = -6.0
    window: int = DEFAULT_WINDOW
    sinks: int = DEFAULT_SINKS

    def __post_init__(self):
        tau = np.asarray(self.tau, dtype=np.float64)
        if tau.ndim > 2 or np.isnan(tau).any():
            raise ValueError(f"tau must be a float, a per-layer list or a [layers][kv_heads] list without NaN; got {self.tau!r}")
        as_tuple = tuple(map(tuple, tau.tolist())) if tau.ndim == 2 else tuple(tau.tolist()) if tau.ndim == 1 else float(tau)
        object.__setattr__(self, "tau", as_tuple)

    def thresholds(self, layer: int, n_kv_heads: int) -> Tensor:
        """The tau of each KV head of ``layer``: ``[kv_heads]`` float."""
        tau = torch.as_tensor(self.tau, dtype=torch.float32)
        if tau.dim() >= 1:
            if not 0 <= layer < tau.shape[0]:
                raise ValueError(f"Threshold has taus for {tau.shape[0]} layers; asked for layer {layer}")
            tau = tau[layer]
        if tau.dim() == 1 and tau.shape[0] != n_kv_heads:
            raise ValueError(f"Threshold has {tau.shape[0]} per-head taus for layer {layer}; the scores have {n_kv_heads} KV heads")
        return tau.expand(n_kv_heads)

    def keep(self, scores: Tensor, layer: int, valid: Tensor) -> Tensor:
        _check_rule_args(scores, valid, self.window, self.sinks)
        tau = self.thresholds(layer, scores.shape[1]).to(scores.device, scores.dtype)
        return valid & (scores >= tau[None, :, None])


@dataclass(frozen=True)
class TopK:
    """Keep the ``budget`` best-scoring candidate pairs of each KV head (a fixed token budget on top of sinks and
    window). With ``across_heads`` (AdaKV) the layer's ``budget * kv_heads`` pairs are shared across its heads.

    A budget in tokens is stable when the engine offers the held pairs again at every decoding step. ``keep_ratio``,
    if set, replaces the budget by that fraction of the pairs offered in each call: right for one-shot (prefill)
    compression, but in decoding it compounds and shrinks the cache geometrically; for a ratio of the context, pass
    ``budget=ceil(ratio * context_tokens)`` instead.
    """

    budget: int = DEFAULT_BUDGET
    across_heads: bool = False
    window: int = DEFAULT_WINDOW
    sinks: int = DEFAULT_SINKS
    keep_ratio: float | None = None

    def __post_init__(self):
        if isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 0:
            raise ValueError(f"budget is a number of pairs per KV head, an int >= 0; got {self.budget!r}")
        if self.keep_ratio is not None and not 0.0 <= self.keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio is the fraction of the offered pairs kept, in [0, 1]; got {self.keep_ratio}")

    def keep(self, scores: Tensor, layer: int, valid: Tensor) -> Tensor:
        _check_rule_args(scores, valid, self.window, self.sinks)
        b, h, n = scores.shape
        flat_scores, flat_valid = (scores.reshape(b, 1, h * n), valid.reshape(b, 1, h * n)) if self.across_heads else (scores, valid)
        if self.keep_ratio is None:
            k = torch.tensor(self.budget * (h if self.across_heads else 1), device=scores.device)
        else:
            k = torch.ceil(flat_valid.sum(-1, keepdim=True) * self.keep_ratio)
        masked = flat_scores.float().masked_fill(~flat_valid, -math.inf)
        order = masked.argsort(dim=-1, descending=True, stable=True)
        ranks = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
        return ((ranks < k) & flat_valid).reshape(b, h, n)


def calibrate(
    scores: np.ndarray | Tensor,
    compression: float,
    *,
    per: str = "global",
    window: int = DEFAULT_WINDOW,
    sinks: int = DEFAULT_SINKS,
) -> Threshold:
    """Pick tau so that a ``compression`` fraction of held-out candidate pairs falls below it.

    ``scores [n, layers, kv_heads]`` are a scorer's predictions on held-out pairs; ``per`` is ``"global"``,
    ``"layer"`` or ``"head"`` (one tau for all, per layer, per layer and KV head).
    """
    scores = np.asarray(scores.detach().cpu() if isinstance(scores, Tensor) else scores, dtype=np.float64)
    if scores.ndim != 3 or scores.shape[0] == 0:
        raise ValueError(f"calibrate takes held-out scores [n, layers, kv_heads] with n > 0; got shape {scores.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("calibrate: held-out scores contain NaN or inf")
    if not 0.0 <= compression < 1.0:
        raise ValueError(f"compression is the fraction of pairs removed, in [0, 1); got {compression}")
    axes = {"global": None, "layer": (0, 2), "head": 0}
    if per not in axes:
        raise ValueError(f"per must be one of {sorted(axes)}; got {per!r}")
    tau = np.quantile(scores, compression, axis=axes[per], method="inverted_cdf")
    return Threshold(tau=tau.tolist() if np.ndim(tau) else float(tau), window=window, sinks=sinks)


class Scorer:
    """Base of every scorer: ``score()`` is the one method to write; the hooks below have defaults.

    ``score(hidden, layer, *, keys, values, positions)`` scores the new KV pairs of one layer: ``hidden
    [b, t, hidden]`` (the hidden state entering the attention layer), ``keys``/``values`` ``[b, kv_heads, t,
    head_dim]`` post-RoPE, ``positions [b, t]`` absolute positions -> ``[b, kv_heads, t]`` (higher = keep).

    Optional hooks (override in a subclass):

    - ``accumulates_attention`` (default False): the engine adds, at every step, the attention mass each held
      pair receives (summed over the query heads of its KV group) to its stored score (H2O/TOVA-like).
    - ``context`` (default 0): how many previous hidden states ``score()`` reads. When > 0 the engine also passes
      ``previous [b, context, hidden]`` (oldest first) and moves each row's padding first: in ``[previous, hidden]``
      each row's new real tokens come last, right after the hidden states of its ``context`` real tokens before
      them (zeros before the start of the sequence); padding and previous tokens in ``hidden``'s slots get scores
      that are not used. So a token's score is the same whether it arrives in a one-chunk prefill, a chunk or a
      decoding step, padded or not. With 0, ``score()``
      gets no ``previous``.
    - ``default_rule`` (default None): the rule :func:`get_policy` uses when given none (None: ``Threshold()``,
      tau -6 on log KVzip+); evaluation sweeps taus for a scorer declaring a finite :class:`Threshold` and
      budgets (keep ratios) otherwise, since the scale of undeclared scores is unknown.
    - ``check_model(model)`` (default: nothing): raise a ValueError when the scorer cannot score ``model``
      (e.g. it was trained for another one); the engine calls it before a run.
    - ``fused_weights()`` (default None): the per-layer maps of a KVzap linear or one-hidden-layer MLP scorer,
      ``[(W [layers, out, in], b [layers, out])]`` (one map) or two maps with GELU between, which ``score()``
      must equal; the engine then scores through the fused kernel and ``score()`` is not called.

    Scorers that read the oracle table subclass :class:`OracleTableScorer`; trainable ones
    :class:`kvzap_lab.surrogate.TrainableScorer` (``fit``, ``predict``, ``save``, ``load``).
    """

    accumulates_attention: ClassVar[bool] = False
    context: int = 0  # a class attribute, or an instance's parameter (KVzap-local's)
    default_rule: ClassVar[Rule | None] = None

    def score(
        self,
        hidden: Tensor,
        layer: int,
        *,
        keys: Tensor | None = None,
        values: Tensor | None = None,
        positions: Tensor | None = None,
    ) -> Tensor:
        """Scores ``[b, kv_heads, t]`` of the ``t`` new pairs of ``layer`` (see the class docstring)."""
        raise NotImplementedError(f"{type(self).__name__} must implement score(hidden, layer, *, keys, values, positions)")

    def check_model(self, model) -> None:
        """Raise a ValueError if this scorer cannot score ``model``; by default every model is fine."""

    def fused_weights(self) -> list[tuple[Tensor, Tensor]] | None:
        """The maps the fused KVzap kernel runs instead of :meth:`score` (see the class docstring), or None."""
        return None


class OracleTableScorer(Scorer):
    """A scorer that reads precomputed oracle scores: evaluation, the envs and the benchmarks call
    :meth:`set_scores` with the table of the current batch before its prefill."""

    def set_scores(self, table: Tensor) -> None:
        """Take the oracle table ``[b, layers, kv_heads, n]`` (or ``[layers, kv_heads, n]``) by absolute position."""
        raise NotImplementedError(f"{type(self).__name__} must implement set_scores(table)")


class ScorerAdapter(Scorer):
    """A scorer object that does not subclass :class:`Scorer` (README's plain class with ``score()`` and
    ``accumulates_attention``), with the base's defaults for every other hook.

    The one place such objects are adapted (:class:`Policy` does it). The object's own ``accumulates_attention``
    (False when absent), ``context`` (0 when absent) and ``default_rule`` are honoured; its other attributes read through (``wrapped``).
    Hooks that only a subclass can declare (``check_model``, ``fused_weights``, ``set_scores``) are refused with
    a TypeError rather than silently ignored.
    """

    _SUBCLASS_HOOKS = ("check_model", "fused_weights", "set_scores")

    def __init__(self, wrapped):
        if not callable(getattr(wrapped, "score", None)):
            raise TypeError(f"the scorer {type(wrapped).__name__} has no score() method")
        declared = [hook for hook in self._SUBCLASS_HOOKS if hasattr(wrapped, hook)]
        if declared:
            base = "OracleTableScorer" if "set_scores" in declared else "Scorer"
            raise TypeError(
                f"the scorer {type(wrapped).__name__} defines {', '.join(declared)} without subclassing "
                f"kvzap_lab.policy.{base}: subclass it so that the hook is used"
            )
        self.wrapped = wrapped
        self.accumulates_attention = bool(getattr(wrapped, "accumulates_attention", False))
        self.context = int(getattr(wrapped, "context", 0))
        self.default_rule = getattr(wrapped, "default_rule", Scorer.default_rule)

    def score(self, hidden: Tensor, layer: int, **kwargs) -> Tensor:
        return self.wrapped.score(hidden, layer, **kwargs)

    def __getattr__(self, name: str):
        if name == "wrapped":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.wrapped, name)

    def __repr__(self) -> str:
        return f"ScorerAdapter({self.wrapped!r})"


def as_scorer(scorer) -> Scorer:
    """``scorer`` itself when it is a :class:`Scorer`, else a :class:`ScorerAdapter` around it."""
    return scorer if isinstance(scorer, Scorer) else ScorerAdapter(scorer)


@dataclass
class Policy:
    """What the engine, evaluation, env and study take: a named scorer plus a rule.

    A scorer that does not subclass :class:`Scorer` is wrapped in a :class:`ScorerAdapter` here.
    """

    name: str
    scorer: Scorer
    rule: Rule

    def __post_init__(self):
        try:
            self.scorer = as_scorer(self.scorer)
        except TypeError as err:
            raise TypeError(f"policy {self.name!r}: {err}") from None
        if not callable(getattr(self.rule, "keep", None)):
            raise TypeError(f"policy {self.name!r}: the rule {type(self.rule).__name__} has no keep() method")


DEFAULT_RULE = Threshold()
_REGISTRY: dict[str, Callable[..., Scorer]] = {}


def register_policy(*names: str) -> Callable:
    """Class decorator: make a scorer class available to :func:`get_policy` under ``names``."""
    if not names:
        raise TypeError("register_policy needs at least one name, e.g. @register_policy('my_policy')")

    def decorate(factory):
        for name in names:
            known = _REGISTRY.get(name)
            if known is not None and known.__qualname__ != factory.__qualname__:
                raise ValueError(f"policy name {name!r} is already registered to {known.__module__}.{known.__qualname__}")
            _REGISTRY[name] = factory
        return factory

    return decorate


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(f"kvzap_lab.policies.{module}")


def _entry_points() -> dict:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def list_policies() -> list[str]:
    """Every policy name :func:`get_policy` accepts (built-ins, registered, entry points), sorted."""
    _load_builtins()
    return sorted(set(_REGISTRY) | set(_entry_points()))


def _from_file(spec: str) -> Callable[..., Scorer]:
    path_str, _, class_name = spec.rpartition(":")
    path = Path(path_str)
    if not path.is_file():
        raise FileNotFoundError(f"policy file {path} does not exist (expected path/to/file.py:ClassName)")
    module_name = f"{FILE_MODULE_PREFIX}{path.stem}_{abs(hash(path.resolve()))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    module_spec.loader.exec_module(module)
    if not hasattr(module, class_name):
        defined = sorted(k for k, v in vars(module).items() if isinstance(v, type) and v.__module__ == module_name)
        raise AttributeError(f"policy file {path} does not define {class_name!r}; classes defined there: {defined or 'none'}")
    return getattr(module, class_name)


def resolve_policy(name: str) -> Callable[..., Scorer]:
    """The scorer class (factory) behind a policy name; raises a ValueError listing the known names."""
    if name.endswith(".py") or ".py:" in name:
        if ":" not in name.rpartition(".py")[2]:
            raise ValueError(f"a policy file is given as path/to/file.py:ClassName; got {name!r}")
        return _from_file(name)
    _load_builtins()
    if name in _REGISTRY:
        return _REGISTRY[name]
    eps = _entry_points()
    if name in eps:
        return eps[name].load()
    raise ValueError(f"unknown policy {name!r}; known policies: {', '.join(list_policies())} (or path/to/file.py:ClassName)")


def get_policy(name: str, *, rule: Rule | None = None, checkpoint: str | Path | None = None, model=None, **params) -> Policy:
    """Build a :class:`Policy` by name.

    Args:
        name: a registered name (``list_policies()``), an entry point, or ``path/to/file.py:ClassName``.
        rule: the rule; default: the scorer's ``default_rule``, else ``Threshold()``.
        checkpoint: a directory written by a trainable scorer's ``save``: the scorer is loaded from it (its
            class's ``load(checkpoint, model=model)``) instead of built from ``params``.
        model: with ``checkpoint``, the model the scorer must have been trained for (checked).
        **params: the scorer's constructor arguments.
    Returns:
        the :class:`Policy` ``(name, scorer, rule)``.
    Raises:
        ValueError: an unknown name, or a checkpoint trained for another model or written by another scorer family.
        TypeError: a checkpoint for a scorer that is not trainable, or both ``checkpoint`` and ``params``.
    """
    from kvzap_lab.surrogate import is_trainable

    factory = resolve_policy(name)
    if checkpoint is not None:
        if not is_trainable(factory):
            raise TypeError(f"policy {name!r} is not trainable: it has no checkpoint to load")
        if params:
            raise TypeError(f"give either checkpoint= or scorer params for {name!r}, not both (got {sorted(params)})")
        scorer = factory.load(checkpoint, model=model)
    else:
        scorer = as_scorer(factory(**params))
    rule = rule if rule is not None else scorer.default_rule if scorer.default_rule is not None else DEFAULT_RULE
    return Policy(name=name, scorer=scorer, rule=rule)
