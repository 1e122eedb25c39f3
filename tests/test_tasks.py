"""The test bed's tasks: determinism under seed, exact spans and lengths, scoring, rejected parameters, and samples
pinned to what they were before the suite grew a path for chat models."""

import hashlib
import json

import pytest
from transformers import AutoTokenizer

from kvzap_lab import tasks
from kvzap_lab.model import TESTBED_PATH


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TESTBED_PATH)


@pytest.mark.parametrize("task", tasks.TASKS)
def test_samples_are_deterministic_and_exact(task, tokenizer):
    first = tasks.make_samples(task, tokenizer, 3, 256, seed=7)
    again = tasks.make_samples(task, tokenizer, 3, 256, seed=7)
    other = tasks.make_samples(task, tokenizer, 3, 256, seed=8)
    assert [s.input_ids for s in first] == [s.input_ids for s in again]
    assert [s.input_ids for s in first] != [s.input_ids for s in other]
    for sample in first:
        start, end = sample.context_span
        assert end - start == 256
        # The ids are what the tokenizer itself makes of the text: spans are real token offsets.
        full = sample.input_ids + sample.answer_ids
        assert tokenizer.encode(tokenizer.decode(full), add_special_tokens=False) == full
        prompt = tokenizer.decode(sample.input_ids)
        assert prompt.startswith("<|bos|><|user|>\n")
        assert prompt.endswith("<|end|>\n<|assistant|>\n" + (" " + sample.meta["prefix"] if "prefix" in sample.meta else ""))
        assert sample.question in prompt
        assert sample.answer_ids[-1] == tokenizer.convert_tokens_to_ids(tasks.END)


@pytest.mark.parametrize("task", ["single_needle", "multi_key_needle", "multi_value", "kv_retrieval"])
def test_answer_values_are_in_the_context(task, tokenizer):
    for sample in tasks.make_samples(task, tokenizer, 5, 300, seed=1):
        context = tokenizer.decode(sample.context_ids)
        values = [w for w in sample.answer.replace(",", " ").split() if w.isdigit()]
        assert values and all(v in context for v in values)
        # The prompt ends with the answer prefix restating the asked key, as RULER's prompts do.
        key = sample.meta["prefix"].removesuffix(" is").removesuffix(" maps to")
        assert key in context and key in sample.question
        assert tokenizer.decode(sample.input_ids).endswith("<|assistant|>\n " + sample.meta["prefix"])


def test_multi_key_needle_has_distinct_keys(tokenizer):
    sample = tasks.make_samples("multi_key_needle", tokenizer, 1, 512, seed=3, n_needles=6)[0]
    keys = sample.meta["keys"]
    assert len(set(keys)) == 6
    context = tokenizer.decode(sample.context_ids)
    assert context.count("special magic number") == 6


def test_variable_tracking_answer_follows_the_chain(tokenizer):
    sample = tasks.make_samples("variable_tracking", tokenizer, 1, 400, seed=2, n_needles=3)[0]
    context = tokenizer.decode(sample.context_ids)
    chain = sample.answer.split()
    assert sorted(chain) == sorted(sample.meta["chain"])
    value = sample.question.split()[-2]
    assert f"var {chain[0]} = {value} ." in context
    for name in chain:  # every answer variable is defined, and before its first use
        assert context.index(f"var {name} =") < len(context)


def test_copy_answer_is_the_context(tokenizer):
    sample = tasks.make_samples("copy", tokenizer, 1, 300, seed=0)[0]
    assert sample.answer_ids[:-1] == sample.context_ids
    assert sample.question == tasks.COPY_INSTRUCTION


