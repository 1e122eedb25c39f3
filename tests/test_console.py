"""The installed ``kvzap-lab`` console script (pyproject's [project.scripts]), run for real."""

import subprocess
import sys
from importlib.metadata import entry_points, version
from pathlib import Path

SCRIPT = Path(sys.executable).parent / "kvzap-lab"


def kvzap_lab(*args, tmp_path):
    assert SCRIPT.is_file(), f"{SCRIPT} is not installed: pip install -e . declares it"
    return subprocess.run([str(SCRIPT), *args], cwd=tmp_path, capture_output=True, text=True)


def test_the_script_is_declared_by_the_installed_distribution():
    (found,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "kvzap-lab"]
    assert found.value == "kvzap_lab.console:entry_point" and found.dist.name == "kvzap-lab"


def test_version_prints_the_installed_package_version(tmp_path):
    done = kvzap_lab("--version", tmp_path=tmp_path)
    assert (done.returncode, done.stdout.strip()) == (0, f"kvzap-lab {version('kvzap-lab')}")


def test_a_command_reaches_its_module(tmp_path):
    done = kvzap_lab("evaluate", "--help", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "--policies" in done.stdout and "--n-samples" in done.stdout


def test_bad_input_through_the_script_is_one_line_and_exit_2(tmp_path):
    done = kvzap_lab("train", "--policy", "linear", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "out"),
                     tmp_path=tmp_path)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()
    assert "error" in line and "missing" in line
    unknown = kvzap_lab("trian", tmp_path=tmp_path)
    assert unknown.returncode == 2 and unknown.stderr.strip() == (
        "kvzap-lab: error: unknown command 'trian'; choose from collect, train, evaluate, study, finetune, testbed, "
        "kvpress (or --version)"
    )
