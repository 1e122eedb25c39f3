"""The KVzip+ oracle: how much the model needs each context KV pair to repeat the context.

The model reads a *repeat prompt* (the context, an instruction to repeat it exactly, then the context again).
For a context pair i of KV head g in layer l, the KVzip+ score is::

    score_i = max over query positions j in the repeated copy, and query heads h of group g, of
              a_ji * ||W_O,h v_i|| / ||h_j||

with ``a`` the softmax attention weight (over every key the query sees: template tokens, the context and the
repeated tokens before j), ``v_i`` the value vector, ``W_O,h`` query head h's slice of the output projection and
``h_j`` the hidden state entering the attention layer at j (after the input norm). KVzap trains on
``log(score)``. ``normalize=False`` gives plain KVzip (``a_ji`` alone).

That is the KVzap paper's definition (``definition="paper"``, the default). ``definition="kvpress"`` reproduces
kvpress's ``KVzipPress(kvzip_plus_normalization=True)``: its repeat prompt (its instruction, then the chat
template's suffix), the max over every query of the repeat chunk (instruction and suffix included), and a softmax
over the first 4 keys, the chunk's context keys and the repeat chunk only (template keys after the first 4 are
left out); each chunk's keys are scored by that chunk's repeat alone.

The attention rows are read from the post-RoPE queries and keys that the model's own forward hands to
:func:`kvzap_lab.model.attention_override` (see :mod:`kvzap_lab.oracle_attention`, which also says why it is
fast), so sdpa models work and memory stays bounded. Long contexts are repeated chunk by chunk as KVzip does:
the context is prefilled once into a cache (itself in chunks), then each chunk's repeat (instruction, the last
``anchor`` tokens of the previous chunk, the chunk) runs on that cache, which is cropped back afterwards. The
queries of chunk k's copy thus see the template, the whole context, the instruction, the anchor and chunk k's
copy up to themselves; a pair's score is the max over the copied tokens of every chunk. With one chunk this is
exactly the unchunked repeat prompt.

Public API: :func:`repeat_template`, :func:`repeat_prompt`, :func:`oracle_scores` (one context),
:func:`score_contexts` (a batch, optionally with the hidden states of the context tokens),
:func:`decode_oracle_scores` (tokens the model generated) and :func:`repeat_chunk` (the chunk actually used).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
from torch import nn

from kvzap_lab.model import attention_override, capture_attention_inputs, describe
from kvzap_lab.oracle_attention import DEFINITIONS, ForwardPlan, RowPlan, ScoringAttention
from kvzap_lab.tasks import COPY_INSTRUCTION

INSTRUCTION = "\n" + COPY_INSTRUCTION  # the test bed learnt the copy task with this very instruction
DEFAULT_CHUNK = 2048
DEFAULT_ANCHOR = 8
KVPRESS_INSTRUCTION = "\n\nRepeat the previous context exactly."  # kvpress KVzipPress.prepare, first chunk
KVPRESS_CONTINUATION = "\n\nRepeat the part of the previous context exactly, starting with"  # later chunks
KVPRESS_SINK = 4  # KVzipPress.n_sink: keys always in its softmax
CPU_BATCH_TOKENS = 2048  # on CPU, rows scored together hold at most this many context tokens (padded)
_SENTINEL = "\u2063KVZAP_CONTEXT\u2063"


@dataclass(frozen=True)
class RepeatTemplate:
    """Token ids around the context in a repeat prompt: ``prefix + context + middle + context``.

    ``middle`` holds the repeat instruction and the template tokens that open the answer. A later chunk's repeat
    starts with ``continued`` (default: ``middle``), the anchor, then ``after_anchor`` (kvpress puts the
    template's suffix there). Build it from a tokenizer with :func:`repeat_template`, or by hand for
    tokenizer-less models (tests).
    """

    prefix: tuple[int, ...]
    middle: tuple[int, ...]
    continued: tuple[int, ...] | None = None
    after_anchor: tuple[int, ...] = ()

    def lead(self, k: int, anchor_ids: Sequence[int]) -> list[int]:
        """The tokens before chunk ``k``'s copy; ``anchor_ids`` ends the previous chunk (ignored for k = 0)."""
        if k == 0:
            return list(self.middle)
        opening = self.middle if self.continued is None else self.continued
        return list(opening) + list(anchor_ids) + list(self.after_anchor)

    def longest_lead(self, anchor: int) -> int:
        """Length of the longest lead of a later chunk."""
        return len(self.lead(1, [0] * anchor))


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


def repeat_template(tokenizer, definition: str = "paper") -> RepeatTemplate:
    """The repeat-prompt pieces for ``tokenizer`` (a :class:`RepeatTemplate` is returned as it is).

    ``"paper"``: its chat template (user turn = context + instruction, assistant turn = the context) when it has
    one, plain concatenation (BOS, context, instruction, newline) otherwise. ``"kvpress"``: kvpress's prompt
    (``KVzipPress.__call__`` and ``prepare``): template prefix, context, its instruction, the template's suffix;
    without a chat template no prefix (kvpress's pipeline puts BOS in the context itself) and suffix "\n".
    """
    if isinstance(tokenizer, RepeatTemplate):
        return tokenizer
    _check_definition(definition)

    def encode(text: str) -> tuple[int, ...]:
        return tuple(tokenizer.encode(text, add_special_tokens=False)) if text else ()

    def render(content: str) -> str:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False, enable_thinking=False
        )

    has_template = bool(getattr(tokenizer, "chat_template", None))
    if definition == "kvpress":
        prefix, suffix = "", "\n"
        if has_template:
            dummy = "dummy context"
            separator = "\n" + "#" * len(dummy)
            context, suffix = render(dummy + separator).split(separator)
            prefix = context.split(dummy)[0]
        return RepeatTemplate(
            encode(prefix), encode(KVPRESS_INSTRUCTION) + encode(suffix), encode(KVPRESS_CONTINUATION), encode(suffix)
        )
    if has_template:
        rendered = render(_SENTINEL)
        if rendered.count(_SENTINEL) != 1:
            raise ValueError("the tokenizer's chat template does not place the user content exactly once")
        head, tail = rendered.split(_SENTINEL)
        return RepeatTemplate(encode(head), encode(INSTRUCTION) + encode(tail))
    bos = (tokenizer.bos_token_id,) if tokenizer.bos_token_id is not None else ()
    return RepeatTemplate(bos, encode(INSTRUCTION + "\n"))


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
    definition: str = "paper",
) -> torch.Tensor:
    """Log KVzip+ scores (log KVzip with ``normalize=False``) of one context: ``[layers, kv_heads, n]`` float32.

    ``tokenizer`` is a HF tokenizer or a :class:`RepeatTemplate`; ``context`` text or token ids.
    ``chunk_size`` is the largest repeat chunk (see :func:`repeat_chunk`); ``chunk_size=None`` repeats the whole
    context in one forward pass (reference path). ``definition``: ``"paper"`` or ``"kvpress"`` (module docstring).
    """
    results = score_contexts(
        model, tokenizer, [context], normalize=normalize, chunk_size=chunk_size, anchor=anchor, definition=definition
    )
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
    definition: str = "paper",
) -> list[OracleResult]:
    """Oracle scores of a batch of contexts (any lengths; rows are right-padded with explicit positions, so each
    result equals the one-by-one result). Returns one :class:`OracleResult` per context.

    Args:
        model: a supported causal LM (:func:`kvzap_lab.model.load_model`).
        tokenizer: its tokenizer, or a :class:`RepeatTemplate`.
        contexts: texts or token-id lists.
        normalize: KVzip+ (True) or KVzip (False).
        chunk_size: the largest repeat chunk in tokens; None: one forward over the whole repeat prompt.
        anchor: tokens of the previous chunk that open a later chunk's repeat.
        return_hidden: also return the hidden states entering each attention layer at the context tokens.
        definition: ``"paper"`` (KVzap's labels) or ``"kvpress"`` (``KVzipPress``).
    """
    if len(contexts) == 0:
        raise ValueError("contexts is empty: pass a list of one or more contexts (text or token ids)")
    _check_definition(definition)
    template = repeat_template(tokenizer, definition)
    ids = [_context_ids(tokenizer, c, i, model.config.vocab_size) for i, c in enumerate(contexts)]
    sizes = [repeat_chunk(model, template, len(c), chunk_size, anchor) for c in ids]
    results: list[OracleResult | None] = [None] * len(ids)
    for group in _row_groups([len(c) for c in ids], model.device):
        rows = [ids[i] for i in group]
        scored = _score_rows(model, template, rows, [sizes[i] for i in group], normalize, chunk_size, anchor,
                             return_hidden, definition)
        for i, result in zip(group, scored):
            results[i] = result
    return results


