"""Accuracy against compression: policies x settings x tasks x context lengths, with the evicting engine.

    python -m kvzap_lab.evaluate --model testbed --policies full oracle kvzap_mlp@results/train/mlp \\
        streaming_llm knorm --taus -7 -6 -5 --keep-ratios 0.5 0.25 --tasks single_needle kv_retrieval \\
        --context-tokens 512 1024 --n-samples 200 --out results/eval/eval.jsonl [--json]

Each cell (policy, setting, task, context length) greedily generates the answers of ``--n-samples`` seeded
samples in batches (left padding, chunked prefill, eviction during prefill and decoding) and records the
accuracy with its 95 % Wilson interval (:mod:`kvzap_lab.stats`), the achieved compression (fraction of KV pairs
evicted over prompt and generated tokens), the bytes the compacted cache held relative to a full cache, and the
wall time. Samples and scores come from :mod:`kvzap_lab.tasks`: on the test bed, exact match (token accuracy
for ``copy``), each row stopping at its first wrong token; on a chat model, RULER's scoring (the expected
answers contained in the output), each row stopping at the tokenizer's end of turn or at a budget that fits the
answer. Settings: ``tau`` for policies whose rule is a threshold (the oracle, the
KVzap scorers; with ``--tau-offsets=a,b,...`` layer l uses ``tau`` plus its offset, as the study's rule does), ``keep_ratio`` (a per-head :class:`~kvzap_lab.policy.TopK` budget of ``keep_ratio`` times
the context length) for the training-free baselines, nothing for ``full`` (full cache). A policy is ``NAME`` or ``NAME@CHECKPOINT_DIR`` (a trained scorer).

Results go to a JSON-lines file, rewritten atomically after every cell; a rerun skips the cells already there
(same model, options and samples: a digest of the samples is part of the key), so an interrupted run resumes. A table is printed, accuracy against
compression is plotted per policy (PNG next to the JSON lines), and ``--json`` ends with one summary line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from kvzap_lab import cli, io, plots, tasks, tracking
from kvzap_lab.faults import kill_point
from kvzap_lab.engine import DEFAULT_CHUNK, Generation, generate, prefill
from kvzap_lab.model import MODEL_HELP, check_fits, describe, fingerprint, load_model
from kvzap_lab.oracle import oracle_table
from kvzap_lab.policy import DEFAULT_SINKS, DEFAULT_WINDOW, OracleTableScorer, Policy, Threshold, TopK, as_scorer, get_policy, resolve_policy
from kvzap_lab.stats import compression_ratio, format_interval, wilson_interval
from kvzap_lab.surrogate import is_trainable

FULL = "full"
DEFAULT_POLICIES = (FULL, "oracle", "streaming_llm", "knorm", "accumulated_attention", "random")
DEFAULT_TAUS = (-8.0, -7.0, -6.0, -5.0, -4.0)
DEFAULT_KEEP_RATIOS = (0.5, 0.25, 0.1)


@dataclass(frozen=True)
class Cell:
    """One evaluation cell; ``setting`` is ``{"tau": x}``, ``{"keep_ratio": r}`` or ``{}`` (full cache)."""

    policy: str
    setting: tuple
    task: str
    context_tokens: int

    def label(self) -> str:
        return self.policy + "".join(f" {k}={_format_setting(v)}" for k, v in self.setting)


def _format_setting(value) -> str:
    """``-1.75`` for a number, ``-2,-1.5,-2,-2`` for per-layer values."""
    return ",".join(f"{v:g}" for v in value) if isinstance(value, (list, tuple)) else f"{value:g}"


@dataclass(frozen=True)
class Options:
    """What decides a cell's result besides the cell itself (part of the resume key)."""

    model: str
    n_samples: int
    seed: int
    window: int
    sinks: int
    chunk_size: int


