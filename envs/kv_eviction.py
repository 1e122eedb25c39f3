"""KV-cache eviction as a Gymnasium environment over the real decode loop, rewarded against the KVzip+ oracle.

An episode is one task sample (:func:`kvzap_lab.tasks.make_samples`) or one text window
(:func:`text_window_samples`). The prompt is prefilled in chunks of ``chunk_size`` tokens, then the answer is
decoded one token per forward: teacher-forced on the reference answer by default (``decoding="teacher"``, so
episodes are comparable across policies), or greedily (``decoding="greedy"``: the model's own tokens, stopping
at the end token, at the answer's length or, on exact-match tasks, at the first wrong token, exactly as
:mod:`kvzap_lab.evaluate` does).

Every forward runs in :func:`kvzap_lab.engine.evicting` with the real compacted cache. The engine offers, at its
eviction points (after every prefill chunk and every ``evict_every`` decode steps), the pairs outside the
sliding window (``window`` most recent tokens) that are not sinks (``sinks`` first tokens); the **candidates** of
a step are those that left the window since the previous eviction point: at most ``max_candidates`` positions,
the same positions in every layer and KV head. The agent decides them once (DMS/KVzap semantics: a pair is
judged when it leaves the window; a kept pair stays): the engine's rule inside the env keeps everything it is
offered, and the agent's evictions go through the cache's own ``drop`` before the next forward (evicted pairs
leave the attention at once and the storage at the engine's next compaction).

Step ``t``: ``step(action)`` applies the keep/evict decisions to the current candidates, then runs the next
forward (a prefill chunk or one decode token) and returns the candidates it produced. The episode ends with the
step that decides the candidates of the last forward (so every forward's candidates are decided, as in
:func:`kvzap_lab.engine.generate`).

Observation (``Dict`` of float32 ``Box`` es, fixed shapes; ``L`` layers, ``H`` KV heads, ``C`` = ``max_candidates``,
``D`` hidden size; candidates in position order, unused slots zero):

- ``hidden [L, C, D]``: hidden state entering each attention layer at each candidate token (what a KVzap scorer
  reads), clipped to ``[-hidden_bound, hidden_bound]`` (default 100; the test bed's stay within +-10);
- ``candidate_mask [C]``: 1 for a real candidate;
- ``positions [C]``: candidate position / ``T`` (``T`` = tokens the episode feeds: prompt + answer - 1), in [0, 1);
- ``occupancy [L, H]``: pairs held / tokens seen, per layer and KV head, in [0, 1];
- ``progress [1]``: tokens fed / ``T``;
- ``scores [L, H, C]`` (only when the env is made with a ``policy``): the policy scorer's stored scores of the
  candidates (as the engine computed them, accumulated attention included), clipped to ``[-1000, 1000]``.

Actions: ``KVEviction-v0`` takes ``MultiBinary([L, H, C])`` (1 = keep; slots beyond the candidates are
ignored); ``KVEvictionThreshold-v0`` takes thresholds ``Box(-1000, 1000, [L, H])`` and keeps the candidates whose
stored score (of the env's ``policy``) is ``>= tau[l, h]``, through :class:`kvzap_lab.policy.Threshold`.

Reward of step ``t`` (weights ``w_o, w_f, w_m`` = ``oracle_weight, fidelity_weight, memory_weight``)::

    r_t = - w_o * sum_{(l,h,p) evicted at t} s[l,h,p] / Z                       (oracle term)
          - w_f * sum_{j predicted by the forward of t} KL(P_full,j || P_comp,j) / A   (fidelity term)
          - w_m * (pairs kept at t) / (L * H * T)                              (memory term)

with ``s = exp(log KVzip+)`` the oracle importance of each context pair (from the same oracle table the
``oracle`` policy reads; template, question and answer pairs have no oracle score and weigh 0),
``Z = sum of s`` over every context pair of the sample, ``A`` the answer length, ``P_full,j`` / ``P_comp,j`` the
next-token distributions of a full cache / of the compressed cache at answer position ``j`` (teacher-forced on
the reference; in greedy mode only while the generated tokens equal the reference). The final step also pays
``- w_m * (pairs held that were never offered) / (L * H * T)``, so over an episode::

    sum_t r_t = - w_o * (oracle mass lost)  - w_f * sum_j KL_j / A  - w_m * (pairs held at the end) / (L * H * T)

(under teacher forcing ``sum_j KL_j / A`` is the mean KL over the answer and ``T`` tokens are fed, so the memory
term is ``- w_m * (1 - compression)``).

``info`` carries ``compression`` (fraction of pairs evicted so far, as ``Compression.per_row``), ``kl`` (mean KL
so far), ``oracle_mass_retained`` (1 - mass lost), the step's reward ``terms``, and at the end ``accuracy``
(:func:`kvzap_lab.tasks.score_answer` of the greedy/argmax answer), ``token_accuracy`` and ``answer_ids``.

The oracle table and the full-cache next-token log-probs of a sample are computed once, at the first reset that
draws it, and cached by the sample's tokens (:class:`ReferenceCache`): re-running a sample costs no oracle pass.
While an episode runs the env holds the model's eviction hooks; the single env releases them when the episode
ends (or at ``close``), the vector env at ``close``.

:class:`KVEvictionVectorEnv` runs ``N`` episodes through one batched forward per step (left padding inside the
step, per-row positions), with standard ``NEXT_STEP`` autoreset. :class:`PolicyAgent` makes any registered
policy with a threshold rule act in the env.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import weakref
from dataclasses import dataclass, field
from typing import Sequence

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space
from torch import Tensor, nn

from kvzap_lab import tasks
from kvzap_lab.engine import DEFAULT_COMPACT_EVERY, evicting
from kvzap_lab.evaluate import oracle_table
from kvzap_lab.model import capture_attention_inputs, describe, load_model
from kvzap_lab.policy import DEFAULT_SINKS, DEFAULT_WINDOW, Policy, Threshold, get_policy

HIDDEN_BOUND = 100.0
SCORE_BOUND = 1000.0
DEFAULT_ENV_CHUNK = 64
DECODINGS = ("teacher", "greedy")
# model -> the rows whose eviction hooks it carries: one model serves one env at a time
_HOOKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
ACTION_TYPES = ("binary", "threshold")


# ------------------------------------------------------------------------------------------ samples, references
def text_window_samples(tokenizer, text: str, context_tokens: int, answer_tokens: int = 16) -> list[tasks.Sample]:
    """Episodes cut from plain text: consecutive windows of ``context_tokens`` tokens (the context, after the BOS
    token) each followed by the next ``answer_tokens`` tokens as the reference continuation (task ``"text"``,
    exact match; ``info["token_accuracy"]`` gives the per-token view)."""
    if context_tokens < 1 or answer_tokens < 2:
        raise ValueError(f"need context_tokens >= 1 and answer_tokens >= 2; got {context_tokens}, {answer_tokens}")
    ids = tokenizer.encode(text, add_special_tokens=False)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    step = context_tokens + answer_tokens
    samples = [
        tasks.Sample("text", bos + ids[s : s + context_tokens], (len(bos), len(bos) + context_tokens), "", "",
                     ids[s + context_tokens : s + step])
        for s in range(0, len(ids) - step + 1, step)
    ]
    if not samples:
        raise ValueError(f"the text has {len(ids)} tokens: too few for one window of {context_tokens} + {answer_tokens}")
    return samples


@dataclass
class Reference:
    """What an episode is rewarded against, computed once per sample.

    ``table [L, H, n_prompt]``: oracle log KVzip+ by position (+inf outside the context), exactly what the
    ``oracle`` policy reads; ``weights [L, H, n_prompt]``: ``exp(table) / Z`` on the context, 0 elsewhere;
    ``log_probs [A, vocab]``: full-cache next-token log-probs at each answer position (teacher-forced).
    """

    table: Tensor
    weights: np.ndarray
    log_probs: Tensor


def sample_key(sample: tasks.Sample) -> tuple:
    """A sample's identity: its prompt tokens, context span and reference answer tokens."""
    return tuple(sample.input_ids), tuple(sample.context_span), tuple(sample.answer_ids)


