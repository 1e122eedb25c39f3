"""Tasks for any chat model: RULER-style needles and distractors as natural sentences in natural filler text.

The filler is prose from the ``filler`` split of a corpus (:mod:`kvzap_lab.corpus`; the default one is the
Python language reference): consecutive sentences from a random place, with the task's sentences inserted
between them at random depths. Contexts are exactly ``context_tokens`` tokens long (the last filler sentence is
cut, as RULER cuts its haystack) and start on a new line.

Tasks (RULER's names in brackets; keys are city names, values numbers of ``DIGITS`` digits):

- ``single_needle`` [niah_single_2]: "One of the special magic numbers for {city} is: {number}." in the filler.
- ``multi_key_needle`` [niah_multikey_1]: ``n_needles`` such needles with distinct cities; one is asked.
- ``multi_value`` [niah_multivalue]: ``n_needles`` needles with the same city; all numbers are asked.
- ``kv_retrieval`` [niah_multikey_3]: no filler: the context is a list of needles whose keys are UUID-like
  (8-4 hex digits); one is asked (the list is cut at the context length: the last line is a distractor).
- ``variable_tracking`` [vt]: "VAR ABCDE = 12345." then a chain "VAR FGHIJ = VAR ABCDE." of ``n_needles``
  variables, and a distractor chain of the same length holding another value; asked for every variable
  holding the value.
- ``copy``: the context is filler only; the model is asked to repeat it (KVzip's pretext task).

Each sample's ``meta`` holds its ``keys`` and ``values`` (or ``chain`` and ``distractor_chain``), the token
offsets of its needles inside the context (``needle_spans``) and the answer ``prefix``.

Scoring is RULER's (``"contains"``): the fraction of the expected strings (the number; every number of
multi_value; every variable of the chain) found in the normalised output, and for copy the fraction of the
context's words reproduced in order (``"recall"``). See :mod:`kvzap_lab.tasks.scoring`.
"""

from __future__ import annotations

import functools
import random
import re

from kvzap_lab.corpus import load_corpus
from kvzap_lab.tasks.prompts import Frame, build_prompt
from kvzap_lab.tasks.sample import PieceEncoder, Sample

DIGITS = 7  # RULER's needle values
VAR_DIGITS = 5  # RULER's variable-tracking values
CITIES = (
    "Amsterdam Athens Atlanta Auckland Baghdad Bangkok Barcelona Beijing Berlin Bogota Boston Brisbane Brussels "
    "Bucharest Budapest Cairo Calgary Chicago Copenhagen Dakar Dallas Delhi Denver Detroit Dublin Edinburgh Florence "
    "Geneva Glasgow Hamburg Hanoi Havana Helsinki Houston Istanbul Jakarta Jerusalem Kabul Karachi Kyoto Lagos Lima "
    "Lisbon Liverpool London Madrid Manchester Manila Marseille Melbourne Miami Milan Montreal Moscow Mumbai Munich "
    "Nairobi Naples Oslo Ottawa Paris Perth Prague Quebec Riga Rome Santiago Seattle Seoul Shanghai Singapore Sofia "
    "Stockholm Sydney Taipei Tokyo Toronto Valencia Venice Vienna Warsaw Zurich"
).split()

NEEDLE = "One of the special magic numbers for {key} is: {value}."
NEEDLE_INSTRUCTION = (
    "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards."
)
KV_INSTRUCTION = (
    "A list of special magic numbers follows, one per line, each for a different key. Make sure to memorize it. "
    "I will quiz you about the numbers afterwards."
)
# RULER's questions without its "mentioned in the provided text": on 8 paired single-needle samples of 1,024
# tokens SmolLM2-135M-Instruct answered 7 with it (once "**None**") and 8 without.
QUESTION = "What is the special magic number for {key}?"
PREFIX = "The special magic number for {key} is"
MULTI_QUESTION = "What are all the special magic numbers for {key}?"
MULTI_PREFIX = "The special magic numbers for {key} are"
VT_INSTRUCTION = "Memorize and track the chain(s) of variable assignment hidden in the following text."
COPY_INSTRUCTION = "Read the following text carefully."
COPY_QUESTION = "Repeat the text above exactly, word for word, from its first word to its last."
# Tokens of slack beyond the reference answer: what SmolLM2-135M-Instruct needed, measured (docs/results.md).
ANSWER_SLACK = 8