def parse_policy(spec: str) -> tuple[str, Path | None]:
    """``NAME`` or ``NAME@CHECKPOINT_DIR`` -> (name, checkpoint); a dir holding ``scorer/`` (train's --out) works."""
    name, _, path = spec.partition("@")
    if name != FULL and is_trainable(resolve_policy(name)) and not path:  # unknown names fail, listing known ones
        raise ValueError(f"policy {name!r} is a trained scorer: give its checkpoint as {name}@CHECKPOINT_DIR")
    if not path:
        return name, None
    checkpoint = Path(path)
    if (checkpoint / "scorer").is_dir():
        checkpoint = checkpoint / "scorer"
    if not checkpoint.is_dir():
        raise FileNotFoundError(f"policy {spec!r}: checkpoint directory {checkpoint} does not exist")
    return name, checkpoint


def uses_threshold(name: str, checkpoint: Path | None) -> bool:
    """Whether policy ``name`` is swept over taus (score thresholds) rather than keep ratios (budgets)."""
    if checkpoint is not None:
        return True
    rule = as_scorer(resolve_policy(name)()).default_rule  # None: scores of unknown scale, swept by budget
    return isinstance(rule, Threshold) and rule.tau != math.inf  # tau = inf is StreamingLLM: swept by budget


def build_policy(
    name: str, checkpoint: Path | None, setting: tuple, context_tokens: int, model, window: int, sinks: int
) -> Policy | None:
    """The :class:`Policy` of a cell (``None`` for the full cache).

    A ``keep_ratio`` becomes a fixed per-head budget of ``keep_ratio * context_tokens`` pairs (besides window and
    sinks): the rule runs at every step, and a ratio of the current candidates would compound step after step.
    """
    if name == FULL:
        return None
    knob = dict(setting)
    if "tau" in knob:
        tau = [knob["tau"] + offset for offset in knob["tau_offsets"]] if "tau_offsets" in knob else knob["tau"]
        rule = Threshold(tau=tau, window=window, sinks=sinks)
    else:
        rule = TopK(budget=math.ceil(knob["keep_ratio"] * context_tokens), window=window, sinks=sinks)
    return get_policy(name, rule=rule, checkpoint=checkpoint, model=model if checkpoint is not None else None)


def batches(samples: list[tasks.Sample], batch_size: int) -> list[list[tasks.Sample]]:
    """Consecutive batches of ``batch_size`` samples."""
    return [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]


@dataclass
class Tally:
    """What a cell accumulates over its batches: a score, a compression and a bytes ratio per sample."""

    scores: list[float] = field(default_factory=list)
    compression: list[float] = field(default_factory=list)
    bytes_ratio: list[float] = field(default_factory=list)

    def add(self, batch: list[tasks.Sample], out: Generation, tokenizer) -> None:
        """Score one batch's generation."""
        self.scores += [tasks.score_answer(s, ids, tokenizer) for s, ids in zip(batch, out.tokens)]
        self.compression += out.compression.per_row.tolist()
        self.bytes_ratio += [out.bytes_held / out.full_bytes] * len(batch)

    def result(self) -> dict:
        """Accuracy with its 95 % Wilson interval, mean / min / max compression, mean bytes ratio."""
        accuracy = statistics.fmean(self.scores)
        low, high = wilson_interval(accuracy, len(self.scores))
        return {
            "accuracy": accuracy,
            "accuracy_low": low,
            "accuracy_high": high,
            "compression": statistics.fmean(self.compression),
            "compression_min": min(self.compression),
            "compression_max": max(self.compression),
            "bytes_ratio": statistics.fmean(self.bytes_ratio),
        }


def generation_args(batch: list[tasks.Sample], eos_token_id: int | Sequence[int] | None = None) -> dict:
    """``max_new_tokens``, ``eos_token_id`` and ``expected`` of a batch: each row stops at its sample's
    ``stop_ids`` (and ``eos_token_id``, if given) or at its budget, and an exact-match batch (the test bed) also at
    its first wrong token."""
    extra = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return {
        "max_new_tokens": max(s.max_new_tokens for s in batch),
        "eos_token_id": sorted({*extra, *(t for s in batch for t in s.stop_ids)}),
        "expected": [s.answer_ids for s in batch] if all(s.stops_early for s in batch) else None,
    }


