"""What a study searches: the scorer's dimensions (``studies/<policy>.py`` or a ``search_space(spec)`` next to a
custom scorer class), the rule's (``studies/rule.py``), ``--space`` overrides, and the start points a new study
queues first (the paper's default configuration at every tau of the paper's grid, then the same configuration
at taus on the model's own score scale)."""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

import numpy as np

from kvzap_lab.policy import list_policies, resolve_policy
from kvzap_lab.studies import rule as rule_space
from kvzap_lab.studies.space import check_space, contains, defaults, describe, override
from kvzap_lab.surrogate import is_trainable
from kvzap_lab.study.config import CALIBRATED_EVICTION, StudyError


@dataclass
class SearchSpace:
    """The scorer's dimensions (constructor arguments), the rule's, and the scorer arguments held fixed."""

    scorer: dict
    rule: dict
    fixed: dict

    def baseline(self, tau: float) -> dict:
        """The default configuration with rule threshold ``tau`` (the params of one start point)."""
        return defaults(self.scorer) | defaults(self.rule) | {"tau": tau}


def trainable_factory(policy: str):
    """The scorer class behind ``policy``; it must be a :class:`~kvzap_lab.surrogate.TrainableScorer`."""
    try:
        factory = resolve_policy(policy)
    except (ValueError, FileNotFoundError, AttributeError) as err:
        raise StudyError(str(err)) from None
    if not is_trainable(factory):
        trainable = [name for name in list_policies() if is_trainable(resolve_policy(name))]
        raise StudyError(f"policy {policy!r} has nothing to train; a study needs a trainable policy: {', '.join(trainable)}")
    return factory


def scorer_space(policy: str, factory, spec) -> tuple[dict, dict]:
    """``(space, fixed)`` for a scorer class: its own ``search_space(spec)`` (attribute, or a function in its
    module), else ``kvzap_lab.studies.<name>`` for any name the class is registered under."""
    own = getattr(factory, "search_space", None) or getattr(sys.modules.get(factory.__module__), "search_space", None)
    if own is not None:
        return own(spec), dict(getattr(factory, "search_fixed", {}))
    names = [policy] + [name for name in list_policies() if resolve_policy(name) is factory]  # aliases too
    for name in filter(str.isidentifier, names):
        try:
            module = importlib.import_module(f"kvzap_lab.studies.{name}")
        except ModuleNotFoundError:
            continue
        return module.space(spec), dict(module.FIXED)
    raise StudyError(
        f"policy {policy!r} has no search space: define search_space(spec) -> {{name: Float|Int|Choice}} on its "
        "class (or in its module), or add studies/<name>.py"
    )


def build_space(policy: str, factory, spec, scores: np.ndarray, overrides: list[str] | tuple[str, ...]) -> SearchSpace:
    """The study's :class:`SearchSpace` with ``--space`` overrides applied and every range checked."""
    scorer, fixed = scorer_space(policy, factory, spec)
    rules = rule_space.space(spec, scores)
    clash = sorted(set(scorer) & set(rules))
    if clash:
        raise StudyError(f"policy {policy!r}: scorer dimensions {clash} clash with the rule's ({', '.join(rules)})")
    merged = override(check_space(scorer) | check_space(rules), list(overrides))
    return SearchSpace({k: merged[k] for k in scorer}, {k: merged[k] for k in rules}, fixed)


def start_points(space: SearchSpace, spec, scores: np.ndarray) -> tuple[list[tuple[dict, str]], list[str]]:
    """The start points of a new study, ``[(params, kind)]`` with kind ``paper`` (the default configuration at
    each tau of the paper's grid) then ``calibrated`` (taus that would evict ``CALIBRATED_EVICTION`` of the
    training pairs; ``scores``: their log-scores), and a message per kind for taus a ``--space`` override
    excludes (those points are skipped: a clamped point would no longer be the configuration it stands for)."""
    taus = {"paper": list(rule_space.paper_taus(spec.model_type)),
            "calibrated": rule_space.calibrated_taus(scores, CALIBRATED_EVICTION)}
    points, skipped = [], []
    for kind, values in taus.items():
        outside = [tau for tau in values if not contains(space.rule["tau"], tau)]
        points += [(space.baseline(tau), kind) for tau in values if tau not in outside]
        if outside:
            skipped.append(f"{kind} start points at tau {', '.join(f'{t:g}' for t in outside)} skipped: outside the "
                           f"searched tau {describe({'tau': space.rule['tau']})['tau']}")
    return points, skipped
