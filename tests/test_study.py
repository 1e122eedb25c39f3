"""python -m kvzap_lab.study: search spaces, the Optuna/MLflow study end to end, resume, kill -9, two workers,
an MLflow server over REST, PostgreSQL, and bad input; on a tiny random model with a tiny oracle dataset."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from sqlalchemy.exc import OperationalError

from kvzap_lab import collect, data, study
from kvzap_lab.model import describe, fingerprint, random_tiny_model
from kvzap_lab.policies.kvzap_mlp import KVzapMLP
from kvzap_lab.studies import rule
from kvzap_lab.studies.space import Choice, Float, Int, SpaceError, check_space, contains, override, suggest
from kvzap_lab.testbed import train_tokenizer

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
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


@pytest.fixture(scope="module")
def mlflow_template(tmp_path_factory) -> Path:
    """An MLflow sqlite store with its tables created: creating them takes ~10-20 s, so each test copies it."""
    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def args_for(tiny, results: Path, *extra: str, template: Path | None = None) -> list[str]:
    """Study arguments on the tiny model; with ``template``, the results folder starts with a ready MLflow store."""
    model_dir, data_dir, _ = tiny
    if template is not None and not (results / "mlflow.db").exists():
        results.mkdir(parents=True, exist_ok=True)
        shutil.copy(template, results / "mlflow.db")
    return ["--policy", "mlp", "--model", str(model_dir), "--data", str(data_dir), "--results", str(results),
            "--tasks", "single_needle", "copy", "--samples-per-task", "2", "--context-tokens", "40",
            "--space", "epochs=2", "--verify-samples", "3", *extra]


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ spaces


def test_space_checks_overrides_and_sampling():
    with pytest.raises(SpaceError, match="inverted"):
        check_space({"lr": Float(1e-2, 1e-4, log=True)})
    with pytest.raises(SpaceError, match="empty"):
        check_space({"depth": Int(2, 2)})
    with pytest.raises(SpaceError, match="low bound must be > 0"):
        check_space({"lr": Float(0.0, 1.0, log=True)})
    with pytest.raises(SpaceError, match="no values"):
        check_space({"window": Choice(())})
    with pytest.raises(SpaceError, match="empty"):
        check_space({})
    space = {"lr": Float(1e-4, 1e-2, log=True, default=5e-3), "depth": Int(1, 3, default=1), "window": Choice((8, 32), default=32)}
    with pytest.raises(SpaceError, match="inverted"):
        override(space, ["lr=1e-2:1e-4"])
    with pytest.raises(SpaceError, match="no dimension 'width'.*lr, depth, window"):
        override(space, ["width=4:8"])
    with pytest.raises(SpaceError, match="NAME=LOW:HIGH"):
        override(space, ["lr"])
    changed = override(space, ["lr=1e-3:2e-3", "depth=2", "window=8,16"])
    assert changed["lr"] == Float(1e-3, 2e-3, log=True, default=None)  # the old default fell outside
    assert changed["depth"] == Choice((2,), default=None) and changed["window"] == Choice((8, 16))
    assert contains(changed["lr"], 1.5e-3) and not contains(changed["lr"], 5e-3)
    assert contains(changed["window"], 16) and not contains(changed["window"], 32)
    trials = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        values = suggest(trials.ask(), changed)
        assert 1e-3 <= values["lr"] <= 2e-3 and values["depth"] == 2 and values["window"] in (8, 16)


def test_rule_space_follows_the_scores_and_builds_per_layer_taus(tiny):
    spec = describe(tiny[2])
    scores = np.random.default_rng(0).normal(-3.0, 1.0, size=(500, spec.n_layers, spec.n_kv_heads))
    dims = rule.space(spec, scores)
    assert dims["tau"].low <= -9.0 and dims["tau"].high >= np.quantile(scores, 0.98)  # paper grid and data both covered
    assert [f"tau_offset_{i}" for i in range(spec.n_layers)] == [k for k in dims if k.startswith("tau_offset_")]
    scores = np.random.default_rng(0).normal(-3.0, 1.0, size=(2000, 2, 2))
    taus = rule.calibrated_taus(scores, (0.7, 0.8))
    assert [np.mean(scores < t) for t in taus] == pytest.approx([0.7, 0.8], abs=0.02)
    values = {"tau": -5.0, "window": 16} | {f"tau_offset_{i}": 0.5 * i for i in range(spec.n_layers)}
    threshold = rule.build(values, spec.n_layers)
    assert threshold.tau == tuple(-5.0 + 0.5 * i for i in range(spec.n_layers)) and threshold.window == 16


def test_calibrated_start_points_follow_the_scores_and_respect_a_fixed_tau(tiny):
    spec = describe(tiny[2])
    scores = np.random.default_rng(0).normal(-3.0, 1.0, size=(2000, spec.n_layers, spec.n_kv_heads))
    rules = rule.space(spec, scores)
    space = study.SearchSpace(scorer={"width": Int(4, 16, default=8)}, rule=rules, fixed={})
    st = optuna.create_study()
    study.enqueue_baselines(st, space, spec, scores)
    queued = [(t.user_attrs["baseline"], t.system_attrs["fixed_params"]["tau"]) for t in st.get_trials(states=(TrialState.WAITING,))]
    expected = rule.calibrated_taus(scores, study.CALIBRATED_EVICTION)
    assert queued == [("paper", t) for t in rule.paper_taus(spec.model_type)] + [("calibrated", t) for t in expected]
    fixed = study.SearchSpace(scorer=space.scorer, rule=override(rules, ["tau=-5"]), fixed={})  # a Choice now
    st = optuna.create_study()
    study.enqueue_baselines(st, fixed, spec, scores)
    assert all(t.user_attrs["baseline"] == "paper" for t in st.get_trials(states=(TrialState.WAITING,)))


def test_custom_policy_declares_its_space_next_to_its_class(tiny, tmp_path):
    spec = describe(tiny[2])
    (tmp_path / "mine.py").write_text(
        "from kvzap_lab.policies.kvzap_linear import KVzapLinear\n"
        "from kvzap_lab.studies.space import Float\n"
        "class Mine(KVzapLinear):\n"
        "    @staticmethod\n"
        "    def search_space(spec):\n"
        "        return {'alpha': Float(0.5, 2.0 * spec.hidden_size, log=True, default=1.0)}\n"
        "class NoSpace(KVzapLinear):\n"
        "    pass\n"
    )
    scores = np.zeros((10, spec.n_layers, spec.n_kv_heads))
    spec_name = f"{tmp_path / 'mine.py'}:Mine"
    space = study.build_space(spec_name, study.trainable_factory(spec_name), spec, scores, [])
    assert space.scorer == {"alpha": Float(0.5, 2.0 * spec.hidden_size, log=True, default=1.0)}
    assert "tau" in space.rule
    # A subclass without its own space, registered under no name of studies/: clear error (not the parent's space).
    with pytest.raises(study.StudyError, match="has no search space"):
        other = f"{tmp_path / 'mine.py'}:NoSpace"
        study.build_space(other, study.trainable_factory(other), spec, scores, [])
    # Built-ins: the MLP default width is the paper's hidden/8.
    mlp = study.build_space("mlp", study.trainable_factory("mlp"), spec, scores, [])
    assert mlp.baseline(-7.0)["width"] == spec.hidden_size // 8 and mlp.baseline(-7.0)["tau"] == -7.0


def test_default_data_dir_reuses_collect_output_unless_it_is_another_models(tiny, tmp_path):
    _, data_dir, model = tiny
    fp = fingerprint(model)
    assert study.default_data_dir(tmp_path, "model", fp, "model-x") == tmp_path / "data" / "model"  # nothing there yet
    shutil.copytree(data_dir, tmp_path / "data" / "model")
    assert study.default_data_dir(tmp_path, "model", fp, "model-x") == tmp_path / "data" / "model"  # ours: reused
    assert study.default_data_dir(tmp_path, "model", "0" * 16, "model-x") == tmp_path / "data" / "model-x"


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_policy_and_unreachable_services_fail_fast(tiny, tmp_path, capsys):
    assert study.main(["--policy", "nosuch"]) == 2
    assert "unknown policy 'nosuch'" in (err := capsys.readouterr().err) and "kvzap_mlp" in err and "gbdt" in err
    assert study.main(["--policy", "knorm"]) == 2
    assert "nothing to train" in capsys.readouterr().err
    cases = [
        (["--tracking-uri", f"http://127.0.0.1:{free_port()}"], "MLflow tracking server .* is unreachable"),
        (["--tracking-uri", str(tmp_path / "mlruns")], "file store"),
        (["--storage", f"postgresql://kvzap:secret@127.0.0.1:{free_port()}/db"], "cannot reach the Optuna storage"),
        (["--storage", "sqlite:////no/such/dir/optuna.db"], "directory /no/such/dir does not exist"),
        (["--storage", "nosuchdb://x"], "not a usable database URL"),
    ]
    for extra, message in cases:
        started = time.monotonic()
        assert study.main(args_for(tiny, tmp_path / "r", *extra)) == 2
        err = capsys.readouterr().err
        assert re.search(message, err), err
        assert "secret" not in err
        assert time.monotonic() - started < 15


# ------------------------------------------------------------------------------------------------ end to end


def test_study_logs_trials_resumes_and_refuses_other_settings(tiny, mlflow_template, tmp_path, capsys, monkeypatch):
    results = tmp_path / "results"
    fits, real_fit = [], KVzapMLP.fit
    monkeypatch.setattr(KVzapMLP, "fit", lambda self, X, y, **kw: fits.append(self.get_params()) or real_fit(self, X, y, **kw))
    assert study.main(args_for(tiny, results, "--n-trials", "5", template=mlflow_template)) == 0
    out = capsys.readouterr().out
    assert len(fits) == 1  # the start points differ only in the rule: one fit serves them and the verification
    tracking = f"sqlite:///{results / 'mlflow.db'}"
    assert "Pareto front" in out and f"mlflow ui --backend-store-uri {tracking}" in out

    trials = trials_of(results, default_name(tiny))
    # the last two queued start points wait for a later run (--n-trials counts finished trials)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 5 + [TrialState.WAITING] * 2
    trials = trials[:5]
    paper = [t for t in trials if t.user_attrs.get("baseline") == "paper"]
    assert sorted(t.params["tau"] for t in paper) == [-9.0, -8.0, -7.0, -6.0]  # the paper's Llama grid
    assert all(t.params["width"] == 64 // 8 and t.params["window"] == 32 for t in paper)
    calibrated = trials[4]  # then the same configuration at taus on the model's own score scale
    y_train = data.load_dataset(tiny[1]).y_train.numpy()
    assert calibrated.user_attrs.get("baseline") == "calibrated"
    assert calibrated.params["tau"] == rule.calibrated_taus(y_train, study.CALIBRATED_EVICTION[:1])[0]
    assert calibrated.params["width"] == 64 // 8 and calibrated.params["tau_offset_0"] == 0.0
    assert all(0 <= t.values[0] <= 1 and 0 <= t.values[1] <= 1 for t in trials)

    parents, children = runs_of(tracking, default_name(tiny))
    assert len(parents) == 1 and len(children) == 5
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert sorted(int(r.data.tags["optuna.trial"]) for r in children) == [t.number for t in trials]
    client = MlflowClient(tracking)
    for run in children:
        assert run.info.status == "FINISHED"
        assert {"r2", "accuracy", "compression", "reward", "seconds"} <= set(run.data.metrics)
        assert {"policy", "model", "git_commit"} <= set(run.data.tags) and run.data.tags["policy"] == "mlp"
        trial = trials[int(run.data.tags["optuna.trial"])]
        assert run.data.metrics["accuracy"] == pytest.approx(trial.values[0])
        assert run.data.params["tau"] == str(trial.params["tau"])
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"scorer", "accuracy_vs_compression.png"} <= artifacts
    # The logged checkpoint is the trial's scorer.
    run = children[0]
    scorer = KVzapMLP.load(client.download_artifacts(run.info.run_id, "scorer", str(tmp_path / "dl")))
    assert scorer.weights_[0][0].shape[1] == int(run.data.params["width"])
    parent_artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"pareto_front.png", "best_trials.csv", "best_trials.md"} <= parent_artifacts
    assert "n_complete" in parent.data.metrics and parent.data.metrics["n_complete"] == 5
    # The best point within 1 point of full-cache accuracy is re-checked on fresh samples, once.
    (key, verified), = optuna.load_study(study_name=default_name(tiny), storage=f"sqlite:///{results / 'optuna.db'}").user_attrs["verified"].items()
    assert key == f"{verified['trial']}:3" and verified["samples_per_task"] == 3
    assert 0 <= verified["accuracy"] <= 1 and 0 <= verified["compression"] <= 1
    assert verified["accuracy_drop"] == pytest.approx(verified["full_accuracy"] - verified["accuracy"])
    assert f"verified on 3 fresh samples per task (seed {study.VERIFY_SEED_OFFSET}): trial {verified['trial']}" in out
    assert parent.data.metrics["verified_accuracy"] == pytest.approx(verified["accuracy"])

    # Rerunning continues the study up to --n-trials: old trials untouched, full-cache accuracy not re-measured.
    full_cache_runs = []
    real_run = study.Bench.run
    monkeypatch.setattr(study.Bench, "run", lambda self, policy, task: (policy is None and full_cache_runs.append(task)) or real_run(self, policy, task))
    assert study.main(args_for(tiny, results, "--n-trials", "7")) == 0
    capsys.readouterr()
    assert fits == [fits[0]] * 2  # a new process fits once more, with the same arguments (the study's seed)
    again = trials_of(results, default_name(tiny))
    assert len(again) == 7 and all(t.state == TrialState.COMPLETE for t in again)
    assert [t.user_attrs.get("baseline") for t in again[4:]] == ["calibrated"] * 3  # the queued ones ran first
    assert [(t.params, t.values) for t in again[:5]] == [(t.params, t.values) for t in trials]
    assert full_cache_runs == []
    parents, children = runs_of(tracking, default_name(tiny))
    assert len(parents) == 2 and len(children) == 7

    # Other objectives or settings on the same study name: a clear error, nothing stored changes.
    assert study.main(args_for(tiny, results, "--n-trials", "9", "--objectives", "reward")) == 2
    assert "created with --objectives pareto" in capsys.readouterr().err
    assert study.main(args_for(tiny, results, "--n-trials", "9", "--samples-per-task", "3")) == 2
    assert "samples_per_task: study has 2, this run has 3" in capsys.readouterr().err
    assert study.main(args_for(tiny, results, "--n-trials", "9", "--space", "lr=1e-2:1e-4")) == 2
    assert "inverted" in capsys.readouterr().err
    assert len(trials_of(results, default_name(tiny))) == 7 and len(runs_of(tracking, default_name(tiny))[1]) == 7


def test_failed_and_pruned_trials_end_failed_and_killed(tiny, mlflow_template, tmp_path, capsys, monkeypatch):
    """Reward objective (single, prunable): trial 0 is pruned after its first task, trial 1's fit raises."""
    results = tmp_path / "results"
    real_fit = KVzapMLP.fit
    fits = []

    def fit(self, X, y, **kwargs):
        fits.append(self.get_params())
        if len(fits) == 2:  # trial 1's scorer
            raise FloatingPointError("loss diverged")
        return real_fit(self, X, y, **kwargs)

    monkeypatch.setattr(KVzapMLP, "fit", fit)
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: self.number == 0)
    argv = args_for(tiny, results, "--n-trials", "2", "--objectives", "reward", "--no-baseline", template=mlflow_template)
    assert study.main(argv) == 0
    capsys.readouterr()
    states = [t.state for t in trials_of(results, default_name(tiny))]
    assert states == [TrialState.PRUNED, TrialState.FAIL, TrialState.COMPLETE]
    _, children = runs_of(f"sqlite:///{results / 'mlflow.db'}", default_name(tiny))
    status = {int(r.data.tags["optuna.trial"]): r for r in children}
    assert [status[i].info.status for i in range(3)] == ["KILLED", "FAILED", "FINISHED"]
    assert "loss diverged" in status[1].data.tags["error"]
    assert "partial_reward" in status[0].data.metrics and "reward" in status[2].data.metrics


