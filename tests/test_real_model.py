"""SmolLM2-135M-Instruct through ``load_model("smollm2-135m")``: the converted checkpoint against the GGUF it comes
from (shape, token ids, special tokens, chat template, logits), a greedy answer, and bad input on the real file.

Conversion atomicity, resume after kill -9 and the other bad inputs run the same code on tiny GGUFs in
test_gguf_models.py; here the real file is converted once per session (the ``smollm2`` fixture, conftest.py).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvzap_lab.engine import generate
from kvzap_lab.gguf_models import REGISTRY, file_sha256, registry_file
from kvzap_lab.model import ContextTooLongError, UnsupportedModelError, check_fits, describe, load_model

pytestmark = pytest.mark.real_model

SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def gguf_reference(smollm2):
    """``(model, tokenizer)`` loaded by transformers straight from the GGUF file (dequantised again)."""
    path = registry_file(REGISTRY["smollm2-135m"])
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_smollm2_loads_as_a_plain_float32_llama(smollm2, smollm2_cache):
    model, _ = smollm2
    spec = describe(model)
    assert (spec.model_type, spec.n_layers, spec.n_heads, spec.n_kv_heads, spec.head_dim) == ("llama", 30, 9, 3, 64)
    assert (spec.hidden_size, spec.max_positions, model.config.vocab_size) == (576, 8192, 49152)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert {p.dtype for p in model.parameters()} == {torch.float32} and not model.training
    assert getattr(model, "hf_quantizer", None) is None  # a plain checkpoint, not the GGUF quantizer
    key = smollm2_cache / "gguf" / REGISTRY["smollm2-135m"].sha256
    assert sorted(p.name for p in key.iterdir()) == ["checkpoint", "lock"]  # converted, no leftovers


def test_smollm2_registry_digest_is_the_installed_files():
    entry = REGISTRY["smollm2-135m"]
    assert file_sha256(registry_file(entry)) == entry.sha256


def test_smollm2_tokenizer_gives_the_gguf_ids(smollm2, gguf_reference):
    _, tokenizer = smollm2
    text = "Hello world, the number is 42."
    assert tokenizer.encode(text, add_special_tokens=False) == [19556, 905, 28, 260, 1230, 314, 216, 36, 34, 30]
    assert (tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.bos_token, tokenizer.bos_token_id) == ("<|im_end|>", 2, "<|im_start|>", 1)
    assert smollm2[0].config.eos_token_id == 2
    prose = "The special magic number for Rome is 65125. It was noted, with care, in the city's old archive."
    for special in (False, True):
        ids = tokenizer.encode(prose, add_special_tokens=special)
        assert ids == gguf_reference[1].encode(prose, add_special_tokens=special)
        assert 0 not in ids  # the trap: an unknown token between words


def test_smollm2_chat_template_survives_the_conversion(smollm2, gguf_reference):
    _, tokenizer = smollm2
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert prompt == gguf_reference[1].apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert prompt == SYSTEM + "<|im_start|>user\n" + QUESTION[0]["content"] + "<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert ids == gguf_reference[1].apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert ids[:2] == [1, 9690]  # one <|im_start|>, then "system": no doubled bos


def test_smollm2_logits_equal_the_gguf_models(smollm2, gguf_reference):
    model, tokenizer = smollm2
    ids = torch.tensor([tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, gguf_reference[0](ids).logits, rtol=0, atol=0)


def test_smollm2_answers_through_the_engine(smollm2):
    model, tokenizer = smollm2
    prompt = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    answer = tokenizer.decode(generate(model, [prompt], None, 12).tokens[0], skip_special_tokens=True)
    assert "Paris" in answer


def test_smollm2_window_is_checked(smollm2):
    spec = describe(smollm2[0])
    check_fits(spec, 8192, "a sample")
    with pytest.raises(ContextTooLongError, match="a sample needs 8193 tokens, more than the 8192-token window"):
        check_fits(spec, 8193, "a sample")


def test_truncated_copy_of_the_real_file_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("KVZAP_LAB_CACHE", str(tmp_path / "cache"))
    with open(registry_file(REGISTRY["smollm2-135m"]), "rb") as handle:
        (tmp_path / "smollm2.gguf").write_bytes(handle.read(1 << 20))  # cut inside the vocabulary
    with pytest.raises(UnsupportedModelError, match=r"cannot read .*smollm2.gguf as a GGUF file .* truncated or corrupt"):
        load_model(str(tmp_path / "smollm2.gguf"))
    assert not (tmp_path / "cache").exists()
