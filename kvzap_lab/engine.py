"""The eviction engine: apply any policy to any supported HF model, during prefill and decoding, with real eviction.

``with evicting(model, policy) as run:`` makes plain ``model(...)`` forward calls use a :class:`CompactCache`
(created on the first call, or pass ``cache=run.new_cache()``), and :func:`generate` is a batched greedy decode
loop with chunked prefill built on it. Semantics are DMS/KVzap's:

- every new token (prefill chunk or decode step) is scored from the hidden state entering each attention layer
  as it arrived, with its keys/values/positions (and, for a scorer with ``context`` k, the hidden states of the
  k tokens before, kept per layer and row in the cache: ``CompactLayer.recent``); the score is stored with the
  pair (a scorer with ``accumulates_attention`` also gets, at every step, the attention mass the pair receives,
  summed over the query heads of its KV group);
- at each eviction point (after every multi-token forward, and every ``evict_every`` decode steps) the pairs
  that left the sliding window (``rule.window`` most recent tokens of the row) and are not sinks (``rule.sinks``
  first tokens) are offered to ``rule.keep``; the others are evicted. The token just decoded is never offered.
  With ``evict_every=1`` this is DMS step by step; larger values batch the scoring of decoded tokens (scores are
  only read once a pair leaves the window) and let an evictable pair linger up to ``evict_every - 1`` steps;
- evicted pairs leave the attention at once (masked) and the storage at the next compaction (after every
  multi-token forward and every ``compact_every`` decode steps, or every ``seen / 16`` on shorter sequences),
  which keeps the per-step work small.

Scorers with ``fused_weights()`` (KVzap linear and MLP) run through the fused scoring kernel
(:func:`kvzap_lab.kernels.score_and_threshold`) when Triton runs (CUDA), one call per layer; elsewhere the
buffered tokens of all layers are scored at once by one stacked matmul per map (:func:`stacked_weights`: on CPU
at decode sizes, dispatch costs more than arithmetic). Compaction runs through :func:`kvzap_lab.kernels.compact` and leaves room for the tokens that
arrive before the next one, so decode appends do not grow the storage.

Attention is exact: each query sees the held pairs of its KV head at positions ``<=`` its own (and inside the
layer's sliding window, if any). New tokens get their true positions: each row counts its real tokens, so left
padding is ignored, as in ``model.generate``. ``policy=None`` runs the same engine as a full cache.

Two more ways in: decisions from outside (``evicting(..., offer=Offer(window, sinks))``: at each eviction point
``run.pending()`` describes the pairs that just left the window and ``run.decide(keep)`` evicts the others; the
envs are built on it), and :func:`prefill` once / :meth:`Prefill.branch` per policy (evaluation of many policies
on the same prompts with a one-chunk prefill). A run's hooks stay on the model while it is attached
(:meth:`EvictionRun.attach`); :func:`release` makes the model plain again.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.cache_utils import Cache

from kvzap_lab.cache import CompactCache, Compression, outside_window
from kvzap_lab.kernels import ScorerWeights, score_and_threshold, uses_triton
from kvzap_lab.model import UnsupportedModelError, attention_override, capture_attention_inputs, describe
from kvzap_lab.padding import pad_rows
from kvzap_lab.policy import Policy

DEFAULT_CHUNK = 128
DEFAULT_EVICT_EVERY = 8
DEFAULT_COMPACT_EVERY = 32
MASS_BLOCK = 1024  # query rows per block of :func:`attention_mass`


def check_policy(model: nn.Module, policy: Policy | None) -> None:
    """Raise a clear error for a policy the engine cannot run on ``model``.

    Checks: window and sinks are ints >= 0; the scorer can score the model (its ``check_model``). Infinite
    thresholds are meaningful (``-inf`` keeps everything, ``+inf`` is StreamingLLM); NaN ones are refused by
    :class:`~kvzap_lab.policy.Threshold` itself.
    """
    if policy is None:
        return
    rule = policy.rule
    for name in ("window", "sinks"):
        value = getattr(rule, name, None)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"policy {policy.name!r}: rule.{name} must be an int >= 0; got {value!r}")
    policy.scorer.check_model(model)


def fused_weights(model: nn.Module, policy: Policy | None) -> list[ScorerWeights] | None:
    """Per-layer :class:`~kvzap_lab.kernels.ScorerWeights` of a scorer whose ``fused_weights()`` gives one or two
    maps (KVzap linear, MLP of depth 1), on the model's device in float32; ``None`` for any other scorer."""
    stacked = None if policy is None else policy.scorer.fused_weights()
    if stacked is None:
        return None
    if len(stacked) not in (1, 2):
        raise ValueError(
            f"policy {policy.name!r}: fused_weights() returned {len(stacked)} maps; the fused kernel runs one (linear) "
            "or two (Linear-GELU-Linear): return None to be scored by score()"
        )
    param = next(model.parameters())
    n_layers = stacked[0][0].shape[0]
    return [ScorerWeights.from_stacked(stacked, i).to(param.device, torch.float32) for i in range(n_layers)]


