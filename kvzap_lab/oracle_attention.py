"""The oracle's attention override: the model's exact attention output plus a running max of scored rows.

During a scored forward (see :mod:`kvzap_lab.oracle`) every layer's attention goes through
:class:`ScoringAttention`. For each batch row it computes the attention output the model needs, and folds into
``best[layer]`` (``[b, kv_heads, group, width]``, log space) the max over the row's scored queries j of::

    log a_hji - log ||h_j||            (KVzip+; without the norm, ``normalize=False``: KVzip)

for each kept key i and query head h, with ``log a_hji = scale * q_hj . k_i - lse_hj``. :meth:`finish` adds
``log ||W_O,h v_i||`` and takes the max over the heads of each KV group. Two definitions (the scored queries
and the softmax the attention weight is taken from):

- ``"paper"`` (KVzap's labels): the queries of the repeated copy; the model's own softmax (every key the query
  sees).
- ``"kvpress"`` (kvpress ``KVzipPress.score_kvzip``): every query of the repeat chunk (instruction, template
  suffix, copy); the softmax over the first ``sink`` keys, the chunk's context keys and the repeat chunk only.

Why it is fast (``benchmarks/oracle_cost.py``): for the paper definition on CPU, the attention output *and* its
log-sum-exp come from PyTorch's fused flash kernel, called per batch row on exactly the row's real tokens: once
over the cached keys (all visible, no mask) and once over the step's own keys (causal, so the kernel skips the
upper triangle), the two merged by their log-sum-exps. What is left for the scores is one matmul per block of
scored queries against the kept keys, with ``-lse_hj - log ||h_j||`` folded in as an extra input column, and a
max over the block's queries: no softmax is materialised, no exp is taken. Blocks hold a fixed number of
elements (``BLOCK_ELEMENTS``) whatever the batch. Elsewhere (kvpress's definition, other devices, masks that are
not plain causal + right padding, e.g. sliding windows) the model's own attention gives the output and the
scores take the log-sum-exp of their own logits, in the same fixed-size blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvzap_lab.model import output_projection_per_head

BLOCK_ELEMENTS = 1 << 19  # logits held at once by the scoring of one batch row (2 MiB in fp32)
DEFINITIONS = ("paper", "kvpress")
_TINY = torch.finfo(torch.float32).tiny
_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


@dataclass(frozen=True)
class RowPlan:
    """What one batch row scores in one forward. Step query t is key column ``past + t``.

    Attributes:
        length: real step tokens of the row (queries ``[0, length)``; the rest is right padding).
        cache: real cache columns of the row (``[0, cache)``, all visible to its step queries).
        scored: the scored step queries ``[q0, q1)``.
        kept: the key columns ``[k0, k1)`` whose scores are kept.
        sink: kvpress's definition: the first ``sink`` key columns join its softmax.
    """

    length: int
    cache: int
    scored: tuple[int, int]
    kept: tuple[int, int]
    sink: int = 0


@dataclass(frozen=True)
class ForwardPlan:
    """The rows of one scored forward; ``past`` is the (padded) number of cache columns before the step."""

    past: int
    rows: tuple[RowPlan, ...]


class _Scored(Exception):
    """Raised after the last layer's scores: the rest of the forward (o_proj, MLP, norm) is not needed."""


