"""Build a KVzap training set from the KVzip+ oracle: ``python -m kvzap_lab.collect``.

For every sequence (a window of the default text corpus, a task-suite context, or a window of a user's text
files) the oracle scores every context KV pair; ``--tokens-per-sequence`` tokens are drawn at random (seeded) and
each gives one row::

    X [layers, hidden]    hidden state entering each attention layer at that token (as the model reads the prompt)
    y [layers, kv_heads]  oracle log-score of that token's KV pair in every KV head
    previous [K, layers, hidden]   with --neighbours K: X of the K tokens before it, oldest first (zeros before the
                          context's first token), for scorers that read a local context (``kvzap_local``)

Sources: a real model (anything but ``--model testbed``) reads windows of natural text and code from the lab's
offline corpus (:mod:`kvzap_lab.corpus`) by default, KVzap-like: 224 windows of 750-1,250 tokens, 500 rows drawn
from each (about 100,000 training rows), X stored in bfloat16. The test bed reads its task suite (``--tasks``).
``--text-files`` cuts windows from your own files. With ``--decode-tokens N`` the rows come from the decoding
phase instead: the model greedily continues each prompt for N tokens, the oracle scores the whole prompt +
generation as its context, and rows are drawn from the generated tokens.

Sequences are split into train/test before anything is computed (never tokens of one sequence on both sides; the
corpus's own document split when it has one), grouped into shards of ``--shard-size`` sequences and written with
a manifest (see :mod:`kvzap_lab.data`). A killed run is resumed by running the same command again: finished
shards are re-verified (sha256) and kept, a bad one is collected again. ``--num-workers N --worker-index I`` (or
torchrun's ``WORLD_SIZE``/``RANK``) splits the shards of one dataset between processes or machines writing to
the same directory: worker I takes shards I, I + N, ...; the dataset is complete when every worker is done.

    python -m kvzap_lab.collect --model smollm2-135m
    python -m kvzap_lab.collect --model smollm2-135m --num-workers 2 --worker-index 0   # and index 1 elsewhere
    python -m kvzap_lab.collect --n-sequences 200 --context-tokens 256 --tokens-per-sequence 256 --json
    python -m kvzap_lab.collect --text-files corpus/*.txt --context-tokens 1024 --out results/data/mine
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from kvzap_lab import cli, data, io, oracle
from kvzap_lab.faults import kill_point
from kvzap_lab.model import MODEL_HELP, capture_attention_inputs, describe, fingerprint, load_model, model_name

# Defaults by source (KVzap-like windows of the corpus, which a real model reads by default; tasks and text files
# as the test bed always had them) and by model (a real model's X is large: bfloat16 halves it).
CORPUS_DEFAULTS = {"n_sequences": 224, "context_tokens": (750, 1250), "tokens_per_sequence": 500}
OTHER_SOURCE_DEFAULTS = {"n_sequences": 200, "context_tokens": (256, 256), "tokens_per_sequence": 256}
TESTBED_DEFAULTS = {"dtype": "float32", "shard_size": 16, "batch_size": 8}
REAL_MODEL_DEFAULTS = {"dtype": "bfloat16", "shard_size": 8, "batch_size": 1}
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class Context:
    """One sequence to score: its context token ids, the prompt tokens before it (X is read from
    ``prefix + ids``), where it comes from, the prompt tokens after it (question and answer header: the prompt
    that decoding continues is ``prefix + ids + suffix``) and, when its source splits documents, its split."""

    ids: list[int]
    prefix: list[int]
    source: str
    suffix: list[int] = field(default_factory=list)
    split: str | None = None


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
        ids = tokenizer.encode(text, add_special_tokens=False, verbose=False)  # whole files: longer than the window
        for start in range(0, len(ids), context_tokens):
            window = ids[start : start + context_tokens]
            if len(window) >= min(16, context_tokens):
                windows.append(Context(window, list(prefix), f"file:{path.name}:{start}"))
    if not windows:
        raise ValueError(f"the text files {list(map(str, files))} hold no window of at least 16 tokens")
    random.Random(seed).shuffle(windows)
    return windows[:n]


def corpus_contexts(
    tokenizer, corpus, n: int, lengths: tuple[int, int], seed: int, prefix: list[int], test_fraction: float
) -> list[Context]:
    """``n`` windows of natural text and code from a :class:`kvzap_lab.corpus.Corpus`: its ``train`` and ``test``
    documents (disjoint), each split's documents joined in a seeded order and cut into consecutive windows of
    lengths drawn uniformly from ``lengths`` (as in pretraining, a window may span two documents); ``n`` windows
    are drawn (seeded) from them, ``test_fraction`` of them from the test documents."""
    n_test = _test_count(n, test_fraction)
    rng = random.Random(seed)
    contexts = []
    for split, count in (("train", n - n_test), ("test", n_test)):
        documents = corpus.split(split, seed=seed)
        rng.shuffle(documents)
        ids = tokenizer.encode("\n\n".join(d.text for d in documents), add_special_tokens=False, verbose=False)
        windows, start = [], 0
        while True:
            size = rng.randint(*lengths)
            if start + size > len(ids):
                break
            windows.append((start, size))
            start += size
        if len(windows) < count:
            raise ValueError(
                f"the corpus {corpus.name!r} holds {len(windows)} {split} windows of {lengths[0]}-{lengths[1]} tokens, "
                f"fewer than the {count} asked; lower --n-sequences or --context-tokens"
            )
        for start, size in sorted(rng.sample(windows, count)):
            contexts.append(Context(ids[start : start + size], list(prefix), f"corpus:{split}:{start}", split=split))
    return contexts


def _test_count(n: int, test_fraction: float) -> int:
    if not 0 <= test_fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    return min(n - 1, max(1, round(n * test_fraction))) if test_fraction > 0 and n > 1 else 0


def split_sequences(n: int, test_fraction: float, seed: int) -> dict[str, list[int]]:
    """Seeded train/test split of sequence indices (at least one test sequence when the fraction is > 0)."""
    n_test = _test_count(n, test_fraction)
    order = list(range(n))
    random.Random(seed).shuffle(order)
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


def resolve_workers(num_workers: int | None, worker_index: int | None, environ=os.environ) -> tuple[int, int]:
    """``(N, I)`` from ``--num-workers/--worker-index``, else torchrun's ``WORLD_SIZE``/``RANK``, else ``(1, 0)``."""
    if num_workers is None and worker_index is None and "WORLD_SIZE" in environ:
        num_workers, worker_index = int(environ["WORLD_SIZE"]), int(environ.get("RANK", "0"))
    if worker_index is not None and num_workers is None:
        raise ValueError("--worker-index needs --num-workers (the number of workers sharing the dataset)")
    num_workers, worker_index = num_workers or 1, worker_index or 0
    if num_workers < 1 or not 0 <= worker_index < num_workers:
        raise ValueError(f"the worker index must be in [0, {num_workers}) for {num_workers} workers, got {worker_index}")
    return num_workers, worker_index


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
    oracle_settings = settings["oracle"]
    template = oracle.repeat_template(tokenizer, oracle_settings["definition"])
    oracle_kwargs = {k: oracle_settings[k] for k in ("normalize", "chunk_size", "anchor", "definition")}
    xs, ys, seqs, poss, prevs = [], [], [], [], []
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
            if settings.get("neighbours"):
                prevs.append(previous_states(hidden, positions, settings["neighbours"]).to(xs[-1].dtype).cpu())
            ys.append(result.scores[:, :, positions].permute(2, 0, 1).cpu())
            seqs.append(torch.full((len(positions),), index, dtype=torch.int64))
            poss.append(positions)
        progress.update(len(batch))
    rows = {"X": torch.cat(xs), "y": torch.cat(ys), "sequence": torch.cat(seqs), "position": torch.cat(poss)}
    return rows | ({"previous": torch.cat(prevs)} if prevs else {})


