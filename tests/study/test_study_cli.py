"""Bad input to ``python -m kvzap_lab.study``: one line naming what is wrong and what would work, exit code 2,
before anything is created or queued."""

from __future__ import annotations

import re
import subprocess
import sys

from study_helpers import ENV, REPO, args_for, free_port, run_cli, tiny  # noqa: F401  (fixture)


def test_bad_policy_sampler_and_unreachable_services_fail_with_one_line(tiny, tmp_path, capsys):
    assert run_cli(["--policy", "nosuch"]) == 2
    assert "unknown policy 'nosuch'" in (err := capsys.readouterr().err) and "kvzap_mlp" in err and "gbdt" in err
    assert run_cli(["--policy", "knorm"]) == 2
    assert "nothing to train" in capsys.readouterr().err
    results = tmp_path / "r"
    cases = [
        (["--tracking-uri", f"http://127.0.0.1:{free_port()}"], "MLflow tracking server .* is unreachable"),
        (["--tracking-uri", str(tmp_path / "mlruns")], "file store"),
        (["--tracking-uri", "htp:/bad uri"], "--tracking-uri 'htp:/bad uri': unknown scheme 'htp'; use http://host:port"),
        (["--tracking-uri", "http:/bad uri"], "--tracking-uri 'http:/bad uri' is not a valid URL"),
        (["--storage", f"postgresql://kvzap:secret@127.0.0.1:{free_port()}/db"], "cannot reach the Optuna storage"),
        (["--storage", "sqlite:////no/such/dir/optuna.db"], "directory /no/such/dir does not exist"),
        (["--storage", "nosuchdb://x"], "not a usable database URL"),
        (["--sampler", "cmaes"], "--sampler cmaes optimises one objective; --objectives pareto has 2"),
    ]
    for extra, message in cases:
        assert run_cli(args_for(tiny, results, *extra)) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("python -m kvzap_lab.study: error: "), err
        assert re.search(message, err), err
        assert "secret" not in err
        assert not results.exists()  # checked before anything was made, let alone queued


def test_the_module_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kvzap_lab.study", "--policy", "mlp", "--tracking-uri", "htp:/bad uri",
                           "--results", str(tmp_path / "r")], cwd=REPO, env=ENV, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "python -m kvzap_lab.study: error: --tracking-uri 'htp:/bad uri': unknown scheme 'htp'; use http://host:port "
        "(an MLflow server) or a database such as sqlite:///path/to/mlflow.db"]
    assert not (tmp_path / "r").exists()
