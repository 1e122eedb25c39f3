"""python -m kvzap_lab.finetune: a tiny run end to end (scorer checkpoint, metrics, MLflow), resume after a crash and
after kill -9 to the same weights, and bad input as one line with exit 2 and nothing written."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from transformers import AutoTokenizer

from kvzap_lab import cli, finetune
from kvzap_lab.corpus import load_corpus
from kvzap_lab.model import describe, fingerprint, random_tiny_model
from kvzap_lab.policies.kvzap_mlp import KVzapMLP
from kvzap_lab.policy import get_policy
from kvzap_lab.testbed import train_tokenizer

REPO = Path(__file__).resolve().parents[1]


def random_mlp(model, seed: int, model_fingerprint: str | None) -> KVzapMLP:
    """A KVzap MLP with random weights whose scores spread around -2, tied to ``model``."""
    spec = describe(model)
    g = torch.Generator().manual_seed(seed)
    L, D, H, W = spec.n_layers, spec.hidden_size, spec.n_kv_heads, 8
    scorer = KVzapMLP(width=W)
    scorer.trained_for_ = {"model_fingerprint": model_fingerprint, "n_layers": L, "hidden_size": D, "n_kv_heads": H}
    scorer.weights_ = [(torch.randn(L, W, D, generator=g) / math.sqrt(D), torch.randn(L, W, generator=g)),
                       (torch.randn(L, H, W, generator=g), torch.full((L, H), -2.0))]
    return scorer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama checkpoint with the chat tokenizer, a random KVzap MLP for it, one for another model, and an
    MLflow store with its tables (creating them takes ~10-20 s; each test copies it)."""
    root = tmp_path_factory.mktemp("finetune")
    tokenizer = train_tokenizer(vocab_size=300, lines=2000)
    model = random_tiny_model("llama", seed=0, vocab_size=len(tokenizer), max_position_embeddings=512,
                              pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    random_mlp(model, 0, fingerprint(model)).save(root / "scorer")
    random_mlp(model, 0, "another-model").save(root / "other")
    MlflowClient(f"sqlite:///{root / 'mlflow.db'}").search_experiments()
    return root, model


def argv_for(tiny, out: Path, *extra: str, store: Path | None = None) -> list[str]:
    root, _ = tiny
    if store is not None and not store.exists():
        shutil.copy(root / "mlflow.db", store)
    store = store or out.parent / "unused.db"
    return ["--policy", "mlp", "--checkpoint", str(root / "scorer"), "--out", str(out), "--model", str(root / "model"),
            "--tasks", "single_needle", "--context-tokens", "48", "--text-tokens", "8", "--window", "4", "--sinks", "2", "--chunk-size", "16",
            "--batch-size", "2", "--steps", "4", "--eval-every", "2", "--eval-samples", "2", "--checkpoint-every", "1",
            "--target-compression", "0.5", "--lr", "0.01", "--tracking-uri", f"sqlite:///{store}", *extra]


def weights(path: Path) -> list[torch.Tensor]:
    return [t for pair in KVzapMLP.load(path).weights_ for t in pair]


def test_finetune_writes_an_ordinary_scorer_metrics_and_an_mlflow_run(tiny, tmp_path, capsys):
    root, model = tiny
    out, store = tmp_path / "out", tmp_path / "mlflow.db"
    assert finetune.main(argv_for(tiny, out, "--json", store=store)) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 4 and Path(summary["scorer_dir"]) == out / "scorer"
    # An ordinary checkpoint of the scorer class, loaded as every tool loads one, with moved weights.
    policy = get_policy("mlp", checkpoint=out / "scorer", model=model)
    assert isinstance(policy.scorer, KVzapMLP) and policy.scorer.get_params() == KVzapMLP.load(root / "scorer").get_params()
    assert any(not torch.equal(a, b) for a, b in zip(weights(out / "scorer"), weights(root / "scorer")))
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["step"] for r in metrics["history"]] == [0, 1, 2, 3, 4]
    assert [r["step"] for r in metrics["history"] if "heldout_accuracy" in r] == [0, 2, 4]
    assert all(r["kl"] >= 0 and 0 <= r["expected_compression"] <= 1 for r in metrics["history"][1:])
    client = MlflowClient(f"sqlite:///{store}")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.params["target_compression"] == "0.5"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "kl")] == [1, 2, 3, 4]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "heldout_accuracy")] == [0, 2, 4]
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"metrics.json", "training.png"}
    # The same command again returns the finished run without training.
    assert finetune.main(argv_for(tiny, out, "--json", store=store)) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["mlflow_run_id"] == summary["mlflow_run_id"]