def previous_states(hidden: torch.Tensor, positions: torch.Tensor, k: int) -> torch.Tensor:
    """The hidden states of the ``k`` tokens before each of ``positions [n]`` in ``hidden [length, layers, H]``,
    oldest first: ``[n, k, layers, H]``, zeros before the first token (what the engine passes a scorer with
    ``context`` k, :class:`kvzap_lab.policy.Scorer`)."""
    index = positions[:, None] - torch.arange(k, 0, -1)  # [n, k]
    return hidden[index.clamp_min(0)].masked_fill((index < 0)[:, :, None, None], 0.0)


def _split_of_contexts(contexts: list[Context], settings: dict) -> dict[str, list[int]]:
    """The contexts' own split when their source has one, else a seeded split by sequence."""
    given = {c.split for c in contexts}
    if given == {None}:
        return split_sequences(len(contexts), settings["test_fraction"], settings["seed"])
    if None in given or not given <= set(data.SPLITS):
        raise ValueError(f"contexts must all carry a split in {data.SPLITS} or none; got {sorted(map(str, given))}")
    return {name: [i for i, c in enumerate(contexts) if c.split == name] for name in data.SPLITS}


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
    num_workers: int = 1,
    worker_index: int = 0,
) -> dict:
    """Score ``contexts``, write this worker's shards under ``out`` (resuming and re-verifying finished ones),
    and return a summary.

    Args:
        model, tokenizer: the model to collect on (loaded).
        contexts: the sequences (see :func:`task_contexts`, :func:`corpus_contexts`, :func:`text_contexts`).
        out: the dataset directory.
        settings: ``seed, test_fraction, tokens_per_sequence, decode_tokens, dtype, oracle{normalize, chunk_size,
            anchor[, definition]}``, a ``source`` description, ``model_name`` and optionally ``neighbours`` (K > 0:
            each row also stores its K previous hidden states); model facts, split, plan and shapes are added here.
        shard_size: sequences per shard. batch_size: contexts scored together.
        overwrite: replace a dataset with other settings (one process only).
        num_workers, worker_index: this process takes shards ``worker_index, worker_index + num_workers, ...``.

    Returns:
        The summary: rows and shapes of the dataset so far, this worker's shards written / resumed / repaired,
        ``complete``, seconds.
    """
    started = time.perf_counter()
    out = Path(out)
    num_workers, worker_index = resolve_workers(num_workers, worker_index, {})
    if overwrite and num_workers > 1:
        raise ValueError("--overwrite with several workers would let them delete each other's shards; clear the "
                         "directory once (or run one process with --overwrite), then start the workers")
    io.check_writable(out)
    spec = describe(model)
    settings = dict(settings, oracle=dict({"definition": "paper"}, **settings["oracle"]))
    oracle_settings = settings["oracle"]
    template = oracle.repeat_template(tokenizer, oracle_settings["definition"])
    decode = settings["decode_tokens"]
    longest = max(len(c.prefix + c.ids + c.suffix) + decode if decode else len(c.ids) for c in contexts)
    oracle.repeat_chunk(model, template, longest, oracle_settings["chunk_size"], oracle_settings["anchor"])
    split = _split_of_contexts(contexts, settings)
    plan = [
        {"file": f"{name}-{k // shard_size:05d}.safetensors", "split": name, "sequences": ids[k : k + shard_size]}
        for name, ids in split.items()
        for k in range(0, len(ids), shard_size)
    ]
    manifest = dict(
        settings,
        format=data.FORMAT,
        model={"name": settings["model_name"], "fingerprint": fingerprint(model), "spec": asdict(spec)},
        oracle=dict(oracle_settings, template=[template.prefix, template.middle]),
        n_sequences=len(contexts),
        split=split,
        shard_size=shard_size,
        n_shards=len(plan),
        plan=plan,
        shapes={"layers": spec.n_layers, "hidden": spec.hidden_size, "kv_heads": spec.n_kv_heads},
    )
    manifest.pop("model_name")
    manifest = json.loads(json.dumps(manifest))  # compare with a manifest read back from JSON
    _open_manifest(out, manifest, overwrite)
    mine = plan[worker_index::num_workers]
    data.remove_temporaries(out, [name for s in mine for name in (s["file"], data.record_name(s["file"]))])
    recorded = {entry["file"]: entry for entry in data.read_manifest(out)["shards"]}
    repaired = 0
    for shard in mine:  # a resume trusts no file: each recorded shard is checked against its sha256
        entry = recorded.get(shard["file"])
        if entry is not None and data.shard_problem(out, entry):
            data.remove_shard(out, shard["file"])
            recorded.pop(shard["file"])
            repaired += 1
    todo = [shard for shard in mine if shard["file"] not in recorded]
    with tqdm(
        total=sum(len(s["sequences"]) for s in todo), desc="oracle", unit="seq", disable=not show_progress
    ) as progress:
        for shard in todo:
            rows = _shard_rows(model, tokenizer, contexts, shard["sequences"], manifest, batch_size, progress)
            sha = data.write_shard(out, shard["file"], rows)
            kill_point("collect.shard-written")  # tests: the shard in place, its record not yet
            data.write_record(out, dict(shard, n=len(rows["y"]), sha256=sha))
    final = data.read_manifest(out)
    counts = {name: sum(e["n"] for e in final["shards"] if e["split"] == name) for name in data.SPLITS}
    shapes = manifest["shapes"]
    return {
        "out": str(out),
        "n_train": counts["train"],
        "n_test": counts["test"],
        "sequences_train": len(split["train"]),
        "sequences_test": len(split["test"]),
        "X_shape": [counts["train"], shapes["layers"], shapes["hidden"]],
        "y_shape": [counts["train"], shapes["layers"], shapes["kv_heads"]],
        "worker": [worker_index, num_workers],
        "shards_written": len(todo),
        "shards_resumed": len(mine) - len(todo),
        "shards_repaired": repaired,
        "complete": final["complete"],
        "seconds": round(time.perf_counter() - started, 2),
    }


