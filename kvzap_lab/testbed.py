"""The bundled test-bed model: its tokenizer, its training recipe and its evaluation.

    python -m kvzap_lab.testbed train --out DIR [--steps N] [--device cuda]     # seeded, resumable
    python -m kvzap_lab.testbed eval --json                                      # full-cache accuracy

The bundled checkpoint is these defaults (stage 1, 48 min on 2 CPU cores) then a fine-tune on contexts up to
1,024 tokens (stage 2, 17 min; copy samples need twice their context), both recorded in its ``training.json``:

    python -m kvzap_lab.testbed train --out stage1
    python -m kvzap_lab.testbed train --init-from stage1 --out stage2 --steps 1000 --lr 1e-3 --max-context 1024

The model is a small Llama (GQA: 4 query heads, 2 KV heads; RoPE) with a byte-level BPE tokenizer trained on
our own synthetic corpus, so it encodes any UTF-8 text; every task word is one token and a number's first digit
carries its leading space. It is trained from scratch, seeded: first mostly pure induction (random tokens, then
a continuation from a random anchor in them: induction heads form there) with dense associative recall, then
the task suite of :mod:`kvzap_lab.tasks` in a multi-turn form (many questions about one context, loss on answer
tokens only), the copy task (loss on the repeated context) and small-alphabet induction (matches several tokens
long), with a fixed length curriculum (256 -> ``max_context`` tokens). The result is a standard HF checkpoint
directory (config, safetensors, tokenizer.json, chat template) loadable by ``AutoModelForCausalLM``/``AutoTokenizer``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm import tqdm

from kvzap_lab import cli, io, tasks
from kvzap_lab.faults import kill_point
from kvzap_lab.model import TESTBED_PATH
from kvzap_lab.padding import pad_rows

CHAT_TEMPLATE = (
    "{{ '<|bos|>' }}{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + "
    "'<|end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
# Context lengths and the fraction of training after which each is unlocked (fixed, so batches are a pure
# function of (seed, step): resumable and producible in worker processes).
CURRICULUM = {256: 0.0, 512: 0.15, 1024: 0.35, 2048: 0.6}


@dataclass
class TrainConfig:
    """Everything that decides the trained weights (saved next to the checkpoint)."""

    seed: int = 0
    steps: int = 2600
    tokens_per_step: int = 4096
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 256
    vocab_size: int = 1024
    tokenizer_lines: int = 20000
    max_positions: int = 4096
    max_context: int = 512
    init_from: str = ""

    def __post_init__(self):
        positive = ("steps", "tokens_per_step", "hidden_size", "layers", "heads", "kv_heads", "intermediate_size",
                    "vocab_size", "tokenizer_lines", "max_positions", "max_context")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0; got {self.warmup}")
        for name in ("lr", "weight_decay"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0 or (name == "lr" and value == 0):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number {'> 0' if name == 'lr' else '>= 0'}; got {value}")
        if self.heads % self.kv_heads:
            raise ValueError(f"--heads ({self.heads}) must be a multiple of --kv-heads ({self.kv_heads})")


# ----------------------------------------------------------------------------------------------- tokenizer
def _corpus_lines(rng: random.Random, n: int):
    """Synthetic text covering every word, digit and template of the task suite."""
    for _ in range(n):
        key, adj = rng.choice(tasks.KEYS), rng.choice(tasks.COLORS)
        var, var2 = rng.sample(tasks.VARIABLES, 2)
        yield " ".join(
            [
                tasks.filler_sentence(rng),
                f"the special magic number for {key} is {rng.randrange(1000, 10000)} .",
                f"{adj} {key} maps to {rng.randrange(1000, 10000)} .",
                f"var {var} = {rng.randrange(10000, 100000)} . var {var2} = {var} .",
                f"\nwhat is the special magic number for {key} ?\nwhat are all the special magic numbers for {key} ?",
                f"\nwhat does {adj} {key} map to ?\nwhich variables are equal to {rng.randrange(10000, 100000)} ?",
                "\n" + tasks.COPY_INSTRUCTION,
            ]
        )


def train_tokenizer(vocab_size: int = 1024, seed: int = 0, lines: int = 20000):
    """A byte-level BPE tokenizer with the chat tokens and template, trained on ``lines`` lines of synthetic
    task text. Digits are split one by one, the first keeping its leading space (" 1234" -> " 1" "2" "3" "4"),
    so a value starts right after the word before it, as a key does: one token less for induction to bridge."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r" ?[0-9]"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=tasks.SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_corpus_lines(random.Random(seed), lines), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=tasks.BOS,
        eos_token=tasks.END,
        pad_token=tasks.PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )


