"""RL with standard libraries: SB3 PPO trains on the env unmodified; REINFORCE on the KVzap-MLP scorer."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_file
from kvzap_lab.envs import KVEvictionEnv
from kvzap_lab.envs.config import shared_model
from kvzap_lab.policies.kvzap_mlp import KVzapMLP

import kvzap_lab  # noqa: F401  registers the env ids
from kvzap_lab.tasks import make_samples

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    return load_file(EXAMPLES / f"{name}.py", name)


@pytest.fixture(scope="module")
def supervised(tmp_path_factory):
    """A quickly fitted supervised KVzap-MLP checkpoint for the test bed."""
    torch.manual_seed(0)
    model, tokenizer = shared_model("testbed", "cpu")
    scorer = load_example("learn_thresholds").quick_mlp_scorer(model, tokenizer, "single_needle", 6, 96, seed=1000, epochs=5)
    path = tmp_path_factory.mktemp("supervised") / "scorer"
    scorer.save(path)
    return path


def test_sb3_ppo_trains_on_the_threshold_env_unmodified(tmp_path, monkeypatch):
    import tempfile

    from stable_baselines3.common.env_checker import check_env

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where SB3's default logger would make a folder

    sb3 = load_example("sb3_thresholds")
    args = sb3.Args(context_tokens=96, n_train=2, total_timesteps=64, n_envs=2, n_steps=32, window=16,
                    out=str(tmp_path / "ppo.zip"), progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(sb3.make_env(args, sb3.make_samples("single_needle", shared_model("testbed")[1], 2, 96, seed=0)))
    agent = sb3.train(args)
    assert agent.num_timesteps >= 64 and (tmp_path / "ppo.zip").is_file()
    assert list(scratch.glob("SB3-*")) == []  # no SB3-<date> folder left behind
    scores = sb3.evaluate(sb3.Args(**{**vars(args), "n_heldout": 1}), lambda obs: agent.predict(obs, deterministic=True)[0])
    assert 0 <= scores["compression"] < 1 and scores["accuracy"] in (0.0, 1.0)


def test_sb3_checks_the_binary_env_with_flat_actions_and_compact_observations():
    import gymnasium as gym
    from gymnasium.wrappers import FlattenObservation
    from stable_baselines3.common.env_checker import check_env

    env = gym.make("kvzap_lab/KVEviction-v0", model="testbed", n_samples=2, context_tokens=96, window=16, chunk_size=32,
                   policy="oracle", observation="compact", flat_actions=True)
    env = FlattenObservation(env)  # SB3 wants 1-D observations
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env)
    env.close()


def test_reinforce_moves_the_scorer_along_the_reward_and_saves_a_checkpoint(supervised, tmp_path):
    """With only the memory term, the return is minus the pairs kept: REINFORCE lowers the scores (evicts more);
    seeded, the same run gives the same weights; the result is an ordinary checkpoint."""
    rl = load_example("reinforce_scorer")
    args = rl.Args(checkpoint=str(supervised), out=str(tmp_path / "learned"), context_tokens=96, n_train=2,
                   iterations=3, episodes=3, window=16, chunk_size=32, learning_rate=1e-2, oracle_weight=0.0,
                   fidelity_weight=0.0, memory_weight=1.0, progress=False)
    learned = rl.train(args)
    model, tokenizer = shared_model("testbed")
    start = KVzapMLP.load(supervised, model=model)
    loaded = KVzapMLP.load(args.out, model=model)
    env = KVEvictionEnv("testbed", samples=make_samples("single_needle", tokenizer, 1, 96, seed=5), window=16, chunk_size=96)
    obs, _ = env.reset(seed=0)
    X = obs["hidden"][:, : int(obs["candidate_mask"].sum())].transpose(1, 0, 2)  # real hidden states [n, L, D]
    np.testing.assert_allclose(loaded.predict(X), learned.predict(X), atol=1e-6)
    assert loaded.predict(X).mean() < start.predict(X).mean() - 0.05
    again = rl.train(rl.Args(**{**vars(args), "out": str(tmp_path / "again")}))
    for (W, b), (W2, b2) in zip(learned.weights_, again.weights_):
        assert torch.equal(W, W2) and torch.equal(b, b2)
    rows = rl.evaluate_scorers(rl.Args(**{**vars(args), "n_heldout": 2, "eval_tau_offsets": "0,2"}), {"rl": learned})
    assert [(r["scorer"], r["tau"]) for r in rows] == [("rl", -6.0), ("rl", -4.0)]
    assert rows[0]["compression"] < rows[1]["compression"] and all(0 <= r["accuracy"] <= 1 for r in rows)
    with pytest.raises(ValueError, match="episodes >= 2"):
        rl.train(rl.Args(**{**vars(args), "episodes": 1}))
