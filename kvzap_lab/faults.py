"""Deterministic crash points for kill -9 tests: a process kills itself exactly where a test asks.

Long-running commands call :func:`kill_point` at the places where a crash matters (after a checkpoint, between a
shard's write and the manifest's, between a study's creation and its start points, ...). With the environment
variable ``KVZAP_LAB_KILL_AT`` unset it does nothing. Set to ``NAME`` or ``NAME:N``, the process sends itself
SIGKILL at the N-th call (default the first) of ``kill_point(NAME)``: a test reproduces a crash at a named phase
with no race against the wall clock.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

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
