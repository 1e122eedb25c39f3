"""Reliability: studies started at once on a new store (sqlite; PostgreSQL in CI), kill -9 at each phase of a
study followed by a rerun that ends with the trials of an uninterrupted run, dead workers found at once on this
host, and MLflow runs of dead workers ended. Every kill is the child stopping itself at a named phase
(``KVZAP_LAB_KILL_AT``, :func:`kvzap_lab.faults.kill_point`) and every overlap a barrier (``KVZAP_LAB_BARRIER``): no race against the clock."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import uuid
from types import SimpleNamespace

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from study_helpers import ENV, args_for, default_name, finished_set, mlflow_template, run_cli, run_study, runs_of, start_study, tiny, trials_of  # noqa: F401

from kvzap_lab import faults
from kvzap_lab.study import lifecycle, resume, storage
from kvzap_lab.study.tracking import stale_trial_callback

# Two start points (the paper's tau -7 and -6; the calibrated taus fall outside and are skipped), then two
# sampled trials: every phase of a study in four trials. The grace period is long: within a test, only the
# dead-process check can fail a killed worker's trial.
KILL_ARGS = ("--space", "tau=-7.5:-5.5", "--n-trials", "4", "--grace-period", "3600")


def run_together(argv: list[str], env: dict, folder) -> None:
    """Two study processes started at once (``env`` holds them at a barrier); both must succeed."""
    logs = [folder / f"study-{i}.log" for i in range(2)]
    procs = [start_study(argv, env, log) for log in logs]
    for p in procs:
        p.join()
    codes = [p.exitcode for p in procs]
    if codes != [0, 0]:  # the whole output of each, in the failure's captured stdout (an assertion message is cut)
        for log in logs:
            print(f"===== {log.name}\n{log.read_text()}")
    assert codes == [0, 0]


def postgres_url() -> str:
    """The test server's URL (``.ci/postgres.sh``); in CI a missing server fails the test instead of skipping."""
    url = os.environ.get("KVZAP_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("CI"):
            pytest.fail("KVZAP_TEST_POSTGRES_URL is not set in CI: .ci/run starts PostgreSQL with .ci/postgres.sh")
        pytest.skip("KVZAP_TEST_POSTGRES_URL is not set (.ci/postgres.sh starts a server and prints it)")
    return storage.database_url(url)


def new_postgres_schema(url: str) -> str:
    """A URL of ``url``'s database whose tables go to a new, empty schema: a new store."""
    from sqlalchemy import create_engine, text

    name = f"s_{uuid.uuid4().hex[:10]}"
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text(f"CREATE SCHEMA {name}"))
    engine.dispose()
    return f"{url}?options=-csearch_path%3D{name}"


# ------------------------------------------------------------------------------------------------ dead workers


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_dead_worker_on_this_host_is_failed_at_once_and_its_trial_queued_again(tmp_path):
    calls = []
    store = storage.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}", 60, 3600, lambda study, trial: calls.append(trial.number))
    study = optuna.create_study(study_name="s", storage=store)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is free now
    trials = [study.ask({"x": optuna.distributions.FloatDistribution(0, 1)}) for _ in range(4)]
    records = [
        resume.worker_record(trials[0].number) | {"pid": dead.pid},  # dead, here
        resume.worker_record(trials[1].number),  # this process: alive
        resume.worker_record(trials[2].number) | {"pid": dead.pid, "host": "elsewhere"},  # another machine: wait for its heartbeat
        resume.worker_record(trials[0].number) | {"pid": dead.pid},  # copied from trial 0 (a retry): not this trial's
    ]
    for trial, record in zip(trials, records):
        trial.set_user_attr("worker", record)
    resume.fail_stale_trials(study)
    states = {t.number: t.state for t in study.get_trials()}
    assert [states[t.number] for t in trials] == [TrialState.FAIL] + [TrialState.RUNNING] * 3
    assert calls == [trials[0].number]
    (retry,) = study.get_trials(states=(TrialState.WAITING,))
    assert retry.params == {"x": trials[0].params["x"]} and retry.system_attrs["failed_trial"] == trials[0].number
    resume.fail_stale_trials(study)  # once only
    assert calls == [trials[0].number] and len(study.get_trials(states=(TrialState.WAITING,))) == 1
    assert not resume.process_gone(resume.process_record()) and not resume.process_gone(None)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_a_dead_workers_trial_runs_again_before_the_points_queued_after_it(tmp_path):
    """Queued points 0..3, fewer trials than points: the killed point 1 runs again next (then 2, 3), so the
    first finished trials are those of an uninterrupted study; a retry of a retry keeps that place."""
    store = storage.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}", 60, 3600, lambda study, trial: None)
    study = optuna.create_study(study_name="s", storage=store)
    space = {"x": optuna.distributions.IntDistribution(0, 9)}
    for x in range(4):
        study.enqueue_trial({"x": x})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()

    def run_next(dies: bool) -> int:
        trial = study.ask(space)
        if dies:  # its worker is killed mid-trial
            trial.set_user_attr("worker", resume.worker_record(trial.number) | {"pid": dead.pid})
            resume.fail_stale_trials(study)
        else:
            study.tell(trial, 0.0)
        return trial.params["x"]

    assert [run_next(dies) for dies in (False, True, True, False, False, False)] == [0, 1, 1, 1, 2, 3]
    assert sorted(t.params["x"] for t in study.get_trials(states=(TrialState.COMPLETE,))) == [0, 1, 2, 3]


