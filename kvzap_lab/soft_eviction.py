"""Soft eviction: the eviction engine's decisions as a differentiable attention bias, for training scorers.

One full-cache forward over a whole teacher-forced sequence gives, for every (query j, key i) of every KV head,
what the hard engine (:mod:`kvzap_lab.engine`) would let j see, with the keep decision relaxed:

- the sequence is fed as the engine feeds it (:class:`Schedule`): the prompt in chunks of ``chunk_size``, then
  one token per forward; eviction points come after every multi-token forward and every ``evict_every``
  single-token forwards (a one-token last prompt chunk counts as a single-token forward, as in the engine);
- a pair is judged at the first eviction point where it has left the sliding window (position <= the row's
  newest position - max(window, 1)) and is not a sink (position >= ``sinks``); the engine keeps or evicts it
  there, and a threshold on a stored score gives the same answer at every later point, so one judgement is it;
- queries fed in the forward of that eviction point or earlier see the pair in full (tokens of one forward see
  each other); later queries see it through its gate ``g``: the attention weight is multiplied by ``g`` before
  normalisation, i.e. ``log g`` is added to the attention logit. ``gate="soft"``: ``g = sigmoid((s - tau) / T)``,
  which tends to the hard rule as ``T -> 0``; ``"hard"``: ``g = [s >= tau]``, exactly the engine's eviction;
  ``"straight_through"``: the hard gate forward, the soft gate's gradient backward (so training runs the very
  decisions the engine will make).

The score ``s`` comes from :class:`ScorerNet`, a differentiable view of a KVzap linear or MLP scorer, applied to
the hidden state entering each attention layer (detached: the scorer learns through its gates, not through its
inputs); the backbone is frozen while the forward runs, so gradients reach only the scorer. ``noise`` adds
logistic noise to ``s - tau`` (a binary-concrete / Gumbel-sigmoid relaxation, as DMS trains its gates): with the
straight-through gate each pair is then kept with probability ``sigmoid(s - tau)``.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from sklearn.utils.validation import check_is_fitted
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from kvzap_lab.engine import DEFAULT_CHUNK, DEFAULT_EVICT_EVERY
from kvzap_lab.model import attention_override, capture_attention_inputs, describe
from kvzap_lab.policies.kvzap_linear import KVzapLinear
from kvzap_lab.policy import Threshold


class NoGradientError(ValueError):
    """A scorer whose scores are not a differentiable function of parameters (e.g. boosted trees)."""


class ScorerNet(nn.Module):
    """The weights of a fitted KVzap linear or MLP scorer (its ``weights_``: ``(W [layers, out, in], b [layers,
    out])`` per map, GELU between maps) as trainable parameters.

    ``net(hidden [b, t, hidden], layer) -> [b, kv_heads, t]`` computes what ``scorer.score`` does, with gradients;
    :meth:`to_scorer` returns a copy of the original scorer holding the current weights (saved by its own
    ``save``, so every tool loads it unchanged).
    """

    def __init__(self, scorer: KVzapLinear):
        super().__init__()
        if not isinstance(scorer, KVzapLinear):
            raise NoGradientError(
                f"{type(scorer).__name__} has no gradient with respect to its parameters; soft eviction trains "
                "KVzap linear or MLP scorers (policy linear or mlp)"
            )
        check_is_fitted(scorer, "weights_")  # NotFittedError (a ValueError) for a scorer never trained or loaded
        self._template = scorer
        self.weights = nn.ParameterList(p.detach().clone().float() for pair in scorer.weights_ for p in pair)

    @property
    def n_layers(self) -> int:
        return self.weights[0].shape[0]

    def forward(self, hidden: Tensor, layer: int) -> Tensor:
        x = hidden.float()
        for i in range(0, len(self.weights), 2):
            x = F.gelu(x) if i else x
            x = x @ self.weights[i][layer].T + self.weights[i + 1][layer]
        return x.transpose(1, 2)

    def to_scorer(self) -> KVzapLinear:
        """A copy of the scorer this net was built from, with the net's current weights."""
        scorer = copy.deepcopy(self._template)
        flat = [p.detach().cpu().contiguous().clone() for p in self.weights]
        scorer.weights_ = list(zip(flat[0::2], flat[1::2]))
        return scorer


