"""The options of the KVEviction envs, validated once (:func:`configure`), and the one loaded model per name that
every env asking for that name shares."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from kvzap_lab import tasks
from kvzap_lab.engine import DEFAULT_COMPACT_EVERY
from kvzap_lab.envs.references import ReferenceCache
from kvzap_lab.model import describe, load_model
from kvzap_lab.policy import DEFAULT_SINKS, DEFAULT_WINDOW, Policy, get_policy

HIDDEN_BOUND = 100.0
SCORE_BOUND = 1000.0
DEFAULT_ENV_CHUNK = 64
DECODINGS = ("teacher", "greedy")
ACTION_TYPES = ("binary", "threshold")
OBSERVATIONS = ("full", "compact")
# (name, device) -> (model, tokenizer): envs made with a model name share one loaded model
_LOADED: dict[tuple[str, str], tuple[nn.Module, object]] = {}


@dataclass
class EnvConfig:
    """Everything both env classes share: the model, the sample pool, the policy and the validated options (see
    :class:`~kvzap_lab.envs.kv_eviction.KVEvictionEnv` for their meaning)."""

    model: nn.Module
    tokenizer: object
    samples: list[tasks.Sample]
    policy: Policy | None
    window: int
    sinks: int
    chunk_size: int
    evict_every: int
    compact_every: int
    max_candidates: int
    decoding: str
    action_type: str
    observation: str
    flat_actions: bool
    threshold_range: tuple[float, float]
    weights: tuple[float, float, float]
    hidden_bound: float
    eos_token_id: int
    references: ReferenceCache


def shared_model(name: str, device: str | torch.device | None = None) -> tuple[nn.Module, object]:
    """``load_model(name, device=device)``, loaded once per process: every env made with this name uses the same
    model (the envs take turns on it). :func:`clear_shared_models` forgets them."""
    key = (name, str(torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))))
    if key not in _LOADED:
        _LOADED[key] = load_model(name, device=device)
    return _LOADED[key]


def clear_shared_models() -> None:
    """Forget the models :func:`shared_model` loaded."""
    _LOADED.clear()


def _positive_int(name: str, value) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1; got {value!r}")
    return int(value)


def _resolve_policy(policy, checkpoint, model, window, sinks) -> Policy | None:
    if policy is None:
        if checkpoint is not None:
            raise ValueError("checkpoint= is given without policy=: name the trained scorer, e.g. policy='kvzap_mlp'")
        return None
    if isinstance(policy, str):
        policy = get_policy(policy, checkpoint=checkpoint, model=model if checkpoint is not None else None)
        given = {k: v for k, v in (("window", window), ("sinks", sinks)) if v is not None}
        if given:  # a policy named here takes the env's window and sinks
            policy = Policy(policy.name, policy.scorer, dataclasses.replace(policy.rule, **given))
    elif checkpoint is not None:
        raise ValueError("checkpoint= goes with a policy name, not with a Policy object (load the scorer into it)")
    if not isinstance(policy, Policy):
        raise TypeError(f"policy must be a registered name or a kvzap_lab.policy.Policy; got {type(policy).__name__}")
    if hasattr(policy.scorer, "check_model"):
        try:
            policy.scorer.check_model(model)
        except RuntimeError as err:  # not fitted
            raise ValueError(
                f"policy {policy.name!r} asks for a trained scorer but has none: pass checkpoint=DIR (a scorer trained "
                f"for this model, see `python -m kvzap_lab.train`) or use policy='oracle' ({err})"
            ) from err
    return policy


def configure(
    model: str | nn.Module = "testbed",
    tokenizer=None,
    *,
    samples: Sequence[tasks.Sample] | None = None,
    task: str = "single_needle",
    n_samples: int = 16,
    context_tokens: int = 256,
    sample_seed: int = 0,
    policy: str | Policy | None = None,
    checkpoint=None,
    window: int | None = None,
    sinks: int | None = None,
    chunk_size: int = DEFAULT_ENV_CHUNK,
    evict_every: int = 1,
    compact_every: int = DEFAULT_COMPACT_EVERY,
    max_candidates: int | None = None,
    decoding: str = "teacher",
    action_type: str = "binary",
    observation: str = "full",
    flat_actions: bool = False,
    threshold_range: tuple[float, float] = (-SCORE_BOUND, SCORE_BOUND),
    oracle_weight: float = 1.0,
    fidelity_weight: float = 1.0,
    memory_weight: float = 1.0,
    hidden_bound: float = HIDDEN_BOUND,
    device: str | torch.device | None = None,
    reference_cache: ReferenceCache | None = None,
) -> EnvConfig:
    """Validate the options of an env (see :class:`~kvzap_lab.envs.kv_eviction.KVEvictionEnv` for their meaning).

    ``model`` is a name for :func:`kvzap_lab.model.load_model` (loaded once per process and device by
    :func:`shared_model`: CUDA when available, CPU otherwise) or a loaded model with its ``tokenizer``. The sample
    pool is ``samples`` or ``make_samples(task, tokenizer, n_samples, context_tokens, sample_seed)``.
    """
    if isinstance(model, str):
        model, tokenizer = shared_model(model, device)
    else:
        if tokenizer is None:
            raise ValueError("a loaded model needs its tokenizer: pass tokenizer=")
        model_device = next(model.parameters()).device
        want = None if device is None else torch.device(device)
        if want is not None and (want.type != model_device.type or want.index not in (None, model_device.index)):
            raise ValueError(f"device={device!r} but the given model is on {model_device}; move the model or drop device=")
    spec = describe(model)
    if decoding not in DECODINGS:
        raise ValueError(f"decoding must be one of {DECODINGS}; got {decoding!r}")
    if action_type not in ACTION_TYPES:
        raise ValueError(f"action_type must be one of {ACTION_TYPES}; got {action_type!r}")
    if observation not in OBSERVATIONS:
        raise ValueError(f"observation must be one of {OBSERVATIONS} (compact: scores and positions, no hidden states); got {observation!r}")
    low, high = (float(x) for x in threshold_range)
    if not -SCORE_BOUND <= low < high <= SCORE_BOUND:
        raise ValueError(f"threshold_range must be (low, high) with -{SCORE_BOUND:g} <= low < high <= {SCORE_BOUND:g}; got {threshold_range!r}")
    chunk_size, evict_every = _positive_int("chunk_size", chunk_size), _positive_int("evict_every", evict_every)
    compact_every = _positive_int("compact_every", compact_every)
    needed = max(chunk_size, evict_every)
    max_candidates = needed if max_candidates is None else _positive_int("max_candidates", max_candidates)
    if max_candidates < needed:
        raise ValueError(
            f"max_candidates={max_candidates} is smaller than the candidates one step can produce "
            f"(max(chunk_size={chunk_size}, evict_every={evict_every}) = {needed}); raise it or lower those"
        )
    weights = tuple(float(w) for w in (oracle_weight, fidelity_weight, memory_weight))
    if not all(math.isfinite(w) and w >= 0 for w in weights):
        raise ValueError(f"reward weights must be finite and >= 0; got oracle/fidelity/memory = {weights}")
    if not (math.isfinite(hidden_bound) and hidden_bound > 0):
        raise ValueError(f"hidden_bound must be a finite number > 0; got {hidden_bound}")

    policy = _resolve_policy(policy, checkpoint, model, window, sinks)
    if action_type == "threshold" and policy is None:
        raise ValueError(
            "KVEvictionThreshold-v0 thresholds a scorer's scores: pass policy=NAME (e.g. 'oracle', or 'kvzap_mlp' "
            "with checkpoint=DIR)"
        )
    for name, given in (("window", window), ("sinks", sinks)):
        own = None if policy is None else getattr(policy.rule, name)
        if given is not None and own is not None and given != own:
            raise ValueError(f"{name}={given} contradicts the policy's rule ({name}={own}); give one of them")
    window = window if window is not None else (policy.rule.window if policy else DEFAULT_WINDOW)
    sinks = sinks if sinks is not None else (policy.rule.sinks if policy else DEFAULT_SINKS)
    for name, value in (("window", window), ("sinks", sinks)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be an int >= 0; got {value!r}")

    if samples is None:
        if not isinstance(sample_seed, (int, np.integer)) or isinstance(sample_seed, bool) or not 0 <= sample_seed < 2**63:
            raise ValueError(f"sample_seed must be an int in [0, 2**63); got {sample_seed!r}")
        samples = tasks.make_samples(task, tokenizer, _positive_int("n_samples", n_samples), context_tokens, int(sample_seed))
    samples = list(samples)
    if not samples:
        raise ValueError("the sample pool is empty: give samples= or n_samples >= 1")
    for k, s in enumerate(samples):
        context = s.context_span[1] - s.context_span[0]
        if window >= context:
            raise ValueError(
                f"window={window} is not smaller than the context of sample {k} ({context} tokens): no context pair "
                "would ever leave the window; use a smaller window or longer contexts"
            )
        if len(s.answer_ids) < 2:
            raise ValueError(f"sample {k} has a reference answer of {len(s.answer_ids)} tokens; need >= 2 (answer + end)")
        if len(s.input_ids) + len(s.answer_ids) > spec.max_positions:
            need = len(s.input_ids) + len(s.answer_ids)
            raise ValueError(f"sample {k} needs {need} positions; the model covers {spec.max_positions}")


    end = tokenizer.convert_tokens_to_ids(tasks.END) if hasattr(tokenizer, "convert_tokens_to_ids") else None
    eos = end if isinstance(end, int) and end != getattr(tokenizer, "unk_token_id", None) else model.config.eos_token_id
    return EnvConfig(
        model=model, tokenizer=tokenizer, samples=samples, policy=policy, window=window, sinks=sinks,
        chunk_size=chunk_size, evict_every=evict_every, compact_every=compact_every, max_candidates=max_candidates,
        decoding=decoding, action_type=action_type, observation=observation, flat_actions=bool(flat_actions),
        threshold_range=(low, high), weights=weights, hidden_bound=float(hidden_bound), eos_token_id=int(eos),
        references=reference_cache or ReferenceCache(model, tokenizer),
    )