def test_a_crashed_run_resumes_to_the_weights_of_an_uninterrupted_one(tiny, tmp_path, monkeypatch, capsys):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert finetune.main(argv_for(tiny, straight, store=tmp_path / "a.db")) == 0
    real_step = finetune.train_step

    def crash_at_third(*args, step):
        if step == 2:
            raise KeyboardInterrupt  # after the state of step 2 was saved
        return real_step(*args, step=step)

    monkeypatch.setattr(finetune, "train_step", crash_at_third)
    with pytest.raises(KeyboardInterrupt):
        finetune.main(argv_for(tiny, crashed, store=tmp_path / "b.db"))
    assert not (crashed / "scorer").exists()
    assert json.loads((crashed / "state" / "state.json").read_text())["step"] == 2
    monkeypatch.setattr(finetune, "train_step", real_step)
    assert finetune.main(argv_for(tiny, crashed, store=tmp_path / "b.db")) == 0
    for a, b in zip(weights(straight / "scorer"), weights(crashed / "scorer")):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    resumed, uninterrupted = (json.loads((d / "metrics.json").read_text())["history"] for d in (crashed, straight))
    assert [sorted(r) for r in resumed] == [sorted(r) for r in uninterrupted]
    assert all(r[k] == pytest.approx(u[k], abs=1e-5) for r, u in zip(resumed, uninterrupted) for k in r)
    # Other settings in the same folder are refused, naming what differs.
    out = tmp_path / "other"
    assert finetune.main(argv_for(tiny, out, "--steps", "1", store=tmp_path / "c.db")) == 0
    shutil.rmtree(out / "scorer")
    (out / "metrics.json").unlink()
    assert cli.run(finetune.main, argv_for(tiny, out, "--steps", "1", "--lr", "0.02", store=tmp_path / "c.db")) == 2
    assert "other settings (lr)" in capsys.readouterr().err


