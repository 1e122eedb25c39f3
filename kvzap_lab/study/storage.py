"""Optuna's storage: URLs, a fast reachability check, creation safe under concurrent starts, the study's creation
with its start points, and the detection of trials whose worker died.

Concurrent starts: the schema of a new store, the study and its start points are created while holding a lock
(:func:`creation_lock`: a lock file beside a sqlite database, a session-level advisory lock on PostgreSQL), so
of several processes started at once on an empty store exactly one creates the study and queues its start
points, once; the others find them. A study records ``start_points_queued`` after its last start point, so a
creator killed half-way is completed by the next start.

A trial whose worker died is failed and its parameters queued again (:mod:`kvzap_lab.study.resume`), in its
place: before the points queued after it (:class:`RetriesInPlaceStorage`).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import warnings
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlparse

import optuna
from optuna.storages._cached_storage import _CachedStorage  # what optuna.create_study wraps an RDBStorage in
from optuna.trial import TrialState

from kvzap_lab.faults import kill_point
from kvzap_lab.study.config import OBJECTIVES, StudyError

SERVICE_TIMEOUT_S = 5
START_POINTS_DONE = "start_points_queued"  # study user attribute: every start point is queued
MAX_RETRIES = 3  # a trial whose worker died is run again at most this many times


def hide_password(url: str) -> str:
    """``url`` with its password masked (unchanged when it is not a database URL)."""
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


def scheme(url: str) -> str:
    """The database family of ``url``: ``sqlite``, ``postgresql``, ``mysql``, ... (driver suffix dropped)."""
    return urlparse(url).scheme.split("+")[0]


def sqlite_path(url: str) -> Path | None:
    """The file of a sqlite URL (None for an in-memory database)."""
    path = url.split(":///", 1)[-1]
    return None if not path or path == ":memory:" else Path(path)


def engine_kwargs(url: str) -> dict:
    """SQLAlchemy arguments: sqlite waits for a lock held by another worker; servers time out a connection fast."""
    if scheme(url) == "sqlite":
        return {"connect_args": {"timeout": 60}}
    if scheme(url) in ("postgresql", "mysql"):
        return {"connect_args": {"connect_timeout": SERVICE_TIMEOUT_S}, "pool_pre_ping": True}
    return {}


def check_database(url: str, what: str) -> None:
    """Raise :class:`StudyError` within seconds unless ``url`` is a database URL we can connect to."""
    from sqlalchemy import create_engine
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

    shown = hide_password(url)
    if scheme(url) == "sqlite":
        path = sqlite_path(url)
        if path is not None and not path.parent.is_dir():
            raise StudyError(f"{what} {shown}: directory {path.parent} does not exist; create it or use another path")
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


@contextmanager
def creation_lock(url: str) -> Iterator[None]:
    """Hold an exclusive lock on the store at ``url`` across processes (and, for PostgreSQL, machines): a lock
    file ``<db>.lock`` beside a sqlite database, ``pg_advisory_lock`` on PostgreSQL. Both are released when the
    holder dies. Other stores (MySQL, an MLflow server) take no lock: their creation races are tolerated."""
    kind = scheme(url)
    if kind == "sqlite" and sqlite_path(url) is not None:
        with open(f"{sqlite_path(url)}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
    elif kind == "postgresql":
        from sqlalchemy import create_engine, text

        key = int.from_bytes(hashlib.sha256(b"kvzap_lab.study creation").digest()[:8], "big", signed=True)
        engine = create_engine(url, **engine_kwargs(url))
        try:
            with engine.connect() as connection:
                connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": key})
                try:
                    yield
                finally:
                    connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": key})
        finally:
            engine.dispose()
    else:
        yield


class RetriesInPlaceStorage(_CachedStorage):
    """Optuna's RDB storage (behind the cache Optuna itself puts in front of it) listing waiting trials in the
    order an uninterrupted study would run them.

    Optuna runs waiting trials in the order :meth:`get_all_trials` lists them, and re-queues a dead worker's
    trial as a new trial, behind every point queued after it: a study with more queued points than
    ``--n-trials`` would then end without the killed configuration. Here a retry is listed at the place of the
    trial it retries (the first number of its ``retry_history``), so it runs next.

    Args:
        backend: the RDB storage.
    """

    def get_all_trials(self, study_id, deepcopy=True, states=None):
        trials = super().get_all_trials(study_id, deepcopy=deepcopy, states=states)
        if states is not None and set(states) == {TrialState.WAITING}:
            trials.sort(key=lambda t: (t.system_attrs.get("retry_history") or [t.number])[0])
        return trials


def open_storage(url: str, heartbeat_interval: int, grace_period: int, on_stale: Callable):
    """Optuna's RDB storage (its schema created if new, waiting trials listed retries first:
    :class:`RetriesInPlaceStorage`) with heartbeats: ``on_stale(study, trial)`` is called for each trial of a
    dead worker, after its parameters were queued again."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)

    def stale(study, trial) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            retry(study, trial)
        on_stale(study, trial)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetriesInPlaceStorage(optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs(url),
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            heartbeat_stale_trial_callback=stale,
        ))


def open_study(storage, name: str, identity: dict, objectives: str, sampler, pruner, points: list[tuple[dict, str]]):
    """Create the study with its start points (``[(params, kind)]``), or load it after checking that it was
    created with the same objectives and settings; queue the start points a killed creator left out. Call it
    under :func:`creation_lock`. Returns ``(study, created)``."""
    metric_names, directions = OBJECTIVES[objectives]
    study = optuna.create_study(
        study_name=name, storage=storage, directions=list(directions), sampler=sampler, pruner=pruner, load_if_exists=True
    )
    kill_point("study.created")
    stored = study.user_attrs.get("identity")
    wanted_dirs = [optuna.study.StudyDirection[d.upper()] for d in directions]
    created = stored is None and not study.trials and study.directions == wanted_dirs  # new (or created empty by a crash)
    if created:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(metric_names))
        study.set_user_attr("identity", identity)
    elif stored is None:
        raise StudyError(f"study {name!r} in this storage was not made by kvzap_lab.study; choose another --study-name")
    elif stored["objectives"] != objectives or study.directions != wanted_dirs:
        raise StudyError(
            f"study {name!r} was created with --objectives {stored['objectives']} "
            f"({', '.join(study.metric_names or [])}); rerun with --objectives {stored['objectives']} or choose a "
            "new --study-name (its trials are kept)"
        )
    else:
        differs = [f"{k}: study has {stored.get(k)!r}, this run has {v!r}" for k, v in identity.items() if stored.get(k) != v]
        if differs:
            raise StudyError(
                f"study {name!r} was created with other settings ({'; '.join(differs)}); rerun with the study's "
                "settings or choose a new --study-name (its trials are kept)"
            )
    if not study.user_attrs.get(START_POINTS_DONE):
        queue_start_points(study, points)
    return study, created


def queue_start_points(study, points: list[tuple[dict, str]]) -> None:
    """Queue the start points not yet in ``study`` (any state; a killed creator may have queued some), in
    order, then mark the study as having them all."""
    key = lambda params: json.dumps(params, sort_keys=True)  # noqa: E731
    present = Counter(key(t.system_attrs.get("fixed_params") or t.params) for t in study.get_trials(deepcopy=False))
    for params, kind in points:  # equal start points (two taus rounding alike) are each queued
        if present[key(params)]:
            present[key(params)] -= 1
            continue
        study.enqueue_trial(params, user_attrs={"baseline": kind})
        kill_point("study.start_point")
    study.set_user_attr(START_POINTS_DONE, True)
