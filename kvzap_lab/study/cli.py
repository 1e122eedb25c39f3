"""The command line: ``python -m kvzap_lab.study`` (flags named as :class:`StudyConfig`'s fields)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from kvzap_lab import tasks
from kvzap_lab.cli import fraction, non_negative_int, positive_int
from kvzap_lab.study.config import (
    ACCURACY_TOLERANCE,
    MAX_FLOPS_RATIO,
    OBJECTIVES,
    OTHER_PROFILE,
    PROFILES,
    REWARD_PENALTY,
    SAMPLERS,
    StudyConfig,
)
from kvzap_lab.study.report import format_table, json_summary

PROG = "python -m kvzap_lab.study"


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds; got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds > 0; got {text}")
    return value


def _by_model(field: str) -> str:
    """The profile defaults of a flag, e.g. ``[testbed 64, smollm2-135m 12, other models 64]``."""

    def text(value) -> str:
        return " ".join(value) if isinstance(value, tuple) else str(value)

    values = [f"{name} {text(getattr(profile, field))}" for name, profile in PROFILES.items()]
    return f"[{', '.join(values)}, other models {text(getattr(OTHER_PROFILE, field))}]"


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m kvzap_lab.study``."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Optuna search of a scorer's hyper-parameters and the eviction rule (tau, per-layer offsets, "
        "window), tracked in MLflow. Every option has a default: `--policy mlp` alone runs on the test bed. Defaults that "
        "depend on the model come from its profile (kvzap_lab/study/config.py: PROFILES), printed at the start.",
    )
    p.add_argument("--policy", required=True, help="trainable policy to tune: mlp, linear, shared, gbdt (or a registered "
                   "name, or path/to/file.py:ClassName with a search_space(spec))")
    p.add_argument("--n-trials", type=positive_int, default=None, help="finished trials the whole study "
                   "should hold, over all its workers and machines (each stops once the study holds that many; a "
                   f"rerun continues up to it; the first ones are the start points) {_by_model('n_trials')}")
    p.add_argument("--timeout", type=_seconds, default=None, help="stop starting trials after this many seconds")
    p.add_argument("--study-name", default=None, help="Optuna study (and MLflow experiment) name; reuse it to "
                   "continue a study [<policy>-<model>-<model fingerprint>]")
    p.add_argument("--storage", default=None, help="Optuna RDB URL shared by all workers, e.g. "
                   "postgresql://user:pass@host/db (give machines a shared --tracking-uri too) "
                   "[sqlite:///<results>/optuna.db]")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI: sqlite:///file.db or http://host:port "
                   "[sqlite:///<results>/mlflow.db]")
    p.add_argument("--objectives", choices=sorted(OBJECTIVES), default="pareto", help="pareto: maximise accuracy and "
                   f"compression (a Pareto front); reward: maximise compression - {REWARD_PENALTY:g} x accuracy lost "
                   f"beyond {ACCURACY_TOLERANCE:g} (single objective, with pruning) [pareto]")
    p.add_argument("--sampler", choices=list(SAMPLERS), default="tpe", help="Optuna sampler: tpe (one or several "
                   "objectives), nsga2 (several; population 16), random, cmaes (one objective only: --objectives "
                   "reward; needs the cmaes package) [tpe]")
    p.add_argument("--max-flops-ratio", type=fraction(), default=MAX_FLOPS_RATIO, help="most a trial's scorer may "
                   "cost per token, as a fraction of the model's projection FLOPs (q, k, v, o, MLP); a trial above it "
                   "is infeasible: the sampler steers away from it (tpe, nsga2) and it is left out of the Pareto front, "
                   f"the best point and the verification; 1: no limit [{MAX_FLOPS_RATIO:g}]")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampler, the scorers and the evaluation samples [0]")
    p.add_argument("--workers", type=positive_int, default=1, help="worker processes on this machine (this one and N-1 "
                   "more, each loading the model); other machines run the same command with the same --storage [1]")
    p.add_argument("--model", default="testbed", help="'testbed', a checkpoint directory or a hub name [testbed]")
    p.add_argument("--tasks", nargs="+", choices=tasks.TASKS, metavar="TASK", default=None, help="evaluation "
                   f"tasks: {', '.join(tasks.TASKS)} (the defaults are those on which the eviction target is "
                   "measured; kv_retrieval contexts are all facts, so query-agnostic eviction costs points on it "
                   f"from ~3x on; copy is the oracle's pretext task, not a benchmark) {_by_model('tasks')}")
    p.add_argument("--verify-samples", type=non_negative_int, default=None, help="fresh samples per "
                   "task on which the best point within 1 point of full-cache accuracy is re-checked at the end; 0: "
                   f"skip {_by_model('verify_samples')}")
    p.add_argument("--samples-per-task", type=positive_int, default=None, help="held-out samples "
                   f"answered per task and trial {_by_model('samples_per_task')}")
    p.add_argument("--context-tokens", type=positive_int, default=None, help="context length of the "
                   f"samples (and of a collected dataset) {_by_model('context_tokens')}")
    p.add_argument("--chunk-size", type=non_negative_int, default=None, help="prefill chunk of the evaluation in "
                   "tokens, evicting after each; 0: the whole prompt in one chunk (KVzap's semantics), prefilled once "
                   f"per batch and shared by the full cache and every trial {_by_model('chunk_size')}")
    p.add_argument("--batch-size", type=positive_int, default=None, help="samples answered together "
                   f"{_by_model('batch_size')}")
    p.add_argument("--train-rows", type=non_negative_int, default=None, help="training rows drawn (seeded) from the "
                   "oracle dataset for every fit, held-out rows in the same proportion; 0: all "
                   f"{_by_model('train_rows')}")
    p.add_argument("--results", type=Path, default=Path("results"), help="local results folder: optuna.db, mlflow.db, "
                   "mlartifacts/, data/ [results]")
    p.add_argument("--data", type=Path, default=None, help="oracle dataset directory (kvzap_lab.collect); collected "
                   "there if missing [<results>/data/<model>, or <model>-<fingerprint> if that holds another model's]")
    p.add_argument("--space", action="append", default=[], metavar="NAME=LOW:HIGH", help="override a search "
                   "dimension: NAME=LOW:HIGH, NAME=A,B,C or NAME=VALUE (fixed); repeatable. Start points outside "
                   "it are skipped, with a message")
    p.add_argument("--no-baseline", dest="baseline", action="store_false", help="do not queue the start points "
                   "(paper defaults, calibrated taus) in a new study")
    p.add_argument("--heartbeat-interval", type=positive_int, default=10, help="seconds between a running trial's "
                   "heartbeats [10]")
    p.add_argument("--grace-period", type=positive_int, default=60, help="seconds without heartbeat after which a "
                   "running trial of another machine counts as dead, is marked FAIL and queued again (on this "
                   "machine a trial whose process is gone is at once) [60]")
    p.add_argument("--worker-index", type=non_negative_int, default=0, help="this worker's index (offsets the sampler "
                   "seed); give each machine its own when several share a storage [0]")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON line on stdout (the table "
                   "goes to stderr)")
    p.add_argument("--parent-run-id", default=None, help=argparse.SUPPRESS)  # set by --workers for its children
    return p


def config_from_args(args: argparse.Namespace) -> StudyConfig:
    """The :class:`StudyConfig` of parsed flags."""
    return StudyConfig(**{f.name: getattr(args, f.name) for f in fields(StudyConfig)})


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code. Bad input raises (``kvzap_lab.cli.run`` prints it as
    one line and returns 2)."""
    from kvzap_lab.study.runner import run

    args = parser().parse_args(argv)
    summary = run(config_from_args(args))
    if summary is None:  # a worker process: its parent reports
        return 0
    report = "\n".join([
        format_table(summary),
        "",
        f"study {summary['study_name']!r} in {summary['storage']}; MLflow experiment {summary['study_name']!r}, "
        f"parent run {summary['parent_run_id']}",
        f"browse: {summary['browse']}",
    ])
    if args.json:
        print(report, file=sys.stderr)
        print(json.dumps(json_summary(summary)))
    else:
        print(report)
    return 0
