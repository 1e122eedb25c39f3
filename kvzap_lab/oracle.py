"""The KVzip+ oracle: how much the model needs each context KV pair to repeat the context.

The model reads a *repeat prompt* (the context, an instruction to repeat it exactly, then the context again).
For a context pair i of KV head g in layer l, the KVzip+ score is::

    score_i = max over query positions j in the repeated copy, and query heads h of group g, of
              a_ji * ||W_O,h v_i|| / ||h_j||

with ``a`` the softmax attention weight (over every key the query sees: template tokens, the context and the
repeated tokens before j), ``v_i`` the value vector, ``W_O,h`` query head h's slice of the output projection and
``h_j`` the hidden state entering the attention layer at j (after the input norm). KVzap trains on
``log(score)``. ``normalize=False`` gives plain KVzip (``a_ji`` alone).

The attention rows are computed here from the post-RoPE queries and keys that the model's own forward hands
to :func:`kvzap_lab.model.attention_override`, in blocks of queries, so sdpa models work and memory stays
bounded. Long contexts are repeated chunk by chunk as KVzip does: the context is prefilled once into a cache
(itself in chunks), then each chunk's repeat (instruction, the last ``anchor`` tokens of the previous chunk,
the chunk) runs on that cache, which is cropped back afterwards. The queries of chunk k's copy thus see the
template, the whole context, the instruction, the anchor and chunk k's copy up to themselves; a pair's score is
the max over the copied tokens of every chunk. With one chunk this is exactly the unchunked repeat prompt.

Public API: :func:`repeat_template`, :func:`repeat_prompt`, :func:`oracle_scores` (one context),
:func:`score_contexts` (a batch, optionally with the hidden states of the context tokens),
:func:`decode_oracle_scores` (tokens the model generated) and :func:`repeat_chunk` (the chunk actually used).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch
from torch import nn

from kvzap_lab.model import (
    attention_modules,
    attention_override,
    capture_attention_inputs,
    describe,
    output_projection_per_head,
)
from kvzap_lab.tasks import COPY_INSTRUCTION

INSTRUCTION = "\n" + COPY_INSTRUCTION  # the test bed learnt the copy task with this very instruction
DEFAULT_CHUNK = 2048
DEFAULT_ANCHOR = 8
BLOCK_ELEMENTS = 1 << 20  # attention-row entries held at once per layer call (4 MiB in fp32)
_SENTINEL = "\u2063KVZAP_CONTEXT\u2063"


@dataclass(frozen=True)
class RepeatTemplate:
    """Token ids around the context in a repeat prompt: ``prefix + context + middle + context``.

    ``middle`` holds the repeat instruction and the template tokens that open the answer. Build it from a
    tokenizer with :func:`repeat_template`, or by hand for tokenizer-less models (tests).
    """

    prefix: tuple[int, ...]
    middle: tuple[int, ...]


class RepeatPrompt(NamedTuple):
    """A repeat prompt: ``input_ids`` and the ``[start, end)`` spans of the context and of its repeated copy."""

    input_ids: list[int]
    context_span: tuple[int, int]
    repeat_span: tuple[int, int]


@dataclass
class OracleResult:
    """Oracle output for one context: ``scores [layers, kv_heads, n]`` (log KVzip+ or log KVzip) and, when
    asked for, ``hidden [n, layers, hidden]``: the hidden state entering each attention layer at each context
    token while the model reads the context (the surrogate's input)."""

    scores: torch.Tensor
    hidden: torch.Tensor | None = None


def repeat_template(tokenizer) -> RepeatTemplate:
    """The repeat-prompt pieces for ``tokenizer``: its chat template (user turn = context + instruction, assistant
    turn = the context) when it has one, plain concatenation (BOS, context, instruction, newline) otherwise."""
    if isinstance(tokenizer, RepeatTemplate):
        return tokenizer

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False) if text else []

    if getattr(tokenizer, "chat_template", None):
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": _SENTINEL}], add_generation_prompt=True, tokenize=False, enable_thinking=False
        )
        if rendered.count(_SENTINEL) != 1:
            raise ValueError("the tokenizer's chat template does not place the user content exactly once")
        head, tail = rendered.split(_SENTINEL)
        return RepeatTemplate(tuple(encode(head)), tuple(encode(INSTRUCTION) + encode(tail)))
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return RepeatTemplate(tuple(bos), tuple(encode(INSTRUCTION + "\n")))


def repeat_prompt(tokenizer, context_ids: Sequence[int]) -> RepeatPrompt:
    """The full (unchunked) repeat prompt for ``context_ids``, assembled from token pieces so spans are exact."""
    template = repeat_template(tokenizer)
    context = list(context_ids)
    start = len(template.prefix)
    repeat_start = start + len(context) + len(template.middle)
    ids = list(template.prefix) + context + list(template.middle) + context
    return RepeatPrompt(ids, (start, start + len(context)), (repeat_start, repeat_start + len(context)))


