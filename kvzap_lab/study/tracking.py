"""MLflow side of a study: a fast check of the tracking URI, the experiment (created as a model-training
experiment), one parent run per invocation and one nested run per trial, with MLflow's standard source tags
(``mlflow.source.name``, ``mlflow.source.type``, ``mlflow.source.git.commit``) and the oracle dataset logged as
an input (name, digest from its manifest, source = its directory), and the ending of runs whose worker died."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from kvzap_lab.study.config import StudyError
from kvzap_lab.study.storage import SERVICE_TIMEOUT_S, check_database, scheme, sqlite_path

EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # the UI opens it as model training
SOURCE_NAME = "python -m kvzap_lab.study"
_DATABASES = ("sqlite", "postgresql", "mysql", "mssql")


def check_tracking(uri: str) -> None:
    """Raise :class:`StudyError` within seconds unless ``uri`` is a usable MLflow tracking URI: an
    ``http(s)://`` server that answers, or a database (MLflow's own retries take minutes)."""
    parsed = urlparse(uri)
    kind = scheme(uri)
    if kind in ("http", "https"):
        if not parsed.netloc or any(c.isspace() for c in uri):
            raise StudyError(f"--tracking-uri {uri!r} is not a valid URL; write http://host:port")
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=SERVICE_TIMEOUT_S) as response:
                response.read()
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            raise StudyError(
                f"MLflow tracking server {uri} is unreachable ({reason}); start it (mlflow server --host 127.0.0.1 "
                "--port 5000) or leave out --tracking-uri to use the local sqlite store"
            ) from None
    elif kind in ("", "file"):
        raise StudyError(
            f"--tracking-uri {uri!r} is MLflow's file store, which MLflow 3 refuses by default; "
            "use sqlite:///path/to/mlflow.db or http://host:port"
        )
    elif kind in _DATABASES:
        check_database(uri, "the MLflow tracking store")
    elif kind not in ("databricks", "databricks-uc"):
        raise StudyError(
            f"--tracking-uri {uri!r}: unknown scheme {parsed.scheme!r}; use http://host:port (an MLflow server) "
            "or a database such as sqlite:///path/to/mlflow.db"
        )


def git_commit() -> str | None:
    """The commit of the lab's checkout, or None outside a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return commit.stdout.strip() if commit.returncode == 0 else None


def source_tags() -> dict:
    """MLflow's standard source tags for runs of this command (the UI's Source column)."""
    tags = {"mlflow.source.name": SOURCE_NAME, "mlflow.source.type": "LOCAL"}
    commit = git_commit()
    return tags | ({"mlflow.source.git.commit": commit} if commit else {})


def dataset_input(data_dir: Path, manifest_digest: str, name: str):
    """The oracle dataset as an MLflow run input (training context): ``name``, ``manifest_digest`` (sha256 of
    its manifest, which lists every shard's sha256) and its directory as a local source."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    dataset = Dataset(name=name, digest=manifest_digest[:32], source_type="local",
                      source=json.dumps({"uri": str(Path(data_dir).resolve())}))
    return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "training")])


@dataclass
class Tracker:
    """MLflow runs of one study: a parent per invocation, a nested run per trial (via ``mlflow.parentRunId``)."""

    client: object
    uri: str
    experiment_id: str
    tags: dict
    inputs: list

    @classmethod
    def open(cls, uri: str, experiment: str, tags: dict, inputs: list | None = None) -> "Tracker":
        """Connect (creating a new store's tables) and get or create the experiment; a local sqlite store keeps
        artifacts next to its file. ``tags`` go on every run, ``inputs`` (:func:`dataset_input`) are logged to
        each."""
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        if found is None:
            location = None
            if scheme(uri) == "sqlite":
                location = (sqlite_path(uri).resolve().parent / "mlartifacts").as_uri()
            try:
                experiment_id = client.create_experiment(experiment, artifact_location=location, tags=EXPERIMENT_KIND)
            except MlflowException:  # another worker created it meanwhile
                experiment_id = client.get_experiment_by_name(experiment).experiment_id
        else:
            experiment_id = found.experiment_id
            if any(found.tags.get(k) != v for k, v in EXPERIMENT_KIND.items()):  # made by an older version
                for key, value in EXPERIMENT_KIND.items():
                    client.set_experiment_tag(experiment_id, key, value)
        return cls(client, uri, experiment_id, source_tags() | tags, list(inputs or []))

    def start(self, name: str, params: dict, tags: dict, parent: str | None = None) -> str:
        """Create a run (nested under ``parent``), log ``params`` and the inputs; returns its id."""
        from mlflow.entities import Param

        tags = self.tags | {k: str(v) for k, v in tags.items()}
        if parent is not None:
            tags["mlflow.parentRunId"] = parent
        run_id = self.client.create_run(self.experiment_id, tags=tags, run_name=name).info.run_id
        if params:
            self.client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
        if self.inputs:
            self.log_inputs(run_id)
        return run_id

    def log_inputs(self, run_id: str) -> None:
        """Log the dataset inputs to ``run_id``. MLflow looks a dataset up, then inserts it: a worker that logs
        the same dataset to the same experiment between the two makes the insert fail (a unique constraint); at
        the second try the dataset exists and only the run's link to it is written."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.log_inputs(run_id, datasets=self.inputs)
        except MlflowException:
            self.client.log_inputs(run_id, datasets=self.inputs)

    def end_dead_invocations(self) -> None:
        """End FAILED the parent runs still RUNNING whose process is known to be gone (killed on this host
        outside any trial, e.g. while verifying); their trials' runs are ended by :func:`stale_trial_callback`."""
        from kvzap_lab.study.resume import process_gone

        for run in self.client.search_runs([self.experiment_id], "tags.kind = 'study' and attributes.status = 'RUNNING'"):
            if process_gone(json.loads(run.data.tags.get("worker", "null"))):
                self.client.set_tag(run.info.run_id, "error", "invocation died (its process is gone)")
                self.client.set_terminated(run.info.run_id, status="FAILED")

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


def stale_trial_callback(uri: str):
    """Optuna's callback for a trial whose worker died: end its MLflow run FAILED (found by its ``optuna.trial``
    tag, so a worker killed before it recorded the run id is covered too; also a run that had already ended
    FINISHED when the worker died before Optuna recorded the result, so both agree), and its invocation's
    parent run once none of that invocation's trials is still running."""

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
            client.set_tag(run.info.run_id, "error", "worker died (process gone, or no Optuna heartbeat within the grace period); trial marked FAIL and queued again")
            client.set_terminated(run.info.run_id, status="FAILED")
        running = {t.user_attrs.get("mlflow_parent_run_id") for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
        for parent in parents - running - {None}:
            if client.get_run(parent).info.status == "RUNNING":
                client.set_tag(parent, "error", "invocation died (a trial of it lost its worker)")
                client.set_terminated(parent, status="FAILED")
        print(f"trial {trial.number} of a dead worker marked FAIL and queued again ({len(found)} MLflow run(s) ended FAILED)", file=sys.stderr)

    return on_stale


def browse_command(uri: str) -> str:
    """How to look at the results in the MLflow browser."""
    if urlparse(uri).scheme in ("http", "https"):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"
