"""The FLOPs limit end to end on the tiny model: a trial whose scorer costs more than ``--max-flops-ratio`` of the
model's projection FLOPs is kept and shown, carries its Optuna constraint, and is left out of the front, the best
point and the verification; a rerun with a limit of 1 judges the same trials again and picks among them."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from study_helpers import args_for, default_name, mlflow_template, run_cli, runs_of, tiny, trials_of  # noqa: F401

# The paper-default MLP on the tiny Llama (hidden 64, 2 KV heads, 2 layers, intermediate 128, 4 heads of 16):
# 2 * (64 * 8 + 8 * 2) * 2 scorer FLOPs per token against 2 * (64 * 16 * (2 * 4 + 2 * 2) + 3 * 64 * 128) * 2.
PAPER_MLP_RATIO = (2 * (64 * 8 + 8 * 2) * 2) / (2 * (64 * 16 * 12 + 3 * 64 * 128) * 2)


def test_trials_over_the_flops_limit_are_kept_but_never_picked(tiny, mlflow_template, tmp_path, capsys):
    results = tmp_path / "results"
    assert 0.014 < PAPER_MLP_RATIO < 0.015  # within the default limit: the tiny limit below is what excludes it
    argv = args_for(tiny, results, "--n-trials", "3", "--json", template=mlflow_template)
    assert run_cli(argv + ["--max-flops-ratio", "0.001"]) == 0
    captured = capsys.readouterr()
    line = json.loads(captured.out.strip().splitlines()[-1])
    assert line["n_complete"] == 3 and line["max_flops_ratio"] == 0.001
    assert line["infeasible_trials"] == [0, 1, 2]  # the start points: the paper-default MLP at several taus
    assert line["front"] == [] and line["best_at_target"] is None and line["best_compression_at_target"] is None
    assert line["verified"] is None and line["hypervolume"] == 0.0
    assert ("(--max-flops-ratio 0.001); 3 of 3 complete trials over it, left out of the front, the best point and the "
            "verification: trials 0, 1, 2") in captured.err
    assert "best compression within 1 point of full-cache accuracy: none" in captured.err

    trials = trials_of(results, default_name(tiny))
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 3
    for t in complete:  # Optuna's constraint (feasible when <= 0), which TPE and NSGA-II read
        assert t.user_attrs["result"]["flops_ratio"] == pytest.approx(PAPER_MLP_RATIO)
        assert t.constraints == {"flops_ratio": pytest.approx(PAPER_MLP_RATIO - 0.001)}
    tracking = f"sqlite:///{results / 'mlflow.db'}"
    (parent,), children = runs_of(tracking, default_name(tiny))
    assert parent.data.params["max_flops_ratio"] == "0.001" and parent.data.metrics["n_infeasible"] == 3
    assert all(r.data.metrics["flops_ratio"] == pytest.approx(PAPER_MLP_RATIO) for r in children)

    # The limit belongs to the invocation: at 1 the same three trials are feasible, a best point is picked and
    # verified on fresh samples; no trial is added or re-run.
    assert run_cli(argv + ["--max-flops-ratio", "1"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["infeasible_trials"] == [] and line["n_complete"] == 3 and len(line["front"]) >= 1
    assert line["best_at_target"]["trial"] in (0, 1, 2) and line["verified"]["trial"] == line["best_at_target"]["trial"]
    assert [t.number for t in trials_of(results, default_name(tiny)) if t.state == TrialState.COMPLETE] == [0, 1, 2]
    client = MlflowClient(tracking)
    parents, _ = runs_of(tracking, default_name(tiny))
    assert sorted(client.get_run(p.info.run_id).data.params["max_flops_ratio"] for p in parents) == ["0.001", "1.0"]