# A sentence ends at . ! or ? before a space and a capital letter, except after "e.g.", "i.e.", "etc.", "vs.", "cf.".
_SENTENCE_END = re.compile(r"(?<!\be\.g\.)(?<!\bi\.e\.)(?<!\betc\.)(?<!\bvs\.)(?<!\bcf\.)(?<=[.!?])\s+(?=[A-Z])")


@functools.lru_cache(maxsize=4)
def filler_sentences(corpus: str = "default") -> tuple[str, ...]:
    """The prose sentences of the corpus's ``filler`` split, in order.

    Paragraphs are kept when they read as prose: not indented (code, grammar), not a heading, ending with a
    full stop; their lines are joined and split into sentences (``_SENTENCE_END``).
    """
    sentences: list[str] = []
    for document in load_corpus(corpus).split("filler", kind="prose"):
        for paragraph in re.split(r"\n\s*\n", document.text):
            lines = paragraph.splitlines()
            if not lines or lines[0][:1].isspace() or not paragraph.rstrip().endswith("."):
                continue
            if len(lines) > 1 and set(lines[1].strip()) <= set("*=-"):  # a heading and its underline
                continue
            text = " ".join(line.strip() for line in lines)
            sentences += [s for s in _SENTENCE_END.split(text) if s]
    return tuple(sentences)


def haystack(
    encode: PieceEncoder, facts: list[str], context_tokens: int, rng: random.Random, pieces
) -> tuple[list[int], list[tuple[int, int]]]:
    """A context of exactly ``context_tokens`` token ids: ``pieces`` (an iterator of filler texts) with ``facts``
    inserted in order at random places between them, after the first piece and before the last (cut) one.
    Every piece and fact text starts with its separator (a space or a newline).

    Returns ``(ids, fact_spans)``, ``fact_spans[i]`` the token offsets of fact i. Raises ValueError when the
    facts leave no room for filler.
    """
    fact_ids = [encode(fact) for fact in facts]
    budget = context_tokens - sum(map(len, fact_ids))
    if budget < 1:
        raise ValueError(
            f"{len(facts)} facts need {context_tokens - budget} tokens but the context has only {context_tokens}; "
            "ask for fewer needles or a longer context"
        )
    filler: list[list[int]] = []
    used = 0
    while used < budget:
        filler.append(encode(next(pieces)))
        used += len(filler[-1])
    filler[-1] = filler[-1][: len(filler[-1]) - (used - budget)]  # cut the last piece: exact length
    gaps = sorted(rng.randint(1, max(1, len(filler) - 1)) for _ in facts)  # fact i goes before filler piece gaps[i]
    ids: list[int] = []
    spans: list[tuple[int, int]] = []
    k = 0
    for i, piece in enumerate(filler + [[]]):
        while k < len(facts) and gaps[k] == i:
            spans.append((len(ids), len(ids) + len(fact_ids[k])))
            ids += fact_ids[k]
            k += 1
        ids += piece
    assert len(ids) == context_tokens and k == len(facts)
    return ids, spans


def prose(rng: random.Random, corpus: str):
    """Consecutive filler sentences from a random place (wrapping around), the first on a new line."""
    sentences = filler_sentences(corpus)
    i = rng.randrange(len(sentences))
    yield "\n" + sentences[i]
    while True:
        i = (i + 1) % len(sentences)
        yield " " + sentences[i]


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def _uuid_key(rng: random.Random) -> str:
    return f"{rng.getrandbits(32):08x}-{rng.getrandbits(16):04x}"


def _variable(rng: random.Random) -> str:
    return "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))


