"""Scoring a generated answer against its sample: one function for every caller (evaluate, the env, the study).

- ``exact`` (the test bed): 1.0 when the generated ids start with ``answer_ids`` (answer and end token), else 0.0.
- ``token_accuracy`` (the test bed's copy): the fraction of ``answer_ids`` reproduced at their position.
- ``contains`` (chat models, RULER's ``string_match_all``): the fraction of the expected strings contained in
  the normalised output (lower case, whitespace runs as one space). A multi-value sample with 3 of its 4
  numbers scores 0.75: RULER's metric, and a per-sample score in [0, 1] whose mean has at most the variance of
  a 0/1 score with the same mean, so Wilson intervals on it stay valid (conservative), see
  :mod:`kvzap_lab.stats`.
- ``recall`` (copy on chat models): the fraction of the reference's words (normalised) that the output
  reproduces in order (the matching blocks of :class:`difflib.SequenceMatcher`).

The output text is the decoded generation, up to its first stop token, within ``sample.max_new_tokens``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

from kvzap_lab.tasks.sample import Sample


def normalize(text: str) -> str:
    """RULER's normalisation: lower case, every whitespace run (newlines included) as one space, stripped."""
    return re.sub(r"\s+", " ", text).strip().lower()


def answer_text(sample: Sample, generated_ids: Sequence[int], tokenizer) -> str:
    """The generated answer as text: ids up to the first stop token, within the sample's budget, decoded
    without special tokens."""
    ids = list(generated_ids)[: sample.max_new_tokens]
    for k, token in enumerate(ids):
        if token in sample.stop_ids:
            ids = ids[:k]
            break
    return tokenizer.decode(ids, skip_special_tokens=True)


def score_text(sample: Sample, text: str) -> float:
    """Score an output text against a ``contains`` or ``recall`` sample (see the module docstring)."""
    if sample.scoring == "contains":
        output = normalize(text)
        return sum(normalize(ref) in output for ref in sample.references) / len(sample.references)
    if sample.scoring == "recall":
        reference = normalize(sample.references[0]).split()
        matcher = difflib.SequenceMatcher(None, reference, normalize(text).split(), autojunk=False)
        return sum(block.size for block in matcher.get_matching_blocks()) / max(len(reference), 1)
    raise ValueError(f"score_text scores 'contains' and 'recall' samples; this one is scored {sample.scoring!r}")


def score_answer(sample: Sample, generated_ids: Sequence[int], tokenizer=None) -> float:
    """The score in [0, 1] of ``generated_ids`` (the greedy continuation of ``sample.input_ids``).

    Args:
        sample: the task instance; ``sample.scoring`` picks the rule (module docstring).
        generated_ids: the generated token ids (tokens after a stop token or past the budget are ignored).
        tokenizer: decodes the output of ``contains``/``recall`` samples (chat models); unused by the test bed's.
    Raises:
        ValueError: a text-scored sample without a tokenizer.
    """
    if sample.scoring == "exact":
        reference = sample.answer_ids
        return float(list(generated_ids)[: len(reference)] == reference)
    if sample.scoring == "token_accuracy":
        reference = sample.answer_ids
        return sum(int(g == r) for g, r in zip(generated_ids, reference)) / len(reference)
    if tokenizer is None:
        raise ValueError(
            f"a {sample.task} sample is scored on the decoded text ({sample.scoring!r}): pass the tokenizer, "
            "score_answer(sample, ids, tokenizer)"
        )
    return score_text(sample, answer_text(sample, generated_ids, tokenizer))