def run_cell(
    model, policy: Policy | None, samples: list[tasks.Sample], eos_token_id: int | Sequence[int] | None, batch_size: int,
    chunk_size: int, tables=None, tokenizer=None,
) -> dict:
    """Accuracy, compression and bytes ratio of ``policy`` on ``samples`` (greedy, batched, prefill in chunks of
    ``chunk_size`` tokens with eviction after each).

    Generation stops as :func:`generation_args` says; scores are :func:`kvzap_lab.tasks.score_answer` (which needs
    ``tokenizer`` for a chat model's samples); see :meth:`Tally.result` for what is returned. ``tables`` are the
    oracle tables of the batches, for a policy that takes them.
    """
    tally = Tally()
    for i, batch in enumerate(batches(samples, batch_size)):
        if tables is not None:
            policy.scorer.set_scores(tables[i])
        out = generate(model, [s.input_ids for s in batch], policy, chunk_size=chunk_size, **generation_args(batch, eos_token_id))
        tally.add(batch, out, tokenizer)
    return tally.result()


def _key(record: dict) -> str:
    fields = ("model", "n_samples", "seed", "window", "sinks", "chunk_size", "policy", "setting", "task", "context_tokens", "samples")
    return json.dumps([record.get(f) for f in fields])


def samples_digest(samples: list[tasks.Sample]) -> str:
    """A short hash of what a cell's samples ask (prompts, references, budgets): part of the resume key, so a
    change of the task suite or of the corpus recomputes a cell instead of reusing a stale one."""
    digest = hashlib.sha256()
    for s in samples:
        digest.update(json.dumps([s.input_ids, s.answer_ids, list(s.references), s.scoring, list(s.stop_ids), s.max_new_tokens]).encode())
    return digest.hexdigest()[:16]


def read_records(path: Path) -> list[dict]:
    """The records of a results file (empty if it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_records(path: Path, records: list[dict]) -> None:
    """Write JSON lines atomically (:func:`kvzap_lab.io.atomic_write_text`)."""
    io.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def summarize(records: list[dict]) -> list[dict]:
    """Accuracy (pooled over the samples of every task and context length, with its 95 % Wilson interval) and
    mean compression per (policy, setting), sorted."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["policy"], json.dumps(r["setting"])), []).append(r)
    rows = []
    for (policy, setting), group in groups.items():
        n = sum(r["n_samples"] for r in group)
        accuracy = sum(r["accuracy"] * r["n_samples"] for r in group) / n
        low, high = wilson_interval(min(max(accuracy, 0.0), 1.0), n)
        rows.append({
            "policy": policy,
            "setting": json.loads(setting),
            "accuracy": accuracy,
            "accuracy_low": low,
            "accuracy_high": high,
            "compression": statistics.fmean(r["compression"] for r in group),
            "cells": len(group),
            "n_samples": n,
        })
    return sorted(rows, key=lambda r: (r["policy"], r["compression"]))