def repeat_chunk(model: nn.Module, tokenizer, n: int, chunk_size: int | None, anchor: int = DEFAULT_ANCHOR) -> int:
    """The chunk size used for a context of ``n`` tokens: the whole context when its repeat fits in one chunk and
    in the model's positions, else ``chunk_size`` shrunk, if needed, so that the context plus one chunk's repeat
    (instruction, anchor, chunk) fits in ``max_position_embeddings``. Raises ValueError when nothing fits, or,
    for ``chunk_size=None`` (one forward over the whole repeat prompt), when that prompt does not fit.
    ``tokenizer`` is a tokenizer (the paper's template) or a :class:`RepeatTemplate`."""
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
    lead = template.longest_lead(anchor)
    size = min(chunk_size, max_positions - len(template.prefix) - n - lead)
    if size < 1:
        raise ValueError(
            f"a context of {n} tokens leaves no room for a repeat chunk: template prefix {len(template.prefix)} + "
            f"context {n} + instruction and anchor {lead} + 1 > {max_positions} positions "
            "(max_position_embeddings); use a shorter context"
        )
    return size


# ----------------------------------------------------------------------------------------------- internals
def _check_definition(definition: str) -> None:
    if definition not in DEFINITIONS:
        raise ValueError(f"definition must be one of {', '.join(DEFINITIONS)}; got {definition!r}")


