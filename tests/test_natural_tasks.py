"""Tasks for chat models: chat-template and plain prompts, exact spans, natural filler, RULER scoring and stop rules,
on a tiny ChatML tokenizer (``chat_tokenizer`` in conftest); the same on SmolLM2 under ``real_model``."""

import copy
import dataclasses

import pytest

from kvzap_lab import tasks
from kvzap_lab.tasks import natural

NATURAL = [t for t in tasks.TASKS]


@pytest.fixture(scope="module")
def plain_tokenizer(chat_tokenizer):
    bare = copy.deepcopy(chat_tokenizer)
    bare.chat_template = None
    return bare


@pytest.mark.parametrize("task", NATURAL)
def test_chat_prompts_have_exact_spans_and_the_template(task, chat_tokenizer):
    samples = tasks.make_samples(task, chat_tokenizer, 3, 200, seed=5, n_needles=3)
    assert [s.input_ids for s in samples] == [s.input_ids for s in tasks.make_samples(task, chat_tokenizer, 3, 200, seed=5, n_needles=3)]
    assert [s.input_ids for s in samples] != [s.input_ids for s in tasks.make_samples(task, chat_tokenizer, 3, 200, seed=6, n_needles=3)]
    for s in samples:
        start, end = s.context_span
        assert end - start == 200
        prompt = chat_tokenizer.decode(s.input_ids)
        # The template's own default system prompt, one bos, the generation prompt, then RULER's answer prefix.
        assert prompt.startswith("<|im_start|>system\nYou are a tiny test model.<|im_end|>\n<|im_start|>user\n")
        assert prompt.count("<|im_start|>") == 3 and s.input_ids[0] == chat_tokenizer.bos_token_id
        assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n" + s.meta.get("prefix", ""))
        # Decoding the span gives the context: what lies between the instruction and the question.
        context = chat_tokenizer.decode(s.context_ids)
        before, after = prompt.split(context)
        assert before.endswith(".") and after.startswith("\n" + s.question + "<|im_end|>")
        assert context.startswith("\n")
        # Pieces encode as the whole text does (byte-level BPE): the ids are the tokenizer's own.
        assert chat_tokenizer.encode(prompt, add_special_tokens=False) == s.input_ids
        assert s.stop_ids == (chat_tokenizer.eos_token_id,) and s.answer_ids[-1] == chat_tokenizer.eos_token_id


@pytest.mark.parametrize("task", ["single_needle", "multi_key_needle", "multi_value", "kv_retrieval", "variable_tracking"])
def test_needles_are_natural_sentences_in_natural_text(task, chat_tokenizer):
    for s in tasks.make_samples(task, chat_tokenizer, 4, 300, seed=1, n_needles=4):
        context = chat_tokenizer.decode(s.context_ids)
        spans = s.meta["needle_spans"]
        facts = [chat_tokenizer.decode(s.context_ids[a:b]).strip() for a, b in spans]
        assert all(fact in context for fact in facts)
        assert all(ref in context for ref in s.references) and s.references
        if task == "variable_tracking":
            value = s.question.split("value ")[1].split()[0]
            chain = s.meta["chain"]
            assert f"VAR {chain[0]} = {value}." in facts
            assert all(f"VAR {b} = VAR {a}." in facts for a, b in zip(chain, chain[1:]))
            for a, b in zip(chain, chain[1:]):  # defined before use
                assert context.index(f"VAR {a} =") < context.index(f"VAR {b} =")
            assert len(facts) == 8 and set(s.references) == set(chain)
        elif task == "kv_retrieval":  # a list of needles only, the asked key once
            key = s.meta["keys"][0]
            assert context.count(key) == 1 and s.question.count(key) == 1
            assert all(line.startswith("One of the special magic numbers for ") for line in context.strip().split("\n"))
        else:
            keys = s.meta["keys"]
            assert facts == [natural.NEEDLE.format(key=k, value=v) for k, v in zip(keys, s.meta["values"])]
            assert all(len(v) == natural.DIGITS for v in s.meta["values"])
            asked = [k for k in keys if k in s.question]
            assert len(set(asked)) == 1 and asked[0] in s.meta["prefix"]
            if task == "multi_key_needle":
                assert len(set(keys)) == 4
            if task == "multi_value":
                assert len(set(keys)) == 1 and s.references == tuple(s.meta["values"])
            # the filler around the needles is corpus prose
            filler = context
            for fact in facts:
                filler = filler.replace(fact, "")
            assert sum(sentence in filler for sentence in natural.filler_sentences()[:]) >= 1


def test_plain_text_fallback(plain_tokenizer, chat_tokenizer):
    """Without a chat template: instruction, context, question, then the answer prefix on its own line; bos only
    when the tokenizer adds it to text (this one does not). ``prompt_style='chat'`` needs a template."""
    s = tasks.make_samples("single_needle", plain_tokenizer, 1, 128, seed=0)[0]
    prompt = plain_tokenizer.decode(s.input_ids)
    assert prompt.startswith(natural.NEEDLE_INSTRUCTION + "\n")
    assert prompt.endswith("\n" + s.question + "\n" + s.meta["prefix"])
    assert "<|im_start|>" not in prompt
    start, end = s.context_span
    assert end - start == 128 and prompt.split(plain_tokenizer.decode(s.context_ids))[0] == natural.NEEDLE_INSTRUCTION
    forced = tasks.make_samples("single_needle", chat_tokenizer, 1, 128, seed=0, prompt_style="plain")[0]
    assert forced.input_ids == s.input_ids  # same draw, same plain prompt
    with pytest.raises(ValueError, match="has no chat template; set tokenizer.chat_template or use the plain-text prompt"):
        tasks.make_samples("single_needle", plain_tokenizer, 1, 128, prompt_style="chat")
    with pytest.raises(ValueError, match="unknown prompt style 'json'"):
        tasks.make_samples("single_needle", chat_tokenizer, 1, 128, prompt_style="json")