def oracle_scores(
    model: nn.Module,
    tokenizer,
    context: str | Sequence[int],
    *,
    normalize: bool = True,
    chunk_size: int | None = DEFAULT_CHUNK,
    anchor: int = DEFAULT_ANCHOR,
) -> torch.Tensor:
    """Log KVzip+ scores (log KVzip with ``normalize=False``) of one context: ``[layers, kv_heads, n]`` float32.

    ``tokenizer`` is a HF tokenizer or a :class:`RepeatTemplate`; ``context`` text or token ids.
    ``chunk_size`` is the largest repeat chunk (see :func:`repeat_chunk`); ``chunk_size=None`` repeats the whole
    context in one forward pass (reference path).
    """
    results = score_contexts(model, tokenizer, [context], normalize=normalize, chunk_size=chunk_size, anchor=anchor)
    return results[0].scores


def decode_oracle_scores(
    model: nn.Module, tokenizer, prompt_ids: Sequence[int], generated_ids: Sequence[int], **kwargs
) -> torch.Tensor:
    """Oracle scores of generated tokens: ``[layers, kv_heads, len(generated_ids)]``.

    The whole sequence the model holds after decoding (``prompt_ids + generated_ids``) is the context that the
    repeat prompt asks to reproduce; the scores of its last ``len(generated_ids)`` pairs are returned.
    ``kwargs`` go to :func:`oracle_scores`.
    """
    if len(generated_ids) == 0:
        raise ValueError("generated_ids is empty: the decode-phase oracle scores generated tokens, pass at least one")
    return oracle_scores(model, tokenizer, list(prompt_ids) + list(generated_ids), **kwargs)[..., len(prompt_ids) :]


def score_contexts(
    model: nn.Module,
    tokenizer,
    contexts: Sequence[str | Sequence[int]],
    *,
    normalize: bool = True,
    chunk_size: int | None = DEFAULT_CHUNK,
    anchor: int = DEFAULT_ANCHOR,
    return_hidden: bool = False,
) -> list[OracleResult]:
    """Oracle scores of a batch of contexts (any lengths; rows are right-padded with explicit positions, so each
    result equals the one-by-one result). Returns one :class:`OracleResult` per context."""
    if len(contexts) == 0:
        raise ValueError("contexts is empty: pass a list of one or more contexts (text or token ids)")
    template = repeat_template(tokenizer)
    spec = describe(model)
    ids = [_context_ids(tokenizer, c, i, model.config.vocab_size) for i, c in enumerate(contexts)]
    sizes = [repeat_chunk(model, template, len(c), chunk_size, anchor) for c in ids]
    state = _OracleState()
    with torch.no_grad(), capture_attention_inputs(model) as captured:
        attend = _scoring_attention(state, captured, normalize)
        with attention_override(model, attend):
            if chunk_size is None:
                hidden = _run_unchunked(model, template, ids, state, captured, return_hidden)
            else:
                hidden = _run_chunked(model, template, ids, state, captured, chunk_size, sizes, anchor, return_hidden)
        scores = _finish_scores(model, state, normalize, spec)  # [b, layers, kv_heads, width]
    results = []
    for row, context in enumerate(ids):
        n = len(context)
        row_hidden = None if hidden is None else hidden[row, len(template.prefix) : len(template.prefix) + n]
        results.append(OracleResult(scores[row, :, :, :n].contiguous(), row_hidden))
    return results


def repeat_chunk(model: nn.Module, tokenizer, n: int, chunk_size: int | None, anchor: int = DEFAULT_ANCHOR) -> int:
    """The chunk size used for a context of ``n`` tokens: the whole context when its repeat fits in one chunk and
    in the model's positions, else ``chunk_size`` shrunk, if needed, so that the context plus one chunk's repeat
    (instruction, anchor, chunk) fits in ``max_position_embeddings``. Raises ValueError when nothing fits, or,
    for ``chunk_size=None`` (one forward over the whole repeat prompt), when that prompt does not fit."""
    template = repeat_template(tokenizer)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens or None, got {chunk_size}")
    if anchor < 0:
        raise ValueError(f"anchor must be >= 0 tokens, got {anchor}")
    max_positions = describe(model).max_positions
    room = max_positions - len(template.prefix) - n - len(template.middle)  # positions left for one repeat
    if chunk_size is None:
        if n > room:
            raise ValueError(
                f"a context of {n} tokens needs {max_positions - room + n} positions for its repeat prompt but the "
                f"model covers {max_positions} (max_position_embeddings); pass chunk_size to repeat it chunk by chunk"
            )
        return n
    if n <= min(chunk_size, room):
        return n
    size = min(chunk_size, room - anchor)
    if size < 1:
        raise ValueError(
            f"a context of {n} tokens leaves no room for a repeat chunk: template prefix {len(template.prefix)} + "
            f"context {n} + instruction {len(template.middle)} + anchor {anchor} + 1 > {max_positions} positions "
            "(max_position_embeddings); use a shorter context"
        )
    return size


