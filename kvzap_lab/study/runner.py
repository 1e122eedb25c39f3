"""A study run from start to end: check the services, load the model and the oracle dataset, create or load
the study under the creation lock, measure the full cache once, run trials (in N worker processes), then
summarise, verify the pick on fresh samples and log it all to MLflow."""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback

import numpy as np
import torch
from tqdm.auto import tqdm

from kvzap_lab import tasks
from kvzap_lab.faults import barrier, kill_point
from kvzap_lab.studies.space import describe as describe_space
from kvzap_lab.study import lifecycle, resume, storage
from kvzap_lab.study.bench import Bench, default_data_dir, load_data
from kvzap_lab.study.config import EVAL_SEED_OFFSET, StudyConfig, StudyError
from kvzap_lab.study.objective import make_objective
from kvzap_lab.study.report import log_summary, summarize
from kvzap_lab.study.search import build_space, start_points, trainable_factory
from kvzap_lab.study.tracking import Tracker, browse_command, check_tracking, dataset_input, stale_trial_callback
from kvzap_lab.study.verify import verify_best


def make_sampler(name: str, seed: int):
    """The Optuna sampler ``name`` (see ``SAMPLERS``), seeded; TPE starts from 12 random trials and models the
    dimensions jointly, with a constant liar for trials running in other workers."""
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=12, multivariate=True, constant_liar=True)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=16)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    try:
        import cmaes  # noqa: F401  (Optuna's CmaEsSampler needs it)
    except ImportError:
        raise StudyError("--sampler cmaes needs the cmaes package: pip install cmaes") from None
    return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=12, warn_independent_sampling=False)


def full_cache_accuracy(study, bench: Bench, task_names: list[str]) -> dict:
    """Per-task full-cache accuracy, measured once per study and kept in its user attributes."""
    stored = study.user_attrs.get("full_cache_accuracy")
    if stored is None:
        stored = {task: bench.run(None, task)["accuracy"] for task in tqdm(task_names, desc="full-cache baseline")}
        study.set_user_attr("full_cache_accuracy", stored)
    return {task: stored[task] for task in task_names}


def run(config: StudyConfig) -> dict | None:
    """Run (or continue) the study ``config`` describes.

    Args:
        config: the study's settings (:class:`StudyConfig`).

    Returns:
        The summary (rows of the complete trials, the infeasible ones, and among the feasible ones the Pareto
        front, best point within 1 point, comparisons with the paper default; verification, study name,
        storage, tracking URI, parent run), or None in a worker process started by another (``parent_run_id``
        set).

    Raises:
        StudyError: bad settings or an unreachable service (a ValueError: ``kvzap_lab.cli.run`` prints it as
            one line with exit code 2).
    """
    threads = torch.get_num_threads()
    try:
        return _run(config)
    finally:
        torch.set_num_threads(threads)


