"""The fault-injection helpers: the crash point kills the process at the named point and call, and nowhere else;
the barrier holds each process at the named point until all of them got there."""

import subprocess
import sys
import time

SCRIPT = "from kvzap_lab.faults import kill_point\nfor i in range(5):\n    kill_point('a')\n    kill_point('b')\n    print(i, flush=True)\n"
BARRIER = "from kvzap_lab.faults import barrier\nbarrier('other')\nbarrier('meet')\nbarrier('meet')\nprint('passed', flush=True)\n"


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


def test_the_barrier_holds_each_process_until_all_got_there(tmp_path):
    folder = tmp_path / "barrier"
    folder.mkdir()
    env = {"PATH": "/usr/bin:/bin", "KVZAP_LAB_BARRIER": f"meet:2:{folder}"}
    start = lambda: subprocess.Popen([sys.executable, "-c", BARRIER], env=env, stdout=subprocess.PIPE, text=True)  # noqa: E731
    first = start()
    while not any(folder.iterdir()):  # the first process reached the barrier (its file); it cannot pass alone
        assert first.poll() is None
        time.sleep(0.01)
    assert [p.name for p in folder.iterdir()] == [str(first.pid)] and first.poll() is None
    second = start()
    assert [p.communicate()[0] for p in (first, second)] == ["passed\n"] * 2  # the second call does not wait again
    assert [p.returncode for p in (first, second)] == [0, 0] and len(list(folder.iterdir())) == 2
    unset = subprocess.run([sys.executable, "-c", BARRIER], env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert unset.returncode == 0 and unset.stdout == "passed\n"
