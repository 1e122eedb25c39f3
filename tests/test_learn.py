"""The learning example: CEM over per-layer, per-head thresholds of a KVzap-MLP scorer improves the env reward."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from kvzap_lab.envs import KVEvictionVectorEnv
from kvzap_lab.model import load_model
from kvzap_lab.policy import Policy, Threshold
from kvzap_lab.tasks import make_samples

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "learn_thresholds.py"


def load_example():
    spec = importlib.util.spec_from_file_location("learn_thresholds", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setting():
    torch.manual_seed(0)
    learn = load_example()
    model, tokenizer = load_model("testbed", device="cpu")
    scorer = learn.quick_mlp_scorer(model, tokenizer, "single_needle", 6, 96, seed=1000, epochs=5)
    policy = Policy("kvzap_mlp", scorer, Threshold(window=16))
    pool = make_samples("single_needle", tokenizer, 2, 96, seed=0)
    venv = KVEvictionVectorEnv(6, model, tokenizer, samples=pool, policy=policy, action_type="threshold", chunk_size=32)
    yield learn, venv
    venv.close()


def test_cem_improves_over_the_starting_thresholds_deterministically(setting):
    learn, venv = setting
    samples, tau0 = [0, 1], -7.0
    start = learn.evaluate_taus(venv, np.full((6, 4, 2), tau0), samples)
    assert np.ptp(start.reward) == 0  # every row plays the same samples with the same thresholds
    mu, history = learn.cem(venv, samples, tau0, iterations=3, seed=0, progress=False)
    assert history[0]["mu_reward"] == pytest.approx(start.reward[0])
    learned = learn.evaluate_taus(venv, np.broadcast_to(mu, (6, 4, 2)), samples)
    assert learned.reward[0] > start.reward[0] + 0.01
    assert mu.shape == (4, 2) and np.ptp(mu) > 0  # thresholds per layer and head, not one uniform value
    again, _ = learn.cem(venv, samples, tau0, iterations=3, seed=0, progress=False)
    np.testing.assert_array_equal(mu, again)  # seeded: the same run gives the same thresholds


def test_uniform_taus_bracket_a_target_compression(setting):
    learn, venv = setting
    target = 0.3
    (tau_low, low), (tau_high, high) = learn.uniform_bracket(venv, target, [0], rounds=4)
    assert learn.TAU_RANGE[0] < tau_low <= tau_high < learn.TAU_RANGE[1]
    assert low["compression"] <= target <= high["compression"] and high["compression"] - low["compression"] < 0.05
    at = learn.interpolate([(tau_low, low), (tau_high, high)], target)
    assert at["compression"] == pytest.approx(target)
    assert min(low["reward"], high["reward"]) <= at["reward"] <= max(low["reward"], high["reward"])
