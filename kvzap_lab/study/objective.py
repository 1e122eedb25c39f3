"""One trial: sample the scorer's and the rule's parameters, fit the scorer on the oracle dataset, measure its
held-out R² and its FLOPs against the limit (an Optuna constraint), answer the held-out samples with the evicting
engine, log the nested MLflow run, and return the objectives (accuracy and compression, or the scalar reward)."""

from __future__ import annotations

import inspect
import os
import socket
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

from kvzap_lab.faults import barrier, kill_point
from kvzap_lab.policy import Policy
from kvzap_lab.studies import rule as rule_space
from kvzap_lab.studies.space import suggest
from kvzap_lab.surrogate import projection_flops_per_token
from kvzap_lab.study.bench import Bench
from kvzap_lab.study.metrics import flops_constraint, operating_point, reward
from kvzap_lab.study.report import trial_plot
from kvzap_lab.study.search import SearchSpace
from kvzap_lab.study.resume import worker_record
from kvzap_lab.study.tracking import Tracker


def scorer_arguments(factory, space: SearchSpace, params: dict, seed: int) -> dict:
    """The scorer's constructor arguments for sampled ``params``: the fixed ones, the sampled scorer values, and
    ``seed`` if the scorer takes one (the study's seed for every trial, so equal arguments mean an equal fit)."""
    seeded = {"seed": seed} if "seed" in inspect.signature(factory).parameters else {}
    return space.fixed | {k: params[k] for k in space.scorer} | seeded


def fit_trial_policy(policy: str, factory, space: SearchSpace, bench: Bench, params: dict, seed: int):
    """A trial's scorer (``params``: its sampled scorer and rule values; ``seed``: the study's), fitted on the
    oracle dataset, and its :class:`Policy` named ``policy``: ``(scorer, policy)``. Deterministic, so a trial can
    be rebuilt from its stored parameters."""
    scorer = bench.fit(factory, scorer_arguments(factory, space, params, seed))
    rule = rule_space.build({k: params[k] for k in space.rule}, bench.spec.n_layers)
    return scorer, Policy(policy, scorer, rule)


def make_objective(policy: str, factory, space: SearchSpace, bench: Bench, full: dict, tracker: Tracker, parent: str,
                   *, seed: int, objectives: str, max_flops_ratio: float, on_sampled=None):
    """The Optuna objective of a study of ``policy`` (``factory``: its scorer class) on ``bench``; ``full``:
    full-cache accuracy per evaluated task; ``parent``: the invocation's MLflow run; ``objectives``: ``pareto``
    (returns accuracy, compression) or ``reward`` (returns the reward; pruned on partial rewards);
    ``max_flops_ratio``: the FLOPs limit, set as the trial's constraint ``flops_ratio`` once its scorer is fitted
    (:meth:`optuna.trial.Trial.set_constraint`: TPE and NSGA-II steer away from infeasible trials);
    ``on_sampled(trial)`` is called once the trial's parameters are drawn."""
    import optuna

    from kvzap_lab.train import evaluate as held_out_fit

    task_names = list(full)
    full_mean = float(np.mean([full[t] for t in task_names]))
    data = bench.dataset

    def objective(trial) -> float | tuple[float, float]:
        started = time.perf_counter()
        trial.set_user_attr("worker", worker_record(trial.number))
        values = suggest(trial, space.scorer)
        rule_values = suggest(trial, space.rule)
        if on_sampled is not None:
            on_sampled(trial)
        params = scorer_arguments(factory, space, values, seed)
        tags = {"optuna.trial": trial.number, "baseline": trial.user_attrs.get("baseline", "no"), "host": socket.gethostname(), "pid": os.getpid()}
        trial.set_user_attr("mlflow_parent_run_id", parent)
        run_id = tracker.start(f"trial-{trial.number}", params | rule_values, tags, parent=parent)
        trial.set_user_attr("mlflow_run_id", run_id)
        try:
            scorer, policy_ = fit_trial_policy(policy, factory, space, bench, values | rule_values, seed)
            kill_point("study.trial")
            barrier("study.trial")
            fit = held_out_fit(scorer, data.X_test.numpy(), data.y_test.numpy(), data.positions_test, data.previous_test)
            flops_ratio = scorer.flops_per_token() / projection_flops_per_token(bench.model.config)
            if "flops_ratio" not in trial.constraints:  # a rerun of a dead worker's trial inherits its constraint
                trial.set_constraint("flops_ratio", flops_constraint(flops_ratio, max_flops_ratio))
            train_seconds = time.perf_counter() - started
            per_task = {}
            for step, task in enumerate(task_names):
                per_task[task] = bench.run(policy_, task)
                if objectives == "reward":
                    full_so_far = float(np.mean([full[t] for t in per_task]))
                    point = operating_point(per_task, full_so_far)
                    partial = reward(point["accuracy"], point["compression"], full_so_far)
                    trial.report(partial, step)
                    if trial.should_prune():
                        tracker.metrics(run_id, {"r2": fit["r2"], "flops_ratio": flops_ratio, "partial_reward": partial,
                                                 "seconds": time.perf_counter() - started})
                        raise optuna.TrialPruned(f"pruned after {task}: partial reward {partial:.4f}")
            point = operating_point(per_task, full_mean)
            accuracy, compression = point["accuracy"], point["compression"]
            result = {
                "r2": fit["r2"],
                "spearman": fit["spearman"],
                **point,
                "reward": reward(accuracy, compression, full_mean),
                "flops_ratio": flops_ratio,
                "train_seconds": train_seconds,
                "seconds": time.perf_counter() - started,
            }
            result |= {f"r2_layer_{i}": v for i, v in enumerate(fit["per_layer"]["r2"])}
            result |= {f"accuracy_{t}": r["accuracy"] for t, r in per_task.items()}
            result |= {f"compression_{t}": r["compression"] for t, r in per_task.items()}
            tracker.metrics(run_id, result)
            with tempfile.TemporaryDirectory() as tmp:
                plot = Path(tmp) / "accuracy_vs_compression.png"
                trial_plot(per_task, full, accuracy, compression, plot)
                tracker.client.log_artifact(run_id, str(plot))
                if callable(getattr(scorer, "save", None)):
                    scorer.save(Path(tmp) / "scorer")
                    tracker.client.log_artifacts(run_id, str(Path(tmp) / "scorer"), "scorer")
            trial.set_user_attr("result", result)
            tracker.end(run_id, "FINISHED")
            return (accuracy, compression) if objectives == "pareto" else result["reward"]
        except optuna.TrialPruned:
            tracker.end(run_id, "KILLED")
            raise
        except BaseException as err:
            tracker.end(run_id, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED", traceback.format_exc())
            raise

    return objective
