"""Optuna search of a scorer's hyper-parameters and the eviction rule, tracked in MLflow: ``python -m kvzap_lab.study``.

    python -m kvzap_lab.study --policy mlp                        # test bed, retrieval tasks, results/ (local)
    python -m kvzap_lab.study --policy mlp --workers 2            # two processes on one study
    python -m kvzap_lab.study --policy gbdt --objectives reward --n-trials 40 --space max_iter=20:80
    python -m kvzap_lab.study --policy mlp --storage postgresql://u:p@db/optuna --tracking-uri http://mlflow:5000

Each trial samples the scorer's space (``studies/<policy>.py``, or a ``search_space(spec)`` next to a custom
scorer class) and the rule's space (``studies/rule.py``: tau, a tau offset per layer, window), fits the scorer
with the study's seed on the oracle dataset (reused from ``results/data/<model>`` when there, else collected
once; consecutive trials with the same scorer arguments share one fit), measures its held-out R², then greedily
answers a fixed, seeded set of held-out task samples with the eviction engine and returns accuracy and
compression (Pareto, both maximised) or one scalar ``reward``. The full-cache accuracy is measured once per
study. The first trials of a new study are the paper's default configuration (MLP width hidden/8, AdamW 5e-3, 15
epochs, every tau of the paper's grid), so the study says how much it improves on it, then the same configuration
with taus on the model's own score scale (those that would evict 70, 75 and 80 % of the training pairs), from
which the sampler starts.
At the end the best point within 1 point of full-cache accuracy is re-fitted and re-checked on fresh samples
(``--verify-samples``), which says how much picking the best of many trials on few samples flattered it.

Storage: Optuna's RDB storage (sqlite by default, PostgreSQL/MySQL for several machines). ``--n-trials`` is the
number of finished trials the study should hold: rerunning the same command continues a study (after a kill, it
runs what is missing). ``--workers N`` starts N processes on the study; on other machines the same command with
the same ``--storage`` (and its own ``--worker-index``) joins it; a worker whose remaining trials are running
elsewhere waits for them. A trial whose process died (kill -9, power loss) is detected by Optuna's heartbeat
(``--heartbeat-interval``), not by looking for live processes, so it works across machines: once
``--grace-period`` seconds have passed without a heartbeat, the next start (or any live worker, before each
trial) marks it FAIL, ends its MLflow run (and its invocation's parent run) FAILED, and the trial is run again;
every finished trial stays, in both stores.

MLflow: one parent run per invocation, one nested run per trial (params, metrics r2/accuracy/compression/reward/
seconds, tags policy/model/git commit, artifacts: the scorer checkpoint and an accuracy-vs-compression plot);
the parent gets the Pareto-front plot, the best-trials table (CSV and markdown) and the ``verified_*`` metrics.
Failed trials end FAILED, pruned ones KILLED (pruning only with ``--objectives reward``: Optuna cannot prune
multi-objective studies).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import importlib.util
import inspect
import io
import json
import logging
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
from tqdm.auto import tqdm

from kvzap_lab import tasks
from kvzap_lab.cli import positive_int
from kvzap_lab.policy import Policy, list_policies, resolve_policy
from kvzap_lab.studies import rule as rule_space
from kvzap_lab.studies.space import SpaceError, check_space, contains, defaults, override, suggest
from kvzap_lab.studies.space import describe as describe_space

DEFAULT_RESULTS = Path("results")
DEFAULT_N_TRIALS = 64
DEFAULT_TASKS = ("single_needle", "multi_key_needle")  # the eviction target's tasks (README); see parser()
DEFAULT_SAMPLES_PER_TASK = 24
DEFAULT_VERIFY_SAMPLES = 100
DEFAULT_CONTEXT_TOKENS = 512
# The oracle dataset collected when none exists yet: the README's recipe (every task of the suite, 300 contexts
# of 256 tokens, 200 sampled tokens each; ~10 s on the test bed). Scorers fitted on it evict better at 512
# tokens than ones fitted on 512-token contexts of the evaluation tasks alone (README, "Studies").
COLLECT_SEQUENCES = 300
COLLECT_CONTEXT_TOKENS = 256
COLLECT_TOKENS_PER_SEQUENCE = 200
EVAL_SEED_OFFSET = 10_000  # evaluation samples never coincide with the collect step's contexts (seeds 0..)
VERIFY_SEED_OFFSET = 20_000  # nor with the verification samples
ACCURACY_TOLERANCE = 0.01  # "within 1 point of full-cache accuracy"
CALIBRATED_EVICTION = (0.7, 0.75, 0.8)  # fractions of training pairs the calibrated start points would evict
TARGET_COMPRESSION = 0.75  # 4x: three quarters of the KV pairs evicted
REWARD_PENALTY = 10.0
OBJECTIVES = {
    "pareto": (("accuracy", "compression"), ("maximize", "maximize")),
    "reward": (("reward",), ("maximize",)),
}
MAX_CONSECUTIVE_FAILURES = 3
_SERVICE_TIMEOUT_S = 5


class StudyError(RuntimeError):
    """Bad input or an unreachable service; the message says what is wrong and what would work."""


def reward(accuracy: float, compression: float, full_accuracy: float) -> float:
    """The scalar objective: compression (fraction evicted), minus ``REWARD_PENALTY`` per unit of accuracy lost
    beyond ``ACCURACY_TOLERANCE`` below the full cache."""
    return compression - REWARD_PENALTY * max(0.0, full_accuracy - accuracy - ACCURACY_TOLERANCE)


# ---------------------------------------------------------------------------------------------- search space


@dataclass
class SearchSpace:
    """The scorer's dimensions (constructor arguments), the rule's, and the scorer arguments held fixed."""

    scorer: dict
    rule: dict
    fixed: dict

    def baseline(self, tau: float) -> dict:
        """The default configuration with rule threshold ``tau`` (the params of one baseline trial)."""
        return defaults(self.scorer) | defaults(self.rule) | {"tau": tau}


def trainable_factory(policy: str):
    """The scorer class behind ``policy``; it must be trainable (have ``fit``)."""
    try:
        factory = resolve_policy(policy)
    except (ValueError, FileNotFoundError, AttributeError) as err:
        raise StudyError(str(err)) from None
    if not callable(getattr(factory, "fit", None)):
        trainable = [name for name in list_policies() if callable(getattr(resolve_policy(name), "fit", None))]
        raise StudyError(f"policy {policy!r} has nothing to train; a study needs a trainable policy: {', '.join(trainable)}")
    return factory


def scorer_space(policy: str, factory, spec) -> tuple[dict, dict]:
    """``(space, fixed)`` for a scorer class: its own ``search_space(spec)`` (attribute, or a function in its
    module), else ``kvzap_lab.studies.<name>`` for any name the class is registered under."""
    own = getattr(factory, "search_space", None) or getattr(sys.modules.get(factory.__module__), "search_space", None)
    if own is not None:
        return own(spec), dict(getattr(factory, "search_fixed", {}))
    names = [policy] + [name for name in list_policies() if resolve_policy(name) is factory]  # aliases too
    for name in filter(str.isidentifier, names):
        try:
            module = importlib.import_module(f"kvzap_lab.studies.{name}")
        except ModuleNotFoundError:
            continue
        return module.space(spec), dict(module.FIXED)
    raise StudyError(
        f"policy {policy!r} has no search space: define search_space(spec) -> {{name: Float|Int|Choice}} on its "
        "class (or in its module), or add studies/<name>.py"
    )


def build_space(policy: str, factory, spec, scores: np.ndarray, overrides: list[str]) -> SearchSpace:
    """The study's :class:`SearchSpace` with ``--space`` overrides applied and every range checked."""
    scorer, fixed = scorer_space(policy, factory, spec)
    rules = rule_space.space(spec, scores)
    clash = sorted(set(scorer) & set(rules))
    if clash:
        raise StudyError(f"policy {policy!r}: scorer dimensions {clash} clash with the rule's ({', '.join(rules)})")
    merged = override(check_space(scorer) | check_space(rules), overrides)
    return SearchSpace({k: merged[k] for k in scorer}, {k: merged[k] for k in rules}, fixed)