def split_task_words(tokenizer) -> list[str]:
    """Task words (:data:`kvzap_lab.tasks.VOCABULARY`, after a space) that ``tokenizer`` does not encode as one
    token: empty for a tokenizer fit for the test bed."""
    return [w for w in tasks.VOCABULARY if len(tokenizer.encode(" " + w, add_special_tokens=False)) != 1]


# ----------------------------------------------------------------------------------------------- data
def _turn(encode, question: str, answer: str, prefix: str | None) -> tuple[list[int], list[int]]:
    """A further user question and assistant answer (after the answer prefix, if any): (ids, loss mask)."""
    end = encode.special(tasks.END)
    prompt = [encode.special(tasks.USER)] + encode("\n" + question) + [end] + encode("\n")
    prompt += [encode.special(tasks.ASSISTANT)] + encode("\n") + (encode(" " + prefix) if prefix else [])
    answer_ids = tasks.encode_answer(encode, answer)
    return prompt + answer_ids + encode("\n"), [0] * len(prompt) + [1] * len(answer_ids) + [0]


def training_sequence(encode, kind: str, context_tokens: int, rng: random.Random) -> tuple[list[int], list[int]]:
    """One training sequence of a given kind and its loss mask (1 on answer tokens)."""
    end = encode.special(tasks.END)
    if kind in ("induction", "ngram_induction"):
        # Random tokens, then a continuation from a random anchor in them: pure induction. "induction" draws
        # distinct tokens (one-token matches are unique: the easy case, where induction heads form);
        # "ngram_induction" draws from an alphabet as small as the ten digits, so one-token matches are
        # ambiguous and the model must match several tokens back, as it must to find "KEY is" among many
        # needles and to continue a number without jumping to another one.
        special = {encode.special(token) for token in tasks.SPECIAL_TOKENS}
        vocabulary = [i for i in range(len(encode.tokenizer)) if i not in special]
        n = min(context_tokens // 2, 32)  # short: induction heads form within ~500 steps of 4k tokens
        if kind == "induction" and n <= len(vocabulary):
            context = rng.sample(vocabulary, n)
        else:
            alphabet = rng.sample(vocabulary, rng.choice([10, 16, 64])) if kind == "ngram_induction" else vocabulary
            context = [rng.choice(alphabet) for _ in range(n)]
        anchor = rng.randrange(n // 2)
        continuation = context[anchor : anchor + n // 2]
        # the first two continuation tokens may be ambiguous (the anchor token can occur twice); loss after them
        return [encode.special(tasks.BOS)] + context + continuation, [0] * (1 + n + 2) + [1] * (len(continuation) - 2)
    if kind == "copy":
        context, _ = tasks.build_context(encode, [], context_tokens // 2, rng)
        prompt, _ = tasks.chat_prompt(encode, context, tasks.COPY_INSTRUCTION)
        return prompt + context + [end], [0] * len(prompt) + [1] * (len(context) + 1)
    if kind == "kv":
        context, _, _, meta = tasks.draw_task("kv_retrieval", encode, context_tokens, rng, 1)
        questions = [(f"what does {key} map to ?", value, f"{key} maps to") for key, value in meta["pairs"]]
        rng.shuffle(questions)
        questions = questions[:8]
    elif kind == "vars":
        context, question, answer, _ = tasks.draw_task("variable_tracking", encode, context_tokens, rng, rng.randint(2, 4))
        questions = [(question, answer, None)]
    elif kind == "multi_value":
        context, question, answer, meta = tasks.draw_task("multi_value", encode, context_tokens, rng, rng.randint(2, 4))
        questions = [(question, answer, meta["prefix"])]
    else:  # recall: needles with distinct keys, several asked; dense_recall packs them with no filler between
        dense = kind == "dense_recall"
        needle_tokens = max(len(encode(" " + tasks.needle(key, "1234"))) for key in tasks.KEYS)  # longest needle
        count = rng.randint(4, max(4, min(48, context_tokens // needle_tokens))) if dense else rng.randint(1, 16)
        keys = rng.sample(tasks.KEYS, count)
        values = [str(rng.randrange(1000, 10000)) for _ in keys]
        facts = [tasks.needle(k, v) for k, v in zip(keys, values)]
        context, _ = tasks.build_context(encode, facts, context_tokens, rng, fill=not dense)
        asked = [rng.randrange(count) for _ in range(rng.randint(4, 12) if dense else rng.randint(2, 8))]
        questions = [(f"what special magic number does {keys[i]} have ?", values[i], f"{keys[i]} is") for i in asked]
    first_q, first_a, first_prefix = questions[0]
    prompt, _ = tasks.chat_prompt(encode, context, first_q)
    prompt += encode(" " + first_prefix) if first_prefix else []
    answer_ids = tasks.encode_answer(encode, first_a)
    ids = prompt + answer_ids + encode("\n")
    mask = [0] * len(prompt) + [1] * len(answer_ids) + [0]
    for question, answer, prefix in questions[1:]:
        more_ids, more_mask = _turn(encode, question, answer, prefix)
        ids, mask = ids + more_ids, mask + more_mask
    return ids, mask


KINDS = ("induction", "ngram_induction", "dense_recall", "recall", "kv", "multi_value", "vars", "copy")
# Mix of sequence kinds: first mostly pure induction (induction heads form there, after a plateau of a few
# million tokens) with dense associative recall, then the full task mix. Fixed by step fraction, like the
# length curriculum.
WARMUP_MIX = {"induction": 0.5, "dense_recall": 0.3, "copy": 0.2}
TASK_MIX = {
    "induction": 0.05, "ngram_induction": 0.1, "dense_recall": 0.2, "recall": 0.25, "kv": 0.1, "multi_value": 0.1,
    "vars": 0.05, "copy": 0.15,
}  # fmt: skip
INDUCTION_FRACTION = 0.2  # pure induction first: mixed with the tasks from the start, induction heads never formed
WARMUP_FRACTION = 0.35


class BatchSource(torch.utils.data.Dataset):
    """Batch ``step`` of the run, a pure function of (config, step): safe to resume and to produce in
    DataLoader workers. Half the batches use the longest unlocked context length."""

    def __init__(self, tokenizer, config: TrainConfig):
        self.encode = tasks.PieceEncoder(tokenizer)
        self.config = config
        self.pad = tokenizer.pad_token_id

    def __len__(self):
        return self.config.steps

    def __getitem__(self, step: int):
        rng = random.Random(f"train:{self.config.seed}:{step}")
        unlocked = [n for n, at in CURRICULUM.items() if step >= at * self.config.steps and n <= self.config.max_context]
        length = unlocked[-1] if rng.random() < 0.5 else rng.choice(unlocked)
        if self.config.init_from:  # fine-tuning a trained test bed: its induction heads exist already
            mix = TASK_MIX
        elif step < INDUCTION_FRACTION * self.config.steps:
            mix = {"induction": 1.0}
        else:
            mix = WARMUP_MIX if step < WARMUP_FRACTION * self.config.steps else TASK_MIX
        seqs, masks, kinds = [], [], []
        budget = self.config.tokens_per_step
        while budget > 0:
            kind = rng.choices(list(mix), weights=list(mix.values()))[0]
            ids, mask = training_sequence(self.encode, kind, length, rng)
            seqs.append(ids)
            masks.append(mask)
            kinds.append(kind)
            budget -= len(ids)
        input_ids, _ = pad_rows(seqs, self.pad)
        labels, _ = pad_rows([[t if m == 1 else -100 for t, m in zip(ids, mask)] for ids, mask in zip(seqs, masks)], -100)
        kind_ids = torch.tensor([KINDS.index(k) for k in kinds])
        return input_ids, labels, kind_ids, length


# ----------------------------------------------------------------------------------------------- training
def build_model(config: TrainConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    model_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.kv_heads,
        max_position_embeddings=config.max_positions,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(config.seed)
    return LlamaForCausalLM(model_config)


def _save_checkpoint(model, tokenizer, out: Path, meta: dict) -> None:
    """Write the HF checkpoint directory atomically (see :func:`kvzap_lab.io.atomic_directory`)."""
    with io.atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "training.json").write_text(json.dumps(meta, indent=2))


def train(config: TrainConfig, out: Path, device: str, workers: int, every: int, time_budget: float | None) -> dict:
    """Train (or resume) the test bed into ``out``; returns a summary dict."""
    out = Path(out)
    io.check_writable(out.parent)  # before any work: a read-only --out fails now, not at the first checkpoint
    state_path = out.parent / (out.name + ".train_state.pt")
    if config.init_from or state_path.exists():  # fine-tuning or resuming: keep the tokenizer already made
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(config.init_from or out)
    else:
        tokenizer = train_tokenizer(config.vocab_size, config.seed, config.tokenizer_lines)
        split = split_task_words(tokenizer)
        if split:  # one token per word: keys split in pieces would share tokens and make retrieval ambiguous
            raise ValueError(
                f"--vocab-size {config.vocab_size} leaves {len(split)} task words in several tokens "
                f"({', '.join(split[:5])}, ...); raise it or --tokenizer-lines"
            )
    model = build_model(config, tokenizer)
    history = []
    if config.init_from:  # fine-tune: start from an earlier checkpoint's weights (same architecture)
        from safetensors.torch import load_file

        source = Path(config.init_from)
        model.load_state_dict(load_file(source / "model.safetensors"), strict=False)
        earlier = source / "training.json"
        history = json.loads(earlier.read_text()).get("history", []) + [json.loads(earlier.read_text())] if earlier.exists() else []
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95))
    start = 0
    if state_path.exists():
        state = torch.load(state_path, map_location=device, weights_only=True)
        if state["config"] != asdict(config):
            raise ValueError(f"{state_path} was written with another config; remove it or pass the same flags")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
        print(f"resuming from step {start} ({state_path})", file=sys.stderr)

    source = BatchSource(tokenizer, config)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(source, range(start, config.steps)),
        batch_size=None,
        num_workers=workers,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
    )
    use_bf16 = device.startswith("cuda")
    model.train()
    began = time.time()
    accuracy = {}
    progress = tqdm(total=config.steps, initial=start, desc="test-bed training", mininterval=5)
    step = start
    for input_ids, labels, kind_ids, length in loader:
        lr_scale = min(1.0, (step + 1) / config.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / config.steps)))
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_scale
        input_ids, labels = input_ids.to(device), labels.to(device)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(input_ids=input_ids).logits
        # HF shifts labels inside the loss; we do it explicitly here: position t predicts token t+1.
        shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
        token_loss = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=-100, reduction="none")
        # Mean per sequence, then over sequences: a copy sequence (hundreds of loss tokens) weighs as much as a
        # retrieval sequence (a few answer tokens).
        counts = (shift_labels != -100).sum(dim=1).clamp(min=1)
        loss = (token_loss.sum(dim=1) / counts).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        progress.update(1)
        with torch.no_grad():
            hit = (shift_logits.argmax(-1) == shift_labels) & (shift_labels != -100)
            per_row = (hit.sum(1) / counts).float().cpu()  # token accuracy on the loss tokens of each row
        for index, kind in enumerate(KINDS):
            rows = kind_ids == index
            if rows.any():
                accuracy[kind] = 0.9 * accuracy.get(kind, per_row[rows].mean().item()) + 0.1 * per_row[rows].mean().item()
        progress.set_postfix(loss=f"{loss.item():.3f}", L=int(length), **{k[:6]: f"{v:.2f}" for k, v in accuracy.items()})
        out_of_time = time_budget is not None and time.time() - began > time_budget
        if step % every == 0 or step == config.steps or out_of_time:
            meta = {"config": asdict(config), "step": step, "seconds": time.time() - began, "batch_token_accuracy": accuracy}
            meta["history"] = [{k: v for k, v in h.items() if k != "history"} for h in history]
            _save_checkpoint(model, tokenizer, out, meta)  # first: a saved state always has its checkpoint
            state = {"config": asdict(config), "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}
            io.atomic_write(state_path, lambda tmp: torch.save(state, tmp))
            kill_point("testbed.checkpoint")
        if out_of_time:
            break
    progress.close()
    return {"step": step, "seconds": time.time() - began, "batch_token_accuracy": accuracy}


# ----------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def teacher_forced_scores(model, samples, batch_size: int = 16) -> list[float]:
    """Greedy-decoding scores of each sample, computed in one teacher-forced forward per batch.

    Greedy decoding reproduces the reference exactly iff the argmax is right at every answer position, so the
    argmaxes at the answer positions are the greedy answer, scored by :func:`kvzap_lab.tasks.score_answer`.
    """
    device = next(model.parameters()).device
    scores = []
    for begin in range(0, len(samples), batch_size):
        batch = samples[begin : begin + batch_size]
        input_ids, _ = pad_rows([s.input_ids + s.answer_ids for s in batch], 0, device=device)
        logits = model(input_ids=input_ids).logits
        for row, sample in enumerate(batch):
            start = len(sample.input_ids)
            predicted = logits[row, start - 1 : start - 1 + len(sample.answer_ids)].argmax(-1).tolist()
            scores.append(tasks.score_answer(sample, predicted))
    return scores


def evaluate(model, tokenizer, context_tokens: int, n: int, seed: int, task_names=tasks.TASKS) -> dict:
    """Full-cache accuracy per task on ``n`` held-out samples (seeds disjoint from training's)."""
    result = {}
    for task in tqdm(task_names, desc=f"eval @ {context_tokens} tokens"):
        samples = tasks.make_samples(task, tokenizer, n, context_tokens, seed=10_000 + seed)
        scores = teacher_forced_scores(model, samples)
        result[task] = sum(scores) / len(scores)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvzap_lab.testbed", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train (or resume) the test-bed model")
    p_train.add_argument("--out", type=Path, help=f"checkpoint directory (required; {TESTBED_PATH} is the bundled one)")
    p_train.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p_train.add_argument("--workers", type=cli.non_negative_int, default=0, help="DataLoader worker processes producing batches")
    p_train.add_argument("--every", type=cli.positive_int, default=200, help="checkpoint every N steps")
    p_train.add_argument("--time-budget", type=float, default=None, help="stop (after a checkpoint) after this many seconds")
    for name, field_ in TrainConfig.__dataclass_fields__.items():
        p_train.add_argument("--" + name.replace("_", "-"), type=type(field_.default), default=field_.default)
    p_eval = sub.add_parser("eval", help="full-cache accuracy per task on held-out samples")
    p_eval.add_argument("--model", default="testbed")
    p_eval.add_argument("--context-tokens", type=cli.positive_int, default=1024)
    p_eval.add_argument("--n-samples", type=cli.positive_int, default=200, help="samples per task")
    p_eval.add_argument("--n", type=cli.positive_int, dest="n_samples", action=cli.DeprecatedAlias, new="--n-samples", help=argparse.SUPPRESS)
    p_eval.add_argument("--seed", type=int, default=0)
    p_eval.add_argument("--tasks", nargs="+", action=cli.ListOption, allowed=tasks.TASKS, default=list(tasks.TASKS))
    p_eval.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p_eval.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16")
    p_eval.add_argument("--json", action="store_true", help="print the summary as one JSON line at the end")
    args = parser.parse_args(argv)
    if args.command == "train":
        if args.out is None:
            parser.error(f"--out is required (a checkpoint directory); the bundled checkpoint is replaced only when "
                         f"named explicitly: --out {TESTBED_PATH}")
        fields = {name: getattr(args, name) for name in TrainConfig.__dataclass_fields__}
        summary = train(TrainConfig(**fields), args.out, args.device, args.workers, args.every, args.time_budget)
        print(json.dumps(summary))
        return 0
    from kvzap_lab.model import load_model

    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    accuracy = evaluate(model, tokenizer, args.context_tokens, args.n_samples, args.seed, args.tasks)
    for task, value in accuracy.items():
        print(f"{task:20s} {value:.3f}")
    summary = {"context_tokens": args.context_tokens, "n_per_task": args.n_samples, "accuracy": accuracy}
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