def _row_groups(lengths: list[int], device) -> list[list[int]]:
    """The rows scored together. On CPU a batch buys little once a row has a few hundred tokens (every matmul
    already has that many rows) while padding costs, so rows go in order of length, in groups of at most
    ``CPU_BATCH_TOKENS`` padded tokens; elsewhere the whole batch at once."""
    if device.type != "cpu":
        return [list(range(len(lengths)))]
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if groups and (len(groups[-1]) + 1) * lengths[i] <= CPU_BATCH_TOKENS:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _score_rows(model, template, ids, sizes, normalize, chunk_size, anchor, return_hidden, definition):
    """:func:`score_contexts` on one group of rows scored together."""
    prefix = len(template.prefix)
    with torch.no_grad(), capture_attention_inputs(model) as captured:
        scoring = ScoringAttention(
            captured, describe(model).n_layers, (prefix, prefix + max(map(len, ids))), normalize, definition
        )
        with attention_override(model, scoring):
            if chunk_size is None:
                hidden = _run_unchunked(model, template, ids, scoring, return_hidden)
            else:
                hidden = _run_chunked(model, template, ids, scoring, chunk_size, sizes, anchor, return_hidden)
        scores = scoring.finish()  # [b, layers, kv_heads, width]
    results = []
    for row, context in enumerate(ids):
        n = len(context)
        row_hidden = None if hidden is None else hidden[row, prefix : prefix + n]
        results.append(OracleResult(scores[row, :, :, :n].contiguous(), row_hidden))
    return results


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