# ----------------------------------------------------------------------------------------------- internals
def _context_ids(tokenizer, context, index: int, vocab_size: int) -> list[int]:
    if isinstance(context, str):
        if isinstance(tokenizer, RepeatTemplate):
            raise TypeError("context text needs a tokenizer; with a RepeatTemplate pass token ids")
        context = tokenizer.encode(context, add_special_tokens=False)
    ids = [int(t) for t in context]
    if not ids:
        raise ValueError(f"context {index} is empty: the oracle scores context tokens, pass at least one")
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"context {index} holds token ids {bad[:5]} outside the model's vocabulary [0, {vocab_size})")
    return ids


@dataclass
class _OracleState:
    """What the attention override needs to know about the current forward, and what it accumulates."""

    query_weight: torch.Tensor | None = None  # [b, q] 1 for scored queries, 0 elsewhere; None: plain attention
    key_span: tuple[int, int] = (0, 0)  # cache columns of the context pairs
    best: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [b, kv_heads, group, width] running max
    values: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [b, kv_heads, width, head_dim]


def _allowed_keys(attention_mask, q: int, kv: int, heads: int, kv_heads: int, q0: int, q1: int, device):
    """Bool mask of the keys queries ``q0:q1`` may see, broadcastable to ``[b, kv_heads, group, q1-q0, kv]``."""
    if attention_mask is None:  # transformers only skips the mask when it is plain causal (bottom-right aligned)
        rows = torch.arange(q0, q1, device=device) + (kv - q)
        return (torch.arange(kv, device=device)[None, :] <= rows[:, None])[None, None, None]
    mask = attention_mask[:, :, q0:q1, :kv]
    if mask.dtype != torch.bool:
        mask = mask > torch.finfo(mask.dtype).min / 2
    if mask.shape[1] == heads and heads > 1:
        return mask.reshape(mask.shape[0], kv_heads, heads // kv_heads, q1 - q0, kv)
    return mask[:, :, None]


def _scoring_attention(state: _OracleState, captured: dict, normalize: bool):
    """The attention override: plain attention when nothing is scored, else attention computed in query blocks
    that also folds ``a_ji / ||h_j||`` (or ``a_ji``) of the scored queries into a running max per key."""

    def attend(module, query, key, value, attention_mask, base, **kwargs):
        if state.query_weight is None:
            return base(module, query, key, value, attention_mask, **kwargs)
        b, heads, q, dim = query.shape
        kv_heads, kv = key.shape[1], key.shape[2]
        group = heads // kv_heads
        scaling = kwargs.get("scaling") or dim**-0.5
        weight = state.query_weight
        if normalize:
            norms = captured[module.layer_idx].float().norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
            weight = weight / norms
        start, end = state.key_span
        layer = module.layer_idx
        best = state.best.get(layer)
        if best is None:
            best = torch.zeros(b, kv_heads, group, end - start, device=query.device)
        state.values[layer] = value[:, :, start:end]
        queries = query.view(b, kv_heads, group, q, dim)
        out = torch.empty_like(queries)
        block = max(1, BLOCK_ELEMENTS // max(1, b * heads * kv))
        for q0 in range(0, q, block):
            q1 = min(q, q0 + block)
            seen = kv - q + q1  # causal: no query of this block sees a key after the block's last query
            logits = torch.matmul(queries[:, :, :, q0:q1], key[:, :, None, :seen].transpose(-1, -2)).mul_(scaling)
            allowed = _allowed_keys(attention_mask, q, kv, heads, kv_heads, q0, q1, query.device)[..., :seen]
            logits += torch.where(allowed, 0.0, float("-inf"))  # an additive mask: much faster than masked_fill
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
            out[:, :, :, q0:q1] = torch.matmul(probs.to(value.dtype), value[:, :, None, :seen])
            block_weight = weight[:, q0:q1]
            if bool(block_weight.any()):
                scored = probs[..., start:end].mul_(block_weight[:, None, None, :, None])  # probs are used up
                best = torch.maximum(best, scored.amax(dim=3))
        state.best[layer] = best
        return out.view(b, heads, q, dim).transpose(1, 2), None

    return attend


def _finish_scores(model, state: _OracleState, normalize: bool, spec) -> torch.Tensor:
    """``log(max over the group of best * ||W_O,h v_i||)`` per layer: ``[b, layers, kv_heads, width]``."""
    per_layer = []
    for layer, module in enumerate(attention_modules(model)):
        best = state.best[layer]
        if normalize:
            best = best * _value_norms(module, state.values[layer], spec)
        per_layer.append(best.amax(dim=2))
    return torch.stack(per_layer, dim=1).log()


def _value_norms(module, values: torch.Tensor, spec) -> torch.Tensor:
    """``||W_O,h v_i||`` for every query head h and context value v_i: ``[b, kv_heads, group, width]``.

    Uses the per-head Gram matrix ``W_O,h^T W_O,h`` ([head_dim, head_dim]) so memory is linear in ``width``."""
    w_o = output_projection_per_head(module, spec.n_heads, spec.head_dim).float()  # [heads, hidden, head_dim]
    gram = torch.einsum("hod,hoe->hde", w_o, w_o).view(spec.n_kv_heads, spec.group_size, spec.head_dim, spec.head_dim)
    values = values.float()
    squared = torch.einsum("bkwd,kgde,bkwe->bkgw", values, gram, values)
    return squared.clamp_min(0).sqrt()


def _pad_rows(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token rows: ``(ids [b, t], real [b, t] bool)``."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long, device=device)
    real = torch.zeros(len(rows), width, dtype=torch.bool, device=device)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long, device=device)
        real[i, : len(row)] = True
    return ids, real


def _forward(model, ids, attention_mask, positions, cache=None):
    model.model(
        input_ids=ids,
        attention_mask=attention_mask.long(),
        position_ids=positions,
        cache=cache,
        use_cache=cache is not None,
    )


def _run_unchunked(model, template, ids, state, captured, return_hidden):
    """One forward over the whole repeat prompts; the repeated copies are the scored queries."""
    device = model.device
    prompts = [repeat_prompt(template, c) for c in ids]
    tokens, real = _pad_rows([p.input_ids for p in prompts], 0, device)
    weight = torch.zeros(tokens.shape, device=device)
    for row, prompt in enumerate(prompts):
        weight[row, slice(*prompt.repeat_span)] = 1.0
    positions = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
    state.key_span = (len(template.prefix), len(template.prefix) + max(len(c) for c in ids))
    state.query_weight = weight
    _forward(model, tokens, real, positions)
    return _stack_hidden(captured) if return_hidden else None


def _run_chunked(model, template, ids, state, captured, chunk_size, sizes, anchor, return_hidden):
    """Prefill ``prefix + context`` once (in pieces of ``chunk_size``), then repeat each context chunk by chunk (row
    r in chunks of ``sizes[r]``) on that cache: step k feeds ``middle + anchor + chunk_k`` (no anchor for the
    first chunk) and scores chunk_k."""
    from transformers import DynamicCache

    device = model.device
    prefix = list(template.prefix)
    tokens, real = _pad_rows([prefix + c for c in ids], 0, device)
    length = tokens.shape[1]
    positions = torch.arange(length, device=device).expand_as(tokens)
    cache = DynamicCache()
    hidden_parts = []
    for s in range(0, length, chunk_size):
        e = min(length, s + chunk_size)
        _forward(model, tokens[:, s:e], real[:, :e], positions[:, s:e], cache)
        if return_hidden:
            hidden_parts.append(_stack_hidden(captured))
    chunks = [[c[i : i + size] for i in range(0, len(c), size)] for c, size in zip(ids, sizes)]
    state.key_span = (len(prefix), len(prefix) + max(len(c) for c in ids))
    for k in range(max(len(c) for c in chunks)):
        rows, leads = [], []
        for row_chunks in chunks:
            if k >= len(row_chunks):
                rows.append([])
                leads.append(0)
                continue
            lead = list(template.middle) + (row_chunks[k - 1][-anchor:] if k > 0 and anchor else [])
            rows.append(lead + row_chunks[k])
            leads.append(len(lead))
        step, step_real = _pad_rows(rows, 0, device)
        weight = torch.zeros(step.shape, device=device)
        for row, (lead, tokens_row) in enumerate(zip(leads, rows)):
            weight[row, lead : len(tokens_row)] = 1.0
        context_end = torch.tensor([len(prefix) + len(c) for c in ids], device=device)
        step_positions = context_end[:, None] + torch.arange(step.shape[1], device=device)
        state.query_weight = weight
        _forward(model, step, torch.cat([real, step_real], dim=1), step_positions, cache)
        cache.crop(-step.shape[1])
    return torch.cat(hidden_parts, dim=1) if return_hidden else None


def _stack_hidden(store: dict) -> torch.Tensor:
    """Captured attention inputs as ``[b, t, layers, hidden]``."""
    return torch.stack([store[i] for i in sorted(store)], dim=2).float()