def test_the_sampler_continues_its_draws_in_a_new_process():
    study = optuna.create_study()
    space = {"x": optuna.distributions.FloatDistribution(0, 1)}
    first = optuna.samplers.TPESampler(seed=3)
    study.sampler = first
    draws = [study.ask(space).params["x"] for _ in range(2)]
    resume.save_sampler_state(study, first, "key")
    expected = study.ask(space).params["x"]  # what the same process draws next
    restarted = optuna.samplers.TPESampler(seed=3)
    assert resume.restore_sampler_state(study, restarted, "key")
    study.sampler = restarted
    assert study.ask(space).params["x"] == expected and expected not in draws
    assert not resume.restore_sampler_state(study, optuna.samplers.TPESampler(seed=3), "other")


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
    stale_trial_callback(uri)(st, st.trials[trial.number])
    assert client.get_run(runs[0]).info.status == "FAILED" and "worker died" in client.get_run(runs[0]).data.tags["error"]
    assert client.get_run(runs[1]).info.status == "FINISHED"


# ------------------------------------------------------------------------------------------------ kill -9


def verification(study) -> tuple[dict, dict]:
    """The verified point of a study without its trial number (a retried trial has a new one), and the
    parameters of the trial it re-checked."""
    ((_, verified),) = study.user_attrs["verified"].items()
    return {k: v for k, v in verified.items() if k != "trial"}, study.trials[verified["trial"]].params


@pytest.fixture(scope="module")
def uninterrupted(tiny, mlflow_template, tmp_path_factory):
    """The complete trials and the verification of the kill test's study, run without interruption."""
    results = tmp_path_factory.mktemp("uninterrupted") / "results"
    assert run_cli(args_for(tiny, results, *KILL_ARGS, template=mlflow_template)) == 0
    study = optuna.load_study(study_name=default_name(tiny), storage=f"sqlite:///{results / 'optuna.db'}")
    return finished_set(study.trials), verification(study)


@pytest.mark.slow
def test_kill_9_at_every_phase_in_turn_ends_with_the_uninterrupted_trials(tiny, mlflow_template, tmp_path, capsys, monkeypatch, uninterrupted):
    """One study killed at each phase in turn (creation, start points, a start point's trial, a sampled trial,
    verification), each run resuming the last, then finished by this process: it ends with the trials and the
    verification of an uninterrupted run, each killed trial failed at once and run again."""
    results = tmp_path / "results"
    argv = args_for(tiny, results, *KILL_ARGS, template=mlflow_template)
    storage_url = f"sqlite:///{results / 'optuna.db'}"
    states = lambda: [t.state for t in trials_of(results, default_name(tiny))]  # noqa: E731
    C, R, W, F = TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING, TrialState.FAIL
    after_each_kill = [
        ("study.created", []),  # the study exists, nothing queued yet
        ("study.start_point:1", [W]),  # one start point of two queued
        ("study.trial:2", [C, R]),  # the second start point queued by this run; killed in its trial
        ("study.trial:2", [C, F, C, R]),  # the dead trial failed at once, run again; killed in the first sampled trial
        ("study.verify", [C, F, C, F, C, C]),  # the same, then the last sampled trial; killed while verifying
    ]
    for phase, expected_states in after_each_kill:
        log = tmp_path / f"killed-{len(list(tmp_path.glob('killed-*')))}.log"
        assert run_study(argv, ENV | {faults.ENV_VAR: phase}, log) == -signal.SIGKILL, log.read_text()[-3000:]
        assert states() == expected_states, phase
    study = optuna.load_study(study_name=default_name(tiny), storage=storage_url)
    assert "verified" not in study.user_attrs and study.user_attrs[storage.START_POINTS_DONE]

    # The last run (this process) never waits: the dead worker's trials were found by their process.
    def no_waiting(seconds):
        raise AssertionError("the rerun waited for a worker that is known to be dead")

    monkeypatch.setattr(lifecycle, "time", SimpleNamespace(sleep=no_waiting, monotonic=lifecycle.time.monotonic))
    assert run_cli(argv) == 0
    capsys.readouterr()
    study = optuna.load_study(study_name=default_name(tiny), storage=storage_url)
    expected, verified = uninterrupted
    assert finished_set(study.trials) == expected and verification(study) == verified
    for dead in [t for t in study.trials if t.state == F]:
        (retry,) = [t for t in study.trials if t.system_attrs.get("failed_trial") == dead.number]
        assert retry.state == C and retry.params == dead.params
    parents, children = runs_of(f"sqlite:///{results / 'mlflow.db'}", default_name(tiny))
    status = {int(r.data.tags["optuna.trial"]): r.info.status for r in children}
    assert status == {t.number: "FAILED" if t.state == F else "FINISHED" for t in study.trials}
    # Three killed invocations had begun their MLflow run (the first two were killed before): ended FAILED.
    assert sorted(p.info.status for p in parents) == ["FAILED"] * 3 + ["FINISHED"]


