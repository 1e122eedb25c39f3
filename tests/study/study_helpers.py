"""Helpers of the study tests: study arguments on the tiny model, the command run in-process, and readers of
both stores."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from kvzap_lab import cli
from kvzap_lab.model import fingerprint
from kvzap_lab.study import cli as study_cli

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def args_for(tiny, results: Path, *extra: str, template: Path | None = None) -> list[str]:
    """Study arguments on the tiny model; with ``template``, the results folder starts with a ready MLflow store."""
    model_dir, data_dir, _ = tiny
    if template is not None and not (results / "mlflow.db").exists():
        results.mkdir(parents=True, exist_ok=True)
        shutil.copy(template, results / "mlflow.db")
    return ["--policy", "mlp", "--model", str(model_dir), "--data", str(data_dir), "--results", str(results),
            "--tasks", "single_needle", "copy", "--samples-per-task", "2", "--context-tokens", "40",
            "--space", "epochs=2", "--verify-samples", "3", *extra]


def run_cli(argv: list[str]) -> int:
    """``python -m kvzap_lab.study ARGV`` in this process: its exit code (2 and one line for bad input)."""
    return cli.run(study_cli.main, argv, prog=study_cli.PROG)


def default_name(tiny) -> str:
    """The default study name: policy, model directory name, model fingerprint."""
    return f"kvzap_mlp-model-{fingerprint(tiny[2])[:8]}"


def trials_of(results: Path, name: str) -> list:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{results / 'optuna.db'}").get_trials()


def runs_of(tracking_uri: str, name: str) -> tuple[list, list]:
    """(parent runs, trial runs) of a study's MLflow experiment."""
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id], max_results=1000)
    return [r for r in runs if r.data.tags.get("kind") == "study"], [r for r in runs if "optuna.trial" in r.data.tags]


def finished_set(trials) -> list[tuple[str, tuple]]:
    """The complete trials as sorted (params, values) pairs: what an interrupted study must end with."""
    return sorted((json.dumps(t.params, sort_keys=True), tuple(t.values)) for t in trials if t.state == TrialState.COMPLETE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
