"""Deterministic crash points for kill -9 tests: a process kills itself exactly where a test asks.

Long-running commands call :func:`kill_point` at the places where a crash matters (after a checkpoint, between a
shard's write and the manifest's, between a study's creation and its start points, ...). With the environment
variable ``KVZAP_LAB_KILL_AT`` unset it does nothing. Set to ``NAME`` or ``NAME:N``, the process sends itself
SIGKILL at the N-th call (default the first) of ``kill_point(NAME)``: a test reproduces a crash at a named phase
with no race against the wall clock. :func:`barrier` is its twin for concurrency tests: processes started
together wait for each other at a named point (``KVZAP_LAB_BARRIER``).
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path

ENV_VAR = "KVZAP_LAB_KILL_AT"
_calls: Counter = Counter()


def kill_point(name: str) -> None:
    """Kill this process with SIGKILL if ``KVZAP_LAB_KILL_AT`` names this point (and this is the N-th call)."""
    spec = os.environ.get(ENV_VAR)
    if not spec:
        return
    target, _, count = spec.partition(":")
    if target != name:
        return
    _calls[name] += 1
    if _calls[name] == (int(count) if count else 1):
        os.kill(os.getpid(), signal.SIGKILL)


BARRIER_ENV = "KVZAP_LAB_BARRIER"
_barriers_passed: set = set()


def barrier(name: str, poll_s: float = 0.05) -> None:
    """Hold this process at its first call of ``barrier(name)`` until N processes got there, if
    ``KVZAP_LAB_BARRIER`` is ``NAME:N:DIR`` (each process leaves a file named by its pid in the existing folder
    DIR and waits until DIR holds N files): a test starts several processes and makes them overlap at a named
    phase (e.g. a study's creation) without a race against the wall clock. Unset or another name: nothing."""
    target, _, rest = os.environ.get(BARRIER_ENV, "").partition(":")
    if target != name or name in _barriers_passed:
        return
    _barriers_passed.add(name)
    count, _, folder = rest.partition(":")
    (Path(folder) / str(os.getpid())).touch()
    while len(list(Path(folder).iterdir())) < int(count):
        time.sleep(poll_s)