@dataclass
class ScoringAttention:
    """The attention override of an oracle run (pass it to :func:`kvzap_lab.model.attention_override`).

    Args:
        captured: the dict :func:`kvzap_lab.model.capture_attention_inputs` fills (``h_j`` of every layer).
        n_layers: decoder layers of the model.
        context: the key columns ``[start, start + width)`` of the contexts; ``best`` column c is key column
            ``start + c``.
        normalize: KVzip+ (True) or KVzip (False).
        definition: ``"paper"`` or ``"kvpress"`` (see the module docstring).
    """

    captured: dict
    n_layers: int
    context: tuple[int, int]
    normalize: bool = True
    definition: str = "paper"
    plan: ForwardPlan | None = None
    best: dict[int, torch.Tensor] = field(default_factory=dict)
    log_value_norms: dict[int, torch.Tensor] = field(default_factory=dict)
    _structural: dict[int, bool] = field(default_factory=dict)

    def __post_init__(self):
        if self.definition not in DEFINITIONS:
            raise ValueError(f"definition must be one of {DEFINITIONS}, got {self.definition!r}")

    def run(self, plan: ForwardPlan | None, forward) -> None:
        """Call ``forward()`` under ``plan`` (``None``: the model's own attention). A plan without scored rows
        (the prefill) gets the fused per-row attention too, so a padded batch costs what its rows cost one by one.
        Under a plan the forward stops after the last layer's attention: nothing after it is used."""
        self.plan, self._structural = plan, {}
        try:
            forward()
        except _Scored:
            pass
        finally:
            self.plan, self._structural = None, {}

    def __call__(self, module, query, key, value, attention_mask, base, **kwargs):
        plan = self.plan
        if plan is None:
            return base(module, query, key, value, attention_mask, **kwargs)
        scale = kwargs.get("scaling") or query.shape[-1] ** -0.5
        scoring = any(q1 > q0 and k1 > k0 for (q0, q1), (k0, k1) in ((r.scored, r.kept) for r in plan.rows))
        fast = (self.definition == "paper" or not scoring) and self._flash_fits(query, attention_mask, key.shape[2])
        if fast:
            out, lse = _flash_rows(query, key, value, plan, scale)
        else:
            out, lse = base(module, query, key, value, attention_mask, **kwargs)[0], None
        if scoring:
            self._score(module, query, key, value, attention_mask, lse, scale)
        if module.layer_idx == self.n_layers - 1:
            raise _Scored
        return out, None

    def _score(self, module, query, key, value, attention_mask, lse, scale: float) -> None:
        """Fold this layer's scored rows into ``best`` (``lse``: the softmax's log-sum-exp, or None to take it
        from the scores' own logits)."""
        plan, layer = self.plan, module.layer_idx
        heads, dim = query.shape[1], query.shape[3]
        kv_heads = key.shape[1]
        group = heads // kv_heads
        if self.definition == "kvpress":
            scale = dim**-0.5  # KVzipPress divides by sqrt(head_dim) whatever the model's scaling
        if self.normalize:
            offsets = -self.captured[layer].float().norm(dim=-1).clamp_min(_TINY).log()  # [b, q]
            if layer not in self.log_value_norms:
                self.log_value_norms[layer] = _log_value_norms(module, value[:, :, slice(*self.context)], group)
        else:
            offsets = query.new_zeros(query.shape[0], query.shape[2], dtype=torch.float32)
        best = self.best.get(layer)
        if best is None:
            width = self.context[1] - self.context[0]
            best = torch.full((query.shape[0], kv_heads, group, width), float("-inf"), device=query.device)
            self.best[layer] = best
        for r, row in enumerate(plan.rows):
            q0, q1 = row.scored
            k0, k1 = row.kept
            if q1 <= q0 or k1 <= k0:
                continue
            queries = query[r, :, q0:q1].float() * scale  # [heads, nq, dim]
            if lse is not None:
                shift = offsets[r, q0:q1] - lse[r, :, q0:q1]  # [heads, nq]
                row_best = _max_with_known_lse(queries, shift, key[r, :, k0:k1].float())
            else:
                keys, allowed, kept = self._softmax_keys(row, r, key, attention_mask, plan.past)
                row_best = _max_with_own_lse(queries, offsets[r, q0:q1], keys, allowed, kept)
            columns = slice(k0 - self.context[0], k1 - self.context[0])
            best[r, :, :, columns] = torch.maximum(best[r, :, :, columns], row_best)

    def finish(self) -> torch.Tensor:
        """Log scores ``[b, layers, kv_heads, width]``: max over each KV group of best (+ log ||W_O,h v_i||)."""
        per_layer = []
        for layer in range(self.n_layers):
            best = self.best[layer]
            if self.normalize:
                best = best + self.log_value_norms[layer]
            per_layer.append(best.amax(dim=2))
        return torch.stack(per_layer, dim=1)

    def _flash_fits(self, query, attention_mask, kv: int) -> bool:
        """The fused kernel applies: a CPU tensor, and the model's mask is plain causal + right padding."""
        if _FLASH is None or query.device.type != "cpu":
            return False
        key = id(attention_mask)
        if key not in self._structural:  # one mask object serves every layer of a forward
            self._structural[key] = _mask_is_planned(attention_mask, self.plan, kv)
        return self._structural[key]

    def _softmax_keys(self, row: RowPlan, r: int, key, attention_mask, past: int):
        """``(keys [kv_heads, m, dim], allowed [nq, m] bool or None, kept slice)`` of a row's softmax."""
        q0, q1 = row.scored
        k0, k1 = row.kept
        if self.definition == "kvpress":  # sinks, the chunk's keys, the repeat chunk (causal)
            own = (past + q0, past + q1)
            keys = torch.cat([key[r, :, : row.sink], key[r, :, k0:k1], key[r, :, slice(*own)]], dim=1)
            n = q1 - q0
            allowed = torch.ones(n, keys.shape[1], dtype=torch.bool, device=key.device)
            allowed[:, -n:] = torch.ones(n, n, dtype=torch.bool, device=key.device).tril()
            return keys.float(), allowed, slice(row.sink, row.sink + k1 - k0)
        kv = key.shape[2]
        if attention_mask is None:  # transformers skips the mask only when it is plain causal (bottom-right)
            rows = torch.arange(q0, q1, device=key.device) + past
            allowed = torch.arange(kv, device=key.device)[None, :] <= rows[:, None]
        else:
            allowed = _as_bool(attention_mask[r, 0, q0:q1, :kv])
        return key[r].float(), allowed, slice(k0, k1)


