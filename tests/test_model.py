"""The model adapter on every supported architecture (random tiny configs) and on the bundled test bed."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from kvzap_lab.model import (
    SUPPORTED_ARCHITECTURES,
    TESTBED_PATH,
    ContextTooLongError,
    UnsupportedModelError,
    attention_modules,
    attention_override,
    capture_attention_inputs,
    check_fits,
    describe,
    fingerprint,
    load_model,
    output_projection_per_head,
    random_tiny_model,
)


@pytest.mark.parametrize("model_type", list(SUPPORTED_ARCHITECTURES))
def test_adapter_on_every_architecture(model_type):
    model = random_tiny_model(model_type, num_hidden_layers=2)
    spec = describe(model)
    assert (spec.n_layers, spec.n_heads, spec.n_kv_heads, spec.head_dim, spec.hidden_size) == (2, 4, 2, 16, 64)
    assert spec.group_size == 2
    assert len(attention_modules(model)) == 2
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
        calls = []

        def spy(module, query, key, value, mask, base, **kwargs):
            calls.append((module.layer_idx, tuple(query.shape), tuple(key.shape), tuple(value.shape)))
            return base(module, query, key, value, mask, **kwargs)

        with attention_override(model, spy), capture_attention_inputs(model) as hidden:
            hooked = model(ids).logits
        # The hidden state entering layer 0's attention is its input norm applied to the embeddings.
        first = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
    torch.testing.assert_close(hooked, reference, rtol=0, atol=0)
    assert sorted(c[0] for c in calls) == [0, 1]
    assert calls[0][1:] == ((2, 4, 24, 16), (2, 2, 24, 16), (2, 2, 24, 16))
    assert hidden[1].shape == (2, 24, 64)
    torch.testing.assert_close(hidden[0], first)
    # The override is removed on exit: the spy sees no further call.
    with torch.no_grad():
        model(ids)
    assert len(calls) == 2
    w_o = output_projection_per_head(attention_modules(model)[0], spec.n_heads, spec.head_dim)
    assert w_o.shape == (4, 64, 16)


def test_override_restored_after_exception():
    model = random_tiny_model("llama")
    before = model.config._attn_implementation

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with attention_override(model, broken):
            model(torch.tensor([[5, 6, 7]]))
    assert model.config._attn_implementation == before
    model(torch.tensor([[5, 6, 7]]))  # works again without the override


def test_unsupported_architecture_names_the_supported_list():
    config = AutoConfig.for_model("gpt2", n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError, match="gpt2.*supported model types: llama"):
        describe(model)


def test_unknown_path_gives_clear_error(tmp_path):
    with pytest.raises(UnsupportedModelError, match="no-such-model': it is none of 'testbed' .*, 'smollm2-135m' .*, a .gguf file, a checkpoint directory or a hub name"):
        load_model(str(tmp_path / "no-such-model"))


def test_check_fits_refuses_a_context_longer_than_the_window():
    spec = describe(random_tiny_model("llama", max_position_embeddings=64))
    check_fits(spec, 64, "a prompt")  # exactly the window fits
    with pytest.raises(ContextTooLongError, match="^a prompt needs 65 tokens, more than the 64-token window of this llama model; use at most 64 tokens"):
        check_fits(spec, 65, "a prompt")
    assert issubclass(ContextTooLongError, ValueError)  # a user error: CLIs end with exit 2


def test_saved_tiny_model_loads_through_adapter(tmp_path):
    model = random_tiny_model("qwen3", vocab_size=len(AutoTokenizer.from_pretrained(TESTBED_PATH)))
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(TESTBED_PATH).save_pretrained(tmp_path)
    loaded, tokenizer = load_model(str(tmp_path), device="cpu")
    assert describe(loaded).model_type == "qwen3"
    assert fingerprint(loaded) == fingerprint(model)
    assert tokenizer.pad_token_id is not None


def test_testbed_loads_with_plain_transformers():
    model = AutoModelForCausalLM.from_pretrained(TESTBED_PATH)
    tokenizer = AutoTokenizer.from_pretrained(TESTBED_PATH)
    assert model.config.model_type == "llama"
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    text = "any UTF-8: héllo wörld, 世界, emoji 🙂, tabs\tand\nnewlines"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<|bos|><|user|>\nhi<|end|>\n<|assistant|>\n"
    size = sum(p.stat().st_size for p in TESTBED_PATH.iterdir())
    assert size <= 20 * 2**20


def test_load_model_testbed_defaults():
    model, tokenizer = load_model("testbed", device="cpu")
    assert next(model.parameters()).dtype == torch.float32
    assert not model.training
    assert describe(model).n_kv_heads == 2
    assert tokenizer.eos_token == "<|end|>"