def format_table(records: list[dict]) -> str:
    """A plain-text table of every cell (accuracy with its 95 % Wilson interval), then the per-policy summary."""
    head = f"{'policy':<34} {'task':<18} {'ctx':>5} {'n':>4} {'acc [95% CI]':>22} {'compr':>6} {'bytes':>6} {'s/sample':>8}"
    lines = [head, "-" * len(head)]
    for r in records:
        label = Cell(r["policy"], tuple(r["setting"].items()), r["task"], r["context_tokens"]).label()
        per_sample = r["seconds"] / r["n_samples"]
        lines.append(
            f"{label:<34} {r['task']:<18} {r['context_tokens']:>5} {r['n_samples']:>4} "
            f"{format_interval(r['accuracy'], r['n_samples']):>22} {r['compression']:>6.3f} {r['bytes_ratio']:>6.3f} {per_sample:>8.2f}"
        )
    lines += ["", f"{'policy (pooled over tasks, lengths)':<34} {'acc [95% CI]':>22} {'compr':>6} {'x':>6}"]
    for s in summarize(records):
        label = Cell(s["policy"], tuple(s["setting"].items()), "", 0).label()
        ratio = compression_ratio(s["compression"])
        lines.append(f"{label:<34} {format_interval(s['accuracy'], s['n_samples']):>22} {s['compression']:>6.3f} {ratio:>6.2f}")
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> None:
    """Accuracy against compression, one line per policy (pooled over tasks and lengths) with 95 % Wilson error
    bars; the full cache is a dashed line in its interval's band."""
    fig, ax = plots.figure()
    by_policy: dict[str, list[dict]] = {}
    for s in summarize(records):
        by_policy.setdefault(s["policy"], []).append(s)
    for policy, points in by_policy.items():
        if policy == FULL:
            full = points[0]
            ax.axhline(full["accuracy"], color="black", linestyle="--", label="full cache")
            ax.axhspan(full["accuracy_low"], full["accuracy_high"], color="black", alpha=0.08)
            continue
        points = sorted(points, key=lambda p: p["compression"])
        accuracy = [p["accuracy"] for p in points]
        errors = [[a - p["accuracy_low"] for a, p in zip(accuracy, points)], [p["accuracy_high"] - a for a, p in zip(accuracy, points)]]
        ax.errorbar([p["compression"] for p in points], accuracy, yerr=errors, marker="o", capsize=3, label=policy)
    plots.accuracy_compression_axes(ax, ylabel="accuracy (95 % Wilson interval)")
    plots.save(fig, path, dpi=120)


def cells_for(
    policies: list[tuple[str, Path | None]], taus, keep_ratios, task_names, lengths, tau_offsets=None
) -> list[tuple[Cell, Path | None]]:
    """Every (cell, checkpoint) of the grid; ``tau_offsets`` (one per layer) go with every tau."""
    out = []
    for name, checkpoint in policies:
        label = name if checkpoint is None else f"{name}@{checkpoint}"
        if name == FULL:
            settings = [()]
        elif uses_threshold(name, checkpoint):
            offsets = () if tau_offsets is None else (("tau_offsets", tuple(tau_offsets)),)
            settings = [(("tau", float(t)), *offsets) for t in taus]
        else:
            settings = [(("keep_ratio", float(r)),) for r in keep_ratios]
        out += [(Cell(label, s, t, n), checkpoint) for s in settings for t in task_names for n in lengths]
    return out


def build_samples(model, tokenizer, grid: list[tuple[Cell, Path | None]], options: Options) -> dict[tuple[str, int], list[tasks.Sample]]:
    """The samples of every (task, context length) of ``grid``; ValueError (one line) for samples that cannot be
    built, e.g. a context longer than the model's window."""
    spec = describe(model)
    out: dict[tuple[str, int], list[tasks.Sample]] = {}
    for cell, _ in grid:
        key = (cell.task, cell.context_tokens)
        if key not in out:
            out[key] = tasks.make_samples(cell.task, tokenizer, options.n_samples, cell.context_tokens, options.seed)
            need = max(len(s.input_ids) + s.max_new_tokens for s in out[key])
            check_fits(spec, need, f"a {cell.task} sample with a {cell.context_tokens}-token context (prompt and answer)")
    return out


def _record(options: Options, cell: Cell, samples: list[tasks.Sample]) -> dict:
    return asdict(options) | {
        "policy": cell.policy,
        "setting": dict(cell.setting),
        "task": cell.task,
        "context_tokens": cell.context_tokens,
        "samples": samples_digest(samples),
    }