def _as_bool(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def _mask_is_planned(attention_mask, plan: ForwardPlan, kv: int) -> bool:
    """Whether every real query of every row sees exactly its row's cache and the step up to itself."""
    if attention_mask is None:  # bottom-right causal: every cache column is visible
        return all(row.cache == plan.past for row in plan.rows)
    if attention_mask.shape[1] != 1:
        return False
    for r, row in enumerate(plan.rows):
        n = row.length
        if n == 0:
            continue
        expected = torch.zeros(n, kv, dtype=torch.bool, device=attention_mask.device)
        expected[:, : row.cache] = True
        expected[:, plan.past : plan.past + n] = torch.ones(n, n, dtype=torch.bool, device=expected.device).tril()
        if not torch.equal(_as_bool(attention_mask[r, 0, :n, :kv]), expected):
            return False
    return True


def _flash_rows(query, key, value, plan: ForwardPlan, scale: float):
    """Attention output ``[b, q, heads, dim]`` and log-sum-exp ``[b, heads, q]`` (fp32) of every row's real
    queries, from the fused kernel: the cached keys (no mask) and the step's keys (causal), merged."""
    b, heads, q, dim = query.shape
    out = query.new_zeros(b, q, heads, dim)
    lse = torch.full((b, heads, q), float("-inf"), device=query.device)
    past = plan.past
    for r, row in enumerate(plan.rows):
        n = row.length
        if n == 0:
            continue
        queries = query[r : r + 1, :, :n]
        step = slice(past, past + n)
        o, l = _FLASH(queries, key[r : r + 1, :, step], value[r : r + 1, :, step], is_causal=True, scale=scale)
        if row.cache:
            cached = slice(0, row.cache)
            o_c, l_c = _FLASH(queries, key[r : r + 1, :, cached], value[r : r + 1, :, cached], scale=scale)
            total = torch.logaddexp(l, l_c)
            o = (o.float() * (l - total).exp()[..., None] + o_c.float() * (l_c - total).exp()[..., None]).to(o.dtype)
            l = total
        out[r, :n] = o[0].transpose(0, 1)
        lse[r, :, :n] = l[0]
    return out, lse


def _max_with_known_lse(queries, shift, keys) -> torch.Tensor:
    """``max over j of (queries[h, j] . keys[k, i] + shift[h, j])`` per query head and key: ``[kv_heads, group,
    n]``. ``queries [heads, nq, dim]`` (scaled), ``shift [heads, nq]``, ``keys [kv_heads, n, dim]``.

    The shift rides in the matmul as an extra column (queries get ``shift``, keys get 1), so a block costs one
    matmul and one max."""
    heads, nq, dim = queries.shape
    kv_heads, n = keys.shape[0], keys.shape[1]
    group = heads // kv_heads
    augmented = torch.cat([queries, shift[..., None]], dim=-1)  # [heads, nq, dim + 1]
    augmented = augmented.view(kv_heads, group, nq, dim + 1).transpose(1, 2).contiguous()  # [kv, nq, group, d+1]
    keys_t = torch.cat([keys, keys.new_ones(kv_heads, n, 1)], dim=-1).transpose(1, 2)  # [kv_heads, dim + 1, n]
    best = torch.full((kv_heads, group, n), float("-inf"), device=queries.device)
    block = max(1, BLOCK_ELEMENTS // (heads * n))
    for s in range(0, nq, block):
        e = min(nq, s + block)
        logits = torch.matmul(augmented[:, s:e].reshape(kv_heads, (e - s) * group, dim + 1), keys_t)
        torch.maximum(best, logits.view(kv_heads, e - s, group, n).amax(dim=1), out=best)
    return best


def _max_with_own_lse(queries, offsets, keys, allowed, kept: slice) -> torch.Tensor:
    """``max over j of (log softmax(queries[h, j] . keys)[kept] + offsets[j])``: ``[kv_heads, group, kept]``.

    ``queries [heads, nq, dim]`` (scaled), ``offsets [nq]``, ``keys [kv_heads, m, dim]`` (the softmax's keys),
    ``allowed [nq, m]`` bool (None: every key)."""
    heads, nq, dim = queries.shape
    kv_heads, m = keys.shape[0], keys.shape[1]
    group = heads // kv_heads
    queries = queries.view(kv_heads, group, nq, dim)
    keys_t = keys.transpose(1, 2)[:, None]  # [kv_heads, 1, dim, m]
    best = torch.full((kv_heads, group, kept.stop - kept.start), float("-inf"), device=queries.device)
    block = max(1, BLOCK_ELEMENTS // (heads * m))
    for s in range(0, nq, block):
        e = min(nq, s + block)
        logits = torch.matmul(queries[:, :, s:e], keys_t)  # [kv_heads, group, block, m]
        if allowed is not None:
            logits += torch.where(allowed[s:e], 0.0, float("-inf"))
        scores = logits[..., kept] - logits.logsumexp(dim=-1, keepdim=True) + offsets[s:e, None]
        torch.maximum(best, scores.amax(dim=2), out=best)
    return best


def _log_value_norms(module, values: torch.Tensor, group: int) -> torch.Tensor:
    """``log ||W_O,h v_i||`` for every query head h and value: ``[b, kv_heads, group, width]``.

    Uses the per-head Gram matrix ``W_O,h^T W_O,h`` (``[dim, dim]``) so memory is linear in ``width``."""
    kv_heads, dim = values.shape[1], values.shape[3]
    w_o = output_projection_per_head(module, kv_heads * group, dim).float()  # [heads, hidden, dim]
    gram = torch.einsum("hod,hoe->hde", w_o, w_o).view(kv_heads, group, dim, dim)
    values = values.float()
    squared = torch.einsum("bkwd,kgde,bkwe->bkgw", values, gram, values)
    return squared.clamp_min(0).sqrt().log()
