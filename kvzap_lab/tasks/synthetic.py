"""The test bed's tasks: seeded, RULER-like, in the test bed's own synthetic vocabulary, built at the token level.

Every task draws a context of ``context_tokens`` tokens (filler sentences with the task's facts scattered at
random depths), asks one question about it, and records where the context sits in the prompt, which is the
part eviction acts on. Prompts go through the tokenizer's chat template shape::

    <|bos|><|user|>\\n{context}\\n{question}<|end|>\\n<|assistant|>\\n      -> answer tokens, then <|end|>

and are assembled from separately encoded pieces, so spans are exact token offsets (the byte-level
pre-tokenizer never merges across the piece boundaries we use: each piece starts with a space or newline).

Tasks (``TASKS``):

- ``single_needle``: one "the special magic number for KEY is NNNN ." in the filler; asked for KEY.
- ``multi_key_needle``: several needles with distinct keys; one is asked.
- ``multi_value``: several needles with the same key; all values are asked, in order of appearance.
- ``kv_retrieval``: a context made only of "ADJ KEY maps to NNNN ." lines; one two-word key is asked.
- ``variable_tracking``: "var X = NNNNN ." then chains "var Y = X ."; asked which variables hold NNNNN.
- ``copy``: the KVzip pretext task: the context, an instruction to repeat it exactly, then the context.

As in RULER, the prompt ends with the start of the answer, restating the key (" apple is", " golden apple maps
to"), and the model generates the value; the prefix is part of ``input_ids`` (after the context span).

Scoring: exact match of the generated answer for every task but ``copy``, which is scored by token accuracy.
These are the tasks of any tokenizer that holds the test bed's chat tokens (``SPECIAL_TOKENS``); other
tokenizers get :mod:`kvzap_lab.tasks.natural`.
"""

from __future__ import annotations

import random

from kvzap_lab.tasks.sample import TASKS, PieceEncoder, Sample, encoder

USER, ASSISTANT, END, BOS, PAD = "<|user|>", "<|assistant|>", "<|end|>", "<|bos|>", "<|pad|>"
SPECIAL_TOKENS = [PAD, BOS, END, USER, ASSISTANT]
COPY_INSTRUCTION = "repeat the previous context exactly ."

COLORS = "red blue green black white yellow brown grey pink orange purple silver golden dark pale bright".split()
ANIMALS = "cat dog fox owl bear wolf horse mouse frog duck goat sheep crow deer lion tiger".split()
PLACES = "hill river forest garden village market harbor valley bridge tower castle meadow lake road farm field".split()
VERBS = "sees likes follows watches finds chases greets helps hears meets visits paints".split()
MOODS = "happy calm quiet tired hungry brave sleepy proud busy lazy gentle clever".split()
TIMES = "morning evening night noon winter summer spring autumn".split()
KEYS = (
    "apple anchor arrow basket beacon candle canyon carpet cedar chimney clover comet copper crystal "
    "desert diamond dragon eagle ember falcon feather fiddle glacier granite hammer harvest helmet "
    "island ivory jasmine jewel kettle ladder lantern lemon lizard magnet maple marble meteor mirror "
    "needle nectar oasis ocean olive orbit orchid oyster paddle parrot pebble pepper pillar planet "
    "pocket puzzle quartz rabbit radar raven ribbon rocket saddle salmon sapphire shadow shell "
    "spider spiral sponge summit thunder timber tulip turtle velvet violin walnut whistle willow "
    "window wizard yacht zebra"
).split()
VARIABLES = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda sigma omega rho tau phi".split()

FILLER_PATTERNS = (
    "the {color} {animal} {verb} the {animal2} .",
    "the {animal} is {mood} in the {time} .",
    "a {color} {place} lies near the {place2} .",
    "the {animal} walks to the {place} at {time} .",
    "the {mood} {animal} sleeps by the {color} {place} .",
    "in the {time} the {place} is {color} .",
)
# Words the tokenizer must know; the tokenizer trainer reads this corpus vocabulary.
VOCABULARY = sorted(set(COLORS + ANIMALS + PLACES + VERBS + MOODS + TIMES + KEYS + VARIABLES))


