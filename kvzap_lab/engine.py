"""The eviction engine: apply any policy to any supported HF model, during prefill and decoding, with real eviction.

``with evicting(model, policy) as run:`` makes plain ``model(...)`` forward calls use a :class:`CompactCache`
(created on the first call, or pass ``cache=run.new_cache()``), and :func:`generate` is a batched greedy decode
loop with chunked prefill built on it. Semantics are DMS/KVzap's:

- every new token (prefill chunk or decode step) is scored from the hidden state entering each attention layer
  as it arrived, with its keys/values/positions; the score is stored with the pair (a scorer with
  ``accumulates_attention`` also gets, at every step, the attention mass the pair receives, summed over the
  query heads of its KV group);
- at each eviction point (after every multi-token forward, and every ``evict_every`` decode steps) the pairs
  that left the sliding window (``rule.window`` most recent tokens of the row) and are not sinks (``rule.sinks``
  first tokens) are offered to ``rule.keep``; the others are evicted. The token just decoded is never offered.
  With ``evict_every=1`` this is DMS step by step; larger values batch the scoring of decoded tokens (scores are
  only read once a pair leaves the window) and let an evictable pair linger up to ``evict_every - 1`` steps;
- evicted pairs leave the attention at once (masked) and the storage at the next compaction (after every
  multi-token forward and every ``compact_every`` decode steps, or every ``seen / 16`` on shorter sequences),
  which keeps the per-step work small.

KVzap linear and MLP scorers run through the fused scoring kernel (:func:`kvzap_lab.kernels.score_and_threshold`)
when Triton runs (CUDA), one call per layer; elsewhere the buffered tokens of all layers are scored at once by
one stacked matmul per map (:func:`stacked_weights`: on CPU at decode sizes, dispatch costs more than
arithmetic). Compaction runs through :func:`kvzap_lab.kernels.compact` and leaves room for the tokens that
arrive before the next one, so decode appends do not grow the storage.

Attention is exact: each query sees the held pairs of its KV head at positions ``<=`` its own (and inside the
layer's sliding window, if any). New tokens get their true positions: each row counts its real tokens, so left
padding is ignored, as in ``model.generate``. ``policy=None`` runs the same engine as a full cache.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.cache_utils import Cache

from kvzap_lab.cache import CompactCache, Compression
from kvzap_lab.kernels import ScorerWeights, score_and_threshold, uses_triton
from kvzap_lab.model import UnsupportedModelError, attention_override, capture_attention_inputs, describe
from kvzap_lab.policy import Policy

DEFAULT_CHUNK = 128
DEFAULT_EVICT_EVERY = 8
DEFAULT_COMPACT_EVERY = 32


def check_policy(model: nn.Module, policy: Policy | None) -> None:
    """Raise a clear error for a policy the engine cannot run on ``model``.

    Checks: window and sinks are ints >= 0; a trained scorer matches the model (its ``check_model``). Infinite
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
    if hasattr(policy.scorer, "check_model"):
        policy.scorer.check_model(model)


def fused_weights(model: nn.Module, policy: Policy | None) -> list[ScorerWeights] | None:
    """Per-layer :class:`~kvzap_lab.kernels.ScorerWeights` of a KVzap linear or one-hidden-layer MLP scorer (its
    ``weights_``), on the model's device and in its dtype; ``None`` for any other scorer."""
    stacked = getattr(None if policy is None else policy.scorer, "weights_", None)
    if not isinstance(stacked, list) or len(stacked) not in (1, 2):
        return None
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