# ---------------------------------------------------------------------------------------------------- services


def _hide_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a database URL: nothing to hide
        return url


def database_url(url: str) -> str:
    """``postgresql://`` selects psycopg 3 in SQLAlchemy 2.1; use psycopg2 (the lab's ``postgres`` extra) when
    only that driver is installed."""
    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None and importlib.util.find_spec("psycopg2"):
        return "postgresql+psycopg2://" + url[len("postgresql://") :]
    return url


def engine_kwargs(url: str) -> dict:
    """SQLAlchemy arguments: sqlite waits for a lock held by another worker; servers time out a connection fast."""
    scheme = urlparse(url).scheme.split("+")[0]
    if scheme == "sqlite":
        return {"connect_args": {"timeout": 60}}
    if scheme in ("postgresql", "mysql"):
        return {"connect_args": {"connect_timeout": _SERVICE_TIMEOUT_S}, "pool_pre_ping": True}
    return {}


def check_database(url: str, what: str) -> None:
    """Raise :class:`StudyError` within seconds unless ``url`` is a database URL we can connect to."""
    from sqlalchemy import create_engine
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

    shown = _hide_password(url)
    if urlparse(url).scheme == "sqlite":
        path = url.split(":///", 1)[-1]
        if path and path != ":memory:" and not Path(path).parent.is_dir():
            raise StudyError(f"{what} {shown}: directory {Path(path).parent} does not exist; create it or use another path")
    try:
        engine = create_engine(url, **engine_kwargs(url))
    except (ArgumentError, NoSuchModuleError, ImportError) as err:
        raise StudyError(
            f"{what} {shown} is not a usable database URL ({err}); "
            "use e.g. sqlite:///results/optuna.db or postgresql://user:password@host:5432/db"
        ) from None
    try:
        with engine.connect():
            pass
    except SQLAlchemyError as err:
        reason = str(getattr(err, "orig", None) or err).strip().splitlines()[0]
        raise StudyError(f"cannot reach {what} {shown}: {reason}") from None
    finally:
        engine.dispose()


def check_tracking(uri: str) -> None:
    """Raise :class:`StudyError` within seconds unless the MLflow tracking URI is usable (MLflow's own retries
    take minutes)."""
    scheme = urlparse(uri).scheme
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=_SERVICE_TIMEOUT_S) as response:
                response.read()
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise StudyError(
                f"MLflow tracking server {uri} is unreachable ({reason}); start it (mlflow server --host 127.0.0.1 "
                "--port 5000) or leave out --tracking-uri to use the local sqlite store"
            ) from None
    elif scheme in ("", "file"):
        raise StudyError(
            f"--tracking-uri {uri!r} is MLflow's file store, which MLflow 3 refuses by default; "
            "use sqlite:///path/to/mlflow.db or http://host:port"
        )
    elif scheme.split("+")[0] in ("sqlite", "postgresql", "mysql", "mssql"):
        check_database(uri, "the MLflow tracking store")


def open_storage(url: str, heartbeat_interval: int, grace_period: int, on_stale):
    """Optuna's RDB storage with heartbeats: trials of a dead worker are failed (and ``on_stale`` called)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs(url),
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            heartbeat_stale_trial_callback=on_stale,
        )


def git_commit() -> str:
    """The commit of the lab's checkout (``+dirty`` when it has changes), or ``unknown``."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if commit.returncode:
        return "unknown"
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


# ---------------------------------------------------------------------------------------------------- tracking