def _takes_table(policy: Policy | None) -> bool:
    return policy is not None and isinstance(policy.scorer, OracleTableScorer)


def _shared_prefill_group(model, tokenizer, cells: list[tuple[Cell, Policy | None]], samples: list[tasks.Sample],
                          batch_size: int, partial_path: Path) -> list[dict]:
    """Every cell of one (task, context length) from one prefill per batch (``--chunk-size 0``).

    Each batch is prefilled once with the full cache (:func:`kvzap_lab.engine.prefill`, with the attention mass
    when a policy accumulates attention) and every cell's policy branches from it, exactly as its own one-chunk
    ``generate`` would. The tallies are saved atomically to ``partial_path`` after every batch, so a killed run
    resumes at its next batch.
    """
    key = samples_digest(samples) + "|" + "|".join(c.label() for c, _ in cells)
    saved = json.loads(partial_path.read_text()) if partial_path.exists() else {}
    state = saved if saved.get("key") == key else {"key": key, "batches": 0, "tallies": [asdict(Tally()) for _ in cells]}
    tallies = [Tally(**t) for t in state["tallies"]]
    accumulating = any(p is not None and p.scorer.accumulates_attention for _, p in cells)
    for i, batch in enumerate(batches(samples, batch_size)):
        if i < state["batches"]:
            continue
        started = prefill(model, [s.input_ids for s in batch], attention_mass=accumulating)
        table = oracle_table(model, tokenizer, batch) if any(_takes_table(p) for _, p in cells) else None
        for (_, policy), tally in zip(cells, tallies):
            if _takes_table(policy):
                policy.scorer.set_scores(table)
            tally.add(batch, started.branch(policy, **generation_args(batch)), tokenizer)
        state = {"key": key, "batches": i + 1, "tallies": [asdict(t) for t in tallies]}
        io.atomic_write_json(partial_path, state, indent=None)
        kill_point("evaluate.batch")
    partial_path.unlink(missing_ok=True)
    return [t.result() for t in tallies]


def evaluate(
    model, tokenizer, grid: list[tuple[Cell, Path | None]], options: Options, out: Path, batch_size: int,
    progress: bool = True, samples: dict[tuple[str, int], list[tasks.Sample]] | None = None,
) -> list[dict]:
    """Run every cell of ``grid`` not already in ``out`` (resume), writing ``out`` after each.

    With ``options.chunk_size`` 0 every prompt is prefilled in one chunk (prefill attention is full, eviction
    starts after it: KVzap's and kvpress's semantics) and all cells of a task and context length branch from one
    prefill per batch; the cells of such a group are written together.

    Args:
        model, tokenizer: what :func:`kvzap_lab.model.load_model` returns.
        grid: the (cell, checkpoint) pairs of :func:`cells_for`.
        options: what else decides a result (part of the resume key, with the cell and a digest of its samples).
        out: the JSON-lines file, rewritten atomically after every cell (or group of cells).
        batch_size: samples generated together.
        progress: show a progress bar over the cells.
        samples: the samples of :func:`build_samples` (built here when not given).
    Returns:
        the records of the grid (old and new) in grid order.
    Raises:
        ValueError: samples that cannot be built (e.g. a context longer than the model's window).
    """
    records = read_records(out)
    done = {_key(r): r for r in records}
    samples = build_samples(model, tokenizer, grid, options) if samples is None else samples
    todo: dict[tuple[str, int], list[tuple[Cell, Path | None]]] = {}
    for cell, checkpoint in grid:
        key = (cell.task, cell.context_tokens)
        if _key(_record(options, cell, samples[key])) not in done:
            todo.setdefault(key, []).append((cell, checkpoint))
    oracle_tables: dict[tuple[str, int], list[torch.Tensor]] = {}  # shared by the taus of the oracle
    bar = tqdm(total=sum(map(len, todo.values())), desc="cells", disable=not progress)

    def finish(cells: list[Cell], results: list[dict], seconds: float) -> None:
        for cell, result in zip(cells, results):
            record = _record(options, cell, samples[(cell.task, cell.context_tokens)]) | result
            spent = round(seconds, 2)
            records.append(record | {"seconds": spent, "seconds_per_sample": round(spent / options.n_samples, 3)})
        write_records(out, records)
        bar.update(len(cells))

    for key, group in todo.items():
        policies = [
            (cell, build_policy(cell.policy.partition("@")[0], checkpoint, cell.setting, cell.context_tokens, model,
                                options.window, options.sinks))
            for cell, checkpoint in group
        ]
        if options.chunk_size == 0:
            started = time.perf_counter()
            results = _shared_prefill_group(model, tokenizer, policies, samples[key], batch_size,
                                            out.with_name(f".{out.name}.partial.json"))
            finish([cell for cell, _ in policies], results, (time.perf_counter() - started) / len(policies))
            continue
        for cell, policy in policies:
            started = time.perf_counter()
            tables = None
            if _takes_table(policy):
                if key not in oracle_tables:
                    oracle_tables[key] = [oracle_table(model, tokenizer, b) for b in batches(samples[key], batch_size)]
                tables = oracle_tables[key]
            result = run_cell(model, policy, samples[key], None, batch_size, options.chunk_size, tables, tokenizer)
            finish([cell], [result], time.perf_counter() - started)
    bar.close()
    done = {_key(r): r for r in records}
    return [done[_key(_record(options, cell, samples[(cell.task, cell.context_tokens)]))] for cell, _ in grid]


