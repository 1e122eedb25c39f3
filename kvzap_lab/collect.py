"""Build a KVzap training set from the KVzip+ oracle: ``python -m kvzap_lab.collect``.

For every sequence (a task-suite context, or a window of a user's text files) the oracle scores every context
KV pair; ``--tokens-per-sequence`` tokens are drawn at random (seeded) and each gives one row::

    X [layers, hidden]    hidden state entering each attention layer at that token (as the model reads the prompt)
    y [layers, kv_heads]  oracle log-score of that token's KV pair in every KV head

With ``--decode-tokens N`` the rows come from the decoding phase instead: the model greedily continues each
prompt (the task prompt through its assistant header, or the text window) for N tokens, the oracle scores the
whole prompt + generation as its context, and rows are drawn from the generated tokens.

Sequences are split into train/test before anything is computed (never tokens of one sequence on both sides),
grouped into shards of ``--shard-size`` sequences and written with a manifest (see :mod:`kvzap_lab.data`).
A killed run is resumed by running the same command again: finished shards are kept and skipped.

    python -m kvzap_lab.collect --n-sequences 200 --context-tokens 256 --tokens-per-sequence 256 --json
    python -m kvzap_lab.collect --text-files corpus/*.txt --context-tokens 1024 --out results/data/mine
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from kvzap_lab import data, oracle
from kvzap_lab.model import capture_attention_inputs, describe, fingerprint, load_model, model_name


@dataclass
class Context:
    """One sequence to score: its context token ids, the prompt tokens before it (X is read from
    ``prefix + ids``), where it comes from, and the prompt tokens after it (question and answer header: the
    prompt that decoding continues is ``prefix + ids + suffix``)."""

    ids: list[int]
    prefix: list[int]
    source: str
    suffix: list[int] = field(default_factory=list)


def task_contexts(tokenizer, task_names, n: int, context_tokens: int, seed: int) -> list[Context]:
    """``n`` task-suite contexts, tasks taken in turn; X comes from the task prompt itself."""
    from kvzap_lab import tasks

    unknown = sorted(set(task_names) - set(tasks.TASKS))
    if unknown:
        raise ValueError(f"unknown tasks {unknown}; known tasks: {', '.join(tasks.TASKS)}")
    counts = [n // len(task_names) + (k < n % len(task_names)) for k in range(len(task_names))]
    per_task = [
        iter(tasks.make_samples(name, tokenizer, count, context_tokens, seed=seed + k)) if count else iter(())
        for k, (name, count) in enumerate(zip(task_names, counts))
    ]
    contexts = []
    for i in range(n):
        k = i % len(task_names)
        sample = next(per_task[k])
        start, end = sample.context_span
        ids, prefix, suffix = sample.input_ids[start:end], sample.input_ids[:start], sample.input_ids[end:]
        contexts.append(Context(ids, prefix, f"task:{task_names[k]}", suffix))
    return contexts


def text_contexts(tokenizer, files, n: int, context_tokens: int, seed: int, prefix: list[int]) -> list[Context]:
    """Up to ``n`` windows of ``context_tokens`` tokens cut from text files (a shorter tail window of at least 16
    tokens is kept), drawn in a seeded order."""
    windows = []
    for file in files:
        path = Path(file)
        if not path.is_file():
            raise FileNotFoundError(f"text file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"text file {path} is not UTF-8 text ({err})") from err
        ids = tokenizer.encode(text, add_special_tokens=False)
        for start in range(0, len(ids), context_tokens):
            window = ids[start : start + context_tokens]
            if len(window) >= min(16, context_tokens):
                windows.append(Context(window, list(prefix), f"file:{path.name}:{start}"))
    if not windows:
        raise ValueError(f"the text files {list(map(str, files))} hold no window of at least 16 tokens")
    random.Random(seed).shuffle(windows)
    return windows[:n]


def split_sequences(n: int, test_fraction: float, seed: int) -> dict[str, list[int]]:
    """Seeded train/test split of sequence indices (at least one test sequence when the fraction is > 0)."""
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_test = min(n - 1, max(1, round(n * test_fraction))) if test_fraction > 0 and n > 1 else 0
    return {"train": sorted(order[n_test:]), "test": sorted(order[:n_test])}


def sample_positions(length: int, k: int, seed: int, sequence: int) -> torch.Tensor:
    """``min(k, length)`` distinct token offsets of a sequence, sorted; seeded by (seed, sequence)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + sequence)
    return torch.randperm(length, generator=generator)[: min(k, length)].sort().values