@dataclass
class Tracker:
    """MLflow runs of one study: a parent per invocation, a nested run per trial (via ``mlflow.parentRunId``)."""

    client: object
    uri: str
    experiment_id: str
    tags: dict

    @classmethod
    def open(cls, uri: str, experiment: str, tags: dict) -> "Tracker":
        """Connect and get (or create) the experiment; a local sqlite store keeps artifacts next to its file."""
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            location = None
            if urlparse(uri).scheme == "sqlite":
                location = (Path(uri.split(":///", 1)[1]).resolve().parent / "mlartifacts").as_uri()
            try:
                experiment_id = client.create_experiment(experiment, artifact_location=location)
            except MlflowException:  # another worker created it meanwhile
                experiment_id = client.get_experiment_by_name(experiment).experiment_id
        else:
            experiment_id = found.experiment_id
        return cls(client, uri, experiment_id, tags)

    def start(self, name: str, params: dict, tags: dict, parent: str | None = None) -> str:
        """Create a run (nested under ``parent``), log ``params``; returns its id."""
        from mlflow.entities import Param

        tags = self.tags | {k: str(v) for k, v in tags.items()}
        if parent is not None:
            tags["mlflow.parentRunId"] = parent
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=name)
        run_id = run.info.run_id
        if params:
            self.client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        return run_id

    def metrics(self, run_id: str, values: dict, step: int = 0) -> None:
        """Log finite ``{name: float}`` metrics in one call."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in values.items() if v is not None and math.isfinite(v)]
        if batch:
            self.client.log_batch(run_id, metrics=batch)

    def end(self, run_id: str, status: str, error: str | None = None) -> None:
        """End a run FINISHED, FAILED or KILLED (``error`` goes to the ``error`` tag and an ``error.txt`` artifact)."""
        if error:
            self.client.set_tag(run_id, "error", error.strip().splitlines()[-1][:5000])
            self.client.log_text(run_id, error, "error.txt")
        self.client.set_terminated(run_id, status=status)


# ---------------------------------------------------------------------------------------------------- the bench


@dataclass
class Bench:
    """What every trial evaluates on: the model, the oracle dataset and the fixed, seeded held-out samples."""

    model: object
    tokenizer: object
    spec: object
    dataset: object
    samples: dict
    end_id: int
    last_fit: tuple = (None, None)  # (arguments as JSON, scorer) of the last scorer fitted on ``dataset``

    def fit(self, factory, arguments: dict):
        """``factory(**arguments)`` fitted on the oracle dataset, or the same scorer again when the previous fit had
        the same arguments (the start points differ only in the rule: they share one fit)."""
        key = json.dumps(arguments, sort_keys=True, default=str)
        if self.last_fit[0] != key:
            scorer = factory(**arguments)
            extra = {"manifest": self.dataset.manifest} if "manifest" in inspect.signature(factory.fit).parameters else {}
            scorer.fit(self.dataset.X_train.numpy(), self.dataset.y_train.numpy(), **extra)
            self.last_fit = (key, scorer)
        return self.last_fit[1]

    def run(self, policy: Policy | None, task: str) -> dict:
        """Accuracy and compression of ``policy`` (``None``: full cache) on ``task``'s samples, one batch."""
        from kvzap_lab.engine import DEFAULT_CHUNK
        from kvzap_lab.evaluate import run_cell

        samples = self.samples[task]
        return run_cell(self.model, policy, samples, self.end_id, len(samples), DEFAULT_CHUNK)


def model_name(model: str) -> str:
    """Short model name used in default paths and study names."""
    return "testbed" if model == "testbed" else Path(model).name


def default_data_dir(results: Path, name: str, fingerprint: str, short: str) -> Path:
    """``<results>/data/<model>`` (where ``kvzap_lab.collect`` writes by default) unless it holds another model's
    data; then ``<results>/data/<model>-<fingerprint>``."""
    from kvzap_lab import data

    shared = results / "data" / name
    manifest = data.read_manifest(shared) if shared.exists() else None
    return shared if manifest is None or manifest["model"]["fingerprint"] == fingerprint else results / "data" / short


def load_data(model, model_arg: str, data_dir: Path, context_tokens: int, seed: int):
    """The oracle dataset in ``data_dir`` (checked against ``model``); collected there first if absent or unfinished
    (contexts of at most ``context_tokens``)."""
    from kvzap_lab import collect, data

    manifest = data.read_manifest(data_dir) if data_dir.exists() else None
    if manifest is None or not manifest.get("complete"):
        print(f"collecting a small oracle dataset in {data_dir} (reused by later studies)", file=sys.stderr)
        argv = [
            "--model", model_arg, "--out", str(data_dir), "--tasks", "all",
            "--n-sequences", str(COLLECT_SEQUENCES), "--context-tokens", str(min(COLLECT_CONTEXT_TOKENS, context_tokens)),
            "--tokens-per-sequence", str(min(COLLECT_TOKENS_PER_SEQUENCE, context_tokens)), "--seed", str(seed),
        ]
        if collect.main(argv) != 0:
            raise StudyError(f"collecting the oracle dataset into {data_dir} failed (see above); pass --data DIR to use another")
    try:
        return data.load_dataset(data_dir, model=model)
    except data.DatasetError as err:
        raise StudyError(f"{err} (or pass --data DIR)") from None


# ------------------------------------------------------------------------------------------------- the study


def identity(args, factory, fingerprint: str) -> dict:
    """What a study's results depend on besides the searched parameters; a resumed study must match it."""
    return {
        "policy": getattr(factory, "policy_name", args.policy),
        "model": fingerprint,
        "tasks": list(args.tasks),
        "context_tokens": args.context_tokens,
        "samples_per_task": args.samples_per_task,
        "eval_seed": EVAL_SEED_OFFSET + args.seed,
        "objectives": args.objectives,
    }