def stacked_weights(fused: list[ScorerWeights] | None) -> tuple[Tensor, ...] | None:
    """The per-layer scorer weights stacked for one batched matmul over all layers: ``(w1 [L, D, M], b1 [L, 1, M])``
    (+ ``(w2 [L, M, H], b2 [L, 1, H])`` for an MLP). ``None`` when there are none, or when they go to the Triton
    kernel (at decode sizes on CPU, one call per layer costs more in dispatch than in arithmetic)."""
    if fused is None or uses_triton(fused[0].w1):
        return None
    stacked = (torch.stack([w.w1 for w in fused]), torch.stack([w.b1 for w in fused])[:, None])
    if fused[0].is_mlp:
        stacked += (torch.stack([w.w2 for w in fused]), torch.stack([w.b2 for w in fused])[:, None])
    return stacked


@dataclass(frozen=True)
class Offer:
    """Keep/evict decisions from outside the engine (an agent, an env), in place of a rule's.

    Pass ``offer=Offer(window, sinks)`` to :func:`evicting`. At each eviction point the pairs that left the window
    since the previous one (not sinks) are offered once: ``run.pending()`` describes them and ``run.decide(keep)``
    evicts the others, before the next forward. A kept pair stays (DMS/KVzap semantics: a pair is judged when it
    leaves the window). ``hidden=True`` keeps the hidden states of the tokens until they are offered
    (:attr:`Pending.hidden`).
    """

    window: int
    sinks: int
    hidden: bool = False


@dataclass
class Pending:
    """The pairs offered at the last eviction point (:meth:`EvictionRun.pending`), awaiting ``run.decide(keep)``.

    Row ``i`` offers the token positions ``start[i] .. start[i] + count[i] - 1``, in every layer and KV head (the
    pairs that left the window since the previous eviction point); ``C = count.max()``. ``L`` layers, ``H`` KV heads,
    ``D`` hidden size:

    - ``start``, ``count`` ``[b]`` long; ``positions [b, C]`` long (-1 beyond ``count``);
    - ``mask [b, L, H, C]`` bool: offered (the first ``count[i]`` columns of row ``i``, in every layer and head);
    - ``scores [b, L, H, C]`` float32: the policy scorer's stored scores (NaN where ``mask`` is False), or ``None``
      without a scorer;
    - ``hidden [b, L, C, D]``: the hidden state entering each attention layer at each offered token (zeros beyond
      ``count``), with ``Offer(hidden=True)``; else ``None``.
    """

    start: Tensor
    count: Tensor
    positions: Tensor
    mask: Tensor
    scores: Tensor | None
    hidden: Tensor | None


class _HiddenWindow:
    """Hidden states ``[L, b * R, D]`` of each row's recent tokens, row ``r``'s position ``p`` at ``r * R + p % R``
    (``R`` grows on demand): what :attr:`Pending.hidden` reads when the tokens are offered."""

    def __init__(self):
        self.ring: Tensor | None = None
        self.size = 0  # R
        self._rows: Tensor | None = None  # [b, 1]: each row's first slot

    def _slots(self, positions: Tensor) -> Tensor:
        if self._rows is None or self._rows.shape[0] != positions.shape[0]:
            self._rows = torch.arange(positions.shape[0], device=positions.device)[:, None] * self.size
        return self._rows + positions % self.size  # [b, n]

    def write(self, hidden: Tensor, positions: Tensor, valid: Tensor | None, oldest: Tensor) -> None:
        """Store ``hidden [L, b, q, D]`` at ``positions [b, q]`` (real tokens only); positions from ``oldest [b]`` on
        must stay readable."""
        n_layers, b, q, d = hidden.shape
        need = int((positions[:, -1] - oldest).max()) + 1
        if self.ring is None or need > self.size:
            old, old_size = self.ring, self.size
            self.size, self._rows = 1 << max(need - 1, 1).bit_length(), None
            self.ring = hidden.new_zeros(n_layers, b * self.size, d)
            if old is not None:  # move the readable positions to their new slots
                keep = oldest[:, None] + torch.arange(old_size, device=oldest.device)  # [b, old_size]
                rows = torch.arange(b, device=oldest.device)[:, None]
                self.ring.index_copy_(1, self._slots(keep).flatten(), old.index_select(1, (rows * old_size + keep % old_size).flatten()))
        slots = self._slots(positions)
        if valid is None:
            self.ring.index_copy_(1, slots.flatten(), hidden.reshape(n_layers, b * q, d))
        else:
            self.ring.index_copy_(1, slots[valid], hidden[:, valid])

    def read(self, positions: Tensor) -> Tensor:
        """Hidden states ``[b, L, C, D]`` at ``positions [b, C]`` (zeros where a position is -1)."""
        b, n = positions.shape
        out = self.ring.index_select(1, self._slots(positions.clamp_min(0)).flatten()).view(-1, b, n, self.ring.shape[2])
        return out.masked_fill((positions < 0)[None, :, :, None], 0.0).transpose(0, 1)


