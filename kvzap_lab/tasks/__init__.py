"""Seeded long-context tasks for any tokenizer: the test bed's own, or RULER-style ones for any chat model.

    from kvzap_lab import tasks
    samples = tasks.make_samples("single_needle", tokenizer, n=20, context_tokens=1024, seed=0)
    out = generate(model, [s.input_ids for s in samples], None, max(s.max_new_tokens for s in samples),
                   eos_token_id=samples[0].stop_ids)
    scores = [tasks.score_answer(s, ids, tokenizer) for s, ids in zip(samples, out.tokens)]

Which suite a tokenizer gets:

- a tokenizer holding the test bed's chat tokens (``<|bos|>``, ``<|user|>``, ...) gets the test bed's tasks
  (:mod:`kvzap_lab.tasks.synthetic`: synthetic vocabulary, exact-match scoring);
- any other gets :mod:`kvzap_lab.tasks.natural`: needles and distractors as sentences in natural prose,
  prompts through its own chat template (or plain text when it has none, :mod:`kvzap_lab.tasks.prompts`),
  RULER's scoring (:mod:`kvzap_lab.tasks.scoring`).

Both record for every :class:`Sample` the exact token span of its context, and what generation and scoring
need: ``stop_ids``, ``max_new_tokens``, ``scoring``.
"""

from __future__ import annotations

from kvzap_lab.tasks.natural import make_natural_samples
from kvzap_lab.tasks.prompts import PROMPT_STYLES, frame
from kvzap_lab.tasks.sample import SCORINGS, TASKS, PieceEncoder, Sample, encoder
from kvzap_lab.tasks.scoring import normalize, score_answer, score_text
from kvzap_lab.tasks.synthetic import (
    ASSISTANT,
    BOS,
    COLORS,
    COPY_INSTRUCTION,
    END,
    KEYS,
    PAD,
    SPECIAL_TOKENS,
    USER,
    VARIABLES,
    VOCABULARY,
    build_context,
    chat_prompt,
    draw_task,
    encode_answer,
    filler_sentence,
    make_synthetic_samples,
    needle,
)

__all__ = [
    "ASSISTANT", "BOS", "COLORS", "COPY_INSTRUCTION", "END", "KEYS", "PAD", "PROMPT_STYLES", "SCORINGS", "SPECIAL_TOKENS",
    "TASKS", "USER", "VARIABLES", "VOCABULARY", "PieceEncoder", "Sample", "build_context", "chat_prompt",
    "draw_task", "encode_answer", "filler_sentence", "is_testbed_tokenizer", "make_samples", "needle", "normalize",
    "score_answer", "score_text",
]


def is_testbed_tokenizer(tokenizer) -> bool:
    """Whether ``tokenizer`` holds every chat token of the test bed (then it gets the test bed's tasks)."""
    vocab = tokenizer.get_vocab()
    return all(token in vocab for token in SPECIAL_TOKENS)


def make_samples(
    task: str,
    tokenizer,
    n: int,
    context_tokens: int,
    seed: int = 0,
    n_needles: int = 4,
    *,
    prompt_style: str = "auto",
    corpus: str = "default",
) -> list[Sample]:
    """``n`` samples of ``task`` whose contexts are exactly ``context_tokens`` tokens; same arguments, same samples.

    Args:
        task: one of :data:`TASKS`.
        tokenizer: a HF tokenizer; the test bed's gets the test bed's tasks, any other the natural ones.
        n: number of samples.
        context_tokens: tokens of every context (>= 16).
        seed: the sample seed.
        n_needles: needles of multi_key_needle / multi_value, chain length of variable_tracking.
        prompt_style: natural tasks only: ``"auto"`` (the chat template when there is one, else plain text),
            ``"chat"`` (the template, required) or ``"plain"``.
        corpus: natural tasks only: the corpus whose ``filler`` split fills the contexts.
    Returns:
        the samples, each with its context span, references, stop ids and generation budget.
    Raises:
        ValueError: an unknown task, parameters that cannot fit, or ``prompt_style="chat"`` with a tokenizer
            that has no chat template.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if context_tokens < 16:
        raise ValueError(f"context_tokens must be at least 16, got {context_tokens}")
    if is_testbed_tokenizer(tokenizer):
        samples = make_synthetic_samples(task, tokenizer, n, context_tokens, seed, n_needles)
    else:
        fr = frame(tokenizer, prompt_style)
        samples = make_natural_samples(task, tokenizer, encoder(tokenizer), fr, n, context_tokens, seed, n_needles, corpus)
    return samples