@dataclass(frozen=True)
class Schedule:
    """How the engine feeds a teacher-forced sequence (``generate``'s defaults): the prompt in chunks of
    ``chunk_size`` tokens, then one token per forward, with an eviction point every ``evict_every`` of those."""

    chunk_size: int = DEFAULT_CHUNK
    evict_every: int = DEFAULT_EVICT_EVERY

    def __post_init__(self):
        for name in ("chunk_size", "evict_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1; got {value!r}")

    def forwards(self, prompt_tokens: int, total_tokens: int) -> tuple[list[int], list[bool]]:
        """Sizes of the forwards that feed ``total_tokens`` tokens whose first ``prompt_tokens`` are the prompt, and
        whether an eviction point follows each (the engine's counter: every multi-token forward, and a
        single-token forward once ``evict_every`` forwards have passed since the last eviction point)."""
        if not 1 <= prompt_tokens <= total_tokens:
            raise ValueError(f"need 1 <= prompt_tokens <= total_tokens; got {prompt_tokens}, {total_tokens}")
        sizes = [min(self.chunk_size, prompt_tokens - s) for s in range(0, prompt_tokens, self.chunk_size)]
        sizes += [1] * (total_tokens - prompt_tokens)
        evicts, since = [], 0
        for size in sizes:
            since += 1
            evicts.append(size > 1 or since >= self.evict_every)
            since = 0 if evicts[-1] else since
        return sizes, evicts


@dataclass
class Visibility:
    """What each query of a right-padded batch sees, as the engine would feed it.

    ``valid [b, n]`` real tokens; ``judged [b, n]`` bool, the pairs the rule judges before the sequence ends;
    ``gated [b, n, n]`` bool, the (query, key) pairs where the query sees the key through its gate (the key was
    judged at an eviction point before the query's forward).
    """

    valid: Tensor
    judged: Tensor
    gated: Tensor

    def to(self, device) -> "Visibility":
        return Visibility(*(t.to(device) for t in (self.valid, self.judged, self.gated)))


def visibility(
    lengths: Sequence[tuple[int, int]], schedule: Schedule, window: int, sinks: int, width: int | None = None
) -> Visibility:
    """The :class:`Visibility` of right-padded rows given as ``(prompt_tokens, total_tokens)`` each.

    Args:
        lengths: per row, the prompt length (prefilled in chunks) and the total tokens fed (prompt + teacher-forced
            tokens, each its own forward).
        schedule: chunking and eviction interval.
        window, sinks: the rule's sliding window and sinks (as :class:`~kvzap_lab.policy.Threshold` holds them).
        width: columns of the batch (default: the longest row).

    Returns:
        The visibility of every (query, key) pair; positions are column indices (right padding).
    """
    if window < 0 or sinks < 0:
        raise ValueError(f"window and sinks must be >= 0; got window={window}, sinks={sinks}")
    width = width or max(total for _, total in lengths)
    b = len(lengths)
    never = torch.iinfo(torch.long).max
    valid = torch.zeros(b, width, dtype=torch.bool)
    forward = torch.full((b, width), never, dtype=torch.long)
    judged_at = torch.full((b, width), never, dtype=torch.long)
    for row, (prompt, total) in enumerate(lengths):
        if total > width:
            raise ValueError(f"row {row} has {total} tokens; the batch is {width} wide")
        sizes, evicts = schedule.forwards(prompt, total)
        ends = torch.tensor(sizes).cumsum(0)  # one past the last column of each forward
        valid[row, :total] = True
        forward[row, :total] = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        points = torch.tensor([f for f, e in enumerate(evicts) if e], dtype=torch.long)
        if len(points) == 0:
            continue
        oldest_judged = ends[points] - 1 - max(window, 1)  # pairs at positions <= this are judged at that point
        first = torch.searchsorted(oldest_judged, torch.arange(total), side="left")  # first point that judges
        judged_here = (first < len(points)) & (torch.arange(total) >= sinks)
        judged_at[row, :total] = torch.where(judged_here, points[first.clamp_max(len(points) - 1)], never)
    gated = forward[:, :, None] > judged_at[:, None, :]  # the query's forward comes after the key's judgement
    gated &= valid[:, :, None] & valid[:, None, :]
    return Visibility(valid=valid, judged=judged_at != never, gated=gated)