# ------------------------------------------------------------------------------------------------ concurrent starts


def check_started_once(trials: list, n_trials: int) -> None:
    """Each start point queued once (the paper's four taus, the three calibrated ones), no trial lost."""
    start = [json.dumps(t.system_attrs["fixed_params"], sort_keys=True) for t in trials if "fixed_params" in t.system_attrs]
    assert len(start) == 7 and len(set(start)) == 6  # two calibrated taus coincide on the tiny model (-8.55)
    assert sum(t.state == TrialState.COMPLETE for t in trials) >= n_trials
    assert not [t for t in trials if t.state == TrialState.FAIL]


@pytest.mark.slow
def test_two_studies_started_at_once_on_a_new_sqlite_store(tiny, tmp_path):
    results = tmp_path / "results"  # nothing there: both stores are new, their schemas created by one process
    (tmp_path / "barrier").mkdir()
    env = ENV | {faults.BARRIER_ENV: f"study.create:2:{tmp_path / 'barrier'}"}  # both reach creation before either goes on
    run_together(args_for(tiny, results, "--n-trials", "2", "--verify-samples", "0"), env, tmp_path)
    check_started_once(trials_of(results, default_name(tiny)), 2)
    parents, _ = runs_of(f"sqlite:///{results / 'mlflow.db'}", default_name(tiny))
    assert len(parents) == 2 and len(MlflowClient(f"sqlite:///{results / 'mlflow.db'}").search_experiments()) == 2  # Default + the study


def test_a_dataset_logged_by_another_worker_between_mlflows_lookup_and_insert(tmp_path):
    """MLflow looks a run's dataset up, then inserts it: another worker's insert in between breaks the unique
    constraint (seen in CI with two studies started at once). Here the other worker's insert is made at exactly
    that moment, from SQLAlchemy's hook on the INSERT; the run still gets its input."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from sqlalchemy import event

    from kvzap_lab.study.tracking import Tracker, dataset_input

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ours, other = (Tracker.open(uri, "e", {}, [dataset_input(data_dir, "d" * 64, "data")]) for _ in range(2))
    other_run = other.client.create_run(other.experiment_id).info.run_id
    engine = SqlAlchemyStore._engine_map[uri]
    inserted = []

    def other_worker_first(conn, cursor, statement, *args):
        if statement.startswith("INSERT INTO datasets") and not inserted:
            inserted.append(True)
            other.client.log_inputs(other_run, datasets=other.inputs)  # commits on a connection of its own

    event.listen(engine, "before_cursor_execute", other_worker_first)
    try:
        run_id = ours.start("run", {}, {})
    finally:
        event.remove(engine, "before_cursor_execute", other_worker_first)
    assert inserted
    for run in (run_id, other_run):
        (logged,) = ours.client.get_run(run).inputs.dataset_inputs
        assert logged.dataset.name == "data"


@pytest.mark.postgres
def test_two_studies_started_at_once_on_a_new_postgres_store(tiny, tmp_path):
    url = new_postgres_schema(postgres_url())
    (tmp_path / "barrier").mkdir()
    env = ENV | {faults.BARRIER_ENV: f"study.create:2:{tmp_path / 'barrier'}"}
    name = f"pg-{uuid.uuid4().hex[:8]}"
    run_together(args_for(tiny, tmp_path / "results", "--n-trials", "2", "--verify-samples", "0", "--storage", url,
                          "--study-name", name), env, tmp_path)
    check_started_once(optuna.load_study(study_name=name, storage=url).get_trials(), 2)


@pytest.mark.postgres
def test_two_workers_on_postgres(tiny, mlflow_template, tmp_path, capsys):
    name = f"pg-{uuid.uuid4().hex[:8]}"
    url = postgres_url()
    argv = args_for(tiny, tmp_path / "results", "--n-trials", "6", "--workers", "2", "--no-baseline",
                    "--storage", url, "--study-name", name, template=mlflow_template)
    assert run_cli(argv) == 0
    capsys.readouterr()
    trials = optuna.load_study(study_name=name, storage=url).get_trials()
    assert 6 <= len(trials) <= 7 and all(t.state == TrialState.COMPLETE for t in trials)
    _, children = runs_of(f"sqlite:///{tmp_path / 'results' / 'mlflow.db'}", name)
    assert sorted(int(r.data.tags["optuna.trial"]) for r in children) == [t.number for t in trials]
