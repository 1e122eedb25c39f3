"""The study's decision logic on hand-computed cases: reward, the FLOPs limit, the Pareto front, its hypervolume,
the best point within 1 point of full-cache accuracy (ties, duplicates, the boundary), the summary built on them
(feasible trials only), and the verification of that point on samples of another seed."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from kvzap_lab.study import verify
from kvzap_lab.study.bench import Bench
from kvzap_lab.study.config import ACCURACY_TOLERANCE, MAX_FLOPS_RATIO, REWARD_PENALTY, VERIFY_SEED_OFFSET
from kvzap_lab.study.metrics import (
    best_at_target,
    feasible,
    flops_constraint,
    hypervolume,
    operating_point,
    pareto_front,
    reward,
    within_tolerance,
)
from kvzap_lab.study.report import format_table, json_summary, summarize
from kvzap_lab.study.search import SearchSpace


def test_reward_is_compression_until_one_point_lost_then_penalised():
    assert reward(1.0, 0.8, 1.0) == 0.8
    assert reward(0.99, 0.8, 1.0) == 0.8  # exactly 1 point lost: no penalty (1.0 - 0.99 is 0.010000000000000009)
    assert reward(0.69, 0.5, 0.7) == 0.5
    assert reward(0.97, 0.8, 1.0) == pytest.approx(0.8 - REWARD_PENALTY * 0.02)
    assert reward(0.5, 0.9, 1.0) == pytest.approx(0.9 - REWARD_PENALTY * 0.49)
    assert reward(1.0, 0.3, 0.9) == 0.3  # better than the full cache: no bonus


def test_within_tolerance_includes_the_one_point_boundary():
    assert ACCURACY_TOLERANCE == 0.01
    for full in (1.0, 0.96, 0.7, 0.33):
        assert within_tolerance(round(full - 0.01, 2), full)  # a drop of exactly 1 point
        assert not within_tolerance(round(full - 0.02, 2), full)
        assert within_tolerance(full + 0.05, full)


def test_pareto_front_keeps_the_first_of_duplicates_and_drops_dominated_points():
    points = [(1.0, 0.5), (0.9, 0.7), (0.9, 0.7), (0.8, 0.6), (1.0, 0.4), (0.5, 0.9)]
    # (0.8, 0.6) is dominated by (0.9, 0.7); (1.0, 0.4) by (1.0, 0.5); index 2 duplicates index 1.
    assert pareto_front(points) == [0, 1, 5]  # sorted by compression
    assert pareto_front([(0.5, 0.5), (0.5, 0.5)]) == [0]
    assert pareto_front([(0.6, 0.5), (0.5, 0.6)]) == [0, 1]  # neither dominates
    assert pareto_front([]) == []


def test_hypervolume_is_the_area_under_the_staircase():
    front = [(1.0, 0.5), (0.9, 0.7), (0.5, 0.9)]
    # compression 0-0.5 at accuracy 1.0, 0.5-0.7 at 0.9, 0.7-0.9 at 0.5: 0.5 + 0.18 + 0.1
    assert hypervolume(front) == pytest.approx(0.78)
    assert hypervolume(front + [(0.8, 0.6), (0.9, 0.7), (0.2, 0.1)]) == pytest.approx(0.78)  # dominated, duplicate
    assert hypervolume([(0.5, 0.9), (0.7, 0.9)]) == pytest.approx(0.63)  # equal compression: the higher accuracy
    assert hypervolume([]) == 0.0


def test_best_at_target_takes_the_highest_compression_within_one_point_first_of_ties():
    rows = [
        {"trial": 0, "accuracy": 0.99, "compression": 0.80},  # exactly 1 point below: within
        {"trial": 1, "accuracy": 0.98, "compression": 0.95},  # 2 points below: out, whatever its compression
        {"trial": 2, "accuracy": 1.00, "compression": 0.80},  # ties trial 0: the first wins
        {"trial": 3, "accuracy": 1.00, "compression": 0.60},
    ]
    assert best_at_target(rows, 1.0)["trial"] == 0
    assert best_at_target(rows[2:], 1.0)["trial"] == 2
    assert best_at_target(rows, 1.02) is None  # nothing within 1 point of 1.02
    assert best_at_target([], 1.0) is None


def test_operating_point_means_tasks_and_gives_the_ratio():
    point = operating_point({"a": {"accuracy": 1.0, "compression": 0.5}, "b": {"accuracy": 0.5, "compression": 1.0}}, 1.0)
    assert point == {"accuracy": 0.75, "accuracy_drop": 0.25, "compression": 0.75, "compression_ratio": pytest.approx(4.0)}


def test_feasible_keeps_the_rows_within_the_flops_limit_boundary_included():
    assert MAX_FLOPS_RATIO == 0.015  # the default: 1.5 % of the model's projection FLOPs
    rows = [{"trial": 0, "flops_ratio": 0.010}, {"trial": 1, "flops_ratio": 0.015}, {"trial": 2, "flops_ratio": 0.020},
            {"trial": 3}, {"trial": 4, "flops_ratio": 0.5}]
    assert [r["trial"] for r in feasible(rows, 0.015)] == [0, 1, 3]  # exactly at the limit: in; unmeasured (3): in
    assert [r["trial"] for r in feasible(rows, 0.0)] == [3]
    assert feasible(rows, 1.0) == rows  # a limit of 1 keeps every scorer cheaper than the model
    assert flops_constraint(0.02, 0.015) == pytest.approx(0.005) and flops_constraint(0.01, 0.015) == pytest.approx(-0.005)


def _study_with(results: list[tuple[float, float, str | None]], flops: list[float] | None = None):
    """An in-memory study whose complete trials have these (accuracy, compression, baseline) results and FLOPs
    ratios (default 1 %)."""
    study = optuna.create_study(directions=["maximize", "maximize"])
    flops = flops or [0.01] * len(results)
    for i, (accuracy, compression, baseline) in enumerate(results):
        result = {"accuracy": accuracy, "compression": compression, "accuracy_drop": 1.0 - accuracy,
                  "compression_ratio": 1 / (1 - compression), "r2": 0.5, "reward": reward(accuracy, compression, 1.0),
                  "flops_ratio": flops[i]}
        attrs = {"result": result} | ({"baseline": baseline} if baseline else {})
        study.add_trial(optuna.create_trial(state=TrialState.COMPLETE, values=[accuracy, compression],
                                            params={"tau": float(-i)}, distributions={"tau": optuna.distributions.FloatDistribution(-10, 0)},
                                            user_attrs=attrs))
    study.add_trial(optuna.create_trial(state=TrialState.FAIL))
    return study


def test_summary_compares_the_best_point_with_the_paper_default():
    study = _study_with([(1.0, 0.40, "paper"), (0.98, 0.70, "paper"), (0.99, 0.75, None), (0.97, 0.90, None),
                         (1.0, 0.60, "calibrated")])
    summary = summarize(study, 1.0, MAX_FLOPS_RATIO)
    assert [r["trial"] for r in summary["rows"]] == [0, 1, 2, 3, 4]  # complete trials only
    assert [r["trial"] for r in summary["front"]] == [4, 2, 3]  # (1.0, 0.4) and (0.98, 0.7) are dominated
    assert summary["best_at_target"]["trial"] == 2 and summary["best_compression_at_target"] == 0.75
    assert summary["baseline_best_compression_at_target"] == 0.40  # paper trials only (not the calibrated one)
    assert summary["target_met"] and summary["improvement_compression"] == pytest.approx(0.35)
    assert summary["baseline_hypervolume"] == pytest.approx(hypervolume([(1.0, 0.4), (0.98, 0.7)]))
    table = format_table(summary)
    assert "best compression within 1 point of full-cache accuracy: 0.750 (4.00x); target >= 4x: met" in table
    assert "paper default" in table and "0.400 (1.67x)" in table
    line = json_summary(summary)
    assert line["n_complete"] == 5 and line["best_at_target"]["trial"] == 2 and line["best_at_target"]["tau"] == -2.0
    assert [r["trial"] for r in line["front"]] == [4, 2, 3] and "rows" not in line
    assert line["infeasible_trials"] == [] and line["front"][0]["flops_ratio"] == 0.01
    assert "FLOPs limit: scorer <= 1.5 % of the model's projection FLOPs per token (--max-flops-ratio 0.015); 0 of 5" in table


def test_summary_leaves_out_trials_over_the_flops_limit():
    """Trial 1 (1.0, 0.9) would dominate every other point and be the best within 1 point, but its scorer costs
    3 % of the model's projection FLOPs: over the 1.5 % limit it is out of the front, the hypervolume, the best
    point and the paper-default comparison; under a limit of 1 it is back."""
    study = _study_with([(1.0, 0.40, "paper"), (1.0, 0.90, "paper"), (0.99, 0.75, None), (0.97, 0.95, None)],
                        flops=[0.01, 0.03, 0.015, 0.012])
    summary = summarize(study, 1.0, 0.015)
    assert [r["trial"] for r in summary["rows"]] == [0, 1, 2, 3]  # every complete trial is still shown
    assert [r["feasible"] for r in summary["rows"]] == [True, False, True, True]
    assert summary["infeasible_trials"] == [1] and summary["max_flops_ratio"] == 0.015
    assert [r["trial"] for r in summary["front"]] == [0, 2, 3]
    # compression 0-0.4 at 1.0, 0.4-0.75 at 0.99, 0.75-0.95 at 0.97
    assert summary["hypervolume"] == pytest.approx(0.4 + 0.35 * 0.99 + 0.2 * 0.97)
    assert summary["best_at_target"]["trial"] == 2 and summary["best_compression_at_target"] == 0.75
    assert summary["baseline_best_compression_at_target"] == 0.40  # the feasible paper trial only
    assert summary["baseline_hypervolume"] == pytest.approx(0.4)
    table = format_table(summary)
    assert "Pareto front (3 of 3 feasible trials, 4 complete;" in table
    assert "(--max-flops-ratio 0.015); 1 of 4 complete trials over it, left out of the front, the best point and the verification: trials 1" in table
    assert "  3.00 " not in table and "  1.50 " in table  # the flops% column: trial 2 at the limit is shown
    assert json_summary(summary)["infeasible_trials"] == [1]

    everything = summarize(study, 1.0, 1.0)
    assert everything["infeasible_trials"] == [] and [r["trial"] for r in everything["front"]] == [1, 3]
    assert everything["best_at_target"]["trial"] == 1 and everything["hypervolume"] == pytest.approx(0.9 + 0.05 * 0.97)


class _Samples(list):
    """Samples made by the stubbed ``tasks.make_samples``: remembers its seed."""

    seed: int


def test_verification_rechecks_the_pick_on_samples_of_another_seed(monkeypatch):
    made, runs = [], []

    def make_samples(task, tokenizer, n, context_tokens, seed):
        made.append((task, n, context_tokens, seed))
        samples = _Samples(range(n))
        samples.seed = seed
        return samples

    def run(self, policy, task):  # fresh samples: full cache 1.0; the pick loses 1 of 100 on task b
        runs.append((policy, task, self.samples[task].seed))
        accuracy = 0.99 if (policy is not None and task == "b") else 1.0
        return {"accuracy": accuracy, "compression": 0.8}

    monkeypatch.setattr(verify.tasks, "make_samples", make_samples)
    monkeypatch.setattr(Bench, "run", run)
    monkeypatch.setattr(verify, "fit_trial_policy", lambda policy, factory, space, bench, params, seed: (None, ("policy", params["tau"], seed)))
    bench = Bench(None, None, None, None, {"a": [0], "b": [0]}, 0, 1)
    study = optuna.create_study()
    row = {"trial": 7, "params": {"tau": -3.0}}
    space = SearchSpace({}, {}, {})
    kwargs = dict(task_names=["a", "b"], samples=100, context_tokens=40, seed=5)

    checked = verify.verify_best(study, row, "mlp", None, space, bench, **kwargs)
    assert made == [("a", 100, 40, VERIFY_SEED_OFFSET + 5), ("b", 100, 40, VERIFY_SEED_OFFSET + 5)]
    assert {seed for _, _, seed in runs} == {VERIFY_SEED_OFFSET + 5}  # never the search's samples
    assert [(p, t) for p, t, _ in runs] == [(None, "a"), (None, "b"), (("policy", -3.0, 5), "a"), (("policy", -3.0, 5), "b")]
    assert checked["trial"] == 7 and checked["seed"] == VERIFY_SEED_OFFSET + 5 and checked["samples_per_task"] == 100
    assert checked["accuracy"] == pytest.approx(0.995) and checked["full_accuracy"] == 1.0
    assert checked["target_met"]  # 0.5 point lost at 5x
    assert study.user_attrs["verified"] == {"7:100": checked}
    runs.clear()
    assert verify.verify_best(study, row, "mlp", None, space, bench, **kwargs) == checked and runs == []  # kept
    assert verify.verify_best(study, None, "mlp", None, space, bench, **kwargs) is None
    assert verify.verify_best(study, row, "mlp", None, space, bench, **(kwargs | {"samples": 0})) is None


def test_verification_counts_a_drop_of_exactly_one_point_as_met(monkeypatch):
    monkeypatch.setattr(verify.tasks, "make_samples", lambda *a: [0])
    monkeypatch.setattr(Bench, "run", lambda self, policy, task: {"accuracy": 1.0 if policy is None else 0.99, "compression": 0.8})
    monkeypatch.setattr(verify, "fit_trial_policy", lambda *a: (None, "p"))
    checked = verify.verify_best(optuna.create_study(), {"trial": 0, "params": {}}, "mlp", None, SearchSpace({}, {}, {}),
                                 Bench(None, None, None, None, {}, 0, 1), task_names=["a", "b"], samples=100, context_tokens=40, seed=0)
    assert checked["accuracy_drop"] == pytest.approx(0.01) and checked["target_met"]