def filler_sentence(rng: random.Random) -> str:
    """One random low-information filler sentence."""
    pattern = rng.choice(FILLER_PATTERNS)
    return pattern.format(
        color=rng.choice(COLORS),
        animal=rng.choice(ANIMALS),
        animal2=rng.choice(ANIMALS),
        verb=rng.choice(VERBS),
        mood=rng.choice(MOODS),
        time=rng.choice(TIMES),
        place=rng.choice(PLACES),
        place2=rng.choice(PLACES),
    )


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10**digits))


def build_context(
    encode: PieceEncoder, facts: list[str], context_tokens: int, rng: random.Random, fill: bool = True
) -> tuple[list[int], list[int]]:
    """Token ids of a context of exactly ``context_tokens`` tokens holding ``facts`` in order, at random depths.

    Returns ``(ids, fact_starts)`` where ``fact_starts[i]`` is the token offset of fact i. Without ``fill`` the
    context is the facts alone, padded with filler at the end to the requested length.
    Raises ValueError when the facts don't fit.
    """
    fact_ids = [encode(" " + fact) for fact in facts]
    need = sum(len(f) for f in fact_ids)
    if need > context_tokens:
        raise ValueError(
            f"{len(facts)} facts need {need} tokens but the context has only {context_tokens}; "
            "ask for fewer needles or a longer context"
        )
    filler: list[list[int]] = []
    budget = context_tokens - need
    while budget > 0:
        sentence = encode(" " + filler_sentence(rng))
        if len(sentence) > budget:  # top up with single-word pieces to hit the length exactly
            sentence = encode(" " + rng.choice(ANIMALS))[:budget]
        filler.append(sentence)
        budget -= len(sentence)
    if fill:
        slots = sorted(rng.sample(range(len(filler) + len(facts)), len(facts)))
    else:
        slots = list(range(len(facts)))
    ids: list[int] = []
    starts: list[int] = []
    pieces = iter(filler)
    facts_iter = iter(fact_ids)
    for slot in range(len(filler) + len(facts)):
        if slot in slots:
            starts.append(len(ids))
            ids.extend(next(facts_iter))
        else:
            ids.extend(next(pieces))
    assert len(ids) == context_tokens
    return ids, starts


def chat_prompt(encode: PieceEncoder, context_ids: list[int], question: str) -> tuple[list[int], tuple[int, int]]:
    """``<|bos|><|user|>\\n{context}\\n{question}<|end|>\\n<|assistant|>\\n`` as ids, and the context span."""
    head = [encode.special(BOS), encode.special(USER)] + encode("\n")
    tail = encode("\n" + question) + [encode.special(END)] + encode("\n") + [encode.special(ASSISTANT)] + encode("\n")
    return head + context_ids + tail, (len(head), len(head) + len(context_ids))


def needle(key: str, value: str) -> str:
    """The needle sentence of the needle tasks."""
    return f"the special magic number for {key} is {value} ."