@dataclass
class EvictionRun:
    """What ``with evicting(model, policy) as run`` yields: ``run.cache`` is the cache of the latest forward.

    The run's state (cache, counters, offers) lives here, its hooks on the model only while it is attached
    (:meth:`attach`, :meth:`detach`): several runs can share one model by attaching in turn.
    """

    model: nn.Module
    policy: Policy | None
    evict_every: int
    compact_every: int
    offer: Offer | None = None
    cache: CompactCache | None = None
    # per-layer weights of a KVzap linear/MLP scorer, scored by the fused kernel (Triton on CUDA) instead of score()
    fused: list[ScorerWeights] | None = None
    # the same weights stacked over layers, when they run on the torch path (see :func:`stacked_weights`)
    stacked: tuple[Tensor, ...] | None = None
    # hidden states [b, t, hidden] of the tokens not scored yet, per layer (scored at the next eviction)
    _pending: dict[int, list[Tensor]] = field(default_factory=dict, repr=False)
    _since_evict: int = field(default=0, repr=False)
    _since_compact: int = field(default=0, repr=False)
    # with an offer: the first position of each row not offered yet [b], the offer awaiting decide() and where its
    # pairs sit in every layer's slots (candidate index [b, H, used], C elsewhere), the compaction due after it
    _next_offer: Tensor | None = field(default=None, repr=False)
    _offered: Pending | None = field(default=None, repr=False)
    _slots: list[Tensor] = field(default_factory=list, repr=False)
    _compact_after: int | None = field(default=None, repr=False)
    _window: _HiddenWindow = field(default_factory=_HiddenWindow, repr=False)
    _captured: dict[int, Tensor] = field(default_factory=dict, repr=False)
    # per layer, the attention mass [b, kv_heads, n] of the last forward, recorded when not None (see :func:`prefill`)
    attention_mass: dict[int, Tensor] | None = field(default=None, repr=False)
    _hooks: contextlib.ExitStack | None = field(default=None, repr=False)

    def new_cache(self) -> CompactCache:
        """A fresh, empty :class:`CompactCache` for this model."""
        return CompactCache(describe(self.model).n_layers)

    @property
    def deciding(self) -> bool:
        """Whether this run has eviction points (a policy, or decisions from outside)."""
        return self.policy is not None or self.offer is not None

    def attach(self) -> None:
        """Put this run's hooks on its model (nothing to do if they are there). A run of another caller attached to
        the same model is detached first; its state stays, and it goes on after its own ``attach()``."""
        if _ATTACHED.get(self.model) is self:
            return
        release(self.model)
        stack = contextlib.ExitStack()
        if self.policy is not None or (self.offer is not None and self.offer.hidden):
            self._captured = stack.enter_context(capture_attention_inputs(self.model))
        stack.enter_context(attention_override(self.model, _attend(self)))
        decoder = self.model.model
        # ``m is decoder``: a deep copy of the model carries these hooks too, and must compute plainly
        handles = [
            decoder.register_forward_pre_hook(lambda m, a, k: _begin_forward(self, a, k) if m is decoder else None, with_kwargs=True),
            decoder.register_forward_hook(lambda m, a, k, out: _end_forward(self) if m is decoder else None, with_kwargs=True),
        ]
        stack.callback(lambda: [h.remove() for h in handles])
        self._hooks = stack
        _ATTACHED[self.model] = self

    def detach(self) -> None:
        """Remove this run's hooks from its model (the model is plain again); the run's state stays."""
        if self._hooks is not None:
            hooks, self._hooks = self._hooks, None
            if _ATTACHED.get(self.model) is self:
                del _ATTACHED[self.model]
            hooks.close()

    def pending(self) -> Pending | None:
        """The pairs offered at the last forward's eviction point, awaiting :meth:`decide`; ``None`` when that forward
        was no eviction point or nothing left the window (a run with an :class:`Offer` only)."""
        if self.offer is None:
            raise RuntimeError("run.pending() needs decisions from outside: evicting(model, policy, offer=Offer(window, sinks))")
        return self._offered

    @torch.no_grad()
    def decide(self, keep: Tensor) -> None:
        """Keep the offered pairs where ``keep [b, L, H, C]`` (bool, or 0/1) is True, evict the others (entries outside
        ``pending().mask`` are ignored); then compact if one was due. Needed before the next forward."""
        offered = self._offered
        if offered is None:
            raise RuntimeError("nothing is pending: call decide() only when run.pending() returned an offer")
        keep = torch.as_tensor(keep, device=offered.mask.device)
        if keep.shape != offered.mask.shape:
            raise ValueError(f"keep must have the shape of pending().mask {tuple(offered.mask.shape)} [b, L, H, C]; got {tuple(keep.shape)}")
        drop = ~keep.bool()
        evicting = (drop & offered.mask).any((0, 2, 3)).tolist()  # per layer
        evict = torch.cat([drop, drop.new_zeros(*drop.shape[:3], 1)], -1)  # index C: not offered
        for layer, index, flags, any_evicted in zip(self.cache.layers, self._slots, evict.unbind(1), evicting):
            if any_evicted:  # columns beyond a row's count map to no slot: never read
                layer.drop(flags.gather(2, index))
        self._offered, self._slots = None, []
        self._compact()

    def restart_row(self, row: int) -> None:
        """Start a new sequence in batch row ``row`` of the cache (its pairs die; its positions and offers restart)."""
        if self._offered is not None and self._offered.count[row] > 0:
            raise RuntimeError(f"row {row} has offered pairs awaiting decide(): decide them before restarting the row")
        self.cache.restart_row(row)
        if self._next_offer is not None:
            self._next_offer[row] = self.offer.sinks

    def _compact(self) -> None:
        if self._compact_after is not None:
            self.cache.compact(headroom=self._compact_after)  # the decode steps until the next compaction need no growth
            self._since_compact, self._compact_after = 0, None