def test_scoring(tokenizer):
    needle = tasks.make_samples("single_needle", tokenizer, 1, 128, seed=0)[0]
    assert tasks.score_answer(needle, needle.answer_ids) == 1.0
    assert tasks.score_answer(needle, needle.answer_ids + [5, 6]) == 1.0  # tokens after the end are ignored
    wrong = list(needle.answer_ids)
    wrong[-2] = wrong[-3]  # one digit changed
    assert tasks.score_answer(needle, wrong if wrong != needle.answer_ids else wrong[:-2]) == 0.0
    assert tasks.score_answer(needle, needle.answer_ids[:-1]) == 0.0  # missing end token
    copy = tasks.make_samples("copy", tokenizer, 1, 100, seed=0)[0]
    half = copy.answer_ids[:50] + [0] * 51
    assert tasks.score_answer(copy, half) == pytest.approx(50 / 101)


def test_impossible_parameters_are_rejected(tokenizer):
    with pytest.raises(ValueError, match="facts need .* tokens but the context has only 64"):
        tasks.make_samples("multi_key_needle", tokenizer, 1, 64, n_needles=20)
    with pytest.raises(ValueError, match="unknown task 'needle'; known tasks: single_needle"):
        tasks.make_samples("needle", tokenizer, 1, 256)
    with pytest.raises(ValueError, match="context_tokens must be at least 16"):
        tasks.make_samples("copy", tokenizer, 1, 8)
    with pytest.raises(ValueError, match="chains must be 1..8 long"):
        tasks.make_samples("variable_tracking", tokenizer, 1, 512, n_needles=9)


def test_the_suite_follows_the_tokenizer(tokenizer, chat_tokenizer):
    """The test bed's chat tokens pick the test bed's tasks (even though its tokenizer also has a chat template);
    any other tokenizer gets the natural ones."""
    assert tasks.is_testbed_tokenizer(tokenizer) and tokenizer.chat_template
    assert not tasks.is_testbed_tokenizer(chat_tokenizer)
    testbed = tasks.make_samples("single_needle", tokenizer, 1, 64, seed=0)[0]
    natural = tasks.make_samples("single_needle", chat_tokenizer, 1, 64, seed=0)[0]
    assert testbed.scoring == "exact" and testbed.stops_early and testbed.stop_ids == (tokenizer.convert_tokens_to_ids(tasks.END),)
    assert natural.scoring == "contains" and not natural.stops_early
    assert "special magic numbers for" in chat_tokenizer.decode(natural.context_ids)


# sha256 (16 hex digits) of the test-bed samples of each task, computed on main before the task suite grew a
# path for chat models: (4 samples of 256 tokens, seed 3), (2 samples of 1,000 tokens, seed 11, 2 needles).
TESTBED_SAMPLE_DIGESTS = {
    "single_needle": ("7d0d6b1b55eb93ae", "be0c8cf71f9a4de3"),
    "multi_key_needle": ("4e77d2b4fa69a271", "f6a3bb2df4a6b9cf"),
    "multi_value": ("4737c272a6e70be7", "cb5ea69092c9d551"),
    "kv_retrieval": ("c2f31667d3698cc5", "e9a6caa11727a996"),
    "variable_tracking": ("93d94da8f5544f14", "d6f917ed70df5dc7"),
    "copy": ("1f2d9cd51e8ab570", "a6a67a64cec9705d"),
}


def _digest(samples) -> str:
    digest = hashlib.sha256()
    for s in samples:
        fields = [s.task, s.input_ids, list(s.context_span), s.question, s.answer, s.answer_ids, s.meta]
        digest.update(json.dumps(fields, sort_keys=True).encode())
    return digest.hexdigest()[:16]


@pytest.mark.parametrize("task", tasks.TASKS)
def test_testbed_samples_are_unchanged(task, tokenizer):
    short = tasks.make_samples(task, tokenizer, 4, 256, seed=3)
    long = tasks.make_samples(task, tokenizer, 2, 1000, seed=11, n_needles=2)
    assert (_digest(short), _digest(long)) == TESTBED_SAMPLE_DIGESTS[task]
    for s in short + long:  # and so are their budgets and stop rules
        assert s.max_new_tokens == len(s.answer_ids) and s.stop_ids == (tokenizer.convert_tokens_to_ids(tasks.END),)
        assert s.scoring == ("token_accuracy" if task == "copy" else "exact")