def _listing(values: list[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return values[0] if len(values) == 1 else ", ".join(values[:-1]) + " and " + values[-1]


def draw(task: str, encode: PieceEncoder, fr: Frame, context_tokens: int, rng: random.Random, n_needles: int, corpus: str):
    """One instance: ``(input_ids, context_span, question, answer, references, scoring, meta)``."""
    if task in ("single_needle", "multi_key_needle", "multi_value"):
        count = 1 if task == "single_needle" else n_needles
        keys = [rng.choice(CITIES)] * count if task == "multi_value" else rng.sample(CITIES, count)
        values = [_number(rng, DIGITS) for _ in keys]
        facts = [" " + NEEDLE.format(key=k, value=v) for k, v in zip(keys, values)]
        context, spans = haystack(encode, facts, context_tokens, rng, prose(rng, corpus))
        if task == "multi_value":
            key, expected = keys[0], values
            question, prefix = MULTI_QUESTION.format(key=key), MULTI_PREFIX.format(key=key)
        else:
            asked = rng.randrange(count)
            key, expected = keys[asked], [values[asked]]
            question, prefix = QUESTION.format(key=key), PREFIX.format(key=key)
        instruction = NEEDLE_INSTRUCTION
        meta = {"keys": keys, "values": values, "needle_spans": spans}
    elif task == "kv_retrieval":
        key, value = _uuid_key(rng), _number(rng, DIGITS)

        def distractors():
            while True:
                other = _uuid_key(rng)
                if other != key:
                    yield "\n" + NEEDLE.format(key=other, value=_number(rng, DIGITS))

        asked = "\n" + NEEDLE.format(key=key, value=value)
        context, spans = haystack(encode, [asked], context_tokens, rng, distractors())
        instruction, expected = KV_INSTRUCTION, [value]
        question, prefix = QUESTION.format(key=key), PREFIX.format(key=key)
        meta = {"keys": [key], "values": [value], "needle_spans": spans}
    elif task == "variable_tracking":
        chain = []
        while len(chain) < 2 * n_needles:
            name = _variable(rng)
            if name not in chain:
                chain.append(name)
        chain, other = chain[:n_needles], chain[n_needles:]
        value, other_value = _number(rng, VAR_DIGITS), _number(rng, VAR_DIGITS)
        while other_value == value:
            other_value = _number(rng, VAR_DIGITS)
        facts = [" " + f for f in _interleave(rng, _chain_facts(chain, value), _chain_facts(other, other_value))]
        context, spans = haystack(encode, facts, context_tokens, rng, prose(rng, corpus))
        instruction, expected = VT_INSTRUCTION, chain
        question = f"Question: Find all variables that are assigned the value {value} in the text above."
        prefix = (
            f"Answer: According to the chain(s) of variable assignment in the text above, {n_needles} variables "
            f"are assigned the value {value}, they are:"
        )
        meta = {"chain": chain, "distractor_chain": other, "needle_spans": spans}
    elif task == "copy":
        context, _ = haystack(encode, [], context_tokens, rng, prose(rng, corpus))
        text = encode.tokenizer.decode(context).strip()
        input_ids, span = build_prompt(encode, fr, COPY_INSTRUCTION, context, COPY_QUESTION, "")
        return input_ids, span, COPY_QUESTION, text, (text,), "recall", {}
    else:
        raise ValueError(f"unknown task {task!r}")
    input_ids, span = build_prompt(encode, fr, instruction, context, question, prefix)
    answer = _listing(expected) + "."
    return input_ids, span, question, answer, tuple(expected), "contains", meta | {"prefix": prefix}


def _chain_facts(names: list[str], value: str) -> list[str]:
    return [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]


def _interleave(rng: random.Random, first: list[str], second: list[str]) -> list[str]:
    """A random merge of two lists that keeps each list's order (each chain stays defined before use)."""
    out, a, b = [], list(first), list(second)
    while a or b:
        source = a if b == [] or (a and rng.random() < len(a) / (len(a) + len(b))) else b
        out.append(source.pop(0))
    return out


def make_natural_samples(
    task: str, tokenizer, encode: PieceEncoder, fr: Frame, n: int, context_tokens: int, seed: int, n_needles: int,
    corpus: str = "default",
) -> list[Sample]:
    """``n`` samples of ``task`` for a chat (or plain-text) model; same arguments, same samples."""
    if task in ("multi_key_needle", "multi_value") and not 1 <= n_needles <= len(CITIES):
        raise ValueError(f"n_needles must be between 1 and {len(CITIES)}, got {n_needles}")
    if task == "variable_tracking" and not 1 <= n_needles <= 64:
        raise ValueError(f"variable_tracking chains must be 1..64 long, got {n_needles}")
    eos = tokenizer.eos_token_id
    stop = () if eos is None else (eos,)
    rng = random.Random(f"natural:{task}:{seed}:{context_tokens}:{n_needles}:{corpus}")
    samples = []
    for _ in range(n):
        input_ids, span, question, answer, references, scoring, meta = draw(
            task, encode, fr, context_tokens, rng, n_needles, corpus
        )
        answer_ids = encode(answer if scoring == "recall" else " " + answer) + list(stop)
        samples.append(
            Sample(
                task, input_ids, span, question, answer, answer_ids, meta, scoring=scoring, references=references,
                stop_ids=stop, max_new_tokens=len(answer_ids) + ANSWER_SLACK,
            )
        )
    return samples
