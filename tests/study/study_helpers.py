"""Fixtures and helpers of the study tests (imported by each test file: a second conftest.py would shadow
tests/conftest.py for ``import conftest``): a tiny random Llama with a tiny oracle dataset, a ready MLflow
store, study arguments on the tiny model, the command run in-process, and readers of both stores."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from kvzap_lab import cli, collect
from kvzap_lab.model import fingerprint, random_tiny_model
from kvzap_lab.study import cli as study_cli
from kvzap_lab.testbed import train_tokenizer

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


_BUILT: dict = {}  # fixtures imported by several test files are built once per session


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny random Llama checkpoint with the chat tokenizer, and a tiny oracle dataset collected on it."""
    if "tiny" not in _BUILT:
        _BUILT["tiny"] = _make_tiny(tmp_path_factory)
    return _BUILT["tiny"]


def _make_tiny(tmp_path_factory):
    tokenizer = train_tokenizer(vocab_size=300, lines=2000)
    model = random_tiny_model(
        "llama", seed=0, vocab_size=len(tokenizer), max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    root = tmp_path_factory.mktemp("study")
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    argv = ["--model", str(root / "model"), "--out", str(root / "data"), "--tasks", "single_needle", "copy",
            "--n-sequences", "8", "--context-tokens", "40", "--tokens-per-sequence", "16",
            "--dtype", "float32", "--shard-size", "16", "--batch-size", "8"]  # the test bed's storage (pinned study)
    assert collect.main(argv) == 0
    return root / "model", root / "data", model


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """An MLflow sqlite store with its tables created: creating them takes ~10-20 s, so each test copies it."""
    if "mlflow" not in _BUILT:
        path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
        MlflowClient(f"sqlite:///{path}").search_experiments()
        _BUILT["mlflow"] = path
    return _BUILT["mlflow"]


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