def _run(config: StudyConfig) -> dict | None:
    import optuna

    from kvzap_lab import data as datasets
    from kvzap_lab.model import describe, fingerprint, load_model, model_name

    for logger in ("alembic", "mlflow.store.db.utils"):
        logging.getLogger(logger).setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    factory = trainable_factory(config.policy)
    results = config.results.resolve()
    storage_url = storage.database_url(config.storage_url())
    tracking_uri = storage.database_url(config.tracking_url())
    if config.tracking_uri:  # the URIs given first: nothing is made for a typo
        check_tracking(tracking_uri)
    if config.storage:
        storage.check_database(storage_url, "the Optuna storage")
    results.mkdir(parents=True, exist_ok=True)
    if not config.tracking_uri:
        check_tracking(tracking_uri)
    if not config.storage:
        storage.check_database(storage_url, "the Optuna storage")
    sampler_seed = config.seed + 1000 * config.worker_index
    sampler = make_sampler(config.sampler, sampler_seed)

    profile_name, profile = config.profile()
    if config.parent_run_id is None:
        print(profile.describe(profile_name), file=sys.stderr)
    model, tokenizer = load_model(config.model)
    spec = describe(model)
    fp = fingerprint(model)
    short = f"{model_name(config.model)}-{fp[:8]}"  # a retrained model gets its own data and studies
    data_dir = config.data or default_data_dir(results, model_name(config.model), fp, short, factory.study_neighbours)
    dataset = load_data(model, tokenizer, model_name(config.model), data_dir, profile.collection, config.context_tokens,
                        config.seed, config.train_rows, factory.study_neighbours)
    space = build_space(config.policy, factory, spec, dataset.y_train.numpy(), config.space)
    points, skipped = start_points(space, spec, dataset.y_train.numpy()) if config.baseline else ([], [])

    policy_name = factory.policy_name
    pruner = optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1) if config.objectives == "reward" else optuna.pruners.NopPruner()
    name = config.study_name or f"{policy_name}-{short}"
    kill_point("study.create")
    barrier("study.create")
    with storage.creation_lock(storage_url):
        store = storage.open_storage(storage_url, config.heartbeat_interval, config.grace_period, stale_trial_callback(tracking_uri))
        study, created = storage.open_study(store, name, config.identity(policy_name, fp), config.objectives, sampler, pruner, points)
    if created:
        for line in skipped:
            print(line, file=sys.stderr)
    sampler_key = f"sampler_state:{config.sampler}:{sampler_seed}"
    resume.restore_sampler_state(study, sampler, sampler_key)
    manifest_digest = datasets.sha256_file(data_dir / datasets.MANIFEST)
    with storage.creation_lock(tracking_uri):
        tracker = Tracker.open(tracking_uri, name, {"policy": config.policy, "model": config.model, "model_fingerprint": fp,
                                                    "optuna.study": name}, [dataset_input(data_dir, manifest_digest, short)])
    tracker.end_dead_invocations()
    resume.fail_stale_trials(study)
    study.set_user_attr("space", {"scorer": describe_space(space.scorer), "rule": describe_space(space.rule), "fixed": space.fixed})

    samples = {t: tasks.make_samples(t, tokenizer, config.samples_per_task, config.context_tokens, EVAL_SEED_OFFSET + config.seed) for t in config.tasks}
    bench = Bench(model, tokenizer, spec, dataset, samples, config.chunk_size, config.batch_size)
    full = full_cache_accuracy(study, bench, list(config.tasks))
    full_mean = float(np.mean(list(full.values())))

    parent = config.parent_run_id
    if parent is None:
        invocation = config.as_params() | {"storage": storage.hide_password(storage_url)}
        parent = tracker.start(f"{name}-{time.strftime('%Y%m%d-%H%M%S')}", invocation,
                               {"kind": "study", "worker": json.dumps(resume.process_record())})
        tracker.metrics(parent, {"full_accuracy": full_mean} | {f"full_accuracy_{t}": a for t, a in full.items()})
    objective = make_objective(config.policy, factory, space, bench, full, tracker, parent, seed=config.seed,
                               objectives=config.objectives, max_flops_ratio=config.max_flops_ratio,
                               on_sampled=lambda trial: resume.save_sampler_state(study, sampler, sampler_key))
    procs = []
    try:
        if config.workers > 1:
            procs = lifecycle.start_workers(config, parent)
            torch.set_num_threads(lifecycle.worker_threads(config.workers))
        lifecycle.optimize(study, objective, config.n_trials, config.timeout, resume.fail_stale_trials)
        lifecycle.wait_workers(procs)
    except BaseException as err:
        lifecycle.stop_workers(procs)
        if config.parent_run_id is None:
            tracker.end(parent, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED", traceback.format_exc())
        raise
    if config.parent_run_id is not None:
        return None
    summary = summarize(study, full_mean, config.max_flops_ratio)
    summary["verified"] = verify_best(study, summary["best_at_target"], config.policy, factory, space, bench,
                                      task_names=list(config.tasks), samples=config.verify_samples,
                                      context_tokens=config.context_tokens, seed=config.seed)
    log_summary(tracker, parent, summary)
    tracker.end(parent, "FINISHED")
    return summary | {"study_name": name, "parent_run_id": parent, "storage": storage.hide_password(storage_url),
                      "tracking_uri": tracking_uri, "browse": browse_command(tracking_uri)}
