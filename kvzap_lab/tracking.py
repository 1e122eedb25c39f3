"""MLflow logging of one command's run: ``--tracking-uri`` (and ``--experiment``) on ``kvzap_lab.train`` and
``kvzap_lab.evaluate``.

Built on the study's tracking (:mod:`kvzap_lab.study.tracking`), so every tool logs the same way: the URI is
checked within seconds before any work, the experiment is created as a model-training experiment, runs carry
MLflow's standard source tags (``mlflow.source.name``, ``mlflow.source.git.commit``), datasets are logged as
inputs, and a local sqlite store keeps its artifacts next to its file.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

_METRIC_UNSAFE = re.compile(r"[^0-9A-Za-z_\-. :/]")


def check_tracking_uri(uri: str) -> None:
    """Raise a ValueError (one line naming the URI and what would work) unless ``uri`` is a usable MLflow
    tracking URI: a database (``sqlite:///path/mlflow.db``) or an ``http(s)://`` server that answers."""
    from kvzap_lab.study.tracking import check_tracking

    check_tracking(uri)


def metric_name(*parts) -> str:
    """An MLflow metric name from ``parts`` joined by ``/`` (characters MLflow refuses, such as ``=`` or ``@``,
    become ``_``)."""
    return _METRIC_UNSAFE.sub("_", "/".join(str(p) for p in parts))


def dataset_input(data_dir: str | Path, name: str | None = None):
    """An oracle dataset directory (``kvzap_lab.collect``'s output) as an MLflow run input, named ``name``
    (default: the directory's name) with the sha256 of its manifest as digest."""
    from kvzap_lab import data
    from kvzap_lab.study.tracking import dataset_input as study_dataset_input

    data_dir = Path(data_dir)
    return study_dataset_input(data_dir, data.sha256_file(data_dir / data.MANIFEST), name or data_dir.name)


def open_run(uri: str, experiment: str, command: str, *, run_name: str, params: dict, run_id: str | None = None,
             inputs: Iterable = (), tags: dict | None = None):
    """Start a run, or continue ``run_id`` (a resumed command's), that the caller logs to and ends.

    Args:
        uri: the tracking URI (checked first with :func:`check_tracking_uri`).
        experiment: the experiment's name, created as a model-training experiment when new.
        command: the command that made the run (``python -m kvzap_lab.train``): the run's source name.
        run_name: the run's name in the UI.
        params: ``{name: value}`` (values as strings, MLflow's limit of 6,000 characters each); not logged again
            to a continued run.
        run_id: the run to continue, or None for a new one.
        inputs: MLflow dataset inputs (:func:`dataset_input`).
        tags: extra run tags.
    Returns:
        ``(tracker, run_id)``: a :class:`kvzap_lab.study.tracking.Tracker` (``metrics``, ``end``, its ``client``)
        and the run's id.
    """
    from kvzap_lab.study.storage import creation_lock
    from kvzap_lab.study.tracking import Tracker

    with creation_lock(uri):  # schema and experiment creation, serialised with any study on the same store
        tracker = Tracker.open(uri, experiment, {"mlflow.source.name": command}, list(inputs))
    return tracker, run_id or tracker.start(run_name, params, dict(tags or {}))


def log_run(
    uri: str,
    experiment: str,
    command: str,
    *,
    run_name: str,
    params: dict,
    metrics: dict,
    artifacts: Iterable[str | Path] = (),
    inputs: Iterable = (),
    tags: dict | None = None,
) -> str:
    """Log one finished run.

    Args:
        uri, experiment, command, run_name, params, inputs, tags: as :func:`open_run`'s.
        metrics: ``{name: float}``; non-finite values and None are left out.
        artifacts: files to attach to the run.
    Returns:
        the run id.
    """
    tracker, run_id = open_run(uri, experiment, command, run_name=run_name, params=params, inputs=inputs, tags=tags)
    try:
        tracker.metrics(run_id, metrics)
        for path in artifacts:
            tracker.client.log_artifact(run_id, str(path))
    except BaseException as err:
        tracker.end(run_id, "FAILED", f"{type(err).__name__}: {err}")
        raise
    tracker.end(run_id, "FINISHED")
    return run_id
