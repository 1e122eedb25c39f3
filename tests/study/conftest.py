"""Fixtures of the study tests: a tiny random Llama with a tiny oracle dataset, and a ready MLflow store."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from kvzap_lab import collect
from kvzap_lab.model import random_tiny_model
from kvzap_lab.testbed import train_tokenizer


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny random Llama checkpoint with the chat tokenizer, and a tiny oracle dataset collected on it."""
    tokenizer = train_tokenizer(vocab_size=300, lines=2000)
    model = random_tiny_model(
        "llama", seed=0, vocab_size=len(tokenizer), max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    root = tmp_path_factory.mktemp("study")
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    argv = ["--model", str(root / "model"), "--out", str(root / "data"), "--tasks", "single_needle,copy",
            "--n-sequences", "8", "--context-tokens", "40", "--tokens-per-sequence", "16"]
    assert collect.main(argv) == 0
    return root / "model", root / "data", model


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory) -> Path:
    """An MLflow sqlite store with its tables created: creating them takes ~10-20 s, so each test copies it."""
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path