@pytest.fixture
def overlapping_workers(monkeypatch):
    """With --workers 2, this process is worker 0 and would finish tiny studies before worker 1 has imported torch:
    make it start only once worker 1 runs a trial, so that both really work on the study at the same time."""
    real_optimize = study.optimize

    def optimize(st, *args, **kwargs):
        deadline = time.monotonic() + 120
        while not st.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.COMPLETE)):
            assert time.monotonic() < deadline, "worker 1 never started a trial"
            time.sleep(0.1)
        return real_optimize(st, *args, **kwargs)

    monkeypatch.setattr(study, "optimize", optimize)


@pytest.mark.slow
def test_two_workers_share_one_study_without_losing_or_duplicating_trials(tiny, mlflow_template, tmp_path, capsys, overlapping_workers):
    results = tmp_path / "results"
    assert study.main(args_for(tiny, results, "--n-trials", "6", "--workers", "2", "--no-baseline", template=mlflow_template)) == 0
    assert "Pareto front" in capsys.readouterr().out
    trials = trials_of(results, default_name(tiny))
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert 6 <= len(complete) <= 7 and len(complete) == len(trials)  # at most workers - 1 extra, none lost
    assert len({json.dumps(t.params, sort_keys=True) for t in trials}) == len(trials)
    parents, children = runs_of(f"sqlite:///{results / 'mlflow.db'}", default_name(tiny))
    assert len(parents) == 1  # one invocation
    assert sorted(int(r.data.tags["optuna.trial"]) for r in children) == [t.number for t in trials]  # one run each
    assert {t.user_attrs["mlflow_run_id"] for t in trials} == {r.info.run_id for r in children}
    assert len({r.data.tags["pid"] for r in children}) == 2  # both processes ran trials