def test_plain_prompt_starts_with_bos_when_the_tokenizer_adds_it(plain_tokenizer):
    from tokenizers import processors

    with_bos = copy.deepcopy(plain_tokenizer)
    with_bos.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    s = tasks.make_samples("single_needle", with_bos, 1, 64, seed=0)[0]
    assert s.input_ids[0] == 1 and s.input_ids[1] != 1 and s.context_span[0] > 1


def _sample(scoring, references, tokenizer, budget=20):
    stop = (tokenizer.eos_token_id,)
    return tasks.Sample("t", [0], (0, 1), "q", "a", [5, stop[0]], scoring=scoring, references=references, stop_ids=stop, max_new_tokens=budget)


def test_ruler_scoring_containment_normalisation_and_partial_credit(chat_tokenizer):
    tok = chat_tokenizer
    ids = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    one = _sample("contains", ("8333777",), tok)
    assert tasks.score_answer(one, ids(' "8333777". It is a number.'), tok) == 1.0  # contained, with chatter
    assert tasks.score_answer(one, ids(" 833377"), tok) == 0.0
    words = _sample("contains", ("ABCDE", "Fghij"), tok)
    assert tasks.score_answer(words, ids(" abcde,\n\n FGHIJ"), tok) == 1.0  # case and whitespace normalised
    many = _sample("contains", ("1111111", "2222222", "3333333", "4444444"), tok, budget=60)
    assert tasks.score_answer(many, ids(" 2222222, 4444444 and 5555555."), tok) == 0.5  # fraction of the values found
    assert tasks.normalize("  A\tB\n\nc ") == "a b c"
    with pytest.raises(ValueError, match="pass the tokenizer"):
        tasks.score_answer(one, ids(" 8333777"), None)


def test_stop_rules_cut_the_output_before_scoring(chat_tokenizer):
    tok = chat_tokenizer
    ids = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    eos = tok.eos_token_id
    one = _sample("contains", ("8333777",), tok, budget=10)
    assert tasks.score_answer(one, ids(" 8333777") + [eos], tok) == 1.0
    assert tasks.score_answer(one, ids(" no") + [eos] + ids(" 8333777"), tok) == 0.0  # after the end of turn
    late = ids(" the number is") + ids(" 8333777")
    assert len(late) == 12 and tasks.score_answer(one, late, tok) == 0.0  # the last digits are beyond the budget
    assert tasks.score_answer(dataclasses.replace(one, max_new_tokens=12), late, tok) == 1.0
    # A real sample's budget fits its answer with room for the model's restating.
    s = tasks.make_samples("multi_value", tok, 1, 256, seed=0)[0]
    assert s.max_new_tokens == len(s.answer_ids) + natural.ANSWER_SLACK
    assert tasks.score_answer(s, s.answer_ids, tok) == 1.0 and not s.stops_early


def test_copy_is_scored_by_in_order_word_recall(chat_tokenizer):
    tok = chat_tokenizer
    s = tasks.make_samples("copy", tok, 1, 120, seed=0)[0]
    assert s.scoring == "recall" and s.references == (tok.decode(s.context_ids).strip(),)
    assert s.max_new_tokens >= 120
    assert tasks.score_answer(s, s.answer_ids, tok) == 1.0
    words = s.references[0].split()
    half = tok.encode(" ".join(words[: len(words) // 2]), add_special_tokens=False)
    assert tasks.score_answer(s, half, tok) == pytest.approx((len(words) // 2) / len(words), abs=0.02)
    shuffled = tok.encode(" ".join(reversed(words)), add_special_tokens=False)
    assert tasks.score_answer(s, shuffled, tok) < 0.2


def test_impossible_natural_parameters_are_rejected(chat_tokenizer):
    with pytest.raises(ValueError, match="facts need .* tokens but the context has only 64"):
        tasks.make_samples("multi_key_needle", chat_tokenizer, 1, 64, n_needles=8)
    with pytest.raises(ValueError, match="n_needles must be between 1 and"):
        tasks.make_samples("multi_value", chat_tokenizer, 1, 512, n_needles=0)


@pytest.mark.real_model
def test_smollm2_prompts_spans_and_ids(smollm2):
    """On SmolLM2's own tokenizer: the template's system prompt, one bos, ids equal to encoding the whole
    prompt, exact spans, eos <|im_end|> as the stop token."""
    _, tok = smollm2
    for task in tasks.TASKS:
        s = tasks.make_samples(task, tok, 1, 512, seed=0)[0]
        prompt = tok.decode(s.input_ids)
        assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
        assert s.input_ids.count(tok.bos_token_id) == 3 and s.input_ids[0] == 1
        assert tok.encode(prompt, add_special_tokens=False) == s.input_ids
        assert s.context_span[1] - s.context_span[0] == 512
        assert tok.decode(s.context_ids) in prompt and s.stop_ids == (2,)
