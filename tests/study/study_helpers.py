"""Fixtures and helpers of the study tests (imported by each test file: a second conftest.py would shadow
tests/conftest.py for ``import conftest``): a tiny random Llama with a tiny oracle dataset, a ready MLflow
store, study arguments on the tiny model, the command run in-process or in processes of its own (forked from a
server that imported everything once), and readers of both stores."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import socket
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from kvzap_lab import cli, collect
from kvzap_lab.model import fingerprint, random_tiny_model
from kvzap_lab.study import cli as study_cli
from kvzap_lab.study import runner  # noqa: F401  (imported by the fork server, with what it imports)
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


# What a study imports on its way, imported once by the fork server: each study process then starts at once.
PRELOAD = ["study_helpers", "torch", "transformers", "sklearn.ensemble", "matplotlib.pyplot", "mlflow",
           "mlflow.store.tracking.sqlalchemy_store", "mlflow.store.model_registry.sqlalchemy_store",
           "optuna.storages", "kvzap_lab.evaluate", "kvzap_lab.engine", "kvzap_lab.policies.kvzap_mlp"]


def start_study(argv: list[str], env: dict, log: Path) -> multiprocessing.Process:
    """``python -m kvzap_lab.study ARGV`` in a process of its own with environment ``env`` (its output in
    ``log``), forked from multiprocessing's fork server, which has imported the study once (``PRELOAD``): a real
    process that a kill point ends with SIGKILL and that races others for a new store, without paying ~10 s of
    imports each time. Its ``exitcode`` after ``join()``: the command's (``-9``: killed)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    process = context.Process(target=_study_main, args=(argv, env, str(log)))
    process.start()
    return process


def _study_main(argv: list[str], env: dict, log: str) -> None:
    import torch

    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.clear()
    os.environ.update(env)
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "1")))
    sys.exit(run_cli(argv))


def run_study(argv: list[str], env: dict, log: Path) -> int:
    """:func:`start_study`, then its exit code."""
    process = start_study(argv, env, log)
    process.join()
    return process.exitcode


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