@dataclass
class EvictionRun:
    """What ``with evicting(model, policy) as run`` yields: ``run.cache`` is the cache of the latest forward."""

    model: nn.Module
    policy: Policy | None
    evict_every: int
    compact_every: int
    cache: CompactCache | None = None
    # per-layer weights of a KVzap linear/MLP scorer, scored by the fused kernel (Triton on CUDA) instead of score()
    fused: list[ScorerWeights] | None = None
    # the same weights stacked over layers, when they run on the torch path (see :func:`stacked_weights`)
    stacked: tuple[Tensor, ...] | None = None
    # hidden states [b, t, hidden] of the tokens not scored yet, per layer (scored at the next eviction)
    _pending: dict[int, list[Tensor]] = field(default_factory=dict, repr=False)
    _since_evict: int = field(default=0, repr=False)
    _since_compact: int = field(default=0, repr=False)

    def new_cache(self) -> CompactCache:
        """A fresh, empty :class:`CompactCache` for this model."""
        return CompactCache(describe(self.model).n_layers)


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
    if run.fused is not None:
        new = score_and_threshold(hidden, run.fused[idx], 0.0)[0]  # the rule thresholds later, with the window
    else:
        keys, values = layer.gather(n - t, n)
        new = run.policy.scorer.score(hidden, idx, keys=keys, values=values, positions=layer.positions[:, 0, n - t : n])
    if new.shape != (b, kv_heads, t):
        raise ValueError(
            f"policy {run.policy.name!r}: scorer returned shape {tuple(new.shape)} for layer {idx}; "
            f"expected [batch, kv_heads, new tokens] = {[b, kv_heads, t]} (trained for another model?)"
        )
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


def _attend(run: EvictionRun, hidden: dict[int, Tensor]):
    """The attention override: exact attention over the compacted cache; buffers the new tokens for scoring."""
    scorer = None if run.policy is None else run.policy.scorer
    accumulates = bool(getattr(scorer, "accumulates_attention", False))

    def attend(module, query, key, value, attention_mask, base, **kwargs):
        cache, idx = run.cache, module.layer_idx
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
            run._pending.setdefault(idx, []).append(hidden[idx])
        if accumulates:  # scores must exist before this step's attention mass is added to them
            _score_pending(run, idx)
            logits = grouped @ key.transpose(-1, -2) * (scale if scale is not None else d**-0.5)
            weights = logits.masked_fill(~mask, -math.inf).softmax(-1)
            out = weights @ value
            layer.scores[:, :, :n] += weights.sum(2).float()
        else:
            out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=mask, scale=scale)
        return out.view(b, n_heads, q, d).transpose(1, 2), None

    return attend


