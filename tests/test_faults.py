"""The crash-point helper kills the process at the named point and call, and nowhere else."""

import subprocess
import sys

SCRIPT = "from kvzap_lab.faults import kill_point\nfor i in range(5):\n    kill_point('a')\n    kill_point('b')\n    print(i, flush=True)\n"


def _run(spec):
    env = {"PATH": "/usr/bin:/bin"}
    if spec is not None:
        env["KVZAP_LAB_KILL_AT"] = spec
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True)


def test_unset_or_other_name_runs_to_the_end():
    for spec in (None, "", "c", "c:2"):
        done = _run(spec)
        assert done.returncode == 0 and done.stdout.split() == ["0", "1", "2", "3", "4"]


def test_kills_at_the_nth_call_of_the_named_point():
    first = _run("b")
    assert first.returncode == -9 and first.stdout.split() == []
    third = _run("a:3")
    assert third.returncode == -9 and third.stdout.split() == ["0", "1"]
