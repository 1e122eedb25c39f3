"""Optuna search of a scorer's hyper-parameters and the eviction rule, tracked in MLflow: ``python -m kvzap_lab.study``.

    python -m kvzap_lab.study --policy mlp                        # test bed, retrieval tasks, results/ (local)
    python -m kvzap_lab.study --policy mlp --workers 2            # two processes on one study
    python -m kvzap_lab.study --policy gbdt --objectives reward --sampler cmaes --n-trials 40 --space max_iter=20:80
    python -m kvzap_lab.study --policy mlp --storage postgresql://u:p@db/optuna --tracking-uri http://mlflow:5000

From Python: ``run(StudyConfig(policy="mlp", n_trials=16))`` returns the summary the command prints.

Each trial samples the scorer's space (``studies/<policy>.py``, or a ``search_space(spec)`` next to a custom
scorer class) and the rule's space (``studies/rule.py``: tau, a tau offset per layer, window), fits the scorer
with the study's seed on the oracle dataset (reused from ``results/data/<model>`` when there, else collected
once; consecutive trials with the same scorer arguments share one fit), measures its held-out R² and its FLOPs
per token as a fraction of the model's projection FLOPs (over ``--max-flops-ratio``, default 1.5 %, the trial is
infeasible: an Optuna constraint the TPE and NSGA-II samplers steer away from, and it is left out of the front,
the best point and the verification), then greedily answers a fixed, seeded set of held-out task samples with
the eviction engine and returns accuracy and compression (Pareto, both maximised) or one scalar ``reward``. The
full-cache accuracy is measured once per study. A new study first runs its start points: the paper's default
configuration (MLP width hidden/8, AdamW 5e-3, 15 epochs) at every tau of the paper's grid, so the study says how
much it improves on it, then the same configuration with taus on the model's own score scale (those that would
evict 70, 75 and 80 % of the training pairs), from which the sampler starts. At the end the best point within 1 point of full-cache accuracy is
re-fitted and re-checked on fresh samples (``--verify-samples``), which says how much picking the best of many
trials on few samples flattered it.

Storage: Optuna's RDB storage (sqlite by default, PostgreSQL for several machines). ``--n-trials`` is the
number of finished trials the whole study should hold: rerunning the same command continues a study (after a
kill, it runs what is missing), and ``--workers N`` (or the same command on other machines with the same
``--storage`` and their own ``--worker-index``) shares that count. Processes started at once on a new store
are safe: one creates the schema, the study and its start points, under a lock. A trial whose worker died is
marked FAIL (at once when its process is known gone on this machine, else after ``--grace-period`` seconds
without Optuna heartbeat), its MLflow run ends FAILED, and its parameters are queued again; every finished trial
stays, in both stores.

MLflow: a model-training experiment per study; one parent run per invocation, one nested run per trial
(params, metrics r2/flops_ratio/accuracy/compression/reward/seconds, the standard source and git tags, the oracle
dataset as input, artifacts: the scorer checkpoint and an accuracy-vs-compression plot); the parent gets the
Pareto-front plot, the best-trials table (CSV and markdown) and the ``verified_*`` metrics. Failed trials end
FAILED, pruned ones KILLED (pruning only with ``--objectives reward``: Optuna cannot prune multi-objective
studies).

Rooms: :mod:`~kvzap_lab.study.config` (settings), :mod:`~kvzap_lab.study.search` (space and start points),
:mod:`~kvzap_lab.study.bench` (model, data, samples), :mod:`~kvzap_lab.study.objective` (one trial),
:mod:`~kvzap_lab.study.storage` (Optuna store, creation, dead workers), :mod:`~kvzap_lab.study.tracking`
(MLflow), :mod:`~kvzap_lab.study.lifecycle` (trial loop, workers), :mod:`~kvzap_lab.study.metrics` (front,
hypervolume, best point, FLOPs limit), :mod:`~kvzap_lab.study.verify`, :mod:`~kvzap_lab.study.report`,
:mod:`~kvzap_lab.study.runner` (start to end), :mod:`~kvzap_lab.study.cli`.
"""

from kvzap_lab.study.config import StudyConfig, StudyError
from kvzap_lab.study.runner import run

__all__ = ["StudyConfig", "StudyError", "run", "main"]


def main(argv: list[str] | None = None) -> int:
    """``python -m kvzap_lab.study`` (see :func:`kvzap_lab.study.cli.main`)."""
    from kvzap_lab.study.cli import main as cli_main

    return cli_main(argv)