def _end_forward(run: EvictionRun) -> None:
    """Forward hook of the decoder: at eviction points (every multi-token forward, every ``evict_every`` decode
    steps) score the buffered tokens, offer the pairs that left the window to the rule, evict; maybe compact."""
    cache, policy = run.cache, run.policy
    step = cache.step
    multi_token = step.positions.shape[1] > 1
    run._since_evict += 1
    run._since_compact += 1
    if policy is not None and (multi_token or run._since_evict >= run.evict_every):
        rule = policy.rule
        last = step.positions[:, -1]
        if run.stacked is not None and run._pending:
            _score_all_pending(run)
        for idx, layer in enumerate(cache.layers):
            if idx in run._pending:
                _score_pending(run, idx)
            candidates = layer.evictable(last, rule.window, rule.sinks)
            keep = rule.keep(layer.scores[:, :, : layer.used], idx, candidates)
            if keep is not candidates:  # a rule that keeps every candidate may return them as they are
                layer.drop(candidates & ~keep)
        run._since_evict = 0
        # Short sequences compact sooner, so that the evicted pairs waiting for it stay a small part of the cache.
        interval = min(run.compact_every, max(1, cache.seen // 16))
        if multi_token or run._since_compact >= interval:
            cache.compact(headroom=interval)  # the decode steps until the next compaction need no growth
            run._since_compact = 0
    cache.end_step()


@contextlib.contextmanager
def evicting(
    model: nn.Module,
    policy: Policy | None,
    *,
    evict_every: int = DEFAULT_EVICT_EVERY,
    compact_every: int = DEFAULT_COMPACT_EVERY,
) -> Iterator[EvictionRun]:
    """Run ``model`` with real KV eviction by ``policy`` inside the block (``None``: full cache, same engine).

    Decode steps are scored and offered to the rule every ``evict_every`` steps (1: at every step, DMS exactly;
    more: a pair that left the window waits up to ``evict_every - 1`` steps, which saves per-step work); the
    storage is compacted every ``compact_every`` steps (every ``seen / 16`` steps on shorter sequences, so that the
    evicted pairs waiting for it stay under ~6 % of a full cache) and after every multi-token forward, leaving
    room for the tokens that come before the next compaction.

    Forward calls get a :class:`CompactCache` (a new one when they pass none or an empty one); a 2-D
    ``attention_mask`` must cover past and new tokens, left padding marked 0. Yields an :class:`EvictionRun`
    whose ``cache`` gives ``compression()`` and ``bytes_held()``. Restores the model on exit.
    """
    describe(model)  # raises UnsupportedModelError for an unsupported architecture
    check_policy(model, policy)
    for name, value in (("evict_every", evict_every), ("compact_every", compact_every)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1 (decode steps); got {value!r}")
    run = EvictionRun(model=model, policy=policy, evict_every=evict_every, compact_every=compact_every)
    run.fused = fused_weights(model, policy)
    run.stacked = stacked_weights(run.fused)
    decoder = model.model
    with contextlib.ExitStack() as stack:
        hidden = stack.enter_context(capture_attention_inputs(model)) if policy is not None else {}
        stack.enter_context(attention_override(model, _attend(run, hidden)))
        handles = [
            decoder.register_forward_pre_hook(lambda m, a, k: _begin_forward(run, a, k), with_kwargs=True),
            decoder.register_forward_hook(lambda m, a, k, out: _end_forward(run), with_kwargs=True),
        ]
        stack.callback(lambda: [h.remove() for h in handles])
        yield run


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
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row):
            ids[i, width - len(row) :] = torch.as_tensor(list(row))
            mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


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
    layer at every prompt token, what KVzap scorers read) and ``logits [b, 1, vocab]`` (the prompts' last ones).
    Memory: the full cache plus ``layers * b * n * hidden`` activations, held until the object is dropped.
    """

    model: nn.Module
    ids: Tensor
    mask: Tensor
    positions: Tensor
    cache: CompactCache
    hidden: list[Tensor]
    logits: Tensor

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
        A scorer with ``accumulates_attention`` needs the prefill's attention weights, which a shared prefill does
        not keep: that policy runs its own one-chunk prefill (same result, the cost of one prefill).

        Example::

            pre = prefill(model, [s.input_ids for s in batch])
            for tau in (-7.0, -6.0, -5.0):
                out = pre.branch(get_policy("oracle", rule=Threshold(tau)), 20, expected=answers)
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
        if policy is not None and getattr(policy.scorer, "accumulates_attention", False):
            return generate(self.model, self.ids, policy, max_new_tokens, attention_mask=self.mask, eos_token_id=eos_token_id,
                            chunk_size=self.ids.shape[1], evict_every=evict_every, compact_every=compact_every, expected=expected)
        with evicting(self.model, policy, evict_every=evict_every, compact_every=compact_every) as run:
            cache = self.cache.fork()
            cache.seen, cache.real_seen = 0, None  # as during the prefill forward, before its end_step
            cache.begin_step(self.positions, self.mask.bool())
            run.cache = cache
            if policy is not None:
                run._pending = {idx: [hidden] for idx, hidden in enumerate(self.hidden)}
            _end_forward(run)  # the prefill's eviction point and compaction under this policy
            return _greedy(self.model, cache, self.logits, max_new_tokens, eos_token_id, expected)


@torch.no_grad()
def prefill(model: nn.Module, prompts: Tensor | Sequence[Sequence[int]], *, attention_mask: Tensor | None = None) -> Prefill:
    """Prefill ``prompts`` once with the full cache (one chunk) and keep what :meth:`Prefill.branch` needs to run any
    number of policies from it (KVzap/kvpress semantics: prefill attention is full, eviction starts after it).

    Args:
        model: a supported HF causal LM.
        prompts: ``ids [b, n]`` (left-padded, with ``attention_mask [b, n]``) or a list of token lists.
    Returns:
        a :class:`Prefill`; ``prefill(m, p).branch(policy, k, ...)`` equals ``generate(m, p, policy, k, ...,
        chunk_size >= n)``.
    """
    ids, mask = _prompt_batch(model, prompts, attention_mask)
    with evicting(model, None) as run, capture_attention_inputs(model) as hidden:
        cache = run.new_cache()
        positions = cache.next_positions(ids.shape[0], ids.shape[1], mask.bool(), device=ids.device)
        logits = model(input_ids=ids, attention_mask=mask, cache=cache, logits_to_keep=1).logits
    return Prefill(model, ids, mask, positions, cache, [hidden[i] for i in range(len(cache.layers))], logits)


def full_cache_bytes(cache: Cache) -> int:
    """Bytes of keys and values held by a transformers cache (e.g. a ``DynamicCache``), for comparisons."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values) if t is not None)