def _offsets(text: str) -> tuple[float, ...]:
    """argparse type of ``--tau-offsets``: finite numbers, comma-separated, one per layer."""
    try:
        values = tuple(cli.finite_float(part) for part in text.split(","))
    except argparse.ArgumentTypeError:
        values = ()
    if not values:
        raise argparse.ArgumentTypeError(f"tau offsets are finite numbers, one per layer, comma-separated (--tau-offsets=-0.5,0,0.5,0); got {text!r}")
    return values


def _log_to_mlflow(args, records: list[dict], plot_path: Path) -> str:
    """Log the evaluation run: the grid's params; per cell and per pooled (policy, setting) the accuracy, its
    95 % Wilson bounds and the compression; the plot and the results file."""
    metrics = {}
    for r in records:
        label = Cell(r["policy"], tuple(r["setting"].items()), r["task"], r["context_tokens"]).label()
        low, high = wilson_interval(min(max(r["accuracy"], 0.0), 1.0), r["n_samples"])
        for key, value in (("accuracy", r["accuracy"]), ("accuracy_low", low), ("accuracy_high", high), ("compression", r["compression"])):
            metrics[tracking.metric_name(label, r["task"], r["context_tokens"], key)] = value
    for s in summarize(records):
        label = Cell(s["policy"], tuple(s["setting"].items()), "", 0).label()
        for key in ("accuracy", "accuracy_low", "accuracy_high", "compression"):
            metrics[tracking.metric_name(label, "pooled", key)] = s[key]
    keys = ("model", "policies", "taus", "tau_offsets", "keep_ratios", "tasks", "context_tokens", "n_samples", "seed",
            "window", "sinks", "chunk_size", "batch_size")
    return tracking.log_run(
        args.tracking_uri, args.experiment, "python -m kvzap_lab.evaluate", run_name=f"evaluate-{args.model}",
        params={k: vars(args)[k] for k in keys}, metrics=metrics, artifacts=[plot_path, args.out],
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvzap_lab.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="testbed", help=MODEL_HELP)
    parser.add_argument("--policies", nargs="+", default=list(DEFAULT_POLICIES), help="NAME or NAME@CHECKPOINT_DIR ('full' = full cache)")
    parser.add_argument("--taus", nargs="+", type=cli.finite_float, default=list(DEFAULT_TAUS), help="thresholds for threshold policies")
    parser.add_argument(
        "--tau-offsets", type=_offsets, default=None,
        help="per-layer offsets added to every tau, one per layer (--tau-offsets=-0.5,0,0.5,0: layer l uses tau + offset l)",
    )
    parser.add_argument("--keep-ratios", nargs="+", type=cli.fraction(), default=list(DEFAULT_KEEP_RATIOS), help="per-head budgets for the baselines")
    parser.add_argument("--tasks", nargs="+", action=cli.ListOption, allowed=tasks.TASKS, default=list(tasks.TASKS))
    parser.add_argument("--context-tokens", nargs="+", type=cli.positive_int, default=[512, 1024])
    parser.add_argument("--n-samples", type=cli.positive_int, default=200, help="samples per cell")
    parser.add_argument("--seed", type=int, default=1, help="sample seed")
    parser.add_argument("--window", type=cli.non_negative_int, default=DEFAULT_WINDOW, help="sliding window (tokens never evicted)")
    parser.add_argument("--sinks", type=cli.non_negative_int, default=DEFAULT_SINKS, help="first tokens never evicted")
    parser.add_argument(
        "--chunk-size", type=cli.non_negative_int, default=DEFAULT_CHUNK,
        help="prefill chunk in tokens, evicting after each; 0: the whole prompt in one chunk (KVzap/kvpress semantics), "
        "one prefill per batch shared by every policy of a task and length (much faster with many policies)",
    )
    parser.add_argument("--batch-size", type=cli.positive_int, default=16)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=Path("results/eval/eval.jsonl"), help="JSON lines (resumable)")
    parser.add_argument("--plot", type=Path, default=None, help="PNG (default: next to --out)")
    parser.add_argument("--json", action="store_true", help="end with one JSON summary line")
    parser.add_argument("--tracking-uri", default=None, help="log the run to MLflow (sqlite:///path/mlflow.db or "
                        "http://host:port): params, per-cell accuracy with its Wilson interval and compression, the plot")
    parser.add_argument("--experiment", default="kvzap-lab-evaluate", help="MLflow experiment (with --tracking-uri)")
    args = parser.parse_args(argv)

    if args.tracking_uri:
        tracking.check_tracking_uri(args.tracking_uri)  # within seconds, before any work
    io.check_writable(args.out.parent)
    policies = [parse_policy(p) for p in args.policies]
    model, tokenizer = load_model(args.model, device=args.device)
    for name, checkpoint in policies:  # a bad or mismatched checkpoint fails here, before any cell runs
        if checkpoint is not None:
            get_policy(name, checkpoint=checkpoint, model=model)
    n_layers = describe(model).n_layers
    if args.tau_offsets is not None and len(args.tau_offsets) != n_layers:
        parser.error(f"--tau-offsets has {len(args.tau_offsets)} values; the model has {n_layers} layers (one offset per layer)")
    options = Options(
        model=fingerprint(model), n_samples=args.n_samples, seed=args.seed, window=args.window, sinks=args.sinks,
        chunk_size=args.chunk_size,
    )
    grid = cells_for(policies, args.taus, args.keep_ratios, args.tasks, args.context_tokens, args.tau_offsets)
    samples = build_samples(model, tokenizer, grid, options)
    records = evaluate(model, tokenizer, grid, options, args.out, args.batch_size, progress=not args.json, samples=samples)
    plot_path = args.plot or args.out.with_suffix(".png")
    plot(records, plot_path)
    print(format_table(records), file=sys.stderr if args.json else sys.stdout)
    run_id = _log_to_mlflow(args, records, plot_path) if args.tracking_uri else None
    if args.json:
        print(json.dumps({"out": str(args.out), "plot": str(plot_path), "cells": len(records), "summary": summarize(records)}
                         | ({"mlflow_run_id": run_id} if run_id else {})))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