class ReferenceCache:
    """Oracle tables and full-cache log-probs per sample (:class:`Reference`), computed in batches on first use."""

    def __init__(self, model: nn.Module, tokenizer, batch_size: int = 8):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.entries: dict[tuple, Reference] = {}

    @torch.no_grad()
    def get(self, samples: Sequence[tasks.Sample]) -> list[Reference]:
        """The references of ``samples``, computing the missing ones (needs the model free of eviction hooks)."""
        missing = list({sample_key(s): s for s in samples if sample_key(s) not in self.entries}.values())
        for start in range(0, len(missing), self.batch_size):
            batch = missing[start : start + self.batch_size]
            tables = oracle_table(self.model, self.tokenizer, batch)  # [b, L, H, width]
            for sample, table, log_probs in zip(batch, tables, self._full_log_probs(batch)):
                table = table[..., : len(sample.input_ids)].contiguous()
                scores = table.double().exp().masked_fill(~torch.isfinite(table), 0.0)
                self.entries[sample_key(sample)] = Reference(table, (scores / scores.sum()).numpy(), log_probs)
        return [self.entries[sample_key(s)] for s in samples]

    def _full_log_probs(self, batch: list[tasks.Sample]) -> list[Tensor]:
        """Next-token log-probs of a full cache at every answer position: ``[A, vocab]`` per sample (one forward
        over prompt + answer[:-1], right-padded)."""
        rows = [s.input_ids + s.answer_ids[:-1] for s in batch]
        width = max(map(len, rows))
        device = next(self.model.parameters()).device
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)], mask[i, : len(row)] = torch.tensor(row), 1
        logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        out = []
        for i, s in enumerate(batch):
            n = len(s.input_ids)
            out.append(torch.log_softmax(logits[i, n - 1 : n - 1 + len(s.answer_ids)], -1))
        return out