def test_stale_trial_fails_its_mlflow_run_even_if_the_run_had_ended(mlflow_template, tmp_path):
    """A worker killed after ending a trial's MLflow run but before Optuna recorded the result: Optuna fails the
    trial, so its FINISHED run is ended FAILED too; another trial's run is left alone."""
    shutil.copy(mlflow_template, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("s")
    runs = []
    for number in (0, 1):
        run = client.create_run(experiment, tags={"optuna.trial": str(number)})
        client.set_terminated(run.info.run_id, status="FINISHED")
        runs.append(run.info.run_id)
    st = optuna.create_study(study_name="s")
    trial = st.ask()
    study.stale_trial_callback(uri)(st, st.trials[trial.number])
    assert client.get_run(runs[0]).info.status == "FAILED" and "worker died" in client.get_run(runs[0]).data.tags["error"]
    assert client.get_run(runs[1]).info.status == "FINISHED"


@pytest.mark.slow
def test_kill_9_mid_trial_then_rerun_marks_it_failed_and_keeps_the_rest(tiny, mlflow_template, tmp_path, capsys):
    results = tmp_path / "results"
    argv = args_for(tiny, results, "--no-baseline", "--heartbeat-interval", "1", "--grace-period", "2", template=mlflow_template)
    proc = subprocess.Popen([sys.executable, "-m", "kvzap_lab.study", *argv, "--n-trials", "100"], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    storage = f"sqlite:///{results / 'optuna.db'}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            time.sleep(0.2)
            if not (results / "optuna.db").exists():
                continue
            try:
                trials = optuna.load_study(study_name=default_name(tiny), storage=storage).get_trials()
            except (KeyError, OperationalError):  # the study (or its tables) does not exist yet
                continue
            states = [t.state for t in trials]
            # Kill once a trial has finished and the next one is running with its MLflow run open.
            if states.count(TrialState.COMPLETE) >= 1 and states[-1] == TrialState.RUNNING and "mlflow_run_id" in trials[-1].user_attrs:
                break
        else:
            pytest.fail("the study never had a complete trial and a running one")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    before = optuna.load_study(study_name=default_name(tiny), storage=storage).get_trials()
    complete = [t for t in before if t.state == TrialState.COMPLETE]
    killed = [t for t in before if t.state == TrialState.RUNNING]
    assert len(killed) == 1
    # The rerun must start after the grace period, or the killed trial's heartbeat is not stale yet (this process
    # has everything imported already, so it could start within it).
    time.sleep(3)

    assert study.main(args_for(tiny, results, "--no-baseline", "--grace-period", "2", "--n-trials", str(len(complete) + 1))) == 0
    capsys.readouterr()
    after = {t.number: t for t in trials_of(results, default_name(tiny))}
    assert after[killed[0].number].state == TrialState.FAIL
    assert all(after[t.number].state == TrialState.COMPLETE and after[t.number].values == t.values for t in complete)
    assert sum(t.state == TrialState.COMPLETE for t in after.values()) == len(complete) + 1
    tracking = f"sqlite:///{results / 'mlflow.db'}"
    parents, children = runs_of(tracking, default_name(tiny))
    by_trial = {int(r.data.tags["optuna.trial"]): r for r in children}
    assert by_trial[killed[0].number].info.status == "FAILED" and "heartbeat" in by_trial[killed[0].number].data.tags["error"]
    assert all(by_trial[t.number].info.status == "FINISHED" for t in complete)
    assert sorted(p.info.status for p in parents) == ["FAILED", "FINISHED"]  # the killed invocation, the rerun


@pytest.mark.slow
def test_mlflow_server_receives_runs_metrics_and_artifacts(tiny, tmp_path, capsys):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(tmp_path / "artifacts")],
        cwd=tmp_path, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "mlflow server did not start in 90 s"
                time.sleep(0.5)
        assert study.main(args_for(tiny, tmp_path / "results", "--n-trials", "2", "--no-baseline", "--tracking-uri", url)) == 0
        assert f"open {url} in a browser" in capsys.readouterr().out

        def api(path: str, body: dict | None = None) -> dict:
            request = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}", data=json.dumps(body).encode() if body else None,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.loads(response.read())

        experiment = api(f"experiments/get-by-name?experiment_name={default_name(tiny)}")["experiment"]
        runs = api("runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 100})["runs"]
        tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
        trial_runs = [r for r, t in zip(runs, tags) if "optuna.trial" in t]
        parent = [r for r, t in zip(runs, tags) if t.get("kind") == "study"]
        assert len(trial_runs) == 2 and len(parent) == 1
        for run in trial_runs:
            metrics = {m["key"] for m in run["data"]["metrics"]}
            assert {"r2", "accuracy", "compression", "reward", "seconds"} <= metrics
            files = {f["path"] for f in api(f"artifacts/list?run_id={run['info']['run_id']}")["files"]}
            assert {"scorer", "accuracy_vs_compression.png"} <= files
        files = {f["path"] for f in api(f"artifacts/list?run_id={parent[0]['info']['run_id']}")["files"]}
        assert {"pareto_front.png", "best_trials.csv", "best_trials.md"} <= files
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


@pytest.mark.postgres
def test_two_workers_on_postgres(tiny, mlflow_template, tmp_path, capsys, overlapping_workers):
    url = os.environ.get("KVZAP_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("KVZAP_TEST_POSTGRES_URL is not set (.ci/postgres.sh starts a server and prints it)")
    name = f"pg-{uuid.uuid4().hex[:8]}"
    argv = args_for(tiny, tmp_path / "results", "--n-trials", "6", "--workers", "2", "--no-baseline",
                    "--storage", url, "--study-name", name, template=mlflow_template)
    assert study.main(argv) == 0
    capsys.readouterr()
    trials = optuna.load_study(study_name=name, storage=study.database_url(url)).get_trials()
    assert 6 <= len(trials) <= 7 and all(t.state == TrialState.COMPLETE for t in trials)
    _, children = runs_of(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}", name)
    assert sorted(int(r.data.tags["optuna.trial"]) for r in children) == [t.number for t in trials]
    assert len({r.data.tags["pid"] for r in children}) == 2
