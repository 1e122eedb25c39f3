"""What a study run depends on: :class:`StudyConfig`, shared by the command line and Python callers, and the
constants of the study's rules (objectives, samplers, seed offsets, the accuracy tolerance).

    from kvzap_lab.study import StudyConfig, run
    summary = run(StudyConfig(policy="mlp", n_trials=16, tasks=("single_needle",)))
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

DEFAULT_N_TRIALS = 64
DEFAULT_TASKS = ("single_needle", "multi_key_needle")  # the eviction target's tasks (README)
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
# Optuna samplers by name, and whether each handles several objectives (CMA-ES optimises one scalar).
SAMPLERS = {"tpe": True, "nsga2": True, "random": True, "cmaes": False}
MAX_CONSECUTIVE_FAILURES = 3


class StudyError(ValueError):
    """Bad input or an unreachable service; the message says what is wrong and what would work."""


@dataclass
class StudyConfig:
    """One study run (``python -m kvzap_lab.study`` builds it from its flags; every field has the flag's name).

    Args:
        policy: trainable policy to tune (``mlp``, ``linear``, ``gbdt``, a registered name, or
            ``path/to/file.py:ClassName``).
        n_trials: finished (complete or pruned) trials the study should hold, counted over the whole study:
            every worker of every machine stops once the study holds that many, and a rerun continues up to it.
        timeout: seconds after which this process starts no new trial (None: no limit).
        study_name: Optuna study and MLflow experiment (default ``<policy>-<model>-<fingerprint>``).
        storage: Optuna RDB URL (default ``sqlite:///<results>/optuna.db``).
        tracking_uri: MLflow tracking URI (default ``sqlite:///<results>/mlflow.db``).
        objectives: ``pareto`` (accuracy and compression) or ``reward`` (one scalar, with pruning).
        sampler: ``tpe`` (default; one or several objectives), ``nsga2`` (several), ``random``, or ``cmaes``
            (one objective only: refused with ``pareto``).
        seed: seeds the sampler, the scorers' fits and the evaluation samples.
        workers: processes on this machine (this one and ``workers - 1`` started by it).
        worker_index: offsets the sampler's seed; one per machine sharing a storage.
        model: ``testbed``, a checkpoint directory or a hub name.
        tasks: evaluation tasks (``kvzap_lab.tasks.TASKS``).
        samples_per_task: held-out samples answered per task and trial.
        verify_samples: fresh samples per task on which the best point within 1 point is re-checked (0: skip).
        context_tokens: context length of the samples (and of a dataset collected on first use).
        results: local results folder (the sqlite stores, MLflow artifacts, collected data).
        data: oracle dataset directory (default ``<results>/data/<model>``; collected there if missing).
        space: ``--space`` overrides, ``NAME=LOW:HIGH``, ``NAME=A,B,C`` or ``NAME=VALUE``.
        baseline: queue the start points (paper defaults, then calibrated taus) in a new study.
        heartbeat_interval: seconds between a running trial's heartbeats.
        grace_period: seconds without a heartbeat after which a trial of another machine counts as dead.
        parent_run_id: MLflow parent run of the worker processes that ``workers`` starts (internal).
    """

    policy: str
    n_trials: int = DEFAULT_N_TRIALS
    timeout: float | None = None
    study_name: str | None = None
    storage: str | None = None
    tracking_uri: str | None = None
    objectives: str = "pareto"
    sampler: str = "tpe"
    seed: int = 0
    workers: int = 1
    worker_index: int = 0
    model: str = "testbed"
    tasks: tuple[str, ...] = DEFAULT_TASKS
    samples_per_task: int = DEFAULT_SAMPLES_PER_TASK
    verify_samples: int = DEFAULT_VERIFY_SAMPLES
    context_tokens: int = DEFAULT_CONTEXT_TOKENS
    results: Path = Path("results")
    data: Path | None = None
    space: tuple[str, ...] = ()
    baseline: bool = True
    heartbeat_interval: int = 10
    grace_period: int = 60
    parent_run_id: str | None = None

    def __post_init__(self) -> None:
        from kvzap_lab import tasks

        self.tasks, self.space = tuple(self.tasks), tuple(self.space)
        self.results = Path(self.results)
        self.data = None if self.data is None else Path(self.data)
        for name in ("n_trials", "workers", "samples_per_task", "context_tokens", "heartbeat_interval", "grace_period"):
            if getattr(self, name) < 1:
                raise StudyError(f"{name} must be an int >= 1; got {getattr(self, name)}")
        if self.verify_samples < 0 or self.worker_index < 0:
            raise StudyError(f"verify_samples and worker_index must be >= 0; got {self.verify_samples}, {self.worker_index}")
        if self.timeout is not None and not (math.isfinite(self.timeout) and self.timeout > 0):
            raise StudyError(f"timeout must be a number of seconds > 0; got {self.timeout}")
        if self.objectives not in OBJECTIVES:
            raise StudyError(f"objectives must be one of {', '.join(OBJECTIVES)}; got {self.objectives!r}")
        if self.sampler not in SAMPLERS:
            raise StudyError(f"sampler must be one of {', '.join(SAMPLERS)}; got {self.sampler!r}")
        if len(OBJECTIVES[self.objectives][0]) > 1 and not SAMPLERS[self.sampler]:
            several = ", ".join(name for name, multi in SAMPLERS.items() if multi)
            raise StudyError(
                f"--sampler {self.sampler} optimises one objective; --objectives {self.objectives} has "
                f"{len(OBJECTIVES[self.objectives][0])}: use --sampler {several}, or --objectives reward"
            )
        unknown = [t for t in self.tasks if t not in tasks.TASKS]
        if unknown or not self.tasks:
            raise StudyError(f"unknown tasks {unknown or '(none given)'}; choose among {', '.join(tasks.TASKS)}")
        if self.workers > 1 and self.parent_run_id:
            raise StudyError("parent_run_id is for the worker processes that workers > 1 starts")

    def storage_url(self) -> str:
        """The Optuna storage URL (default: a sqlite file in ``results``)."""
        return self.storage or f"sqlite:///{self.results.resolve() / 'optuna.db'}"

    def tracking_url(self) -> str:
        """The MLflow tracking URI (default: a sqlite file in ``results``)."""
        return self.tracking_uri or f"sqlite:///{self.results.resolve() / 'mlflow.db'}"

    def identity(self, policy_name: str, fingerprint: str) -> dict:
        """What a study's results depend on besides its searched parameters; a resumed study must match it."""
        return {
            "policy": policy_name,
            "model": fingerprint,
            "tasks": list(self.tasks),
            "context_tokens": self.context_tokens,
            "samples_per_task": self.samples_per_task,
            "eval_seed": EVAL_SEED_OFFSET + self.seed,
            "objectives": self.objectives,
        }

    def to_argv(self) -> list[str]:
        """The command-line flags that rebuild this config (what ``workers`` passes to its processes)."""
        argv = []
        for field in fields(self):
            value, default = getattr(self, field.name), field.default
            flag = "--" + field.name.replace("_", "-")
            if value == default and field.name != "policy":
                continue
            if isinstance(value, bool):
                argv.append(flag if value else f"--no-{field.name.replace('_', '-')}")
            elif field.name == "space":
                argv += [item for spec in value for item in (flag, spec)]
            elif isinstance(value, tuple):
                argv += [flag, *value]
            elif value is not None:
                argv += [flag, str(value)]
        return argv

    def as_params(self) -> dict:
        """The config as MLflow parameters (paths and tuples as text, the internal parent run left out)."""
        params = {k: v for k, v in asdict(self).items() if k != "parent_run_id"}
        return {k: " ".join(v) if isinstance(v, tuple) else v for k, v in params.items()}