# ----------------------------------------------------------------------------------------------- configuration
@dataclass
class _Deferred:
    """The engine's rule inside the env: keeps every pair it is offered and notes that an eviction point happened;
    the agent's decisions are applied after the forward (before the next one), which is equivalent."""

    window: int
    sinks: int
    offered: bool = False

    def keep(self, scores: Tensor, layer: int, valid: Tensor) -> Tensor:
        self.offered = True
        return valid


@dataclass
class EnvSetup:
    """Everything both env classes share: the model, the sample pool, the engine policy and the spaces."""

    model: nn.Module
    tokenizer: object
    samples: list[tasks.Sample]
    policy: Policy | None
    engine_policy: Policy
    window: int
    sinks: int
    chunk_size: int
    evict_every: int
    compact_every: int
    max_candidates: int
    decoding: str
    action_type: str
    weights: tuple[float, float, float]
    hidden_bound: float
    eos_token_id: int
    references: ReferenceCache
    observation_space: spaces.Dict
    action_space: spaces.Space


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


def make_setup(
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
    oracle_weight: float = 1.0,
    fidelity_weight: float = 1.0,
    memory_weight: float = 1.0,
    hidden_bound: float = HIDDEN_BOUND,
    device: str | torch.device | None = None,
    reference_cache: ReferenceCache | None = None,
) -> EnvSetup:
    """Validate the options of an env and build what it needs (see the module docstring for their meaning).

    ``model`` is a name for :func:`kvzap_lab.model.load_model` (loaded on ``device``: CUDA when available, CPU
    otherwise) or a loaded model with its ``tokenizer``. The sample pool is ``samples`` or
    ``make_samples(task, tokenizer, n_samples, context_tokens, sample_seed)``.
    """
    if isinstance(model, str):
        model, tokenizer = load_model(model, device=device)
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

    scorer = policy.scorer if policy is not None else get_policy("streaming_llm").scorer  # cheap; runs the hooks only
    engine_policy = Policy(name=f"env:{policy.name if policy else 'agent'}", scorer=scorer, rule=_Deferred(window, sinks))
    L, H, C, D = spec.n_layers, spec.n_kv_heads, max_candidates, spec.hidden_size
    obs = {
        "hidden": spaces.Box(-hidden_bound, hidden_bound, (L, C, D), np.float32),
        "candidate_mask": spaces.Box(0.0, 1.0, (C,), np.float32),
        "positions": spaces.Box(0.0, 1.0, (C,), np.float32),
        "occupancy": spaces.Box(0.0, 1.0, (L, H), np.float32),
        "progress": spaces.Box(0.0, 1.0, (1,), np.float32),
    }
    if policy is not None:
        obs["scores"] = spaces.Box(-SCORE_BOUND, SCORE_BOUND, (L, H, C), np.float32)
    if action_type == "binary":
        action_space = spaces.MultiBinary([L, H, C])
    else:
        action_space = spaces.Box(-SCORE_BOUND, SCORE_BOUND, (L, H), np.float32)
    end = tokenizer.convert_tokens_to_ids(tasks.END) if hasattr(tokenizer, "convert_tokens_to_ids") else None
    eos = end if isinstance(end, int) and end != getattr(tokenizer, "unk_token_id", None) else model.config.eos_token_id
    return EnvSetup(
        model=model, tokenizer=tokenizer, samples=samples, policy=policy, engine_policy=engine_policy, window=window,
        sinks=sinks, chunk_size=chunk_size, evict_every=evict_every, compact_every=compact_every,
        max_candidates=max_candidates, decoding=decoding, action_type=action_type, weights=weights,
        hidden_bound=float(hidden_bound), eos_token_id=int(eos),
        references=reference_cache or ReferenceCache(model, tokenizer),
        observation_space=spaces.Dict(obs), action_space=action_space,
    )


# ---------------------------------------------------------------------------------------------------- episodes
@dataclass
class _Episode:
    """One row's episode: where it is, what it decided, what it earned."""

    sample: tasks.Sample
    ref: Reference
    hist: Tensor  # [L, T + 1, D] hidden states of the tokens fed, by position
    total: int  # T: tokens the episode feeds at most (prompt + answer - 1)
    next_candidate: int  # positions below this were offered already (or are sinks)
    fed: int = 0
    cand_start: int = 0
    cand_count: int = 0
    predicted: list[int] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    lost: float = 0.0
    kept_decided: int = 0
    finished: bool = False  # no forward left
    done: bool = False  # terminated
    diverged: bool = False  # greedy: a generated token differs from the reference

    @property
    def n_prompt(self) -> int:
        return len(self.sample.input_ids)

    def next_tokens(self, chunk: int, decoding: str) -> list[int]:
        if self.finished:
            return []
        if self.fed < self.n_prompt:
            return self.sample.input_ids[self.fed : self.fed + chunk]
        k = self.fed - self.n_prompt  # the answer token fed now
        return [self.predicted[k] if decoding == "greedy" else self.sample.answer_ids[k]]