def greedy_continuation(model, prompt: list[int], n: int) -> list[int]:
    """``n`` greedy tokens after ``prompt`` (decoding does not stop at end-of-turn tokens)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    step = torch.tensor([prompt], device=model.device)
    tokens = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=step, cache=cache, use_cache=True, logits_to_keep=1).logits
            step = logits[:, -1].argmax(dim=-1, keepdim=True)
            tokens.append(int(step))
    return tokens


def _prompt_hidden(model, prefix: list[int], ids: list[int]) -> torch.Tensor:
    """Hidden state entering each attention layer at the context tokens of ``prefix + ids``: [n, layers, hidden]."""
    with torch.no_grad(), capture_attention_inputs(model) as hidden:
        model.model(input_ids=torch.tensor([prefix + ids], device=model.device))
    return torch.stack([hidden[i][0, len(prefix) :] for i in sorted(hidden)], dim=1).float()


def _scored_sequence(model, context: Context, decode_tokens: int) -> tuple[list[int], list[int], int]:
    """``(oracle context, prompt tokens before it, first offset rows are drawn from)`` of one sequence."""
    if not decode_tokens:
        return context.ids, context.prefix, 0
    prompt = context.prefix + context.ids + context.suffix
    return prompt + greedy_continuation(model, prompt, decode_tokens), [], len(prompt)


def _shard_rows(model, tokenizer, contexts, indices, settings, batch_size, progress) -> dict[str, torch.Tensor]:
    template = oracle.repeat_template(tokenizer)
    oracle_kwargs = {k: settings["oracle"][k] for k in ("normalize", "chunk_size", "anchor")}
    xs, ys, seqs, poss = [], [], [], []
    for b0 in range(0, len(indices), batch_size):
        batch = indices[b0 : b0 + batch_size]
        sequences = [_scored_sequence(model, contexts[i], settings["decode_tokens"]) for i in batch]
        results = oracle.score_contexts(
            model, tokenizer, [s[0] for s in sequences], return_hidden=True, **oracle_kwargs
        )
        for index, (ids, prefix, first), result in zip(batch, sequences, results):
            hidden = result.hidden
            if prefix != list(template.prefix):  # the prompt reads the context after other tokens
                hidden = _prompt_hidden(model, prefix, ids)
            count = settings["tokens_per_sequence"]
            positions = first + sample_positions(len(ids) - first, count, settings["seed"], index)
            xs.append(hidden[positions].to(getattr(torch, settings["dtype"])).cpu())
            ys.append(result.scores[:, :, positions].permute(2, 0, 1).cpu())
            seqs.append(torch.full((len(positions),), index, dtype=torch.int64))
            poss.append(positions)
        progress.update(len(batch))
    return {"X": torch.cat(xs), "y": torch.cat(ys), "sequence": torch.cat(seqs), "position": torch.cat(poss)}


def collect(
    model,
    tokenizer,
    contexts: list[Context],
    out: Path,
    settings: dict,
    *,
    shard_size: int = 16,
    batch_size: int = 8,
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict:
    """Score ``contexts``, write their shards and manifest under ``out`` (resuming a finished part), and return a
    summary. ``settings`` holds ``seed, test_fraction, tokens_per_sequence, decode_tokens, dtype,
    oracle{normalize, chunk_size, anchor}`` and a ``source`` description; model facts, split and shapes are added
    here."""
    started = time.perf_counter()
    out = Path(out)
    spec = describe(model)
    oracle_settings = settings["oracle"]
    decode = settings["decode_tokens"]
    longest = max(len(c.prefix + c.ids + c.suffix) + decode if decode else len(c.ids) for c in contexts)
    oracle.repeat_chunk(model, tokenizer, longest, oracle_settings["chunk_size"], oracle_settings["anchor"])
    split = split_sequences(len(contexts), settings["test_fraction"], settings["seed"])
    shards = [
        {"file": f"{name}-{k // shard_size:05d}.safetensors", "split": name, "sequences": ids[k : k + shard_size]}
        for name, ids in split.items()
        for k in range(0, len(ids), shard_size)
    ]
    template = oracle.repeat_template(tokenizer)
    settings = dict(
        settings,
        format=data.FORMAT,
        model={"name": settings["model_name"], "fingerprint": fingerprint(model), "spec": asdict(spec)},
        oracle=dict(settings["oracle"], instruction=oracle.INSTRUCTION, template=[template.prefix, template.middle]),
        n_sequences=len(contexts),
        split=split,
        shard_size=shard_size,
        n_shards=len(shards),
        shapes={"layers": spec.n_layers, "hidden": spec.hidden_size, "kv_heads": spec.n_kv_heads},
    )
    settings.pop("model_name")
    settings = json.loads(json.dumps(settings))  # compare with a manifest read back from JSON
    manifest = _open_manifest(out, settings, overwrite)
    done = {entry["file"] for entry in manifest["shards"]}
    todo = [shard for shard in shards if shard["file"] not in done]
    with tqdm(
        total=sum(len(s["sequences"]) for s in todo), desc="oracle", unit="seq", disable=not show_progress
    ) as progress:
        for shard in todo:
            rows = _shard_rows(model, tokenizer, contexts, shard["sequences"], settings, batch_size, progress)
            sha = data.write_shard(out, shard["file"], rows)
            manifest["shards"].append(dict(shard, n=len(rows["y"]), sha256=sha))
            manifest["complete"] = len(manifest["shards"]) == len(shards)
            data.write_manifest(out, manifest)
    if not manifest["complete"]:  # nothing was left to do (or no shard at all)
        manifest["complete"] = True
        data.write_manifest(out, manifest)
    counts = {name: sum(e["n"] for e in manifest["shards"] if e["split"] == name) for name in data.SPLITS}
    shapes = settings["shapes"]
    return {
        "out": str(out),
        "n_train": counts["train"],
        "n_test": counts["test"],
        "sequences_train": len(split["train"]),
        "sequences_test": len(split["test"]),
        "X_shape": [counts["train"], shapes["layers"], shapes["hidden"]],
        "y_shape": [counts["train"], shapes["layers"], shapes["kv_heads"]],
        "shards_written": len(todo),
        "shards_resumed": len(shards) - len(todo),
        "seconds": round(time.perf_counter() - started, 2),
    }


def _open_manifest(out: Path, settings: dict, overwrite: bool) -> dict:
    """The manifest to continue: the existing one when its settings match, a fresh one otherwise."""
    existing = data.read_manifest(out) if out.exists() else None
    if existing is not None and overwrite:
        for entry in existing["shards"]:
            (out / entry["file"]).unlink(missing_ok=True)
        (out / data.MANIFEST).unlink()
        existing = None
    if existing is not None:
        data.remove_temporaries(out)
        keys = (set(settings) | set(existing)) - {"shards", "complete"}
        differs = sorted(k for k in keys if existing.get(k) != settings.get(k))
        if differs:
            raise data.DatasetError(
                f"{out} holds a collection with other settings (they differ in: {', '.join(differs)}); "
                "pass --overwrite to replace it, or choose another --out"
            )
        return existing
    out.mkdir(parents=True, exist_ok=True)
    manifest = dict(settings, shards=[], complete=False)
    data.write_manifest(out, manifest)
    return manifest


def _run(args) -> dict:
    """Load the model, build the contexts and settings from parsed CLI arguments, and collect."""
    model, tokenizer = load_model(args.model, device=args.device)
    out = args.out or Path("results/data") / model_name(args.model)
    if args.text_files:
        prefix = list(oracle.repeat_template(tokenizer).prefix)
        contexts = text_contexts(tokenizer, args.text_files, args.n_sequences, args.context_tokens, args.seed, prefix)
        source = {"kind": "text", "files": [str(f) for f in args.text_files]}
    else:
        from kvzap_lab import tasks

        names = list(tasks.TASKS) if args.tasks == "all" else [t.strip() for t in args.tasks.split(",") if t.strip()]
        contexts = task_contexts(tokenizer, names, args.n_sequences, args.context_tokens, args.seed)
        source = {"kind": "tasks", "tasks": names}
    settings = {
        "model_name": model_name(args.model),
        "source": dict(source, context_tokens=args.context_tokens),
        "seed": args.seed,
        "test_fraction": args.test_fraction,
        "tokens_per_sequence": args.tokens_per_sequence,
        "decode_tokens": args.decode_tokens,
        "dtype": args.dtype,
        "oracle": {"normalize": not args.kvzip, "chunk_size": args.chunk_size, "anchor": args.anchor},
    }
    return collect(
        model, tokenizer, contexts, out, settings, shard_size=args.shard_size, batch_size=args.batch_size,
        overwrite=args.overwrite,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvzap_lab.collect", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="testbed", help="'testbed', a checkpoint directory or a hub name")
    parser.add_argument("--out", type=Path, help="dataset directory (default results/data/<model-name>)")
    parser.add_argument("--tasks", default="all", help="comma-separated task names, or 'all' (the task suite)")
    parser.add_argument("--text-files", nargs="+", type=Path, help="collect from these UTF-8 files instead of tasks")
    parser.add_argument("--n-sequences", type=int, default=200)
    parser.add_argument("--context-tokens", type=int, default=256)
    parser.add_argument("--tokens-per-sequence", type=int, default=256, help="tokens sampled per sequence (seeded)")
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=int, default=16, help="sequences per shard")
    parser.add_argument("--batch-size", type=int, default=8, help="contexts scored together")
    parser.add_argument("--chunk-size", type=int, default=oracle.DEFAULT_CHUNK, help="oracle repeat chunk (tokens)")
    parser.add_argument("--anchor", type=int, default=oracle.DEFAULT_ANCHOR, help="anchor tokens of later chunks")
    parser.add_argument("--decode-tokens", type=int, default=0, help="rows from N greedily generated tokens")
    parser.add_argument("--kvzip", action="store_true", help="plain KVzip scores (no ||W_O v||/||h|| factor)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="storage dtype of X")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--overwrite", action="store_true", help="replace a collection with other settings")
    parser.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    args = parser.parse_args(argv)
    for name in ("n_sequences", "context_tokens", "tokens_per_sequence", "shard_size", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")

    if args.decode_tokens < 0:
        parser.error(f"--decode-tokens must be >= 0, got {args.decode_tokens}")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        summary = _run(args)
    except (ValueError, FileNotFoundError) as err:  # bad input: the message says what is wrong
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary))
    else:
        rows = f"{summary['n_train']} train / {summary['n_test']} test rows"
        print(f"wrote {rows} to {summary['out']} in {summary['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
