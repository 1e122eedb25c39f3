"""Running trials until the study holds enough: the trial loop shared by every worker and the worker processes of
``--workers N``.

A study's named phases, where a test makes the process kill itself (:func:`kvzap_lab.faults.kill_point`,
``KVZAP_LAB_KILL_AT=NAME[:N]``) or hold until others got there (:func:`kvzap_lab.faults.barrier`,
``KVZAP_LAB_BARRIER=NAME:N:DIR``, at a process's first call): ``study.create`` (before the study is created or
loaded; a barrier point), ``study.created`` (created, start points not yet queued), ``study.start_point`` (after
each queued start point), ``study.trial`` (each trial, its scorer fitted; a barrier point) and ``study.verify``
(before the verification's scorer is fitted).

``--n-trials`` counts finished (complete or pruned) trials of the whole study: each worker, on this machine or
another, starts a trial only while finished + running trials are fewer than it, and waits while the missing
ones run elsewhere (so N workers finish with n_trials to n_trials + N - 1 trials, never fewer).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from tqdm.auto import tqdm

from kvzap_lab.study.config import MAX_CONSECUTIVE_FAILURES, StudyConfig, StudyError


def optimize(study, objective, target: int, timeout: float | None, fail_stale, poll_s: float = 1.0) -> None:
    """Run trials until the study holds ``target`` finished (complete or pruned) trials, or ``timeout`` seconds
    passed. When the trials still missing are running in other workers, wait for them: ``fail_stale(study)``
    fails those whose worker died (their parameters are queued again) and this worker runs them. Raises after
    ``MAX_CONSECUTIVE_FAILURES`` failed trials in a row."""
    from optuna.trial import TrialState

    started = time.monotonic()
    finished_states = (TrialState.COMPLETE, TrialState.PRUNED)
    last = []
    failures = 0
    count = lambda *states: len(study.get_trials(deepcopy=False, states=states))  # noqa: E731
    with tqdm(total=target, initial=min(count(*finished_states), target), desc=f"study {study.study_name}", unit="trial") as progress:
        while timeout is None or time.monotonic() - started < timeout:
            fail_stale(study)
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


def worker_threads(workers: int) -> int:
    """Torch threads per worker process: the cores shared evenly."""
    return max(1, (os.cpu_count() or 1) // workers)


def start_workers(config: StudyConfig, parent: str) -> list[subprocess.Popen]:
    """Start workers 1..N-1 of ``config`` on the same study (this process is worker 0)."""
    from dataclasses import replace

    env = dict(os.environ, OMP_NUM_THREADS=str(worker_threads(config.workers)))
    procs = []
    for index in range(1, config.workers):
        worker = replace(config, workers=1, worker_index=index, parent_run_id=parent)
        procs.append(subprocess.Popen([sys.executable, "-m", "kvzap_lab.study", *worker.to_argv()], env=env))
    return procs


def wait_workers(procs: list[subprocess.Popen]) -> None:
    """Wait for worker processes; raise if one failed."""
    codes = [p.wait() for p in procs]
    if any(codes):
        raise StudyError(f"worker processes exited with codes {codes} (see their output above)")


def stop_workers(procs: list[subprocess.Popen]) -> None:
    """Terminate the worker processes still running, and reap them."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
            p.wait()