def draw_task(task: str, encode: PieceEncoder, context_tokens: int, rng: random.Random, n_needles: int):
    """Draw one instance: ``(context_ids, question, answer or None for copy, meta)``."""
    if task == "single_needle" or task == "multi_key_needle":
        count = 1 if task == "single_needle" else n_needles
        keys = rng.sample(KEYS, count)
        values = [_number(rng, 4) for _ in keys]
        context, _ = build_context(encode, [needle(k, v) for k, v in zip(keys, values)], context_tokens, rng)
        asked = rng.randrange(count)
        question = f"what special magic number does {keys[asked]} have ?"
        return context, question, values[asked], {"keys": keys, "prefix": f"{keys[asked]} is"}
    if task == "multi_value":
        key = rng.choice(KEYS)
        values = [_number(rng, 4) for _ in range(n_needles)]
        context, _ = build_context(encode, [needle(key, v) for v in values], context_tokens, rng)
        question = f"what special magic numbers does {key} have ?"
        return context, question, " , ".join(values), {"keys": [key], "prefix": f"{key} is"}
    if task == "kv_retrieval":
        # Facts alone, no filler: as many "ADJ KEY maps to NNNN ." lines as fit.
        line_tokens = max(len(encode(f" {adj} {key} maps to 1234 .")) for adj in COLORS for key in KEYS)  # longest line
        count = max(1, context_tokens // line_tokens)
        pairs = {}
        while len(pairs) < count:
            pairs[(rng.choice(COLORS), rng.choice(KEYS))] = _number(rng, 4)
        facts = [f"{a} {k} maps to {v} ." for (a, k), v in pairs.items()]
        context, _ = build_context(encode, facts, context_tokens, rng, fill=False)
        (adj, key), value = rng.choice(list(pairs.items()))
        meta = {"pairs": [(f"{a} {k}", v) for (a, k), v in pairs.items()], "prefix": f"{adj} {key} maps to"}
        return context, f"what does {adj} {key} map to ?", value, meta
    if task == "variable_tracking":
        names = rng.sample(VARIABLES, 2 * n_needles)
        chain, distractors = names[:n_needles], names[n_needles:]
        value, other = _number(rng, 5), _number(rng, 5)
        facts = [f"var {chain[0]} = {value} .", f"var {distractors[0]} = {other} ."]
        for prev, name in zip(chain, chain[1:]):
            facts.append(f"var {name} = {prev} .")
        for prev, name in zip(distractors, distractors[1:]):
            facts.append(f"var {name} = {prev} .")
        order = _definition_order(facts, rng)
        context, _ = build_context(encode, [facts[i] for i in order], context_tokens, rng)
        answer = " ".join(sorted(chain, key=lambda n: order.index(_fact_index(facts, n))))
        return context, f"which variables are equal to {value} ?", answer, {"chain": chain}
    if task == "copy":
        context, _ = build_context(encode, [], context_tokens, rng)
        return context, COPY_INSTRUCTION, None, {}
    raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")


def _fact_index(facts: list[str], name: str) -> int:
    return next(i for i, fact in enumerate(facts) if fact.startswith(f"var {name} "))


def _definition_order(facts: list[str], rng: random.Random) -> list[int]:
    """A random order of the variable facts in which every variable is defined before it is used."""
    defined: set[str] = set()
    pending = list(range(len(facts)))
    order = []
    while pending:
        ready = [i for i in pending if facts[i].split()[3] not in VARIABLES or facts[i].split()[3] in defined]
        pick = rng.choice(ready)
        order.append(pick)
        defined.add(facts[pick].split()[1])
        pending.remove(pick)
    return order


def encode_answer(encode: PieceEncoder, answer: str) -> list[int]:
    """Answer ids as the model should produce them: a leading space (so words are the same tokens as in the
    context), the answer, then the end-of-turn token."""
    return encode(" " + answer) + [encode.special(END)]


def make_synthetic_samples(task: str, tokenizer, n: int, context_tokens: int, seed: int, n_needles: int) -> list[Sample]:
    """``n`` samples of ``task`` with contexts of exactly ``context_tokens`` tokens; same seed, same samples.

    ``n_needles`` sets the needles of multi_key_needle / multi_value and the chain length of variable_tracking.
    Raises ValueError for parameters that cannot fit.
    """
    if task in ("multi_key_needle", "multi_value") and not 1 <= n_needles <= len(KEYS):
        raise ValueError(f"n_needles must be between 1 and {len(KEYS)}, got {n_needles}")
    if task == "variable_tracking" and not 1 <= n_needles <= len(VARIABLES) // 2:
        raise ValueError(f"variable_tracking chains must be 1..{len(VARIABLES) // 2} long, got {n_needles}")
    encode = encoder(tokenizer)
    end = encode.special(END)
    rng = random.Random(f"{task}:{seed}:{context_tokens}:{n_needles}")
    samples = []
    for _ in range(n):
        context, question, answer, meta = draw_task(task, encode, context_tokens, rng, n_needles)
        input_ids, span = chat_prompt(encode, context, question)
        if "prefix" in meta:
            input_ids = input_ids + encode(" " + meta["prefix"])
        if answer is None:  # copy: the answer is the context itself, scored by token accuracy
            answer_ids = list(context) + [end]
            answer, scoring = tokenizer.decode(context), "token_accuracy"
        else:
            answer_ids, scoring = encode_answer(encode, answer), "exact"
        samples.append(Sample(task, input_ids, span, question, answer, answer_ids, meta, scoring=scoring, stop_ids=(end,)))
    return samples