# model -> the run whose hooks it carries
_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def release(model: nn.Module) -> None:
    """Detach whichever run is attached to ``model`` (its state stays): the model computes plainly again."""
    run = _ATTACHED.get(model)
    if run is not None:
        run.detach()


def _new_tokens(args: tuple, kwargs: dict) -> Tensor:
    ids = kwargs.get("input_ids", args[0] if args else None)
    return ids if ids is not None else kwargs["inputs_embeds"]


def _begin_forward(run: EvictionRun, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Forward pre-hook of the decoder: pick the cache, announce the new tokens, set their true positions."""
    tokens = _new_tokens(args, kwargs)
    b, q = tokens.shape[:2]
    cache = kwargs.pop("past_key_values", None)
    cache = kwargs.get("cache") if cache is None else cache
    if cache is None or (not isinstance(cache, CompactCache) and cache.get_seq_length() == 0):
        cache = run.new_cache()
    if not isinstance(cache, CompactCache):
        raise UnsupportedModelError(
            f"inside evicting() the cache must be a CompactCache; got a {type(cache).__name__} already holding "
            f"{cache.get_seq_length()} tokens"
        )
    if run.cache is not None and cache is not run.cache and run._pending:
        raise RuntimeError("evicting() serves one cache at a time: finish (or discard) one generation before the next")
    if run._offered is not None:
        raise RuntimeError(
            "pairs offered at the last eviction point await run.decide(keep): decide them before the next forward "
            "(a plain forward of a model an env is using? kvzap_lab.engine.release(model) first)"
        )
    if run.offer is not None and (cache is not run.cache or run._next_offer is None):  # a new sequence: nothing offered
        run._next_offer = torch.full((b,), run.offer.sinks, dtype=torch.long, device=tokens.device)
        run._window = _HiddenWindow()
    mask = kwargs.get("attention_mask")
    if mask is None:
        valid = None
    elif mask.dim() == 2 and mask.shape == (b, cache.seen + q):
        valid = mask[:, -q:].bool()
    else:
        raise ValueError(
            f"attention_mask must be 2-D [batch, past + new tokens] = [{b}, {cache.seen + q}] (1 = real token, "
            f"0 = left padding); got {tuple(mask.shape)}"
        )
    positions = kwargs.get("position_ids")
    if positions is None:
        positions = cache.next_positions(b, q, valid, device=tokens.device)
    else:
        positions = positions.expand(b, q).long()
    cache.begin_step(positions, valid)
    # The engine builds its own masks: a placeholder 4-D mask makes transformers skip building one.
    kwargs.update(cache=cache, position_ids=positions, attention_mask=tokens.new_ones(1, 1, 1, 1, dtype=torch.bool).expand(b, 1, q, 1))
    run.cache = cache
    return args, kwargs


def _score_pending(run: EvictionRun, idx: int) -> None:
    """Score the buffered new tokens of layer ``idx`` (the last slots of its cache) and store their scores."""
    hidden = torch.cat(run._pending.pop(idx), 1)  # [b, t, hidden]
    layer = run.cache.layers[idx]
    b, t, n = hidden.shape[0], hidden.shape[1], layer.used
    kv_heads = layer.index.shape[1]
    scorer = run.policy.scorer
    if run.fused is not None:
        new = score_and_threshold(hidden, run.fused[idx], 0.0)[0]  # the rule thresholds later, with the window
    else:
        keys, values = layer.gather(n - t, n)
        positions = layer.positions[:, 0, n - t : n]
        if scorer.context:  # the pending tokens are alive exactly where they are real (nothing evicted them yet)
            previous, hidden, source = layer.advance_recent(hidden, layer.alive[:, 0, n - t : n], scorer.context)
            pick = source.clamp_min(0)
            keys, values = (x.gather(2, pick[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[3])) for x in (keys, values))
            new = scorer.score(hidden, idx, keys=keys, values=values, positions=positions.gather(1, pick), previous=previous)
        else:
            new = scorer.score(hidden, idx, keys=keys, values=values, positions=positions)
    if new.shape != (b, kv_heads, t):
        raise ValueError(
            f"policy {run.policy.name!r}: scorer returned shape {tuple(new.shape)} for layer {idx}; "
            f"expected [batch, kv_heads, new tokens] = {[b, kv_heads, t]} (trained for another model?)"
        )
    if run.fused is None and scorer.context:  # back to the slots' order; a previous token's score (source < 0) is dropped
        k = scorer.context
        new = new.new_zeros(b, kv_heads, k + t).scatter_(2, (source + k)[:, None].expand(-1, kv_heads, -1), new)[:, :, k:]
    layer.scores[:, :, n - t : n] = new


def _score_all_pending(run: EvictionRun) -> None:
    """Score the buffered new tokens of every layer with the stacked KVzap weights: one batched matmul per map."""
    layers = run.cache.layers
    hidden = torch.cat([h for idx in range(len(layers)) for h in run._pending.pop(idx)], 1)  # [b, layers * t, D]
    b, t = hidden.shape[0], hidden.shape[1] // len(layers)
    x = hidden.float().view(b, len(layers), t, -1).transpose(0, 1).reshape(len(layers), b * t, -1)
    w1, b1, *second = run.stacked
    out = torch.baddbmm(b1, x, w1)  # [layers, b * t, M or H]
    if second:
        out = torch.baddbmm(second[1], F.gelu(out), second[0])
    for layer, new in zip(layers, out.view(len(layers), b, t, -1).transpose(2, 3)):  # new [b, kv_heads, t]
        layer.scores[:, :, layer.used - t : layer.used] = new


def attention_mass(query: Tensor, key: Tensor, mask: Tensor, scale: float, block: int = MASS_BLOCK) -> Tensor:
    """The attention each key receives, summed over the queries: ``query [b, h, r, d]``, ``key [b, h, n, d]``,
    ``mask`` bool ``[b, h, r or 1, n]`` (True: visible) -> float32 ``[b, h, n]``. Computed over blocks of ``block``
    query rows, so the weights held at once stay ``[b, h, block, n]``."""
    total = None
    for start in range(0, query.shape[2], block):
        rows = slice(start, start + block)
        logits = query[:, :, rows] @ key.transpose(-1, -2) * scale
        part = logits.masked_fill(~(mask[:, :, rows] if mask.shape[2] > 1 else mask), -math.inf).softmax(-1).sum(2).float()
        total = part if total is None else total + part
    return total


def _attend(run: EvictionRun):
    """The attention override: exact attention over the compacted cache; buffers the new tokens for scoring."""
    scorer = None if run.policy is None else run.policy.scorer
    accumulates = scorer is not None and scorer.accumulates_attention

    def attend(module, query, key, value, attention_mask, base, **kwargs):
        cache, idx = run.cache, module.layer_idx
        if cache is None or cache.step is None:  # a deep copy of the model, which carries the hooks: plain attention
            return base(module, query, key, value, attention_mask, **kwargs)
        layer = cache.layers[idx]
        b, n_heads, q, d = query.shape
        kv_heads, n = key.shape[1], key.shape[2]
        group = n_heads // kv_heads
        mask = layer.mask(cache.step.positions, kwargs.get("sliding_window"))  # [b, kv_heads, q or 1, n]
        if q > 1:  # the queries of a KV group share its mask: [b, kv_heads, group * q, n]
            mask = mask[:, :, None].expand(b, kv_heads, group, q, n).reshape(b, kv_heads, group * q, n)
        grouped = query.reshape(b, kv_heads, group * q, d)
        scale = kwargs.get("scaling")
        if scorer is not None:
            run._pending.setdefault(idx, []).append(run._captured[idx])
        if accumulates or run.attention_mass is not None:
            mass = attention_mass(grouped, key, mask, scale if scale is not None else d**-0.5)
            if accumulates:  # scores must exist before this step's attention mass is added to them
                _score_pending(run, idx)
                layer.scores[:, :, :n] += mass
            else:
                run.attention_mass[idx] = mass
        out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, scale=scale)
        return out.view(b, n_heads, q, d).transpose(1, 2), None

    return attend


def _end_forward(run: EvictionRun) -> None:
    """Forward hook of the decoder: at eviction points (every multi-token forward, every ``evict_every`` decode
    steps) score the buffered tokens, then let the rule decide the pairs that left the window and evict (or offer
    the new ones for :meth:`EvictionRun.decide`); compact when due."""
    cache = run.cache
    step = cache.step
    multi_token = step.positions.shape[1] > 1
    run._since_evict += 1
    run._since_compact += 1
    if run.offer is not None and run.offer.hidden:
        hidden = torch.stack([run._captured[idx] for idx in range(len(cache.layers))])  # [L, b, q, D]
        run._window.write(hidden, step.positions, step.valid, run._next_offer)
    if run.deciding and (multi_token or run._since_evict >= run.evict_every):
        last = step.positions[:, -1]
        if run.stacked is not None and run._pending:
            _score_all_pending(run)
        for idx in list(run._pending):
            _score_pending(run, idx)
        run._since_evict = 0
        # Short sequences compact sooner, so that the evicted pairs waiting for it stay a small part of the cache.
        interval = min(run.compact_every, max(1, cache.seen // 16))
        run._compact_after = interval if multi_token or run._since_compact >= interval else None
        if run.offer is not None:
            _offer(run, last)
        else:
            rule = run.policy.rule
            for idx, layer in enumerate(cache.layers):
                candidates = layer.evictable(last, rule.window, rule.sinks)
                keep = rule.keep(layer.scores[:, :, : layer.used], idx, candidates)
                if keep is not candidates:  # a rule that keeps every candidate may return them as they are
                    layer.drop(candidates & ~keep)
        if run._offered is None:
            run._compact()
    cache.end_step()


def _offer(run: EvictionRun, last: Tensor) -> None:
    """Offer the pairs that left the window since the last offer (positions from each row's first one not offered
    yet to :func:`~kvzap_lab.cache.outside_window`, as ``CompactLayer.evictable``): set ``run._offered`` (``None`` if
    there are none) and where they sit in the slots.

    A row holds every position up to its newest token, and a pair not offered yet is held in every layer and KV
    head (nothing else evicts it): the offered positions of a row are ``first .. newest`` everywhere."""
    cache, first = run.cache, run._next_offer
    newest = outside_window(last, run.offer.window)  # [b]
    count = (newest - first + 1).clamp_min(0)
    n = int(count.max())
    if n == 0:
        run._offered = None
        return
    b, h = cache.layers[0].alive.shape[:2]
    n_layers = len(cache.layers)
    columns = torch.arange(n, device=first.device)
    held = columns < count[:, None]  # [b, C]
    positions = torch.where(held, first[:, None] + columns, -1)
    scores = None if run.policy is None else cache.layers[0].scores.new_full((b, n_layers, h, n + 1), math.nan)
    run._slots = []
    for idx, layer in enumerate(cache.layers):
        index = layer.positions[:, :, : layer.used] - first[:, None, None]
        offered = layer.alive[:, :, : layer.used] & (index >= 0) & (index < count[:, None, None])
        index = index.masked_fill_(~offered, n)  # C: not offered
        run._slots.append(index)
        if scores is not None:
            scores[:, idx].scatter_(2, index, layer.scores[:, :, : layer.used])
    run._next_offer = torch.maximum(first, newest + 1)
    mask = held[:, None, None, :].expand(b, n_layers, h, n)
    hidden = run._window.read(positions) if run.offer.hidden else None
    run._offered = Pending(first, count, positions, mask, None if scores is None else scores[..., :n], hidden)


def eviction_run(
    model: nn.Module,
    policy: Policy | None,
    *,
    evict_every: int = DEFAULT_EVICT_EVERY,
    compact_every: int = DEFAULT_COMPACT_EVERY,
    offer: Offer | None = None,
) -> EvictionRun:
    """A detached :class:`EvictionRun` (arguments as for :func:`evicting`): ``run.attach()`` before its forwards.
    For callers that keep a run across steps and share the model with other runs (the envs)."""
    describe(model)  # raises UnsupportedModelError for an unsupported architecture
    check_policy(model, policy)
    for name, value in (("evict_every", evict_every), ("compact_every", compact_every)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1 (decode steps); got {value!r}")
    if offer is not None:
        for name in ("window", "sinks"):
            value = getattr(offer, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"offer.{name} must be an int >= 0; got {value!r}")
            if policy is not None and getattr(policy.rule, name) != value:
                raise ValueError(f"offer.{name}={value} differs from the policy's rule ({name}={getattr(policy.rule, name)})")
    run = EvictionRun(model=model, policy=policy, evict_every=evict_every, compact_every=compact_every, offer=offer)
    run.fused = fused_weights(model, policy)
    run.stacked = stacked_weights(run.fused)
    return run


@contextlib.contextmanager
def evicting(
    model: nn.Module,
    policy: Policy | None,
    *,
    evict_every: int = DEFAULT_EVICT_EVERY,
    compact_every: int = DEFAULT_COMPACT_EVERY,
    offer: Offer | None = None,
) -> Iterator[EvictionRun]:
    """Run ``model`` with real KV eviction by ``policy`` inside the block (``None``: full cache, same engine).

    Decode steps are scored and offered to the rule every ``evict_every`` steps (1: at every step, DMS exactly;
    more: a pair that left the window waits up to ``evict_every - 1`` steps, which saves per-step work); the
    storage is compacted every ``compact_every`` steps (every ``seen / 16`` steps on shorter sequences, so that the
    evicted pairs waiting for it stay under ~6 % of a full cache) and after every multi-token forward, leaving
    room for the tokens that come before the next compaction.

    With ``offer`` (an :class:`Offer`), decisions come from outside instead of ``policy.rule``: each pair is
    offered once, when it leaves the window, through ``run.pending()`` / ``run.decide(keep)`` between forwards;
    ``policy`` (optional; its rule's window and sinks must be the offer's) scores the offered pairs.

    Forward calls get a :class:`CompactCache` (a new one when they pass none or an empty one); a 2-D
    ``attention_mask`` must cover past and new tokens, left padding marked 0. Restores the model on exit.

    Args:
        model: a supported causal LM (:func:`kvzap_lab.model.load_model`).
        policy: the :class:`~kvzap_lab.policy.Policy` that scores and evicts; None: full cache.
        evict_every: decode steps between eviction points (>= 1).
        compact_every: decode steps between compactions (>= 1).
        offer: decide from outside (an RL agent) instead of ``policy.rule``.
    Yields:
        an :class:`EvictionRun`: ``run.new_cache()`` for the forward calls; its ``cache`` gives ``compression()``
        and ``bytes_held()``.
    Raises:
        ValueError: a policy the engine cannot run on ``model`` (:func:`check_policy`).

    Example::

        with evicting(model, None, offer=Offer(window=32, sinks=4)) as run:
            cache = run.new_cache()
            model(ids[:, :64], cache=cache)
            if (offer := run.pending()) is not None:
                run.decide(offer.mask & (offer.positions % 2 == 0)[:, None, None])  # keep even positions
    """
    run = eviction_run(model, policy, evict_every=evict_every, compact_every=compact_every, offer=offer)
    run.attach()
    try:
        yield run
    finally:
        run.detach()


@dataclass
class Generation:
    """Result of :func:`generate`: the greedy tokens of each row (cut after its first end token) and the cache
    statistics at the end (:class:`Compression`, bytes held and bytes a full cache would hold)."""

    tokens: list[list[int]]
    compression: Compression
    bytes_held: int
    full_bytes: int


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[Tensor, Tensor]:
    """Left-pad token lists into ``ids [b, n]`` and ``attention_mask [b, n]`` (1 on real tokens)."""
    ids, real = pad_rows(rows, pad_id, side="left", device=device)
    return ids, real.long()


def _prompt_batch(model: nn.Module, prompts, attention_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """``ids [b, n]`` and ``mask [b, n]`` on the model's device from ids (+ mask) or token lists (left-padded here)."""
    device = next(model.parameters()).device
    if not isinstance(prompts, Tensor):
        prompts, attention_mask = left_pad(prompts, model.config.pad_token_id or 0, device)
    ids = prompts.to(device)
    return ids, torch.ones_like(ids) if attention_mask is None else attention_mask.to(device)


def _greedy(
    model: nn.Module,
    cache: CompactCache,
    logits: Tensor,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int] | None,
    expected: Sequence[Sequence[int]] | None,
) -> Generation:
    """The decode loop of :func:`generate` (and of :meth:`Prefill.branch`), from the prompt's last ``logits
    [b, 1, vocab]`` over ``cache``, inside :func:`evicting`."""
    device = logits.device
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    eos = torch.as_tensor([] if eos is None else [eos] if isinstance(eos, int) else list(eos), dtype=torch.long, device=device)
    b = logits.shape[0]
    if expected is not None:  # right-padded with -1, which no token matches
        expected_ids = torch.full((b, max_new_tokens), -1, dtype=torch.long)
        for row, ref in enumerate(expected):
            ref = list(ref)[:max_new_tokens]
            expected_ids[row, : len(ref)] = torch.as_tensor(ref, dtype=torch.long)
        expected_ids = expected_ids.to(device)
    steps = []
    length = torch.full((b,), max_new_tokens, dtype=torch.long, device=device)  # tokens kept per row
    for i in range(max_new_tokens):
        token = logits[:, -1].argmax(-1)
        steps.append(token)
        stop = torch.isin(token, eos)
        if expected is not None:
            stop |= token != expected_ids[:, i]
        length = torch.where(stop & (length == max_new_tokens), i + 1, length)
        if i == max_new_tokens - 1 or bool((length < max_new_tokens).all()):
            break
        logits = model(input_ids=token[:, None], cache=cache).logits
    tokens = [row[:n] for row, n in zip(torch.stack(steps, 1).tolist(), length.tolist())]
    return Generation(tokens, cache.compression(), cache.bytes_held(), cache.full_bytes())


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: Tensor | Sequence[Sequence[int]],
    policy: Policy | None,
    max_new_tokens: int,
    *,
    attention_mask: Tensor | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    evict_every: int = DEFAULT_EVICT_EVERY,
    compact_every: int = DEFAULT_COMPACT_EVERY,
    expected: Sequence[Sequence[int]] | None = None,
) -> Generation:
    """Greedy batched generation with eviction by ``policy`` (``None``: full cache).

    ``prompts`` is ``ids [b, n]`` (left-padded, with ``attention_mask``) or a list of token lists (padded here).
    The prompt is prefilled in chunks of ``chunk_size`` tokens (eviction runs after each chunk); each row stops
    at its first ``eos_token_id`` (default: the model's), which is included in its tokens. With ``expected``
    (reference tokens per row), a row also stops at its first token that differs from its reference: exact-match
    scoring needs no more, and evaluation gets much cheaper. To run several policies on the same prompts with a
    one-chunk prefill, :func:`prefill` once and :meth:`Prefill.branch` per policy gives the same results.

    Args:
        model: a supported causal LM (:func:`kvzap_lab.model.load_model`).
        prompts: ``ids [b, n]`` or ``b`` token lists.
        policy: the eviction policy (:func:`kvzap_lab.policy.get_policy`); None: full cache.
        max_new_tokens: the most tokens generated per row (>= 1).
        attention_mask: ``[b, n]``, 1 on real tokens (with ``ids``).
        eos_token_id: stop token(s); default the model's.
        chunk_size: prefill chunk in tokens (>= 1).
        evict_every, compact_every: the engine's schedule (:func:`evicting`).
        expected: reference tokens per row, to stop a row at its first mismatch.
    Returns:
        a :class:`Generation`: ``tokens`` (``b`` lists of generated ids), ``compression`` (a
        :class:`~kvzap_lab.cache.Compression`), ``bytes_held`` and ``full_bytes`` at the end.
    """
    if max_new_tokens < 1 or chunk_size < 1:
        raise ValueError(f"max_new_tokens and chunk_size must be >= 1; got {max_new_tokens}, {chunk_size}")
    ids, mask = _prompt_batch(model, prompts, attention_mask)
    with evicting(model, policy, evict_every=evict_every, compact_every=compact_every) as run:
        cache = run.new_cache()
        for start in range(0, ids.shape[1], chunk_size):
            end = min(start + chunk_size, ids.shape[1])
            logits = model(input_ids=ids[:, start:end], attention_mask=mask[:, :end], cache=cache, logits_to_keep=1).logits
        return _greedy(model, cache, logits, max_new_tokens, eos_token_id, expected)