def open_study(storage, name: str, ident: dict, objectives: str, sampler, pruner):
    """Create the study, or load it after checking that it was created with the same objectives and settings."""
    import optuna

    metric_names, directions = OBJECTIVES[objectives]
    study = optuna.create_study(
        study_name=name, storage=storage, directions=list(directions), sampler=sampler, pruner=pruner, load_if_exists=True
    )
    stored = study.user_attrs.get("identity")
    wanted_dirs = [optuna.study.StudyDirection[d.upper()] for d in directions]
    if stored is None and not study.trials and study.directions == wanted_dirs:  # new (or created empty by a crash)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(metric_names))
        study.set_user_attr("identity", ident)
        return study, True
    if stored is None:
        raise StudyError(f"study {name!r} in this storage was not made by kvzap_lab.study; choose another --study-name")
    if stored["objectives"] != objectives or study.directions != wanted_dirs:
        raise StudyError(
            f"study {name!r} was created with --objectives {stored['objectives']} "
            f"({', '.join(study.metric_names or [])}); rerun with --objectives {stored['objectives']} or choose a "
            "new --study-name (its trials are kept)"
        )
    differs = [f"{k}: study has {stored.get(k)!r}, this run has {v!r}" for k, v in ident.items() if stored.get(k) != v]
    if differs:
        raise StudyError(
            f"study {name!r} was created with other settings ({'; '.join(differs)}); rerun with the study's "
            "settings or choose a new --study-name (its trials are kept)"
        )
    return study, False


def full_cache_accuracy(study, bench: Bench, task_names: list[str]) -> dict:
    """Per-task full-cache accuracy, measured once per study and kept in its user attributes."""
    stored = study.user_attrs.get("full_cache_accuracy")
    if stored is None:
        stored = {task: bench.run(None, task)["accuracy"] for task in tqdm(task_names, desc="full-cache baseline")}
        study.set_user_attr("full_cache_accuracy", stored)
    return stored


def enqueue_baselines(study, space: SearchSpace, spec, scores: np.ndarray) -> None:
    """Queue the paper's default configuration once per tau of the paper's grid, then the same configuration
    with the taus that would evict ``CALIBRATED_EVICTION`` of the training pairs (``scores``: their log-scores),
    starting points on this model's own score scale (a new study only)."""
    for tau in rule_space.paper_taus(spec.model_type):
        study.enqueue_trial(space.baseline(tau), user_attrs={"baseline": "paper"})
    for tau in rule_space.calibrated_taus(scores, CALIBRATED_EVICTION):
        if contains(space.rule["tau"], tau):  # a --space override may exclude it
            study.enqueue_trial(space.baseline(tau), user_attrs={"baseline": "calibrated"})