def _open_manifest(out: Path, manifest: dict, overwrite: bool) -> None:
    """Create the manifest, or check the existing one has the same settings (``overwrite``: replace it)."""
    existing = data.read_manifest(out) if (out / data.MANIFEST).exists() else None
    if existing is not None and overwrite:
        for entry in existing.get("plan", existing["shards"]):  # a v1 dataset lists its finished shards only
            data.remove_shard(out, entry["file"])
        (out / data.MANIFEST).unlink()
    existing = data.create_manifest(out, manifest)
    keys = (set(manifest) | set(existing)) - {"shards", "complete"}
    differs = sorted(k for k in keys if existing.get(k) != manifest.get(k))
    if differs:
        raise data.DatasetError(
            f"{out} holds a collection with other settings (they differ in: {', '.join(differs)}); "
            "pass --overwrite to replace it, or choose another --out"
        )


def token_range(text: str) -> tuple[int, int]:
    """argparse type: ``N`` or ``MIN:MAX`` tokens (each >= 1, MIN <= MAX)."""
    low, _, high = text.partition(":")
    try:
        lo, hi = int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be N or MIN:MAX tokens; got {text!r}") from None
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"must be N or MIN:MAX with 1 <= MIN <= MAX; got {text!r}")
    return lo, hi


def _contexts(args, tokenizer, from_corpus: bool) -> tuple[list[Context], dict]:
    """The sequences and the ``source`` record of the manifest, from the parsed arguments."""
    lo, hi = args.context_tokens
    prefix = list(oracle.repeat_template(tokenizer, args.oracle_definition).prefix)
    if not from_corpus and lo != hi:
        raise ValueError(f"--context-tokens {lo}:{hi} is a range; tasks and text files take one length (N)")
    if args.text_files:
        contexts = text_contexts(tokenizer, args.text_files, args.n_sequences, lo, args.seed, prefix)
        return contexts, {"kind": "text", "files": [str(f) for f in args.text_files], "context_tokens": lo}
    if not from_corpus:
        from kvzap_lab import tasks

        names = list(tasks.TASKS) if args.tasks in (None, ["all"]) else args.tasks
        contexts = task_contexts(tokenizer, names, args.n_sequences, lo, args.seed)
        return contexts, {"kind": "tasks", "tasks": names, "context_tokens": lo}
    from kvzap_lab.corpus import load_corpus

    corpus = load_corpus(args.corpus)
    contexts = corpus_contexts(tokenizer, corpus, args.n_sequences, (lo, hi), args.seed, prefix, args.test_fraction)
    return contexts, {"kind": "corpus", "corpus": corpus.manifest(), "context_tokens": [lo, hi]}


