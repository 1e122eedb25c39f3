"""What makes a killed study continue as if it had not been: trials whose worker died are found, failed and
queued again, and the sampler continues its random draws where the dead process left them.

A running trial records its worker (host and pid namespace, pid, process start time). On the same host a trial
whose process is gone is failed at once; elsewhere Optuna's heartbeat fails it after the grace period. Either
way its parameters are queued again (Optuna's ``RetryHeartbeatStaleTrialCallback``, installed by
:func:`kvzap_lab.study.storage.open_storage`) and its MLflow run ended FAILED. The sampler's random state is
stored after each trial's draw and restored by the next process (a new process would restart it from the seed
and draw the killed trial's parameters a second time), so the finished trials of an interrupted study are those
of an uninterrupted one.
"""

from __future__ import annotations

import copy
import os
import socket
import warnings
from pathlib import Path


def _proc_start(pid: int | str) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (``/proc``; None where unavailable)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _host() -> str:
    """This machine and pid namespace: pids of trials recorded under the same value are comparable."""
    parts = [socket.gethostname()]
    try:
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    except OSError:
        pass
    return "/".join(parts)


def process_record() -> dict:
    """This process, as a running trial or invocation records it: host (and pid namespace), pid, start time."""
    return {"host": _host(), "pid": os.getpid(), "started": _proc_start("self")}


def process_gone(record: dict | None) -> bool:
    """Whether the process in ``record`` (:func:`process_record`) is known to be dead: it ran on this host and
    its pid no longer runs it (gone, a zombie, or reused by another process). False when unknown."""
    if not record or record.get("host") != _host():
        return False
    try:
        os.kill(record["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    try:
        state = Path(f"/proc/{record['pid']}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state == "Z" or (record.get("started") is not None and _proc_start(record["pid"]) != record["started"])


def worker_record(trial_number: int) -> dict:
    """What a running trial records about its process (``user_attrs["worker"]``)."""
    return {"trial": trial_number} | process_record()


def worker_is_gone(record: dict | None, trial_number: int) -> bool:
    """Whether the worker of trial ``trial_number`` is known to be dead (a record copied from the trial that
    this one retries does not count)."""
    return bool(record) and record.get("trial") == trial_number and process_gone(record)


def fail_stale_trials(study) -> None:
    """Mark FAIL the running trials whose worker died: at once when it ran on this host and its process is
    gone, else once its heartbeat is older than the grace period. Their parameters are queued again and their
    MLflow runs ended (the storage's stale-trial callback)."""
    import optuna
    from optuna.trial import TrialState

    storage = study._storage
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if worker_is_gone(trial.user_attrs.get("worker"), trial.number):
            try:
                if storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                    failed.append(trial._trial_id)
            except optuna.exceptions.UpdateFinishedTrialError:  # another worker failed it first
                pass
    for trial_id in failed:
        storage.get_heartbeat_stale_trial_callback()(study, copy.deepcopy(storage.get_trial(trial_id)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _random_states(sampler) -> dict:
    """The numpy random states ``sampler`` draws from, by attribute path (``_rng``, ``_random_sampler._rng``)."""
    import numpy as np
    from optuna.samplers import BaseSampler
    from optuna.samplers._lazy_random_state import LazyRandomState

    found = {}
    for name, value in vars(sampler).items():
        if isinstance(value, LazyRandomState):
            found[name] = value.rng
        elif isinstance(value, np.random.RandomState):
            found[name] = value
        elif isinstance(value, BaseSampler):
            found |= {f"{name}.{path}": state for path, state in _random_states(value).items()}
    return found


def save_sampler_state(study, sampler, key: str) -> None:
    """Store where ``sampler``'s random draws stand (after a trial's parameters were drawn), under ``key``."""
    states = {}
    for path, rng in _random_states(sampler).items():
        kind, keys, pos, has_gauss, cached = rng.get_state()
        states[path] = [kind, keys.tolist(), pos, has_gauss, cached]
    study._storage.set_study_system_attr(study._study_id, key, states)


def restore_sampler_state(study, sampler, key: str) -> bool:
    """Continue ``sampler``'s random draws where the study's last process with this ``key`` left them, so a
    resumed study draws what an uninterrupted one would have (a process restarts its sampler from the seed).
    Returns whether a state was found."""
    import numpy as np

    states = study._storage.get_study_system_attrs(study._study_id).get(key)
    if not states:
        return False
    for path, rng in _random_states(sampler).items():
        kind, keys, pos, has_gauss, cached = states[path]
        rng.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    return True
