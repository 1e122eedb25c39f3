"""benchmarks/beyond_imitation.py end to end in its short form: supervised, fine-tuned and RL scorers on the test
bed at matched compressions, the JSON comparison, and a rerun answered from its cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import load_file
from kvzap_lab.envs.config import shared_model

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_beyond_imitation_compares_three_scorers_at_matched_compressions_and_resumes(tmp_path, capsys):
    torch.manual_seed(0)
    model, tokenizer = shared_model("testbed", "cpu")
    quick = load_file(REPO / "examples" / "learn_thresholds.py", "learn_thresholds").quick_mlp_scorer
    quick(model, tokenizer, "single_needle", 6, 96, seed=1000, epochs=5).save(tmp_path / "supervised" / "scorer")
    bench = load_file(REPO / "benchmarks" / "beyond_imitation.py", "beyond_imitation")
    targets = [0.3, 0.5, 0.7]
    argv = ["--model", "testbed", "--results", str(tmp_path / "results"), "--supervised", str(tmp_path / "supervised"),
            "--tasks", "single_needle", "--train-tasks", "single_needle", "--context-tokens", "96", "--n-samples", "2",
            "--calibration-samples", "2", "--compressions", *map(str, targets), "--window", "8", "--sinks", "2",
            "--chunk-size", "32", "--batch-size", "2", "--json",
            "--finetune-args", "--steps 2 --eval-every 2 --eval-samples 2 --text-tokens 16 --batch-size 2",
            "--rl-args", "--iterations 1 --episodes 2 --n-train 1 --n-heldout 1 --chunk-size 32"]
    assert bench.main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    assert result["full"]["n"] == 2
    assert "iterations=1" in result["rl"]["settings"] and "episodes=2" in result["rl"]["settings"]
    for label in ("supervised", "finetuned", "rl"):
        points = result[label]["points"]
        assert [p["target"] for p in points] == targets and all(p["n"] == 2 for p in points)
        taus = [p["tau"] for p in points]
        assert taus == sorted(taus), label  # evicting more of the same calibration pairs takes a higher threshold
        assert all(p["ci95"][0] <= p["accuracy"] <= p["ci95"][1] for p in points)
        within = result[label]["compression_within_1pt"]
        assert within is None or within in [p["compression"] for p in points]
    assert result["goal"] == bench.goal(result) and set(result["goal"]["rl"]) == {"x", "more_compression", "higher_accuracy"}
    assert (tmp_path / "results" / "beyond_imitation" / "testbed" / "rl" / "config.json").is_file()

    cache = tmp_path / "results" / "beyond_imitation" / "testbed" / "points.json"
    answered = cache.read_bytes()
    assert bench.main(argv) == 0  # the fine-tuning is reused, every point comes from the cache
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cache.read_bytes() == answered
    assert [again[k]["points"] for k in ("supervised", "finetuned")] == [result[k]["points"] for k in ("supervised", "finetuned")]


def test_settings_default_by_model_and_flags_override_them():
    bench = load_file(REPO / "benchmarks" / "beyond_imitation.py", "beyond_imitation")
    testbed = bench.parse_args(["--model", "testbed"])
    assert (testbed.context_tokens, testbed.window, testbed.n_samples) == (512, 16, 100)
    assert testbed.supervised == Path("results/train/mlp")
    real = bench.parse_args(["--model", "smollm2-135m", "--window", "32"])
    assert (real.context_tokens, real.window) == (1024, 32) and len(real.compressions) >= 3
    assert "kv_retrieval" not in real.train_tasks and "--steps 16" in real.finetune_args
    assert real.supervised == Path("results/train/smollm2-135m-mlp")
    with pytest.raises(SystemExit):
        bench.parse_args(["--model", "smollm2-135m", "--compressions", "0.5", "0.6"])


def point(accuracy, low, high, compression):
    return {"accuracy": accuracy, "ci95": [low, high], "compression": compression}


def test_goal_counts_more_compression_within_one_point_or_higher_accuracy_at_equal_compression():
    bench = load_file(REPO / "benchmarks" / "beyond_imitation.py", "beyond_imitation")
    sup = [point(0.99, 0.96, 1.0, 0.75), point(0.96, 0.92, 0.98, 0.80), point(0.50, 0.43, 0.57, 0.84)]
    # one sample behind at 4x (inside its interval), far ahead at 6.25x: higher accuracy at equal compression
    ahead = [point(0.98, 0.95, 0.99, 0.75), point(0.97, 0.94, 0.99, 0.80), point(0.97, 0.94, 0.99, 0.84)]
    assert bench.higher_at_equal_compression(sup, ahead)
    # ahead at 0.84 but evicting less there (0.82 < 0.84 - 0.005): not at equal compression
    assert not bench.higher_at_equal_compression(sup, ahead[:2] + [point(0.97, 0.94, 0.99, 0.82)])
    # ahead somewhere but clearly behind elsewhere (upper end 0.985 below 0.99): not higher
    assert not bench.higher_at_equal_compression(sup, [point(0.95, 0.91, 0.985, 0.75)] + ahead[1:])
    # ties everywhere: not higher
    assert not bench.higher_at_equal_compression(sup, sup)

    result = {"supervised": {"compression_within_1pt": 0.75, "points": sup},  # 4x
              "finetuned": {"compression_within_1pt": 0.84, "points": ahead},  # 6.25x: +2.25x
              "rl": {"compression_within_1pt": 0.76, "points": sup}}  # 4.17x: +0.17x, no higher accuracy
    g = bench.goal(result)
    assert g["supervised_x"] == pytest.approx(4.0) and g["finetuned"]["x"] == pytest.approx(6.25)
    assert g["finetuned"] == g["finetuned"] | {"more_compression": True, "higher_accuracy": True} and g["met"]
    assert not g["rl"]["more_compression"] and not g["rl"]["higher_accuracy"]
    result["supervised"]["compression_within_1pt"] = None  # no supervised point within 1 point: only accuracy counts
    g = bench.goal(result)
    assert not g["finetuned"]["more_compression"] and g["met"]
    result["finetuned"]["points"] = sup
    assert not bench.goal(result)["met"]
