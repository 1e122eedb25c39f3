"""Accuracy against compression: policies x settings x tasks x context lengths, with the evicting engine.

    python -m kvzap_lab.evaluate --model testbed --policies full oracle kvzap_mlp@results/train/mlp \\
        streaming_llm knorm --taus -7 -6 -5 --keep-ratios 0.5 0.25 --tasks single_needle kv_retrieval \\
        --context-tokens 512 1024 --n-samples 200 --out results/eval/eval.jsonl [--json]

Each cell (policy, setting, task, context length) greedily generates the answers of ``--n-samples`` seeded
samples in batches (left padding, chunked prefill, eviction during prefill and decoding) and records the
exact-match accuracy (:func:`kvzap_lab.tasks.score_answer`; token accuracy for ``copy``), the achieved
compression (fraction of KV pairs evicted over prompt and generated tokens) and the bytes the compacted cache
held relative to a full cache. Settings: ``tau`` for policies whose rule is a threshold (the oracle, the
KVzap scorers; with ``--tau-offsets=a,b,...`` layer l uses ``tau`` plus its offset, as the study's rule does), ``keep_ratio`` (a per-head :class:`~kvzap_lab.policy.TopK` budget of ``keep_ratio`` times
the context length) for the training-free baselines, nothing for ``full`` (full cache). A policy is ``NAME`` or ``NAME@CHECKPOINT_DIR`` (a trained scorer).

Results go to a JSON-lines file, rewritten atomically after every cell; a rerun skips the cells already there
(same model, samples and seed), so an interrupted run resumes. A table is printed, accuracy against
compression is plotted per policy (PNG next to the JSON lines), and ``--json`` ends with one summary line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from kvzap_lab import tasks
from kvzap_lab.engine import DEFAULT_CHUNK, generate
from kvzap_lab.model import describe, fingerprint, load_model
from kvzap_lab.oracle import score_contexts
from kvzap_lab.policy import DEFAULT_SINKS, DEFAULT_WINDOW, Policy, Threshold, TopK, get_policy, resolve_policy

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
    if name != FULL and hasattr(resolve_policy(name), "load") and not path:  # unknown names fail, listing known ones
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
    rule = getattr(resolve_policy(name), "default_rule", None)
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


def oracle_table(model, tokenizer, batch: list[tasks.Sample]) -> torch.Tensor:
    """Oracle scores by absolute position ``[b, layers, kv_heads, n]``: log KVzip+ on each context, +inf (kept)
    on the template and question tokens."""
    results = score_contexts(model, tokenizer, [s.context_ids for s in batch])
    layers, heads = results[0].scores.shape[:2]
    table = torch.full((len(batch), layers, heads, max(len(s.input_ids) for s in batch)), math.inf)
    for row, (sample, result) in enumerate(zip(batch, results)):
        start, end = sample.context_span
        table[row, :, :, start:end] = result.scores
    return table


def batches(samples: list[tasks.Sample], batch_size: int) -> list[list[tasks.Sample]]:
    """Consecutive batches of ``batch_size`` samples."""
    return [samples[i : i + batch_size] for i in range(0, len(samples), batch_size)]


def run_cell(
    model, policy: Policy | None, samples: list[tasks.Sample], eos_token_id: int, batch_size: int, chunk_size: int, tables=None
) -> dict:
    """Accuracy, compression and bytes ratio of ``policy`` on ``samples`` (greedy, batched, stopping at
    ``eos_token_id``); ``tables`` are the oracle tables of the batches, for a policy that takes them."""
    scores, compression, bytes_ratio = [], [], []
    for i, batch in enumerate(batches(samples, batch_size)):
        if tables is not None:
            policy.scorer.set_scores(tables[i])
        exact = batch[0].task != "copy"
        out = generate(
            model,
            [s.input_ids for s in batch],
            policy,
            max(len(s.answer_ids) for s in batch),
            eos_token_id=eos_token_id,
            chunk_size=chunk_size,
            expected=[s.answer_ids for s in batch] if exact else None,
        )
        scores += [tasks.score_answer(s, ids) for s, ids in zip(batch, out.tokens)]
        compression += out.compression.per_row.tolist()
        bytes_ratio.append(out.bytes_held / out.full_bytes)
    return {
        "accuracy": statistics.fmean(scores),
        "compression": statistics.fmean(compression),
        "compression_min": min(compression),
        "compression_max": max(compression),
        "bytes_ratio": statistics.fmean(bytes_ratio),
    }


def _key(record: dict) -> str:
    fields = ("model", "n_samples", "seed", "window", "sinks", "chunk_size", "policy", "setting", "task", "context_tokens")
    return json.dumps([record[f] for f in fields])


def read_records(path: Path) -> list[dict]:
    """The records of a results file (empty if it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_records(path: Path, records: list[dict]) -> None:
    """Write JSON lines atomically (temporary file in the same directory, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(tmp, path)


def summarize(records: list[dict]) -> list[dict]:
    """Mean accuracy and compression per (policy, setting) over tasks and context lengths, sorted."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["policy"], json.dumps(r["setting"])), []).append(r)
    rows = [
        {
            "policy": policy,
            "setting": json.loads(setting),
            "accuracy": statistics.fmean(r["accuracy"] for r in group),
            "compression": statistics.fmean(r["compression"] for r in group),
            "cells": len(group),
        }
        for (policy, setting), group in groups.items()
    ]
    return sorted(rows, key=lambda r: (r["policy"], r["compression"]))


def format_table(records: list[dict]) -> str:
    """A plain-text table of every cell, then the per-policy summary."""
    head = f"{'policy':<34} {'task':<18} {'ctx':>5} {'n':>4} {'acc':>6} {'compr':>6} {'bytes':>6}"
    lines = [head, "-" * len(head)]
    for r in records:
        label = Cell(r["policy"], tuple(r["setting"].items()), r["task"], r["context_tokens"]).label()
        lines.append(
            f"{label:<34} {r['task']:<18} {r['context_tokens']:>5} {r['n_samples']:>4} {r['accuracy']:>6.3f} "
            f"{r['compression']:>6.3f} {r['bytes_ratio']:>6.3f}"
        )
    lines += ["", f"{'policy (mean over tasks, lengths)':<34} {'acc':>6} {'compr':>6} {'x':>6}"]
    for s in summarize(records):
        label = Cell(s["policy"], tuple(s["setting"].items()), "", 0).label()
        ratio = 1 / max(1 - s["compression"], 1e-9)
        lines.append(f"{label:<34} {s['accuracy']:>6.3f} {s['compression']:>6.3f} {ratio:>6.2f}")
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> None:
    """Accuracy against compression, one line per policy (mean over tasks and lengths); full cache dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_policy: dict[str, list[dict]] = {}
    for s in summarize(records):
        by_policy.setdefault(s["policy"], []).append(s)
    for policy, points in by_policy.items():
        if policy == FULL:
            ax.axhline(points[0]["accuracy"], color="black", linestyle="--", label="full cache")
            continue
        points = sorted(points, key=lambda p: p["compression"])
        ax.plot([p["compression"] for p in points], [p["accuracy"] for p in points], marker="o", label=policy)
    ax.set_xlabel("compression (fraction of KV pairs evicted)")
    ax.set_ylabel("accuracy (exact match)")
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


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


def evaluate(model, tokenizer, grid: list[tuple[Cell, Path | None]], options: Options, out: Path, batch_size: int, progress: bool = True) -> list[dict]:
    """Run every cell of ``grid`` not already in ``out`` (resume), writing ``out`` after each; returns the
    records of the grid (old and new) in grid order."""
    records = read_records(out)
    done = {_key(r): r for r in records}
    samples: dict[tuple[str, int], list[tasks.Sample]] = {}
    oracle_tables: dict[tuple[str, int], list[torch.Tensor]] = {}  # shared by the taus of the oracle
    results = []
    for cell, checkpoint in tqdm(grid, desc="cells", disable=not progress):
        record = asdict(options) | {
            "policy": cell.policy,
            "setting": dict(cell.setting),
            "task": cell.task,
            "context_tokens": cell.context_tokens,
        }
        if _key(record) in done:
            results.append(done[_key(record)])
            continue
        key = (cell.task, cell.context_tokens)
        if key not in samples:
            samples[key] = tasks.make_samples(cell.task, tokenizer, options.n_samples, cell.context_tokens, options.seed)
        name = cell.policy.partition("@")[0]
        policy = build_policy(name, checkpoint, cell.setting, cell.context_tokens, model, options.window, options.sinks)
        started = time.perf_counter()
        tables = None
        if policy is not None and hasattr(policy.scorer, "set_scores"):
            if key not in oracle_tables:
                oracle_tables[key] = [oracle_table(model, tokenizer, b) for b in batches(samples[key], batch_size)]
            tables = oracle_tables[key]
        end = tokenizer.convert_tokens_to_ids(tasks.END)
        record |= run_cell(model, policy, samples[key], end, batch_size, options.chunk_size, tables)
        record["seconds"] = round(time.perf_counter() - started, 2)
        records.append(record)
        done[_key(record)] = record
        write_records(out, records)
        results.append(record)
    return results


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"taus must be finite numbers (log-score thresholds); got {text}")
    return value


def _offsets(text: str) -> tuple[float, ...]:
    """argparse type of ``--tau-offsets``: finite numbers, comma-separated, one per layer."""
    try:
        values = tuple(_finite(part) for part in text.split(","))
    except (ValueError, argparse.ArgumentTypeError):
        values = ()
    if not values:
        raise argparse.ArgumentTypeError(f"tau offsets are finite numbers, one per layer, comma-separated (--tau-offsets=-0.5,0,0.5,0); got {text!r}")
    return values


def _ratio(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"keep ratios are fractions of candidate pairs kept, in [0, 1]; got {text}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an int >= 0; got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an int >= 1, with a message naming the rule."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1; got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kvzap_lab.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="testbed", help="'testbed', a checkpoint directory or a hub name")
    parser.add_argument("--policies", nargs="+", default=list(DEFAULT_POLICIES), help="NAME or NAME@CHECKPOINT_DIR ('full' = full cache)")
    parser.add_argument("--taus", nargs="+", type=_finite, default=list(DEFAULT_TAUS), help="thresholds for threshold policies")
    parser.add_argument(
        "--tau-offsets", type=_offsets, default=None,
        help="per-layer offsets added to every tau, one per layer (--tau-offsets=-0.5,0,0.5,0: layer l uses tau + offset l)",
    )
    parser.add_argument("--keep-ratios", nargs="+", type=_ratio, default=list(DEFAULT_KEEP_RATIOS), help="per-head budgets for the baselines")
    parser.add_argument("--tasks", nargs="+", default=list(tasks.TASKS), choices=tasks.TASKS)
    parser.add_argument("--context-tokens", nargs="+", type=positive_int, default=[512, 1024])
    parser.add_argument("--n-samples", type=positive_int, default=200, help="samples per cell")
    parser.add_argument("--seed", type=int, default=1, help="sample seed")
    parser.add_argument("--window", type=_non_negative, default=DEFAULT_WINDOW, help="sliding window (tokens never evicted)")
    parser.add_argument("--sinks", type=_non_negative, default=DEFAULT_SINKS, help="first tokens never evicted")
    parser.add_argument("--chunk-size", type=positive_int, default=DEFAULT_CHUNK, help="prefill chunk (tokens)")
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", type=Path, default=Path("results/eval/eval.jsonl"), help="JSON lines (resumable)")
    parser.add_argument("--plot", type=Path, default=None, help="PNG (default: next to --out)")
    parser.add_argument("--json", action="store_true", help="end with one JSON summary line")
    args = parser.parse_args(argv)

    policies = [parse_policy(p) for p in args.policies]
    model, tokenizer = load_model(args.model, device=args.device)
    n_layers = describe(model).n_layers
    if args.tau_offsets is not None and len(args.tau_offsets) != n_layers:
        parser.error(f"--tau-offsets has {len(args.tau_offsets)} values; the model has {n_layers} layers (one offset per layer)")
    options = Options(
        model=fingerprint(model), n_samples=args.n_samples, seed=args.seed, window=args.window, sinks=args.sinks,
        chunk_size=args.chunk_size,
    )
    grid = cells_for(policies, args.taus, args.keep_ratios, args.tasks, args.context_tokens, args.tau_offsets)
    records = evaluate(model, tokenizer, grid, options, args.out, args.batch_size, progress=not args.json)
    plot_path = args.plot or args.out.with_suffix(".png")
    plot(records, plot_path)
    print(format_table(records), file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps({"out": str(args.out), "plot": str(plot_path), "cells": len(records), "summary": summarize(records)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
