"""What a study run depends on: :class:`StudyConfig`, shared by the command line and Python callers, and the
constants of the study's rules (objectives, samplers, seed offsets, the accuracy tolerance).

    from kvzap_lab.study import StudyConfig, run
    summary = run(StudyConfig(policy="mlp", n_trials=16, tasks=("single_needle",)))
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

DEFAULT_TASKS = ("single_needle", "multi_key_needle")  # the eviction target's tasks (README)


@dataclass(frozen=True)
class Collection:
    """The oracle dataset a study collects on first use (when ``--data`` holds none): ``python -m
    kvzap_lab.collect --tasks all`` with these counts (contexts at most the study's ``context_tokens`` long)."""

    sequences: int
    context_tokens: int
    tokens_per_sequence: int


@dataclass(frozen=True)
class ModelProfile:
    """The study defaults that depend on the model: every field but ``collection`` and ``note`` is a
    :class:`StudyConfig` field (and a flag) that overrides it. Printed when a study starts."""

    n_trials: int
    tasks: tuple[str, ...]
    samples_per_task: int
    verify_samples: int
    context_tokens: int
    chunk_size: int  # prefill chunk of the evaluation; 0: one chunk, prefilled once and shared by every trial
    batch_size: int
    train_rows: int  # training rows drawn (seeded) from the dataset for every fit; 0: all of them
    collection: Collection
    note: str

    def describe(self, name: str) -> str:
        """One line: the profile's values and why."""
        c = self.collection
        prefill = "one chunk, prefilled once per batch and shared by every trial" if self.chunk_size == 0 else f"chunks of {self.chunk_size} tokens"
        return (
            f"model profile {name!r} (flags override): {self.n_trials} trials, tasks {' '.join(self.tasks)}, "
            f"{self.samples_per_task} samples per task of {self.context_tokens} tokens in batches of {self.batch_size}, "
            f"prefill in {prefill}, {self.verify_samples} verification samples per task, "
            f"{'all' if not self.train_rows else self.train_rows} training rows; first-use dataset: "
            f"{c.sequences} task contexts of {c.context_tokens} tokens, {c.tokens_per_sequence} rows each. {self.note}"
        )


# The test bed's defaults are the README's main job (its seeded results are pinned): 64 trials on 24 samples per
# task at 512 tokens, chunked prefill (evicting after every 128 tokens), and the README's recipe for the data
# (every task of the suite, 300 contexts of 256 tokens, 200 sampled tokens each; ~10 s): scorers fitted on it
# evict better at 512 tokens than ones fitted on 512-token contexts of the evaluation tasks alone (README).
TESTBED_PROFILE = ModelProfile(
    n_trials=64, tasks=DEFAULT_TASKS, samples_per_task=24, verify_samples=100, context_tokens=512, chunk_size=128,
    batch_size=128, train_rows=0, collection=Collection(sequences=300, context_tokens=256, tokens_per_sequence=200),
    note="The README's main job.",
)
PROFILES = {
    "testbed": TESTBED_PROFILE,
    # SmolLM2-135M on 2 CPU cores: a prefill of one 512-token sample costs seconds, an MLP fit of 30 layers
    # ~1 TFLOP per 8k rows and 15 epochs. KVzap's one-chunk prefill (full prefill attention, eviction after it)
    # lets every trial and the full cache branch from one prefill per batch; the 7 start points share one fit;
    # few samples and trials; a subsample of the (e.g. 112k-row) dataset; a small first-use dataset. Sizes
    # chosen, not yet timed end to end (the one attempt ran on a saturated machine).
    "smollm2-135m": ModelProfile(
        n_trials=12, tasks=DEFAULT_TASKS, samples_per_task=8, verify_samples=16, context_tokens=512, chunk_size=0,
        batch_size=8, train_rows=8192, collection=Collection(sequences=64, context_tokens=512, tokens_per_sequence=128),
        note="Sized for SmolLM2-135M on 2 CPU cores.",
    ),
}
# Any other model (a hub name or a checkpoint, on a GPU box): the test bed's search sizes with KVzap's one-chunk
# prefill, shared by every trial, in batches of 8.
OTHER_PROFILE = ModelProfile(
    n_trials=64, tasks=DEFAULT_TASKS, samples_per_task=24, verify_samples=100, context_tokens=512, chunk_size=0,
    batch_size=8, train_rows=0, collection=TESTBED_PROFILE.collection, note="The default for models without a profile of their own.",
)


PROFILE_FIELDS = ("n_trials", "tasks", "samples_per_task", "verify_samples", "context_tokens", "chunk_size", "batch_size",
                  "train_rows")


def profile_for(model: str) -> tuple[str, ModelProfile]:
    """``(name, profile)`` of a ``--model`` value: its own profile (by :func:`kvzap_lab.model.model_name`), else
    ``("other", OTHER_PROFILE)``."""
    from kvzap_lab.model import model_name

    name = model_name(model)
    return (name, PROFILES[name]) if name in PROFILES else ("other", OTHER_PROFILE)


EVAL_SEED_OFFSET = 10_000  # evaluation samples never coincide with the collect step's contexts (seeds 0..)
VERIFY_SEED_OFFSET = 20_000  # nor with the verification samples
ACCURACY_TOLERANCE = 0.01  # "within 1 point of full-cache accuracy"
CALIBRATED_EVICTION = (0.7, 0.75, 0.8)  # fractions of training pairs the calibrated start points would evict
TARGET_COMPRESSION = 0.75  # 4x: three quarters of the KV pairs evicted
REWARD_PENALTY = 10.0
# Most a trial's scorer may cost per token, as a fraction of the model's projection FLOPs (KVzap's budget: ~1 %);
# a trial above it is infeasible (kept, but out of the front and the best point).
MAX_FLOPS_RATIO = 0.015
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
            This and the other fields marked *profile* default to the model's :class:`ModelProfile`
            (:data:`PROFILES`; None: the profile's value).
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
        tasks: evaluation tasks (``kvzap_lab.tasks.TASKS``; *profile*).
        samples_per_task: held-out samples answered per task and trial (*profile*).
        verify_samples: fresh samples per task on which the best point within 1 point is re-checked (0: skip;
            *profile*).
        context_tokens: context length of the samples (and of a dataset collected on first use; *profile*).
        chunk_size: prefill chunk of the evaluation in tokens, evicting after each; 0: the whole prompt in one
            chunk (KVzap's semantics), prefilled once per batch and shared by the full cache and every trial
            (*profile*).
        batch_size: samples answered together (*profile*).
        train_rows: training rows drawn (seeded) from the oracle dataset for every fit, and held-out rows in
            the same proportion; 0: all (*profile*).
        results: local results folder (the sqlite stores, MLflow artifacts, collected data).
        data: oracle dataset directory (default ``<results>/data/<model>``; collected there if missing).
        space: ``--space`` overrides, ``NAME=LOW:HIGH``, ``NAME=A,B,C`` or ``NAME=VALUE``.
        baseline: queue the start points (paper defaults, then calibrated taus) in a new study.
        heartbeat_interval: seconds between a running trial's heartbeats.
        grace_period: seconds without a heartbeat after which a trial of another machine counts as dead.
        max_flops_ratio: most a trial's scorer may cost per token, as a fraction of the model's projection
            FLOPs (in [0, 1]; 1: no limit). A trial above it is infeasible: the sampler (TPE, NSGA-II) steers away
            from it, and the Pareto front, hypervolume, best point and verification leave it out. Not part of the
            study's identity: a rerun with another limit judges every trial by it (the samplers keep the limit
            each trial ran under).
        parent_run_id: MLflow parent run of the worker processes that ``workers`` starts (internal).
    """

    policy: str
    n_trials: int | None = None
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
    tasks: tuple[str, ...] | None = None
    samples_per_task: int | None = None
    verify_samples: int | None = None
    context_tokens: int | None = None
    chunk_size: int | None = None
    batch_size: int | None = None
    train_rows: int | None = None
    results: Path = Path("results")
    data: Path | None = None
    space: tuple[str, ...] = ()
    baseline: bool = True
    heartbeat_interval: int = 10
    grace_period: int = 60
    max_flops_ratio: float = MAX_FLOPS_RATIO
    parent_run_id: str | None = None

    def __post_init__(self) -> None:
        from kvzap_lab import tasks

        profile = self.profile()[1]
        for name in PROFILE_FIELDS:
            if getattr(self, name) is None:
                setattr(self, name, getattr(profile, name))
        self.tasks, self.space = tuple(self.tasks), tuple(self.space)
        self.results = Path(self.results)
        self.data = None if self.data is None else Path(self.data)
        for name in ("n_trials", "workers", "samples_per_task", "context_tokens", "batch_size", "heartbeat_interval", "grace_period"):
            if getattr(self, name) < 1:
                raise StudyError(f"{name} must be an int >= 1; got {getattr(self, name)}")
        if min(self.verify_samples, self.worker_index, self.chunk_size, self.train_rows) < 0:
            raise StudyError(f"verify_samples, worker_index, chunk_size and train_rows must be >= 0; got "
                             f"{self.verify_samples}, {self.worker_index}, {self.chunk_size}, {self.train_rows}")
        if self.timeout is not None and not (math.isfinite(self.timeout) and self.timeout > 0):
            raise StudyError(f"timeout must be a number of seconds > 0; got {self.timeout}")
        ratio = self.max_flops_ratio
        if isinstance(ratio, bool) or not (isinstance(ratio, (int, float)) and 0 <= ratio <= 1):
            raise StudyError(f"max_flops_ratio must be a fraction in [0, 1] (1: no limit); got {self.max_flops_ratio!r}")
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

    def profile(self) -> tuple[str, ModelProfile]:
        """``(name, profile)`` of this study's model (see :func:`profile_for`)."""
        return profile_for(self.model)

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
            "chunk_size": self.chunk_size,
            "batch_size": self.batch_size,
            "train_rows": self.train_rows,
            "eval_seed": EVAL_SEED_OFFSET + self.seed,
            "objectives": self.objectives,
        }

    def to_argv(self) -> list[str]:
        """The command-line flags that rebuild this config (what ``workers`` passes to its processes): those whose
        value differs from its default (the model profile's, for the profile's fields)."""
        argv, profile = [], self.profile()[1]
        for field in fields(self):
            value = getattr(self, field.name)
            default = getattr(profile, field.name) if field.name in PROFILE_FIELDS else field.default
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
