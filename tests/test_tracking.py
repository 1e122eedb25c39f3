"""``--tracking-uri`` on train and evaluate: one MLflow run each in a local sqlite store, with MLflow's standard
tags, a model-training experiment, the metrics and the plot."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from kvzap_lab import cli, data, evaluate, tracking
from kvzap_lab import train as train_mod
from kvzap_lab.stats import wilson_interval
from kvzap_lab.surrogate import synthetic_split


def commit() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True).stdout.strip()


def only_run(uri: str, experiment: str):
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    assert found.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens it as model training
    (run,) = client.search_runs([found.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.source.git.commit"] == commit() and run.data.tags["mlflow.source.type"] == "LOCAL"
    return client, run


def test_train_logs_params_r2_plot_and_the_dataset(tmp_path, monkeypatch, capsys):
    split = synthetic_split(3000, 2, 24, 2, seed=0, model_fingerprint="synthetic-model")
    monkeypatch.setattr(train_mod, "_load_dataset", lambda path, model=None: split)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / data.MANIFEST).write_text('{"shards": []}')  # the run's input is named by its manifest's sha256
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["--policy", "linear", "--data", str(data_dir), "--out", str(tmp_path / "out"), "--tracking-uri", uri,
            "--experiment", "ridge", "--json"]
    assert train_mod.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    client, run = only_run(uri, "ridge")
    assert summary["mlflow_run_id"] == run.info.run_id
    assert run.data.tags["mlflow.source.name"] == "python -m kvzap_lab.train"
    assert run.data.params["policy"] == "linear" and run.data.params["alpha"] == str(summary["params"]["alpha"])
    assert run.data.metrics["r2"] == pytest.approx(summary["r2"])
    assert run.data.metrics["r2_layer/1"] == pytest.approx(summary["per_layer"]["r2"][1])
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"pred_vs_true.png", "metrics.json"}
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.digest == data.sha256_file(data_dir / data.MANIFEST)[:32] and dataset.dataset.name == "data"


def test_evaluate_logs_each_cell_with_its_wilson_interval(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["--model", "testbed", "--policies", "full", "random", "--keep-ratios", "0.5", "--tasks", "single_needle",
            "--context-tokens", "64", "--n-samples", "3", "--out", str(tmp_path / "eval.jsonl"), "--tracking-uri", uri,
            "--json"]
    assert evaluate.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    client, run = only_run(uri, "kvzap-lab-evaluate")
    assert summary["mlflow_run_id"] == run.info.run_id
    assert run.data.tags["mlflow.source.name"] == "python -m kvzap_lab.evaluate"
    assert run.data.params["n_samples"] == "3" and run.data.params["tasks"] == "['single_needle']"
    records = {r["policy"]: r for r in evaluate.read_records(tmp_path / "eval.jsonl")}
    cell = records["random"]
    low, high = wilson_interval(cell["accuracy"], 3)
    prefix = "random keep_ratio_0.5/single_needle/64"
    assert run.data.metrics[f"{prefix}/accuracy"] == pytest.approx(cell["accuracy"])
    assert (run.data.metrics[f"{prefix}/accuracy_low"], run.data.metrics[f"{prefix}/accuracy_high"]) == pytest.approx((low, high))
    assert run.data.metrics[f"{prefix}/compression"] == pytest.approx(cell["compression"]) and 0 < cell["compression"] < 0.8
    assert run.data.metrics["full/pooled/compression"] == 0.0
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"eval.png", "eval.jsonl"}


@pytest.mark.parametrize("uri", ["htp:/bad uri", "http://bad uri", "mlruns"])
def test_a_malformed_tracking_uri_is_refused_before_any_work(uri, tmp_path):
    with pytest.raises(ValueError, match="--tracking-uri"):
        tracking.check_tracking_uri(uri)
    assert cli.run(train_mod.main, ["--policy", "linear", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"),
                                    "--tracking-uri", uri]) == 2
    assert not (tmp_path / "o").exists()


def test_metric_names_drop_what_mlflow_refuses():
    assert tracking.metric_name("kvzap_mlp@ck tau=-6", "single_needle", 512, "accuracy") == "kvzap_mlp_ck tau_-6/single_needle/512/accuracy"