def _run_unchunked(model, template, ids, scoring: ScoringAttention, return_hidden):
    """One forward over the whole repeat prompts; the repeated copies (kvpress: the whole repeat) are scored."""
    device = model.device
    prompts = [repeat_prompt(template, c) for c in ids]
    tokens, real = _pad_rows([p.input_ids for p in prompts], 0, device)
    rows = []
    for prompt in prompts:
        scored = prompt.repeat_span
        if scoring.definition == "kvpress":  # the repeat chunk: instruction, suffix and copy
            scored = (prompt.context_span[1], prompt.repeat_span[1])
        sink = min(KVPRESS_SINK, prompt.context_span[0])
        rows.append(RowPlan(len(prompt.input_ids), 0, scored, prompt.context_span, sink))
    positions = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
    scoring.run(ForwardPlan(0, tuple(rows)), lambda: _forward(model, tokens, real, positions))
    return _stack_hidden(scoring.captured) if return_hidden else None


def _run_chunked(model, template, ids, scoring: ScoringAttention, chunk_size, sizes, anchor, return_hidden):
    """Prefill ``prefix + context`` once (in pieces of ``chunk_size``), then repeat each context chunk by chunk (row
    r in chunks of ``sizes[r]``) on that cache: step k feeds ``template.lead(k, anchor) + chunk_k`` and scores
    the copy of chunk_k (kvpress: the whole step)."""
    from transformers import DynamicCache

    device = model.device
    prefix = len(template.prefix)
    tokens, real = _pad_rows([list(template.prefix) + c for c in ids], 0, device)
    length = tokens.shape[1]
    positions = torch.arange(length, device=device).expand_as(tokens)
    cache = DynamicCache()
    hidden_parts = []
    lengths = [prefix + len(c) for c in ids]
    for s in range(0, length, chunk_size):
        e = min(length, s + chunk_size)
        rows = tuple(RowPlan(max(0, min(n, e) - s), min(n, s), (0, 0), (0, 0)) for n in lengths)  # nothing scored
        scoring.run(ForwardPlan(s, rows), lambda: _forward(model, tokens[:, s:e], real[:, :e], positions[:, s:e], cache))
        if return_hidden:
            hidden_parts.append(_stack_hidden(scoring.captured))
    chunks = [[c[i : i + size] for i in range(0, len(c), size)] for c, size in zip(ids, sizes)]
    context_end = torch.tensor(lengths, device=device)
    for k in range(max(len(c) for c in chunks)):
        rows, plans = [], []
        for row_chunks, size in zip(chunks, sizes):
            if k >= len(row_chunks):
                rows.append([])
                plans.append(RowPlan(0, 0, (0, 0), (0, 0)))
                continue
            lead = template.lead(k, row_chunks[k - 1][-anchor:] if k > 0 and anchor else [])
            rows.append(lead + row_chunks[k])
            cache_len = prefix + sum(map(len, row_chunks))
            if scoring.definition == "kvpress":  # this chunk's keys, scored by every query of its repeat
                start = prefix + k * size
                kept = (start, start + len(row_chunks[k]))
                plans.append(RowPlan(len(rows[-1]), cache_len, (0, len(rows[-1])), kept, min(KVPRESS_SINK, start)))
            else:
                plans.append(RowPlan(len(rows[-1]), cache_len, (len(lead), len(rows[-1])), (prefix, cache_len)))
        step, step_real = _pad_rows(rows, 0, device)
        step_positions = context_end[:, None] + torch.arange(step.shape[1], device=device)
        mask = torch.cat([real, step_real], dim=1)
        scoring.run(ForwardPlan(length, tuple(plans)), lambda: _forward(model, step, mask, step_positions, cache))
        cache.crop(-step.shape[1])
    return torch.cat(hidden_parts, dim=1) if return_hidden else None


def _stack_hidden(store: dict) -> torch.Tensor:
    """Captured attention inputs as ``[b, t, layers, hidden]``."""
    return torch.stack([store[i] for i in sorted(store)], dim=2).float()