@dataclass
class SoftOutput:
    """Result of :func:`soft_forward`: ``logits [b, n, vocab]``, and per layer the keep gate of every pair
    ``gates[l] [b, kv_heads, n]`` (1 where a pair is never judged), its score ``scores[l]`` and the scorer's input
    ``hidden[l] [b, n, hidden]`` (detached)."""

    logits: Tensor
    gates: list[Tensor]
    scores: list[Tensor]
    hidden: list[Tensor]
    visibility: Visibility

    def expected_compression(self) -> Tensor:
        """Expected fraction of all pairs evicted (the engine's compression): ``sum(1 - gate)`` over judged pairs,
        over every real pair of every layer and KV head. A scalar with gradients."""
        judged = self.visibility.judged[:, None].float()
        evicted = sum(((1 - g) * judged).sum() for g in self.gates)
        real = self.visibility.valid.sum() * len(self.gates) * self.gates[0].shape[1]
        return evicted / real

    def kept_fraction(self) -> Tensor:
        """Expected fraction of the judged pairs kept (mean gate over judged pairs): a scalar with gradients."""
        judged = self.visibility.judged[:, None].float()
        total = judged.sum() * len(self.gates) * self.gates[0].shape[1]
        return sum((g * judged).sum() for g in self.gates) / total.clamp_min(1)


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Parameters of ``model`` do not require gradients inside the block (a graph built there never reaches
    them); the previous flags are restored on exit."""
    params = list(model.parameters())
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(params, before):
            p.requires_grad_(flag)


def _taus(tau, n_layers: int, n_kv_heads: int) -> Tensor:
    """``tau`` (a float, one per layer, or ``[layers][kv_heads]``) as ``[layers, kv_heads]``."""
    rule = Threshold(tau=tau)
    return torch.stack([rule.thresholds(layer, n_kv_heads) for layer in range(n_layers)])


GATES = ("soft", "hard", "straight_through")


def gate_values(margin: Tensor, gate: str, temperature: float, noise: torch.Generator | None) -> Tensor:
    """Keep gates of pairs whose score is ``margin = s - tau`` above the threshold: ``[...]`` in [0, 1].

    ``"soft"``: ``sigmoid(margin / T)``; ``"hard"``: ``margin >= 0`` (the engine's rule; noise is ignored);
    ``"straight_through"``: the hard gate's value with the soft gate's gradient. ``noise`` adds logistic noise to the
    margin of the soft and straight-through gates (then a straight-through gate is a Bernoulli(sigmoid(margin))
    sample, DMS's Gumbel-sigmoid).
    """
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}; got {gate!r}")
    if gate == "hard":
        return (margin >= 0).float()
    if noise is not None:
        u = torch.rand(margin.shape, generator=noise, device=noise.device).to(margin.device).clamp(1e-6, 1 - 1e-6)
        margin = margin + torch.log(u) - torch.log1p(-u)
    soft = torch.sigmoid(margin / temperature)
    return soft if gate == "soft" else (margin >= 0).float() + (soft - soft.detach())  # exactly 0 or 1 forward


def soft_forward(
    model: nn.Module,
    net: ScorerNet,
    input_ids: Tensor,
    vis: Visibility,
    *,
    tau: float | Sequence,
    temperature: float = 1.0,
    gate: str = "soft",
    noise: torch.Generator | None = None,
    logits_to_keep: Tensor | int = 0,
) -> SoftOutput:
    """One full-cache forward of ``input_ids [b, n]`` (right-padded; ``vis`` from :func:`visibility`) where every
    gated (query, key) pair's attention weight is multiplied by the key's gate ``g`` before normalisation, i.e.
    ``log g`` is added to its attention logit (``g = sigmoid((s - tau) / temperature)`` for ``gate="soft"``).

    Args:
        model: a supported HF causal LM (frozen during the forward).
        net: the scorer's weights (:class:`ScorerNet`), scoring the hidden state entering each attention layer.
        tau: threshold(s): a float, one per layer, or ``[layers][kv_heads]``.
        temperature: ``T > 0`` of the gate (in score units).
        gate: ``"soft"``, ``"hard"`` (exactly the engine's threshold rule) or ``"straight_through"`` (the hard
            rule's forward with the soft gate's gradient); see :func:`gate_values`.
        noise: a generator for logistic noise on ``s - tau`` (None: deterministic gates).
        logits_to_keep: passed to the model (e.g. a bool ``[b, n]`` mask: logits ``[kept, vocab]`` of those positions).

    Returns:
        :class:`SoftOutput` with the logits, the gates and the scores.
    """
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0; got {temperature}")
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}; got {gate!r}")
    spec = describe(model)
    if net.n_layers != spec.n_layers:
        raise ValueError(f"the scorer has {net.n_layers} layers; the model has {spec.n_layers}")
    device = input_ids.device
    vis = vis.to(device)
    taus = _taus(tau, spec.n_layers, spec.n_kv_heads).to(device)
    b, n = input_ids.shape
    causal = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    visible = causal & vis.valid[:, None, :]  # [b, q, k]
    visible |= ~visible.any(-1, keepdim=True)  # padding queries: finite garbage, never read
    key_pos = torch.arange(n, device=device)
    gated = vis.gated[:, None].float()  # [b, 1, q, k]
    allowed_by_window: dict[int | None, Tensor] = {}  # by sliding window (None: none), built once per forward
    gates: list[Tensor | None] = [None] * spec.n_layers
    scores: list[Tensor | None] = [None] * spec.n_layers

    def allowed(window: int | None) -> Tensor:
        if window not in allowed_by_window:
            mask = visible if window is None else visible & (key_pos[None, None, :] > key_pos[None, :, None] - window)
            allowed_by_window[window] = mask[:, None, None]  # [b, 1, 1, q, k]
        return allowed_by_window[window]

    def attend(module, query, key, value, attention_mask, base, **kwargs):
        idx = module.layer_idx
        kv_heads, d = key.shape[1], query.shape[-1]
        group = query.shape[1] // kv_heads
        s = net(hidden[idx], idx)  # [b, kv_heads, n]
        g = gate_values(s - taus[idx][None, :, None], gate, temperature, noise)
        scores[idx], gates[idx] = s, torch.where(vis.judged[:, None], g, 1.0)
        # Multiplicative gates (a hard 0 keeps the straight-through gradient, which log g would not): 1 where the
        # query sees the key in full, g where the key was judged before the query's forward.
        mask = allowed(kwargs.get("sliding_window"))
        scale = kwargs.get("scaling")
        scale = scale if scale is not None else d**-0.5

        def gated_attention(query, key, value, g):
            weight = 1 + gated * (g[:, :, None, :] - 1)  # [b, kv_heads, q, k]
            q = query.reshape(b, kv_heads, group, n, d)
            logits = (q @ key[:, :, None].transpose(-1, -2) * scale).masked_fill(~mask, -math.inf)
            e = (logits - logits.amax(-1, keepdim=True).detach()).exp() * weight[:, :, None]
            return (e / e.sum(-1, keepdim=True)).to(value.dtype) @ value[:, :, None]

        # Under autograd the [b, heads, q, k] products are recomputed in the backward pass instead of being held for
        # every layer at once (30 layers x 2,048^2 x 9 heads would be ~20 GB on SmolLM2).
        if torch.is_grad_enabled():
            out = checkpoint(gated_attention, query, key, value, g, use_reentrant=False)
        else:
            out = gated_attention(query, key, value, g)
        return out.reshape(b, kv_heads * group, n, d).transpose(1, 2), None

    with frozen(model), capture_attention_inputs(model) as hidden, attention_override(model, attend):
        logits = model(input_ids=input_ids, use_cache=False, logits_to_keep=logits_to_keep).logits
    inputs = [hidden[layer] for layer in range(spec.n_layers)]
    return SoftOutput(logits=logits, gates=gates, scores=scores, hidden=inputs, visibility=vis)