class _Rows:
    """``N`` episodes sharing one model, one :func:`evicting` run and one batched :class:`CompactCache`."""

    def __init__(self, setup: EnvSetup, n: int):
        self.s, self.n = setup, n
        spec = describe(setup.model)
        self.L, self.H, self.D, self.C = spec.n_layers, spec.n_kv_heads, spec.hidden_size, setup.max_candidates
        self.device = next(setup.model.parameters()).device
        self.episodes: list[_Episode | None] = [None] * n
        self._stack: contextlib.ExitStack | None = None
        self.preempted = False  # another env took the model mid-episode
        self._selection: list[tuple[Tensor, Tensor]] | None = None  # per layer: (candidate index, selected) [N, H, used]
        self._scores: Tensor | None = None  # [N, L, H, C] stored scores of the candidates (nan elsewhere)
        self._weights = np.zeros((n, self.L, self.H, self.C))  # oracle weights of the candidates

    # -- engine context
    @property
    def open(self) -> bool:
        return self._stack is not None

    def free_model(self) -> None:
        """Remove the eviction hooks from the model: end this env's episode, or the one of another env holding the
        same model (that env's next step raises)."""
        holder = _HOOKED.get(self.s.model)
        if holder is not None:
            holder.close()
            holder.preempted = holder is not self

    def start_run(self) -> None:
        """Enter :func:`evicting` (and our hidden-state capture) with a fresh cache (call :meth:`free_model` first)."""
        self.preempted = False
        stack = contextlib.ExitStack()
        run = stack.enter_context(
            evicting(self.s.model, self.s.engine_policy, evict_every=self.s.evict_every, compact_every=self.s.compact_every)
        )
        self.captured = stack.enter_context(capture_attention_inputs(self.s.model))
        self._stack, self.cache = stack, run.new_cache()
        _HOOKED[self.s.model] = self

    def close(self) -> None:
        """Leave the engine context (the model is restored)."""
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.close()
            if _HOOKED.get(self.s.model) is self:
                del _HOOKED[self.s.model]

    def check_running(self) -> None:
        """Raise a clear error unless an episode is running on this model."""
        if self.preempted:
            raise RuntimeError(
                "another env started an episode on the same model (one model serves one env at a time), which closed "
                "this one's episode: call reset()"
            )
        if not self.open:
            raise RuntimeError("call reset() before step()")

    # -- episodes
    def begin(self, row: int, sample: tasks.Sample, ref: Reference) -> None:
        """Start ``sample`` in ``row``: the row's old pairs are dropped and its positions restart at 0."""
        self.cache.restart_row(row)
        total = len(sample.input_ids) + len(sample.answer_ids) - 1
        hist = torch.zeros(self.L, total + 1, self.D, device=self.device)
        self.episodes[row] = _Episode(sample, ref, hist, total, next_candidate=self.s.sinks)
        if hasattr(self.s.engine_policy.scorer, "set_scores"):  # the oracle policy reads the tables of its rows
            width = max(len(e.sample.input_ids) for e in self.episodes if e is not None)
            table = torch.full((self.n, self.L, self.H, width), math.inf)
            for i, e in enumerate(self.episodes):
                if e is not None:
                    table[i, :, :, : e.n_prompt] = e.ref.table
            self.s.engine_policy.scorer.set_scores(table)

    @torch.no_grad()
    def forward(self) -> dict[int, float]:
        """One batched forward of every row's next tokens; returns the fidelity KL of each row that predicted an
        answer token, and sets each row's new candidates."""
        feeds = [e.next_tokens(self.s.chunk_size, self.s.decoding) if e is not None else [] for e in self.episodes]
        q = max(map(len, feeds))
        if q == 0:
            return {}
        pad = self.s.model.config.pad_token_id or 0
        ids = torch.tensor([[pad] * (q - len(f)) + f for f in feeds], device=self.device)
        mask = None
        if any(len(f) < q for f in feeds):
            valid = torch.tensor([[0] * (q - len(f)) + [1] * len(f) for f in feeds], device=self.device)
            mask = torch.cat([valid.new_ones(self.n, self.cache.seen), valid], 1)
        rule = self.s.engine_policy.rule
        rule.offered = False
        logits = self.s.model(input_ids=ids, attention_mask=mask, cache=self.cache, logits_to_keep=1).logits[:, -1]
        hidden = torch.stack([self.captured[layer] for layer in range(self.L)], 1)  # [N, L, q, D]
        predicting = []
        for i, (e, f) in enumerate(zip(self.episodes, feeds)):
            if f:
                e.hist[:, e.fed : e.fed + len(f)] = hidden[i, :, q - len(f) :]
                e.fed += len(f)
                if e.fed >= e.n_prompt:
                    predicting.append(i)
        kls = self._predict(logits, predicting)
        for e in self.episodes:
            if e is None:
                continue
            e.cand_count = 0
            if rule.offered:  # an eviction point: the positions that left the window since the last one
                boundary = e.fed - 1 - max(self.s.window, 1)  # as CompactLayer.evictable
                e.cand_start, e.cand_count = e.next_candidate, max(0, boundary - e.next_candidate + 1)
                e.next_candidate += e.cand_count
        self._select()
        return kls

    def _predict(self, logits: Tensor, rows: list[int]) -> dict[int, float]:
        """Record the greedy token each of ``rows`` predicted (``logits [N, vocab]``), decide whether its decoding is
        over, and return its KL to the full cache (where the reference applies)."""
        if not rows:
            return {}
        log_probs = torch.log_softmax(logits[rows].float(), -1)
        tokens = log_probs.argmax(-1).tolist()
        scored, references = [], []
        for i, token in zip(rows, tokens):
            e = self.episodes[i]
            k = e.fed - e.n_prompt  # answer index this forward predicted
            reference, last = e.sample.answer_ids[k], k == len(e.sample.answer_ids) - 1
            scored.append(not e.diverged)  # the full-cache reference holds while the tokens fed are the reference's
            references.append(e.ref.log_probs[k])
            e.predicted.append(token)
            if self.s.decoding == "teacher":
                e.finished = last
            else:
                e.diverged |= token != reference
                wrong = token != reference and e.sample.task != "copy"  # exact match is lost: evaluate stops too
                e.finished = last or token == self.s.eos_token_id or wrong
        full = torch.stack(references)
        kl = (full.exp() * (full - log_probs)).sum(-1).clamp_min(0).tolist()
        out = {}
        for i, value, ok in zip(rows, kl, scored):
            if ok:
                self.episodes[i].kl.append(value)
                out[i] = value
        return out

    def _select(self) -> None:
        """Locate the candidates in every layer's slots (kept for the decisions) and read their stored scores."""
        starts = [e.cand_start if e is not None else 0 for e in self.episodes]
        counts = [e.cand_count if e is not None else 0 for e in self.episodes]
        self._weights[:] = 0.0
        if not any(counts):
            self._selection = self._scores = None
            return
        lo = torch.tensor(starts, device=self.device)[:, None, None]
        n = torch.tensor(counts, device=self.device)[:, None, None]
        self._selection = []
        scores = torch.full((self.n, self.L, self.H, self.C + 1), math.nan, device=self.device) if self.s.policy is not None else None
        for layer_idx, layer in enumerate(self.cache.layers):
            used = layer.used
            index = layer.positions[:, :, :used] - lo
            selected = layer.alive[:, :, :used] & (index >= 0) & (index < n)
            index = index.masked_fill_(~selected, self.C)  # slot -> candidate index, C for the others
            self._selection.append((index, selected))
            if scores is not None:
                scores[:, layer_idx].scatter_(2, index, layer.scores[:, :, :used])
        self._scores = None if scores is None else scores[..., : self.C]
        for i, (e, start, count) in enumerate(zip(self.episodes, starts, counts)):
            if count:
                w = e.ref.weights[:, :, start : start + count]
                self._weights[i, :, :, : w.shape[2]] = w

    def observe(self, kept: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The batched observation ``{key: [N, ...]}`` of the current candidates (fresh arrays); ``kept`` is
        :meth:`kept` if already at hand."""
        L, H, C = self.L, self.H, self.C
        obs = {
            "hidden": np.zeros((self.n, L, C, self.D), np.float32),
            "candidate_mask": np.zeros((self.n, C), np.float32),
            "positions": np.zeros((self.n, C), np.float32),
            "occupancy": np.zeros((self.n, L, H), np.float32),
            "progress": np.zeros((self.n, 1), np.float32),
        }
        kept = self.kept() if kept is None else kept  # [N, L, H]
        for i, e in enumerate(self.episodes):
            if e is None:
                continue
            if e.cand_count and not e.done:
                lo, n = e.cand_start, e.cand_count
                obs["hidden"][i, :, :n] = e.hist[:, lo : lo + n].clamp(-self.s.hidden_bound, self.s.hidden_bound).cpu().numpy()
                obs["candidate_mask"][i, :n] = 1.0
                obs["positions"][i, :n] = np.arange(lo, lo + n, dtype=np.float32) / e.total
            obs["occupancy"][i] = kept[i] / max(e.fed, 1)
            obs["progress"][i] = e.fed / e.total
        if self.s.policy is not None:
            scores = np.zeros((self.n, L, H, C), np.float32)
            if self._scores is not None:
                s = self._scores.nan_to_num(0.0, posinf=SCORE_BOUND, neginf=-SCORE_BOUND).clamp(-SCORE_BOUND, SCORE_BOUND)
                scores[:] = s.cpu().numpy()
                scores *= obs["candidate_mask"][:, None, None, :]
            obs["scores"] = scores
        return obs

    def kept(self) -> np.ndarray:
        """Pairs held per row, layer and KV head: ``[N, L, H]``."""
        if not self.cache.layers[0].is_initialized:
            return np.zeros((self.n, self.L, self.H))
        return torch.stack([layer.kept() for layer in self.cache.layers], 1).cpu().numpy()

    def candidate_scores(self, row: int) -> Tensor:
        """Stored scores of ``row``'s candidates (unclipped): ``[L, H, C]``, NaN beyond the candidates."""
        return self._scores[row]

    @torch.no_grad()
    def decide(self, keep: np.ndarray, rows: list[int]) -> dict[int, tuple[float, int]]:
        """Apply ``keep [N, L, H, C]`` (bool) to the candidates of ``rows`` (any other row keeps its candidates);
        returns per row (oracle mass lost, pairs kept)."""
        out = {i: (0.0, 0) for i in rows}
        if self._selection is None:
            return out
        flags = np.ones((self.n, self.L, self.H, self.C + 1), dtype=bool)  # candidate index C: not a candidate
        flags[rows, :, :, : self.C] = keep[rows]
        flags_t = torch.from_numpy(flags).to(self.device)
        for layer_idx, (layer, (index, selected)) in enumerate(zip(self.cache.layers, self._selection)):
            if not flags[:, layer_idx].all():  # else this layer keeps every candidate: nothing to drop
                layer.drop(selected & ~flags_t[:, layer_idx].gather(2, index))
        for i in rows:
            e = self.episodes[i]
            lost = float(self._weights[i][~keep[i]].sum())
            n_kept = int(keep[i, :, :, : e.cand_count].sum())
            e.lost += lost
            e.kept_decided += n_kept
            e.cand_count = 0
            out[i] = (lost, n_kept)
        self._selection = self._scores = None
        return out


# ---------------------------------------------------------------------------------------------- the two envs
def _check_action(action, space: spaces.Space, action_type: str, batch: int | None) -> np.ndarray:
    """Validate one action (``batch=None``) or a batch of ``batch`` actions; returns a numpy array."""
    expected = space.shape if batch is None else (batch, *space.shape)
    if isinstance(action, Tensor):
        action = action.detach().cpu().numpy()
    action = np.asarray(action)
    if action.shape != tuple(expected):
        what = "keep flags [layers, kv_heads, max_candidates]" if action_type == "binary" else "thresholds [layers, kv_heads]"
        raise ValueError(f"action must have shape {tuple(expected)} ({what}); got {action.shape}")
    if action_type == "binary":
        if not (action.dtype == np.bool_ or np.issubdtype(action.dtype, np.integer)):
            raise TypeError(f"a keep/evict action is an int or bool array of 0/1 (MultiBinary: int8); got dtype {action.dtype}")
        if action.dtype != np.bool_ and (action.min() < 0 or action.max() > 1):
            raise ValueError("a keep/evict action holds only 0 (evict) and 1 (keep)")
        return action.astype(bool)
    if not np.issubdtype(action.dtype, np.floating):
        raise TypeError(f"a threshold action is a float array (Box, float32); got dtype {action.dtype}")
    if np.isnan(action).any() or np.abs(action).max() > SCORE_BOUND:
        raise ValueError(f"threshold actions are finite log-score thresholds in [-{SCORE_BOUND:g}, {SCORE_BOUND:g}]")
    return action.astype(np.float32)


class _Driver:
    """What one ``step``/``reset`` does for a set of rows: shared by the single and the vector env."""

    def __init__(self, setup: EnvSetup, n: int):
        self.s, self.rows = setup, _Rows(setup, n)

    def references(self, samples) -> list[Reference]:
        return self.s.references.get(samples)

    def keep_from_actions(self, actions: np.ndarray, rows: list[int]) -> np.ndarray:
        """Keep flags ``[N, L, H, C]`` from binary actions, or from thresholds applied by :class:`Threshold`."""
        r = self.rows
        if self.s.action_type == "binary":
            return actions
        keep = np.ones((r.n, r.L, r.H, r.C), dtype=bool)
        if r._scores is None:
            return keep
        for i in rows:
            rule = Threshold(tau=actions[i].tolist(), window=self.s.window, sinks=self.s.sinks)
            scores = r.candidate_scores(i)  # [L, H, C]
            valid = ~torch.isnan(scores)
            for layer in range(r.L):
                keep[i, layer] = rule.keep(scores[layer][None].nan_to_num(0.0), layer, valid[layer][None])[0].cpu().numpy()
        return keep

    def step_rows(self, actions: np.ndarray, deciding: list[int]) -> tuple[np.ndarray, list[dict], dict]:
        """Decide the candidates of ``deciding`` rows, end the finished ones, run the next forward for the rest.
        Returns the rewards ``[N]``, per-row info dicts (``terminated`` in each) and the batched observation."""
        r, (w_o, w_f, w_m) = self.rows, self.s.weights
        decisions = r.decide(self.keep_from_actions(actions, deciding), deciding)
        rewards = np.zeros(r.n)
        terms = {i: {"oracle": -decisions[i][0], "fidelity": 0.0, "memory": 0.0} for i in deciding}
        for i in deciding:
            e = r.episodes[i]
            terms[i]["memory"] = -decisions[i][1] / (r.L * r.H * e.total)
            if e.finished:
                e.done = True
        kls = r.forward()
        kept = r.kept()
        infos = [{} for _ in range(r.n)]
        for i, e in enumerate(r.episodes):
            if e is None:
                continue
            t = terms.setdefault(i, {"oracle": 0.0, "fidelity": 0.0, "memory": 0.0})
            if i in kls:
                t["fidelity"] = -kls[i] / len(e.sample.answer_ids)
            if e.done and i in deciding:  # the pairs held that were never offered pay at the end
                t["memory"] -= float(kept[i].sum() - e.kept_decided) / (r.L * r.H * e.total)
            rewards[i] = w_o * t["oracle"] + w_f * t["fidelity"] + w_m * t["memory"]
            infos[i] = self.info(i, kept[i], t)
        return rewards, infos, r.observe(kept)

    def info(self, row: int, kept: np.ndarray, terms: dict | None) -> dict:
        e = self.rows.episodes[row]
        info = {
            "compression": float(1.0 - kept.sum() / max(e.fed * kept.size, 1)),
            "kl": float(np.mean(e.kl)) if e.kl else 0.0,
            "oracle_mass_retained": float(1.0 - e.lost),
            "phase": "prefill" if e.fed < e.n_prompt else "decode",
            "terms": dict(terms or {"oracle": 0.0, "fidelity": 0.0, "memory": 0.0}),
            "terminated": e.done,
        }
        if e.done:
            reference = e.sample.answer_ids
            info["accuracy"] = float(tasks.score_answer(e.sample, e.predicted, self.s.tokenizer))
            hits = sum(p == t for p, t in zip(e.predicted, reference))
            info["token_accuracy"] = hits / len(reference)
            info["answer_ids"] = np.asarray(e.predicted, dtype=np.int64)
        return info


def _check_sample_option(options, n_pool: int, n: int | None) -> list[int] | None:
    if not options or "sample" not in options:
        return None
    unknown = set(options) - {"sample"}
    if unknown:
        raise ValueError(f"unknown reset options {sorted(unknown)}; the env takes options={{'sample': index}}")
    picks = options["sample"]
    picks = [picks] * (n or 1) if np.isscalar(picks) else list(picks)
    if len(picks) != (n or 1):
        raise ValueError(f"options['sample'] must be one index or {n} indices; got {len(picks)}")
    for k in picks:
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or not 0 <= k < n_pool:
            raise ValueError(f"options['sample'] must be sample indices in [0, {n_pool}); got {k!r}")
    return [int(k) for k in picks]


class KVEvictionEnv(gym.Env):
    """Keep/evict the KV pairs leaving the sliding window, one forward per step (see the module docstring).

    Takes the options of :func:`make_setup`; ``action_type="threshold"`` is ``KVEvictionThreshold-v0``.
    ``reset(seed=s)`` draws a sample of the pool with the env's seeded generator; ``options={"sample": k}`` picks
    sample ``k``.
    """

    metadata = {"render_modes": []}

    def __init__(self, model: str | nn.Module = "testbed", tokenizer=None, **options):
        self.setup = make_setup(model, tokenizer, **options)
        self.observation_space = self.setup.observation_space
        self.action_space = self.setup.action_space
        self._driver = _Driver(self.setup, 1)

    @property
    def episode(self) -> _Episode | None:
        """The current episode (sample, tokens fed, predictions, ...)."""
        return self._driver.rows.episodes[0]

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None and (not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= seed < 2**128):
            raise ValueError(f"seed must be an int in [0, 2**128) or None; got {seed!r}")
        super().reset(seed=seed)
        pool = self.setup.samples
        picked = _check_sample_option(options, len(pool), None)
        index = picked[0] if picked else int(self.np_random.integers(len(pool)))
        rows = self._driver.rows
        rows.free_model()  # the references need the model free of eviction hooks
        (ref,) = self._driver.references([pool[index]])
        rows.start_run()
        rows.begin(0, pool[index], ref)
        rows.forward()
        obs = {k: v[0] for k, v in rows.observe().items()}
        info = self._driver.info(0, rows.kept()[0], None) | {"sample": index}
        return obs, info

    def step(self, action):
        e = self.episode
        if e is not None and e.done:
            raise RuntimeError("the episode is over (terminated): call reset() to start the next one")
        self._driver.rows.check_running()
        action = _check_action(action, self.action_space, self.setup.action_type, None)
        rewards, infos, obs = self._driver.step_rows(action[None], [0])
        obs = {k: v[0] for k, v in obs.items()}
        terminated = e.done
        if terminated:
            self._driver.rows.close()
        return obs, float(rewards[0]), terminated, False, infos[0]

    def close(self):
        self._driver.rows.close()
        super().close()


class KVEvictionVectorEnv(VectorEnv):
    """``num_envs`` episodes through one batched model forward per step; ``NEXT_STEP`` autoreset.

    A row whose episode terminated at step ``t`` starts a new sample at step ``t + 1`` (its action is ignored, its
    reward is 0) while the other rows go on; rows in different phases share the forward with left padding inside
    the step. Every sample's reference is prepared (batched) at the first ``reset``. With ``evict_every > 1``, a
    row's prefill chunk is an eviction point for every row (the engine evicts after every multi-token forward).
    """

    metadata = {"autoreset_mode": AutoresetMode.NEXT_STEP, "render_modes": []}

    def __init__(self, num_envs: int = 1, model: str | nn.Module = "testbed", tokenizer=None, **options):
        self.num_envs = _positive_int("num_envs", num_envs)
        self.setup = make_setup(model, tokenizer, **options)
        self.single_observation_space = self.setup.observation_space
        self.single_action_space = self.setup.action_space
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self._driver = _Driver(self.setup, self.num_envs)
        self._autoreset = np.zeros(self.num_envs, dtype=bool)
        self._sample_index = np.zeros(self.num_envs, dtype=np.int64)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if seed is not None and (not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= seed < 2**128):
            raise ValueError(f"seed must be an int in [0, 2**128) or None; got {seed!r}")
        super().reset(seed=seed)
        pool = self.setup.samples
        picks = _check_sample_option(options, len(pool), self.num_envs)
        if picks is None:
            picks = self.np_random.integers(len(pool), size=self.num_envs).tolist()
        rows = self._driver.rows
        rows.free_model()
        self._driver.references(pool)  # every sample of the pool, batched: autoresets then need no oracle pass
        rows.start_run()
        for i, k in enumerate(picks):
            rows.begin(i, pool[k], self.setup.references.entries[sample_key(pool[k])])
        self._sample_index[:] = picks
        rows.forward()
        self._autoreset[:] = False
        kept = rows.kept()
        infos = {}
        for i in range(self.num_envs):
            infos = self._add_info(infos, self._driver.info(i, kept[i], None) | {"sample": int(picks[i])}, i)
        return rows.observe(), infos

    def step(self, actions):
        rows = self._driver.rows
        rows.check_running()
        actions = _check_action(actions, self.single_action_space, self.setup.action_type, self.num_envs)
        pool = self.setup.samples
        restarting = np.flatnonzero(self._autoreset).tolist()
        for i in restarting:
            k = int(self.np_random.integers(len(pool)))
            rows.begin(i, pool[k], self.setup.references.entries[sample_key(pool[k])])
            self._sample_index[i] = k
        deciding = [i for i in range(self.num_envs) if i not in restarting]
        rewards, row_infos, obs = self._driver.step_rows(actions, deciding)
        terminations = np.array([rows.episodes[i].done for i in range(self.num_envs)])
        terminations[restarting] = False
        rewards[restarting] = 0.0
        self._autoreset = terminations.copy()
        infos = {}
        for i, info in enumerate(row_infos):
            infos = self._add_info(infos, info | {"sample": int(self._sample_index[i])}, i)
        return obs, rewards, terminations, np.zeros(self.num_envs, dtype=bool), infos

    def close_extras(self, **kwargs):
        self._driver.rows.close()


def make_vector_env(num_envs: int = 1, **kwargs) -> KVEvictionVectorEnv:
    """Vector entry point of both env ids (``gymnasium.make_vec(id, num_envs=N, vectorization_mode=
    "vector_entry_point")``); ``max_episode_steps`` is refused (episodes end by themselves)."""
    if kwargs.pop("max_episode_steps", None) is not None:
        raise ValueError("KVEviction episodes end by themselves: max_episode_steps is not supported")
    return KVEvictionVectorEnv(num_envs, **kwargs)


# ------------------------------------------------------------------------------------------------- the agent
@dataclass
class PolicyAgent:
    """Any policy with a threshold rule, acting in ``KVEviction-v0``: keep a candidate iff ``rule.keep`` keeps its
    score (``obs["scores"]``, so make the env with the same policy: ``gym.make(id, policy=agent.policy)``).

    Decisions in the env are final when a pair leaves the window, which is exactly what a
    :class:`~kvzap_lab.policy.Threshold` rule does in the engine (a kept pair's score never drops below tau, also
    when attention accumulates on it). Budget rules (``TopK``) re-decide held pairs at every step and are refused.
    """

    policy: Policy | str

    def __post_init__(self):
        if isinstance(self.policy, str):
            self.policy = get_policy(self.policy)
        rule = self.policy.rule
        if not isinstance(rule, Threshold):
            raise ValueError(
                f"policy {self.policy.name!r} has a {type(rule).__name__} rule, which re-decides held pairs at every "
                "step; env decisions are final when a pair leaves the window: give it a Threshold rule "
                "(kvzap_lab.policy.calibrate picks tau for a target compression)"
            )
        if np.abs(np.asarray(rule.tau, dtype=np.float64)).max() >= SCORE_BOUND:
            raise ValueError(f"the env clips scores to +-{SCORE_BOUND:g}: thresholds must lie strictly inside; got {rule.tau}")

    def act(self, obs: dict) -> np.ndarray:
        """Keep flags ``int8 [L, H, C]`` for one observation, or ``[N, L, H, C]`` for a batched one."""
        if "scores" not in obs:
            raise ValueError("the observation has no 'scores': make the env with policy=agent.policy")
        scores = torch.from_numpy(np.asarray(obs["scores"]))
        batched = scores.dim() == 4
        scores = scores if batched else scores[None]
        mask = torch.from_numpy(np.asarray(obs["candidate_mask"])).bool()
        mask = mask if batched else mask[None]
        valid = mask[:, None, :].expand(-1, scores.shape[2], -1)
        keep = torch.stack([self.policy.rule.keep(scores[:, layer], layer, valid) for layer in range(scores.shape[1])], 1)
        keep = (keep | ~valid[:, None]).numpy().astype(np.int8)
        return keep if batched else keep[0]