def _run(args) -> dict:
    """Load the model, build the contexts and settings from parsed CLI arguments, and collect."""
    out = args.out or Path("results/data") / model_name(args.model)
    io.check_writable(out)  # before loading anything
    num_workers, worker_index = resolve_workers(args.num_workers, args.worker_index)
    real_model = args.model != "testbed"
    from_corpus = real_model and not (args.tasks or args.text_files)
    defaults = (CORPUS_DEFAULTS if from_corpus else OTHER_SOURCE_DEFAULTS) | (
        REAL_MODEL_DEFAULTS if real_model else TESTBED_DEFAULTS
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    model, tokenizer = load_model(args.model, device=args.device)
    contexts, source = _contexts(args, tokenizer, from_corpus)
    settings = {
        "model_name": model_name(args.model),
        "source": source,
        "seed": args.seed,
        "test_fraction": args.test_fraction,
        "tokens_per_sequence": args.tokens_per_sequence,
        "decode_tokens": args.decode_tokens,
        "dtype": args.dtype,
        "oracle": {"normalize": not args.kvzip, "chunk_size": args.chunk_size, "anchor": args.anchor,
                   "definition": args.oracle_definition},
    } | ({"neighbours": args.neighbours} if args.neighbours else {})  # absent when 0: earlier datasets stay resumable
    return collect(
        model, tokenizer, contexts, out, settings, shard_size=args.shard_size, batch_size=args.batch_size,
        overwrite=args.overwrite, num_workers=num_workers, worker_index=worker_index,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvzap_lab.collect", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="testbed", help=MODEL_HELP)
    parser.add_argument("--out", type=Path, help="dataset directory (default results/data/<model-name>)")
    parser.add_argument("--tasks", nargs="+", action=cli.ListOption, help="task names, or 'all' (the test bed's default)")
    parser.add_argument("--text-files", nargs="+", type=Path, help="collect from these UTF-8 files instead")
    parser.add_argument("--corpus", default="default", help="the text corpus of a real model (kvzap_lab.corpus)")
    parser.add_argument("--n-sequences", type=cli.positive_int, help="sequences (corpus 224, tasks and text files 200)")
    parser.add_argument("--context-tokens", type=token_range,
                        help="tokens per context, N or MIN:MAX (corpus 750:1250, tasks and text files 256)")
    parser.add_argument("--tokens-per-sequence", type=cli.positive_int,
                        help="rows drawn per sequence, seeded (corpus 500, tasks and text files 256)")
    parser.add_argument("--test-fraction", type=cli.fraction(0.0, 1.0, high_open=True), default=0.1)
    parser.add_argument("--seed", type=cli.non_negative_int, default=0)
    parser.add_argument("--shard-size", type=cli.positive_int, help="sequences per shard (test bed 16, real model 8)")
    parser.add_argument("--batch-size", type=cli.positive_int, help="contexts scored together (test bed 8, real model 1)")
    parser.add_argument("--chunk-size", type=cli.positive_int, default=oracle.DEFAULT_CHUNK, help="oracle repeat chunk")
    parser.add_argument("--anchor", type=cli.non_negative_int, default=oracle.DEFAULT_ANCHOR, help="anchor of later chunks")
    parser.add_argument("--oracle-definition", choices=oracle.DEFINITIONS, default="paper",
                        help="'paper' (KVzap's labels) or 'kvpress' (KVzipPress's scores)")
    parser.add_argument("--decode-tokens", type=cli.non_negative_int, default=0, help="rows from N generated tokens")
    parser.add_argument("--neighbours", type=cli.non_negative_int, default=0,
                        help="also store each row's K previous hidden states (kvzap_local reads up to K)")
    parser.add_argument("--kvzip", action="store_true", help="plain KVzip scores (no ||W_O v||/||h|| factor)")
    parser.add_argument("--dtype", choices=DTYPES, help="storage dtype of X (test bed float32, real model bfloat16)")
    parser.add_argument("--num-workers", type=cli.positive_int, help="processes sharing this dataset (default "
                        "WORLD_SIZE or 1)")
    parser.add_argument("--worker-index", type=cli.non_negative_int, help="this process's index (default RANK or 0)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=cli.positive_int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--overwrite", action="store_true", help="replace a collection with other settings")
    parser.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    summary = _run(args)
    if args.json:
        print(json.dumps(summary))
    else:
        rows = f"{summary['n_train']} train / {summary['n_test']} test rows"
        state = "complete" if summary["complete"] else "unfinished (other workers, or a rerun, finish it)"
        index, count = summary["worker"]
        print(f"{summary['out']}: {rows} so far, {state}; worker {index} of {count} wrote "
              f"{summary['shards_written']} shards in {summary['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