def _accuracy_plot(per_task: dict, full: dict, accuracy: float, compression: float, path: Path) -> None:
    """Accuracy against compression for one trial: a point per task, the full cache at 0, the mean as a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (task, result) in enumerate(per_task.items()):
        color = f"C{i % 10}"
        ax.scatter([result["compression"]], [result["accuracy"]], color=color, label=task)
        ax.scatter([0.0], [full[task]], facecolors="none", edgecolors=color)
    ax.scatter([compression], [accuracy], marker="*", s=200, color="black", label="mean")
    _save_accuracy_plot(fig, ax, path, legend_size=7, dpi=90)


def _save_accuracy_plot(fig, ax, path: Path, legend_size: int, dpi: int) -> None:
    """Shared finish of the accuracy-vs-compression plots: 4x marker, axes, grid, legend, save, close."""
    import matplotlib.pyplot as plt

    ax.axvline(TARGET_COMPRESSION, color="grey", linestyle=":", label="4x compression")
    ax.set(xlabel="compression (fraction of KV pairs evicted)", ylabel="accuracy", xlim=(-0.02, 1.0), ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def operating_point(per_task: dict, full_mean: float) -> dict:
    """Mean accuracy and compression of ``per_task`` results (``{task: {"accuracy", "compression"}}``), the
    accuracy lost against ``full_mean`` and the compression ratio."""
    accuracy = float(np.mean([r["accuracy"] for r in per_task.values()]))
    compression = float(np.mean([r["compression"] for r in per_task.values()]))
    return {"accuracy": accuracy, "accuracy_drop": full_mean - accuracy, "compression": compression,
            "compression_ratio": 1.0 / max(1.0 - compression, 1e-9)}


def scorer_arguments(factory, space: SearchSpace, params: dict, seed: int) -> dict:
    """The scorer's constructor arguments for sampled ``params``: the fixed ones, the sampled scorer values, and
    ``seed`` if the scorer takes one (the study's seed for every trial, so equal arguments mean an equal fit)."""
    seeded = {"seed": seed} if "seed" in inspect.signature(factory).parameters else {}
    return space.fixed | {k: params[k] for k in space.scorer} | seeded


def fit_trial_policy(args, factory, space: SearchSpace, bench: Bench, params: dict):
    """A trial's scorer (``params``: its sampled scorer and rule values), fitted on the oracle dataset, and its
    :class:`Policy`: ``(scorer, policy)``. Deterministic, so a trial can be rebuilt from its stored parameters."""
    scorer = bench.fit(factory, scorer_arguments(factory, space, params, args.seed))
    rule = rule_space.build({k: params[k] for k in space.rule}, bench.spec.n_layers)
    return scorer, Policy(args.policy, scorer, rule)


def make_objective(args, factory, space: SearchSpace, bench: Bench, full: dict, tracker: Tracker, parent: str):
    """The Optuna objective: sample, fit, R², evaluate with eviction, log the nested MLflow run, return objectives."""
    import optuna

    from kvzap_lab.train import evaluate as held_out_fit

    full_mean = float(np.mean([full[t] for t in args.tasks]))
    data = bench.dataset

    def objective(trial) -> float | tuple[float, float]:
        started = time.perf_counter()
        values = suggest(trial, space.scorer)
        rule_values = suggest(trial, space.rule)
        params = scorer_arguments(factory, space, values, args.seed)
        tags = {"optuna.trial": trial.number, "baseline": trial.user_attrs.get("baseline", "no"), "host": socket.gethostname(), "pid": os.getpid()}
        trial.set_user_attr("mlflow_parent_run_id", parent)
        run_id = tracker.start(f"trial-{trial.number}", params | rule_values, tags, parent=parent)
        trial.set_user_attr("mlflow_run_id", run_id)
        try:
            scorer, policy = fit_trial_policy(args, factory, space, bench, values | rule_values)
            fit = held_out_fit(scorer, data.X_test.numpy(), data.y_test.numpy())
            train_seconds = time.perf_counter() - started
            per_task = {}
            for step, task in enumerate(args.tasks):
                per_task[task] = bench.run(policy, task)
                if args.objectives == "reward":
                    full_so_far = float(np.mean([full[t] for t in per_task]))
                    point = operating_point(per_task, full_so_far)
                    partial = reward(point["accuracy"], point["compression"], full_so_far)
                    trial.report(partial, step)
                    if trial.should_prune():
                        tracker.metrics(run_id, {"r2": fit["r2"], "partial_reward": partial, "seconds": time.perf_counter() - started})
                        raise optuna.TrialPruned(f"pruned after {task}: partial reward {partial:.4f}")
            point = operating_point(per_task, full_mean)
            accuracy, compression = point["accuracy"], point["compression"]
            result = {
                "r2": fit["r2"],
                "spearman": fit["spearman"],
                **point,
                "reward": reward(accuracy, compression, full_mean),
                "train_seconds": train_seconds,
                "seconds": time.perf_counter() - started,
            }
            result |= {f"r2_layer_{i}": v for i, v in enumerate(fit["per_layer"]["r2"])}
            result |= {f"accuracy_{t}": r["accuracy"] for t, r in per_task.items()}
            result |= {f"compression_{t}": r["compression"] for t, r in per_task.items()}
            tracker.metrics(run_id, result)
            with tempfile.TemporaryDirectory() as tmp:
                plot = Path(tmp) / "accuracy_vs_compression.png"
                _accuracy_plot(per_task, full, accuracy, compression, plot)
                tracker.client.log_artifact(run_id, str(plot))
                if callable(getattr(scorer, "save", None)):
                    scorer.save(Path(tmp) / "scorer")
                    tracker.client.log_artifacts(run_id, str(Path(tmp) / "scorer"), "scorer")
            trial.set_user_attr("result", result)
            tracker.end(run_id, "FINISHED")
            return (accuracy, compression) if args.objectives == "pareto" else result["reward"]
        except optuna.TrialPruned:
            tracker.end(run_id, "KILLED")
            raise
        except BaseException as err:
            tracker.end(run_id, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED", traceback.format_exc())
            raise

    return objective


def stale_trial_callback(uri: str):
    """Optuna's heartbeat callback for a trial whose worker died: end its MLflow run FAILED (found by its
    ``optuna.trial`` tag, so a worker killed before it recorded the run id is covered too; also a run that had
    already ended FINISHED when the worker died before Optuna recorded the result, so both agree), and its
    invocation's parent run once none of that invocation's trials is still running."""

    def on_stale(study, trial) -> None:
        from mlflow.tracking import MlflowClient
        from optuna.trial import TrialState

        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(study.study_name)
        found = [] if experiment is None else client.search_runs(
            [experiment.experiment_id], f"tags.`optuna.trial` = '{trial.number}' and attributes.status != 'FAILED'"
        )
        parents = {trial.user_attrs.get("mlflow_parent_run_id")} | {r.data.tags.get("mlflow.parentRunId") for r in found}
        for run in found:
            client.set_tag(run.info.run_id, "error", "worker died: no Optuna heartbeat within the grace period; trial marked FAIL")
            client.set_terminated(run.info.run_id, status="FAILED")
        running = {t.user_attrs.get("mlflow_parent_run_id") for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        for parent in parents - running - {None}:
            if client.get_run(parent).info.status == "RUNNING":
                client.set_tag(parent, "error", "invocation died (a trial of it lost its heartbeat)")
                client.set_terminated(parent, status="FAILED")
        print(f"trial {trial.number} of a dead worker marked FAIL ({len(found)} MLflow run(s) ended FAILED)", file=sys.stderr)

    return on_stale


def fail_stale_trials(study) -> None:
    """Mark FAIL the running trials whose heartbeat is older than the grace period (their worker died)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def optimize(study, objective, target: int, timeout: float | None, poll_s: float = 1.0) -> None:
    """Run trials until the study holds ``target`` finished (complete or pruned) trials, or ``timeout`` seconds
    passed. When the trials still missing are running in other workers, wait for them: if their worker dies,
    the heartbeat marks them FAIL after the grace period and this worker runs them again. Raises after
    ``MAX_CONSECUTIVE_FAILURES`` failed trials in a row."""
    from optuna.trial import TrialState

    started = time.monotonic()
    finished_states = (TrialState.COMPLETE, TrialState.PRUNED)
    last = []
    failures = 0
    count = lambda *states: len(study.get_trials(deepcopy=False, states=states))  # noqa: E731
    with tqdm(total=target, initial=min(count(*finished_states), target), desc=f"study {study.study_name}", unit="trial") as progress:
        while timeout is None or time.monotonic() - started < timeout:
            fail_stale_trials(study)
            finished, running = count(*finished_states), count(TrialState.RUNNING)
            progress.update(min(finished, target) - progress.n)
            if finished >= target:
                break
            if finished + running >= target:
                time.sleep(poll_s)
                continue
            study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=[lambda s, t: last.append(t)])
            failures = failures + 1 if last[-1].state == TrialState.FAIL else 0
            if failures >= MAX_CONSECUTIVE_FAILURES:
                raise StudyError(
                    f"{failures} trials in a row failed (last: trial {last[-1].number}); see the error tag and "
                    "error.txt of their MLflow runs"
                )


# ---------------------------------------------------------------------------------------------------- summary


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the non-dominated ``(accuracy, compression)`` points (both maximised; the first of equal
    points), by compression."""
    front = [
        i for i, (a, c) in enumerate(points)
        if not any((a2 >= a and c2 >= c) and (a2 > a or c2 > c) for a2, c2 in points) and (a, c) not in points[:i]
    ]
    return sorted(front, key=lambda i: points[i][1])


def hypervolume(points: list[tuple[float, float]]) -> float:
    """Area dominated by ``(accuracy, compression)`` points above the origin (both in [0, 1])."""
    area, best_accuracy = 0.0, 0.0
    for a, c in sorted(points, key=lambda p: -p[1]):  # sweep from high compression down
        if a > best_accuracy:
            area += (a - best_accuracy) * c
            best_accuracy = a
    return area


def summarize(study, full_mean: float) -> dict:
    """Rows of every complete trial, the Pareto front, and the target / paper-baseline comparisons."""
    from optuna.trial import TrialState

    rows = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        result = t.user_attrs.get("result")
        if result is not None:
            rows.append({"trial": t.number, "baseline": t.user_attrs.get("baseline") == "paper", "params": t.params} | result)
    points = [(r["accuracy"], r["compression"]) for r in rows]
    front = [rows[i] for i in pareto_front(points)]

    def best_at_target(subset):
        """The row of highest compression within the accuracy tolerance, or None."""
        ok = [r for r in subset if r["accuracy"] >= full_mean - ACCURACY_TOLERANCE]
        return max(ok, key=lambda r: r["compression"]) if ok else None

    base = [r for r in rows if r["baseline"]]
    best_row, base_row = best_at_target(rows), best_at_target(base)
    summary = {
        "rows": rows,
        "front": front,
        "full_accuracy": full_mean,
        "best_at_target": best_row,
        "best_compression_at_target": None if best_row is None else best_row["compression"],
        "baseline_best_compression_at_target": None if base_row is None else base_row["compression"],
        "hypervolume": hypervolume(points),
        "baseline_hypervolume": hypervolume([(r["accuracy"], r["compression"]) for r in base]) if base else None,
    }
    best = summary["best_compression_at_target"]
    summary["target_met"] = best is not None and best >= TARGET_COMPRESSION
    if best is not None and summary["baseline_best_compression_at_target"] is not None:
        summary["improvement_compression"] = best - summary["baseline_best_compression_at_target"]
    if base and summary["baseline_hypervolume"]:
        summary["improvement_hypervolume_ratio"] = summary["hypervolume"] / summary["baseline_hypervolume"]
    return summary


def verify_best(args, factory, space: SearchSpace, bench: Bench, study, summary: dict) -> dict | None:
    """The best point within the accuracy tolerance, judged on samples the search never saw: its trial is
    re-fitted (deterministic) and answers ``--verify-samples`` fresh samples per task (another seed), as does the
    full cache. Picking the best of many trials on a few samples flatters it; this measures by how much. Kept in
    the study's user attributes (per trial and sample count), so a rerun does not redo it. None when disabled or
    when no trial is within the tolerance."""
    row = summary["best_at_target"]
    if args.verify_samples == 0 or row is None:
        return None
    key, done = f"{row['trial']}:{args.verify_samples}", dict(study.user_attrs.get("verified", {}))
    if key not in done:
        seed = VERIFY_SEED_OFFSET + args.seed
        fresh = replace(bench, samples={
            t: tasks.make_samples(t, bench.tokenizer, args.verify_samples, args.context_tokens, seed) for t in args.tasks
        })
        full_key = f"verify_full_cache_accuracy:{args.verify_samples}"
        full = study.user_attrs.get(full_key)
        if full is None:
            full = {t: fresh.run(None, t)["accuracy"] for t in tqdm(args.tasks, desc="verify: full cache")}
            study.set_user_attr(full_key, full)
        _, policy = fit_trial_policy(args, factory, space, fresh, row["params"])
        per_task = {t: fresh.run(policy, t) for t in tqdm(args.tasks, desc=f"verify: trial {row['trial']}")}
        full_mean = float(np.mean(list(full.values())))
        point = operating_point(per_task, full_mean)
        done[key] = {
            "trial": row["trial"], "samples_per_task": args.verify_samples, "seed": seed, "full_accuracy": full_mean,
            **point,
            "target_met": point["accuracy_drop"] <= ACCURACY_TOLERANCE and point["compression"] >= TARGET_COMPRESSION,
        }  # fmt: skip
        study.set_user_attr("verified", done)
    return done[key]


TABLE_COLUMNS = ("trial", "baseline", "accuracy", "accuracy_drop", "compression", "compression_ratio", "r2", "reward")


def table_rows(summary: dict) -> list[dict]:
    """The Pareto front as flat rows (metrics then parameters), for the printed and stored tables."""
    return [{k: r[k] for k in TABLE_COLUMNS} | r["params"] for r in summary["front"]]


def format_table(summary: dict) -> str:
    """The printed Pareto table plus the target and baseline lines."""
    rows = table_rows(summary)
    lines = [f"Pareto front ({len(rows)} of {len(summary['rows'])} complete trials; full-cache accuracy {summary['full_accuracy']:.3f})"]
    head = f"{'trial':>5} {'paper':>5} {'acc':>6} {'drop':>6} {'compr':>6} {'x':>5} {'R2':>6} {'tau':>6} {'win':>4}"
    lines += [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['trial']:>5} {'yes' if r['baseline'] else '':>5} {r['accuracy']:>6.3f} {r['accuracy_drop']:>6.3f} "
            f"{r['compression']:>6.3f} {r['compression_ratio']:>5.2f} {r['r2']:>6.3f} {r.get('tau', float('nan')):>6.2f} "
            f"{r.get('window', ''):>4}"
        )
    best, base = summary["best_compression_at_target"], summary["baseline_best_compression_at_target"]
    fmt = lambda c: "none" if c is None else f"{c:.3f} ({1 / max(1 - c, 1e-9):.2f}x)"  # noqa: E731
    lines.append(f"best compression within {100 * ACCURACY_TOLERANCE:g} point of full-cache accuracy: {fmt(best)}; "
                 f"target >= {1 / (1 - TARGET_COMPRESSION):g}x: {'met' if summary['target_met'] else 'not met'}")
    lines.append(f"paper default (default scorer parameters, e.g. MLP width hidden/8; paper tau grid) at the same accuracy: {fmt(base)}")
    if "improvement_compression" in summary:
        lines.append(f"improvement over the paper default: {100 * summary['improvement_compression']:+.1f} points of compression")
    if "improvement_hypervolume_ratio" in summary:
        lines.append(f"hypervolume (accuracy x compression): {summary['hypervolume']:.4f} vs paper default "
                     f"{summary['baseline_hypervolume']:.4f} ({summary['improvement_hypervolume_ratio']:.2f}x)")
    v = summary.get("verified")
    if v is not None:
        lines.append(f"verified on {v['samples_per_task']} fresh samples per task (seed {v['seed']}): trial {v['trial']} "
                     f"accuracy {v['accuracy']:.3f} vs full cache {v['full_accuracy']:.3f} (drop {v['accuracy_drop']:+.3f}), "
                     f"compression {v['compression']:.3f} ({v['compression_ratio']:.2f}x); target "
                     f"{'met' if v['target_met'] else 'not met'}")
    return "\n".join(lines)


def plot_front(summary: dict, path: Path) -> None:
    """Every complete trial, the Pareto front, the paper-default trials, the full cache and the 4x line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = summary["rows"]
    ax.scatter([r["compression"] for r in rows], [r["accuracy"] for r in rows], color="lightgrey", label="trials")
    base = [r for r in rows if r["baseline"]]
    ax.scatter([r["compression"] for r in base], [r["accuracy"] for r in base], marker="x", color="C0", label="paper default")
    front = summary["front"]
    ax.plot([r["compression"] for r in front], [r["accuracy"] for r in front], "o-", color="C3", label="Pareto front")
    ax.axhline(summary["full_accuracy"], color="black", linestyle="--", label="full cache")
    _save_accuracy_plot(fig, ax, path, legend_size=8, dpi=100)


def log_summary(tracker: Tracker, parent: str, summary: dict) -> None:
    """Parent-run artifacts (Pareto plot, best-trials CSV and markdown) and summary metrics."""
    rows = table_rows(summary)
    with tempfile.TemporaryDirectory() as tmp:
        plot_front(summary, Path(tmp) / "pareto_front.png")
        columns = list(dict.fromkeys(k for r in rows for k in r)) or list(TABLE_COLUMNS)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        (Path(tmp) / "best_trials.csv").write_text(buffer.getvalue())
        markdown = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        markdown += ["| " + " | ".join(_cell(r.get(c, "")) for c in columns) + " |" for r in rows]
        (Path(tmp) / "best_trials.md").write_text("\n".join(markdown) + "\n\n```\n" + format_table(summary) + "\n```\n")
        for name in ("pareto_front.png", "best_trials.csv", "best_trials.md"):
            tracker.client.log_artifact(parent, str(Path(tmp) / name))
    keys = ("full_accuracy", "best_compression_at_target", "baseline_best_compression_at_target", "hypervolume",
            "baseline_hypervolume", "improvement_compression", "improvement_hypervolume_ratio")
    tracker.metrics(parent, {k: summary.get(k) for k in keys} | {"n_complete": len(summary["rows"]), "target_met": float(summary["target_met"])})
    verified = summary.get("verified") or {}
    tracker.metrics(parent, {f"verified_{k}": float(v) for k, v in verified.items() if k not in ("samples_per_task", "seed")})


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def browse_command(uri: str) -> str:
    """How to look at the results in the MLflow browser."""
    if urlparse(uri).scheme in ("http", "https"):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"


# -------------------------------------------------------------------------------------------------------- CLI


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0; got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an int >= 0 (0: skip); got {text}")
    return value


def parser() -> argparse.ArgumentParser:
    """The command line of ``python -m kvzap_lab.study``."""
    p = argparse.ArgumentParser(
        prog="python -m kvzap_lab.study",
        description="Optuna search of a scorer's hyper-parameters and the eviction rule (tau, per-layer offsets, "
        "window), tracked in MLflow. Every option has a default: `--policy mlp` alone runs on the test bed.",
    )
    p.add_argument("--policy", required=True, help="trainable policy to tune: mlp, linear, gbdt (or a registered "
                   "name, or path/to/file.py:ClassName with a search_space(spec))")
    p.add_argument("--n-trials", type=positive_int, default=DEFAULT_N_TRIALS, help="finished trials the study should "
                   "hold (rerunning continues up to this many; the first ones are the paper defaults) "
                   f"[{DEFAULT_N_TRIALS}]")
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
    p.add_argument("--seed", type=int, default=0, help="seeds the sampler, the scorers and the evaluation samples [0]")
    p.add_argument("--workers", type=positive_int, default=1, help="worker processes on this machine (this one and N-1 "
                   "more, each loading the model); other machines run the same command with the same --storage [1]")
    p.add_argument("--model", default="testbed", help="'testbed', a checkpoint directory or a hub name [testbed]")
    p.add_argument("--tasks", nargs="+", choices=tasks.TASKS, metavar="TASK", default=list(DEFAULT_TASKS), help="evaluation "
                   f"tasks: {', '.join(tasks.TASKS)} [{' '.join(DEFAULT_TASKS)}: the tasks on which the eviction "
                   "target is measured; kv_retrieval contexts are all facts, so query-agnostic eviction costs "
                   "points on it from ~3x on; copy is the oracle's pretext task, not a benchmark]")
    p.add_argument("--verify-samples", type=_non_negative_int, default=DEFAULT_VERIFY_SAMPLES, help="fresh samples per task on "
                   "which the best point within 1 point of full-cache accuracy is re-checked at the end; 0: skip "
                   f"[{DEFAULT_VERIFY_SAMPLES}]")
    p.add_argument("--samples-per-task", type=positive_int, default=DEFAULT_SAMPLES_PER_TASK, help="held-out samples "
                   f"answered per task and trial [{DEFAULT_SAMPLES_PER_TASK}]")
    p.add_argument("--context-tokens", type=positive_int, default=DEFAULT_CONTEXT_TOKENS, help="context length of the "
                   f"samples (and of a collected dataset) [{DEFAULT_CONTEXT_TOKENS}]")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="local results folder: optuna.db, mlflow.db, "
                   "mlartifacts/, data/ [results]")
    p.add_argument("--data", type=Path, default=None, help="oracle dataset directory (kvzap_lab.collect); collected "
                   "there if missing [<results>/data/<model>, or <model>-<fingerprint> if that holds another model's]")
    p.add_argument("--space", action="append", default=[], metavar="NAME=LOW:HIGH", help="override a search "
                   "dimension: NAME=LOW:HIGH, NAME=A,B,C or NAME=VALUE (fixed); repeatable")
    p.add_argument("--no-baseline", action="store_true", help="do not queue the paper-default trials in a new study")
    p.add_argument("--heartbeat-interval", type=positive_int, default=10, help="seconds between a running trial's "
                   "heartbeats [10]")
    p.add_argument("--grace-period", type=positive_int, default=60, help="seconds without heartbeat after which a "
                   "running trial counts as dead and is marked FAIL [60]")
    p.add_argument("--worker-index", type=int, default=0, help="this worker's index (offsets the sampler seed); "
                   "give each machine its own when several share a storage [0]")
    p.add_argument("--parent-run-id", default=None, help=argparse.SUPPRESS)  # set by --workers for its children
    return p


def start_workers(argv: list[str], n: int, parent: str, threads: int) -> list[subprocess.Popen]:
    """Start workers 1..n-1 of this command on the same study (this process is worker 0)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    command = [sys.executable, "-m", "kvzap_lab.study", *argv]
    return [
        subprocess.Popen(command + ["--workers", "1", "--worker-index", str(i), "--parent-run-id", parent], env=env)
        for i in range(1, n)
    ]


def wait_workers(procs: list[subprocess.Popen]) -> None:
    """Wait for worker processes; raise if one failed."""
    codes = [p.wait() for p in procs]
    if any(codes):
        raise StudyError(f"worker processes exited with codes {codes} (see their output above)")


def run(args, argv: list[str]) -> dict | None:
    """Run (or continue) the study described by ``args``; returns the summary (None in a spawned worker)."""
    import optuna

    from kvzap_lab.model import describe, fingerprint, load_model

    for logger in ("alembic", "mlflow.store.db.utils"):
        logging.getLogger(logger).setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    factory = trainable_factory(args.policy)
    if args.workers > 1 and args.parent_run_id:
        raise StudyError("--parent-run-id is for the worker processes that --workers starts")
    results = args.results.resolve()
    results.mkdir(parents=True, exist_ok=True)
    storage_url = database_url(args.storage or f"sqlite:///{results / 'optuna.db'}")
    tracking_uri = database_url(args.tracking_uri or f"sqlite:///{results / 'mlflow.db'}")
    check_tracking(tracking_uri)
    check_database(storage_url, "the Optuna storage")

    model, tokenizer = load_model(args.model)
    spec = describe(model)
    fp = fingerprint(model)
    short = f"{model_name(args.model)}-{fp[:8]}"  # a retrained model gets its own data and studies
    data_dir = args.data or default_data_dir(results, model_name(args.model), fp, short)
    dataset = load_data(model, args.model, data_dir, args.context_tokens, args.seed)
    space = build_space(args.policy, factory, spec, dataset.y_train.numpy(), args.space)

    sampler_seed = args.seed + 1000 * args.worker_index
    sampler = optuna.samplers.TPESampler(seed=sampler_seed, n_startup_trials=12, multivariate=True, constant_liar=True)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1) if args.objectives == "reward" else optuna.pruners.NopPruner()
    storage = open_storage(storage_url, args.heartbeat_interval, args.grace_period, stale_trial_callback(tracking_uri))
    name = args.study_name or f"{getattr(factory, 'policy_name', args.policy)}-{short}"
    study, created = open_study(storage, name, identity(args, factory, fp), args.objectives, sampler, pruner)
    fail_stale_trials(study)
    study.set_user_attr("space", {"scorer": describe_space(space.scorer), "rule": describe_space(space.rule), "fixed": space.fixed})

    samples = {t: tasks.make_samples(t, tokenizer, args.samples_per_task, args.context_tokens, EVAL_SEED_OFFSET + args.seed) for t in args.tasks}
    bench = Bench(model, tokenizer, spec, dataset, samples, tokenizer.convert_tokens_to_ids(tasks.END))
    full = full_cache_accuracy(study, bench, list(args.tasks))
    full_mean = float(np.mean([full[t] for t in args.tasks]))
    if created and not args.no_baseline:
        enqueue_baselines(study, space, spec, dataset.y_train.numpy())

    tracker = Tracker.open(tracking_uri, name, {"policy": args.policy, "model": args.model, "model_fingerprint": fp,
                                                 "git_commit": git_commit(), "optuna.study": name})
    parent = args.parent_run_id
    if parent is None:
        invocation = {k: v for k, v in vars(args).items() if k != "parent_run_id"} | {"storage": _hide_password(storage_url)}
        parent = tracker.start(f"{name}-{time.strftime('%Y%m%d-%H%M%S')}", invocation, {"kind": "study"})
        tracker.metrics(parent, {"full_accuracy": full_mean} | {f"full_accuracy_{t}": a for t, a in full.items()})
    procs = []
    try:
        if args.workers > 1:
            threads = max(1, (os.cpu_count() or 1) // args.workers)
            procs = start_workers(argv, args.workers, parent, threads)
            torch.set_num_threads(threads)
        optimize(study, make_objective(args, factory, space, bench, full, tracker, parent), args.n_trials, args.timeout)
        wait_workers(procs)
    except BaseException as err:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait()
        if args.parent_run_id is None:
            tracker.end(parent, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED", traceback.format_exc())
        raise
    if args.parent_run_id is not None:
        return None
    summary = summarize(study, full_mean)
    summary["verified"] = verify_best(args, factory, space, bench, study, summary)
    log_summary(tracker, parent, summary)
    tracker.end(parent, "FINISHED")
    print(format_table(summary))
    print(f"\nstudy {name!r} in {_hide_password(storage_url)}; MLflow experiment {name!r}, parent run {parent}")
    print(f"browse: {browse_command(tracking_uri)}")
    return summary | {"study_name": name, "parent_run_id": parent, "storage": storage_url, "tracking_uri": tracking_uri}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 with a clear message on bad input)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    from kvzap_lab.surrogate import ModelMismatchError

    try:
        run(args, argv)
    except (StudyError, SpaceError, ModelMismatchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
