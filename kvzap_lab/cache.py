"""A compacted KV cache: every (layer, batch row, KV head) holds its own set of pairs, and evicted pairs are freed.

Storage of one layer (:class:`CompactLayer`), with ``n`` the slots in use and ``capacity >= n`` the slots
allocated per ``(b, head)`` row:

- ``keys`` / ``values`` ``[stored, head_dim]``: the held pairs, packed (no per-head padding);
- ``index`` ``[b, kv_heads, capacity]`` int64: the row of ``keys``/``values`` behind each slot;
- ``positions`` ``[b, kv_heads, capacity]`` int64: the absolute (RoPE) position of the pair in each slot;
- ``scores`` ``[b, kv_heads, capacity]`` float32: the policy's stored score of the pair;
- ``alive`` ``[b, kv_heads, capacity]`` bool: whether the slot holds a pair (False: evicted, padding or a hole);
- ``recent`` ``[b, k, hidden]`` (or None): the hidden states entering the layer at each row's last ``k`` scored
  tokens, for a scorer that reads ``k`` previous ones (:meth:`CompactLayer.advance_recent`).

New tokens take slots ``[n, n + t)`` of every row and new stored rows, in slot-major order: the pair of
slot ``s`` of row ``(b, head)`` goes to stored row ``offset + s * rows + b * kv_heads + head`` (``rows`` =
``batch * kv_heads``), whatever the chunking of the appends. So the ``index`` and ``alive`` entries of slots
not in use yet are filled when the slots are allocated, and an append writes only the pairs and their
positions (decoding is a few small ops per layer). Eviction only clears ``alive`` (cheap, every step);
:meth:`CompactLayer.compact` packs each row's live slots to the front (stable order,
:func:`kvzap_lab.kernels.compact`), trims the slots to the longest row and rewrites ``keys``/``values`` with
exactly the pairs kept, plus room for a given number of future tokens (the engine asks for the decode steps
until its next compaction). Heads of a layer keep different counts: the shorter rows carry padding slots, but a
padding slot costs 21 bytes of bookkeeping, not a key and a value, so the bytes held follow the pairs kept.

:class:`CompactCache` is a transformers ``Cache`` over these layers. ``get_seq_length`` reports the TRUE
sequence length (every token fed, padding included), so transformers' default position ids stay right; the
engine (:mod:`kvzap_lab.engine`) announces every forward with :meth:`CompactCache.begin_step` (positions and
padding of the new tokens) and builds the per-head attention masks with :meth:`CompactLayer.mask`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.cache_utils import Cache, CacheLayerMixin

from kvzap_lab.kernels import compact

# Slots are allocated in multiples of this, and at least this many are added when a layer grows.
_SLOT_QUANTUM = 8
# A growing layer gets this fraction of its live slots (and stored pairs) as headroom (geometric growth).
_GROWTH = 1 / 16
# A compaction leaves room for at most this fraction of the tokens seen, so that the room asked for stays a small
# part of what a full cache would hold, also for short sequences.
_HEADROOM = 1 / 32


def _round_up(n: int) -> int:
    return -(-n // _SLOT_QUANTUM) * _SLOT_QUANTUM


def _grown(t: Tensor, capacity: int, dim: int, n: int) -> Tensor:
    """A copy of ``t`` with ``capacity`` entries along ``dim``, the first ``n`` copied."""
    shape = list(t.shape)
    shape[dim] = capacity
    out = t.new_empty(shape)
    out.narrow(dim, 0, n).copy_(t.narrow(dim, 0, n))
    return out


def _kept_rows(t: Tensor, rows: Tensor, room: int) -> Tensor:
    """A new ``[room, d]`` tensor whose first ``len(rows)`` rows are ``t[rows]`` (the rest uninitialised).

    Under autograd (``t`` requires grad) the rows are gathered then copied, so gradients reach ``t``; without,
    they are gathered straight into place (``out=`` is not differentiable)."""
    out = t.new_empty(room, t.shape[1])
    if t.requires_grad and torch.is_grad_enabled():
        out.narrow(0, 0, len(rows)).copy_(t.index_select(0, rows))
    else:
        torch.index_select(t, 0, rows, out=out.narrow(0, 0, len(rows)))
    return out


def outside_window(last_positions: Tensor, window: int) -> Tensor:
    """The newest position outside the sliding window of each row: ``[b]`` (the row's newest token, at
    ``last_positions [b]``, always counts as recent)."""
    return last_positions - max(window, 1)


class CompactLayer(CacheLayerMixin):
    """One layer of a :class:`CompactCache` (layout in the module docstring).

    ``used`` is the slots in use, ``stored`` the rows of ``keys``/``values`` in use. ``update`` returns the held pairs
    gathered into ``[b, kv_heads, used, head_dim]`` keys and values, a transient copy for this step's attention
    (transformers' ``DynamicCache`` makes the same copy when it concatenates).
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False
    supports_early_init = False

    def __init__(self):
        super().__init__()
        self.index: Tensor | None = None
        self.positions: Tensor | None = None
        self.scores: Tensor | None = None
        self.alive: Tensor | None = None
        self.recent: Tensor | None = None
        self.used = 0
        self.stored = 0
        self.offset = 0  # stored row of slot s of row r (= b * kv_heads + head): offset + s * b * kv_heads + r

    @property
    def capacity(self) -> int:
        """Slots allocated per ``(b, head)`` row."""
        return 0 if self.index is None else self.index.shape[2]

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        b, h, _, d = key_states.shape
        if value_states.shape[-1] != d:
            raise ValueError(f"keys and values must share a head dim; got {d} and {value_states.shape[-1]}")
        self.device = key_states.device
        self.keys, self.values = key_states.new_empty(0, d), value_states.new_empty(0, d)
        self.index = torch.empty(b, h, 0, dtype=torch.int64, device=self.device)
        self.positions = torch.empty(b, h, 0, dtype=torch.int64, device=self.device)
        self.scores = torch.empty(b, h, 0, dtype=torch.float32, device=self.device)
        self.alive = torch.empty(b, h, 0, dtype=torch.bool, device=self.device)
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, positions: Tensor, valid: Tensor | None, **kwargs):
        """Append ``t`` new pairs ``[b, h, t, d]`` at ``positions [b, t]`` (``valid [b, t]`` False on padding;
        ``None``: all real). Their scores are left for the scorer to write.

        Returns ``(keys, values)`` ``[b, h, used, d]``: every slot in use (dead slots included, to be masked),
        the new pairs last.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        b, h, t, d = key_states.shape
        start, end, rows = self.used, self.used + t, self.stored + b * h * t
        if end > self.capacity:
            self._grow(_round_up(max(end, start + max(_SLOT_QUANTUM, int(start * _GROWTH)))))
        if rows > self.keys.shape[0]:
            stored = max(rows, self.stored + max(b * h * _SLOT_QUANTUM, int(self.stored * _GROWTH)))
            self.keys, self.values = _grown(self.keys, stored, 0, self.stored), _grown(self.values, stored, 0, self.stored)
        # narrow + copy_: a decode step is a few tiny writes, and Python slicing costs more than the copy
        if t == 1:  # slot-major rows [t, b, h, d] are [b, h, 1, d] as well: no permute
            self.keys.narrow(0, self.stored, rows - self.stored).view(b, h, 1, d).copy_(key_states)
            self.values.narrow(0, self.stored, rows - self.stored).view(b, h, 1, d).copy_(value_states)
        else:
            self.keys.narrow(0, self.stored, rows - self.stored).view(t, b, h, d).copy_(key_states.permute(2, 0, 1, 3))
            self.values.narrow(0, self.stored, rows - self.stored).view(t, b, h, d).copy_(value_states.permute(2, 0, 1, 3))
        self.positions.narrow(2, start, t).copy_(positions.unsqueeze(1))
        if valid is not None:
            self.alive.narrow(2, start, t).copy_(valid.unsqueeze(1))
        self.used, self.stored = end, rows
        return self.gather(0, end)

    def _grow(self, capacity: int) -> None:
        """Allocate ``capacity`` slots per row, keeping the slots in use; the new slots get their future stored rows
        (``index``) and ``alive`` True (an append then only clears the padding it brings)."""
        n, (b, h) = self.used, self.index.shape[:2]
        self.index, self.positions, self.scores, self.alive = (
            _grown(x, capacity, 2, n) for x in (self.index, self.positions, self.scores, self.alive)
        )
        slots = torch.arange(n, capacity, device=self.device)
        self.index[:, :, n:] = self.offset + slots * (b * h) + torch.arange(b * h, device=self.device).view(b, h, 1)
        self.alive[:, :, n:] = True

    def gather(self, start: int, end: int) -> tuple[Tensor, Tensor]:
        """Keys and values of slots ``[start, end)``: ``[b, kv_heads, end - start, head_dim]`` each (a copy)."""
        rows = self.index[:, :, start:end]
        return F.embedding(rows, self.keys), F.embedding(rows, self.values)  # a row gather, faster than indexing

    def mask(self, query_positions: Tensor, sliding_window: int | None = None) -> Tensor:
        """Which slots each query may attend to: bool ``[b, kv_heads, q, used]`` (may be a broadcast view).

        A slot is visible if it holds a pair at a position ``<=`` the query's (causal by absolute position) and,
        for sliding-window layers, within the window. Query rows that would see nothing (padding queries) see
        everything instead, which keeps padding outputs finite; no real token ever reads them.
        """
        n = self.used
        alive = self.alive[:, :, None, :n]
        q = query_positions.shape[1]
        if q == 1 and sliding_window is None:
            return alive  # every held pair is in the past of the one new token
        key_pos = self.positions[:, :, None, :n]
        query_pos = query_positions[:, None, :, None]
        visible = alive & (key_pos <= query_pos)
        if sliding_window is not None:
            visible = visible & (key_pos > query_pos - sliding_window)
        if q > 1:
            visible = visible | ~visible.any(-1, keepdim=True)
        return visible

    def evictable(self, last_positions: Tensor, window: int, sinks: int) -> Tensor:
        """Held pairs the rule may evict: bool ``[b, kv_heads, used]``.

        Not sinks (position ``< sinks``), not among the ``window`` most recent tokens of the row (the newest, at
        ``last_positions [b]``, always counts as recent).
        """
        pos = self.positions[:, :, : self.used]
        return self.alive[:, :, : self.used] & (pos <= outside_window(last_positions, window)[:, None, None]) & (pos >= sinks)

    def advance_recent(self, hidden: Tensor, valid: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """For a scorer that reads the ``k`` previous tokens: ``(previous [b, k, D], arranged [b, t, D], source [b, t])``,
        the new tokens ``hidden [b, t, D]`` (``valid [b, t]`` False on padding) after the row's last ``k`` real ones
        (zeros before its first) with each row's padding moved first, so that in ``[previous, arranged]`` the row's
        new real tokens come last, right after its ``k`` previous real ones; ``source``: the index among the new
        tokens of each arranged one (negative: a previous token, whose score is not used). Remembers the last ``k``
        real tokens."""
        b, t, d = hidden.shape
        recent = self.recent if self.recent is not None else hidden.new_zeros(b, k, d)
        order = torch.cat([valid.new_ones(b, k), valid], dim=1).long().argsort(dim=1, stable=True)  # padding first
        arranged = torch.cat([recent, hidden.to(recent.dtype)], dim=1).gather(1, order[..., None].expand(-1, -1, d))
        self.recent = arranged[:, t:].contiguous()
        return arranged[:, :k], arranged[:, k:], order[:, k:] - k

    def drop(self, evict: Tensor) -> None:
        """Mark the slots in ``evict [b, kv_heads, used]`` as free (they leave at the next :meth:`compact`)."""
        self.alive[:, :, : self.used] &= ~evict

    def kept(self) -> Tensor:
        """Pairs held per row: long ``[b, kv_heads]``."""
        return self.alive[:, :, : self.used].sum(-1)

    def compact(self, headroom: int = 0) -> None:
        """Free the evicted pairs: pack every row's live slots to the front (order kept), trim the slots to the
        longest row, and rewrite ``keys``/``values`` with exactly the pairs kept, plus room for ``headroom`` more
        tokens per row (so that the appends until the next compaction need no growth)."""
        if not self.is_initialized:
            return
        n = self.used
        slot_index = self.index[:, :, :n, None].double()  # exact below 2**53: moved as a 1-wide "head dim"
        slot_index, _, self.positions, self.scores, lengths = compact(
            slot_index, slot_index, self.positions[:, :, :n], self.scores[:, :, :n], self.alive[:, :, :n]
        )
        self.used = slot_index.shape[2]
        self.alive = torch.arange(self.used, device=self.device) < lengths[..., None]
        rows = slot_index[..., 0].long()[self.alive]  # kept pairs in (b, head, slot) order
        self.stored = len(rows)
        b, h = self.alive.shape[:2]
        room = max(self.stored + headroom * b * h, 1)  # at least one row, so that padding slots index something
        self.keys, self.values = (_kept_rows(x, rows, room) for x in (self.keys, self.values))
        self.index = torch.zeros_like(self.alive, dtype=torch.int64)
        self.index[self.alive] = torch.arange(self.stored, device=self.device)
        self.offset = self.stored - self.used * b * h
        if headroom:
            self._grow(_round_up(self.used + headroom))

    def bytes_held(self) -> int:
        """Bytes of every tensor this layer holds (keys, values, slot index, positions, scores, flags; padding
        included)."""
        if not self.is_initialized:
            return 0
        held = (self.keys, self.values, self.index, self.positions, self.scores, self.alive)
        return sum(t.numel() * t.element_size() for t in held)

    def full_bytes(self, seq_len: int) -> int:
        """Bytes of keys and values a full cache of ``seq_len`` tokens would hold for this layer."""
        if not self.is_initialized:
            return 0
        b, h = self.index.shape[:2]
        return b * h * seq_len * (self.keys.shape[1] + self.values.shape[1]) * self.keys.element_size()

    def get_seq_length(self) -> int:
        raise NotImplementedError("ask the CompactCache: a compacted layer does not know the true sequence length")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        raise NotImplementedError("ask the CompactCache: a compacted layer does not know the true sequence length")

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("beam search over a compacted cache is not supported; use greedy decoding")


@dataclass
class Step:
    """The tokens of the forward in progress: ``positions [b, q]`` (long) and ``valid [b, q]`` (False on padding;
    ``None`` when every token is real)."""

    positions: Tensor
    valid: Tensor | None


@dataclass
class Compression:
    """Achieved compression: the fraction of KV pairs evicted among all real tokens seen (prompt and generated).

    ``per_layer_head [layers, kv_heads]`` and ``per_row [b]`` are fractions; ``overall`` pools every pair.
    """

    overall: float
    per_layer_head: Tensor
    per_row: Tensor


class CompactCache(Cache):
    """A transformers ``Cache`` whose layers are :class:`CompactLayer` (per-head compacted storage).

    Use it inside :func:`kvzap_lab.engine.evicting`, which announces each forward with :meth:`begin_step` and
    routes attention through the per-head masks. ``seen`` is the true sequence length (tokens fed, padding
    included), ``real_seen [b]`` the non-padding tokens of each row.
    """

    def __init__(self, n_layers: int):
        super().__init__(layers=[CompactLayer() for _ in range(n_layers)])
        self.seen = 0
        self.real_seen: Tensor | None = None
        self.step: Step | None = None

    def begin_step(self, positions: Tensor, valid: Tensor | None = None) -> None:
        """Announce the ``q`` new tokens of the next forward: ``positions [b, q]``, ``valid [b, q]`` bool (False on
        left padding; ``None``: all real)."""
        if self.step is not None:
            raise RuntimeError("CompactCache.begin_step called twice without end_step (a forward did not finish)")
        b = positions.shape[0]
        if self.real_seen is None:
            self.real_seen = torch.zeros(b, dtype=torch.long, device=positions.device)
        elif self.real_seen.shape[0] != b:
            raise ValueError(f"this cache holds a batch of {self.real_seen.shape[0]} rows; got {b} new rows")
        self.step = Step(positions=positions, valid=valid)

    def end_step(self) -> None:
        """Account the tokens of the finished forward into ``seen`` and ``real_seen``."""
        q = self.step.positions.shape[1]
        self.seen += q
        self.real_seen += q if self.step.valid is None else self.step.valid.sum(1)
        self.step = None

    def next_positions(self, batch: int, q: int, valid: Tensor | None = None, device=None) -> Tensor:
        """Default positions of ``q`` new tokens ``[batch, q]``: each row counts its real tokens only, so left
        padding (``valid`` False) is skipped; ``valid=None`` means every new token is real."""
        seen = torch.zeros(batch, dtype=torch.long, device=device) if self.real_seen is None else self.real_seen
        if valid is None:
            return seen[:, None] + torch.arange(q, device=seen.device)
        return (seen[:, None] + valid.long().cumsum(1) - 1).clamp_min(0)

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        if self.step is None:
            raise RuntimeError(
                "a CompactCache must be used inside `with kvzap_lab.engine.evicting(model, policy):`, which announces "
                "the positions and padding of every forward"
            )
        return self.layers[layer_idx].update(
            key_states, value_states, positions=self.step.positions, valid=self.step.valid
        )

    def restart_row(self, row: int) -> None:
        """Empty batch row ``row`` so that a new sequence can start in it (its pairs die and leave at the next
        :meth:`compact`; its positions restart at 0; its ``recent`` hidden states are zeroed); the other rows are
        untouched."""
        if self.real_seen is None:
            return
        self.real_seen[row] = 0
        for layer in self.layers:
            if layer.is_initialized:
                layer.alive[row, :, : layer.used] = False
            if layer.recent is not None:
                layer.recent[row] = 0

    def fork(self) -> "CompactCache":
        """A copy that later steps change without touching this cache: the slot tables and ``recent`` hidden states
        are copied, keys and values shared read-only (trimmed to the stored rows, so the fork's first append or
        compaction writes new storage)."""
        twin = CompactCache(len(self.layers))
        twin.seen, twin.real_seen = self.seen, None if self.real_seen is None else self.real_seen.clone()
        for mine, theirs in zip(twin.layers, self.layers):
            if theirs.is_initialized:
                mine.device, mine.is_initialized = theirs.device, True
                mine.keys, mine.values = theirs.keys[: theirs.stored], theirs.values[: theirs.stored]
                mine.index, mine.positions, mine.scores, mine.alive = (
                    x.clone() for x in (theirs.index, theirs.positions, theirs.scores, theirs.alive)
                )
                mine.used, mine.stored, mine.offset = theirs.used, theirs.stored, theirs.offset
            mine.recent = None if theirs.recent is None else theirs.recent.clone()
        return twin

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.seen

    def compact(self, headroom: int = 0) -> None:
        """Compact every layer (see :meth:`CompactLayer.compact`), leaving room for ``headroom`` more tokens per row,
        at most 1/32 of the tokens seen: the room stays a small part of a full cache's bytes."""
        headroom = min(headroom, int(self.seen * _HEADROOM))
        for layer in self.layers:
            layer.compact(headroom)

    def bytes_held(self) -> int:
        """Bytes held by all layers (pairs kept, their positions, scores and flags, and padding slots)."""
        return sum(layer.bytes_held() for layer in self.layers)

    def full_bytes(self) -> int:
        """Bytes a full (uncompressed) cache of the same tokens would hold: keys and values of every token fed."""
        return sum(layer.full_bytes(self.seen) for layer in self.layers)

    def compression(self) -> Compression:
        """The achieved :class:`Compression` so far (0 before any token)."""
        if self.real_seen is None or not self.layers[0].is_initialized:
            return Compression(0.0, torch.zeros(len(self.layers), 0), torch.zeros(0))
        kept = torch.stack([layer.kept() for layer in self.layers]).double()  # [layers, b, h]
        real = self.real_seen.double()
        n_layers, _, h = kept.shape
        per_layer_head = 1.0 - kept.sum(1) / real.sum().clamp_min(1)
        per_row = 1.0 - kept.sum((0, 2)) / (real * n_layers * h).clamp_min(1)
        overall = 1.0 - kept.sum().item() / max(real.sum().item() * n_layers * h, 1)
        return Compression(overall=overall, per_layer_head=per_layer_head.cpu(), per_row=per_row.cpu())