@dataclass
class Prefill:
    """A batch of prompts prefilled once with the full cache (:func:`prefill`), to branch into policies.

    Holds what every policy's eviction point needs: ``ids``/``mask`` ``[b, n]`` (left-padded prompts, 1 on real
    tokens), ``positions [b, n]`` (each row's true positions), ``cache`` (the full :class:`CompactCache` of the
    prompts, nothing evicted), ``hidden`` (per layer ``[b, n, hidden]``: the hidden state entering that attention
    layer at every prompt token, what KVzap scorers read), ``logits [b, 1, vocab]`` (the prompts' last ones) and,
    when :func:`prefill` was asked for it, ``attention_mass`` (per layer ``[b, kv_heads, n]``: the attention each
    prompt pair received, summed over the prompt's queries and the query heads of its KV group; what a scorer
    with ``accumulates_attention`` holds after a one-chunk prefill). Memory: the full cache plus ``layers * b * n *
    hidden`` activations, held until the object is dropped.
    """

    model: nn.Module
    ids: Tensor
    mask: Tensor
    positions: Tensor
    cache: CompactCache
    hidden: list[Tensor]
    logits: Tensor
    attention_mass: list[Tensor] | None = None

    @torch.no_grad()
    def branch(
        self,
        policy: Policy | None,
        max_new_tokens: int,
        *,
        eos_token_id: int | Sequence[int] | None = None,
        evict_every: int = DEFAULT_EVICT_EVERY,
        compact_every: int = DEFAULT_COMPACT_EVERY,
        expected: Sequence[Sequence[int]] | None = None,
    ) -> Generation:
        """Greedy generation by ``policy`` from this prefill: exactly ``generate(model, ids, policy, max_new_tokens,
        attention_mask=mask, chunk_size=n, ...)`` (same tokens, compression and bytes), without a prefill.

        A fork of the full cache replays the end of the prefill forward under ``policy``: its scorer scores every
        prompt pair from the stored hidden states, keys, values and positions, its rule evicts at the prefill's
        eviction point, the cache is compacted, then decoding runs as in :func:`generate`. The prefill stays
        intact: branch as often as needed (set an oracle's table with ``set_scores`` first, as for ``generate``).
        A scorer with ``accumulates_attention`` starts from the prefill's ``attention_mass`` (``prefill(...,
        attention_mass=True)``); from a prefill without it, that policy runs its own one-chunk prefill (same
        result, the cost of one prefill).

        Example::

            pre = prefill(model, [s.input_ids for s in batch])
            for tau in (-7.0, -6.0, -5.0):
                out = pre.branch(get_policy("oracle", rule=Threshold(tau)), 20, expected=answers)
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
        accumulates = policy is not None and policy.scorer.accumulates_attention
        if accumulates and self.attention_mass is None:
            return generate(self.model, self.ids, policy, max_new_tokens, attention_mask=self.mask, eos_token_id=eos_token_id,
                            chunk_size=self.ids.shape[1], evict_every=evict_every, compact_every=compact_every, expected=expected)
        with evicting(self.model, policy, evict_every=evict_every, compact_every=compact_every) as run:
            cache = self.cache.fork()
            cache.seen, cache.real_seen = 0, None  # as during the prefill forward, before its end_step
            cache.begin_step(self.positions, self.mask.bool())
            run.cache = cache
            if accumulates:  # as after its own prefill: scored (zeros), then the prefill's attention mass added
                for layer, mass in zip(cache.layers, self.attention_mass):
                    layer.scores[:, :, : layer.used] = mass
            elif policy is not None:
                run._pending = {idx: [hidden] for idx, hidden in enumerate(self.hidden)}
            _end_forward(run)  # the prefill's eviction point and compaction under this policy
            return _greedy(self.model, cache, self.logits, max_new_tokens, eos_token_id, expected)


@torch.no_grad()
def prefill(
    model: nn.Module, prompts: Tensor | Sequence[Sequence[int]], *, attention_mask: Tensor | None = None,
    attention_mass: bool = False,
) -> Prefill:
    """Prefill ``prompts`` once with the full cache (one chunk) and keep what :meth:`Prefill.branch` needs to run any
    number of policies from it (KVzap/kvpress semantics: prefill attention is full, eviction starts after it).

    Args:
        model: a supported HF causal LM.
        prompts: ``ids [b, n]`` (left-padded, with ``attention_mask [b, n]``) or a list of token lists.
        attention_mass: also keep each pair's attention mass, so that policies with ``accumulates_attention``
            branch without a prefill of their own (the prefill computes its attention weights once more).
    Returns:
        a :class:`Prefill`; ``prefill(m, p).branch(policy, k, ...)`` equals ``generate(m, p, policy, k, ...,
        chunk_size >= n)``.
    """
    ids, mask = _prompt_batch(model, prompts, attention_mask)
    with evicting(model, None) as run, capture_attention_inputs(model) as hidden:
        run.attention_mass = {} if attention_mass else None
        cache = run.new_cache()
        positions = cache.next_positions(ids.shape[0], ids.shape[1], mask.bool(), device=ids.device)
        logits = model(input_ids=ids, attention_mask=mask, cache=cache, logits_to_keep=1).logits
    layers = range(len(cache.layers))
    mass = [run.attention_mass[i] for i in layers] if attention_mass else None
    return Prefill(model, ids, mask, positions, cache, [hidden[i] for i in layers], logits, mass)


def full_cache_bytes(cache: Cache) -> int:
    """Bytes of keys and values held by a transformers cache (e.g. a ``DynamicCache``), for comparisons."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)