@pytest.mark.slow
def test_kill_9_then_the_same_command_resumes_to_the_uninterrupted_weights(tiny, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert finetune.main(argv_for(tiny, straight, store=tmp_path / "a.db")) == 0
    argv = argv_for(tiny, killed, store=tmp_path / "b.db")
    env = dict(os.environ, OMP_NUM_THREADS="1", KVZAP_LAB_KILL_AT="finetune.checkpoint:3")  # SIGKILL after step 3's state
    done = subprocess.run([sys.executable, "-m", "kvzap_lab.finetune", *argv], cwd=REPO, env=env, capture_output=True)
    assert done.returncode == -signal.SIGKILL
    assert json.loads((killed / "state" / "state.json").read_text())["step"] == 3
    assert not (killed / "scorer").exists() and not (killed / "metrics.json").exists()
    assert finetune.main(argv) == 0
    for a, b in zip(weights(straight / "scorer"), weights(killed / "scorer")):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert not list(killed.glob(".*.tmp"))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--temperature", "0"], "--temperature must be a finite number > 0"),
        (["--temperature", "0.1", "--final-temperature", "0.5"], "T anneals down"),
        (["--target-compression", "0.99"], "out of reach"),
        (["--policy", "gbdt"], "no gradient"),
        (["--checkpoint", "OTHER"], "trained for model fingerprint another-model"),
        (["--checkpoint", "MISSING"], "not a scorer checkpoint"),
        (["--tasks", "no_such_task"], "unknown tasks"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tiny, tmp_path, capsys, extra, message):
    root, _ = tiny
    extra = [{"OTHER": str(root / "other"), "MISSING": str(tmp_path)}.get(e, e) for e in extra]
    out = tmp_path / "out"
    assert cli.run(finetune.main, argv_for(tiny, out, *extra)) == 2
    err = capsys.readouterr().err  # after transformers' progress bar of the model load, when the model was loaded
    assert "Traceback" not in err and [line for line in err.splitlines() if "error" in line] == err.splitlines()[-1:]
    assert err.splitlines()[-1].startswith("python -m kvzap_lab.finetune: error: ") and message in err.splitlines()[-1]
    assert not out.exists()


@pytest.mark.parametrize("extra", [["--tau", "nan"], ["--target-compression", "1"], ["--target-compression", "-0.1"]])
def test_out_of_range_values_are_argument_errors(tiny, tmp_path, capsys, extra):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(argv_for(tiny, out, *extra))
    assert exit_info.value.code == 2 and "error: argument" in capsys.readouterr().err
    assert not out.exists()


def test_text_windows_come_from_the_files_and_end_in_their_continuation(tiny, tmp_path):
    root, _ = tiny
    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    text = tmp_path / "story.txt"
    text.write_text(" ".join(f"the red fox sees the dog {i} ." for i in range(60)))
    args = finetune.parse_args(argv_for(tiny, tmp_path / "out", "--text-files", str(text), "--text-fraction", "1"))
    items = finetune.Batches(args, tokenizer)(0)
    assert len(items) == 2
    corpus = tokenizer.encode(text.read_text(), add_special_tokens=False)
    for item in items:
        assert item.targets == 8 and item.prompt == len(item.ids) + 1 - 8
        body = item.ids[1:]  # after the BOS token
        assert any(corpus[i : i + len(body)] == body for i in range(len(corpus) - len(body) + 1))
    assert finetune.Batches(args, tokenizer)(0) == items  # a pure function of the seed and the step


def test_a_chat_model_trains_on_the_default_corpus_and_the_natural_tasks(chat_tokenizer, tmp_path, capsys):
    """The chat-model path (SmolLM2's): plain text from the default oracle corpus's train documents, needle samples
    through the chat template, the held-out accuracy scored RULER-style (it used to stop at "no '<|bos|>' token")."""
    tokenizer = chat_tokenizer
    model = random_tiny_model("llama", seed=0, vocab_size=len(tokenizer), max_position_embeddings=512,
                              pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                              eos_token_id=tokenizer.eos_token_id)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    random_mlp(model, 0, fingerprint(model)).save(tmp_path / "scorer")
    argv = ["--policy", "mlp", "--checkpoint", str(tmp_path / "scorer"), "--out", str(tmp_path / "out"),
            "--model", str(tmp_path / "model"), "--tasks", "single_needle", "--context-tokens", "96", "--text-tokens", "8",
            "--window", "4", "--sinks", "2", "--chunk-size", "32", "--batch-size", "2", "--steps", "2", "--eval-every", "2",
            "--eval-samples", "2", "--target-compression", "0.5", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]

    items = finetune.Batches(finetune.parse_args([*argv, "--text-fraction", "1"]), tokenizer)(0)
    documents = [d.text for d in load_corpus().split("train")]
    for item in items:
        assert item.ids[0] == tokenizer.bos_token_id and len(item.ids) == 96 - 1 and item.targets == 8
        text = tokenizer.decode(item.ids[1:])[4:-4]  # whole characters at both ends
        pieces = [p for p in text.split("\n\n") if len(p) >= 20]  # a window may span two documents
        assert pieces and all(any(p in d for d in documents) for p in pieces)

    assert finetune.main([*argv, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 2 and 0 <= summary["end"]["heldout_accuracy"] <= 1
    assert 0 < summary["end"]["heldout_compression"] < 1
    KVzapMLP.load(summary["scorer_dir"], model=model)
