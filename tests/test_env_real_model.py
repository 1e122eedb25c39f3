"""The envs on SmolLM2-135M-Instruct (``real_model``): check_env and an episode on text windows, prefill branches."""

from __future__ import annotations

import inspect
import json
import warnings

import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

import kvzap_lab  # noqa: F401  registers the env ids
from kvzap_lab.engine import generate, prefill
from kvzap_lab.envs import PolicyAgent, text_window_samples
from kvzap_lab.policy import Threshold, TopK, get_policy

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def windows(smollm2):
    text = inspect.getdoc(json) + "\n" + inspect.getdoc(json.JSONDecoder) + "\n" + inspect.getdoc(json.JSONEncoder)
    return text_window_samples(smollm2[1], text, 96, answer_tokens=6)[:2]


def test_env_by_name_passes_check_env_and_plays_an_episode_on_smollm2(smollm2_cache, windows, monkeypatch):
    """``gym.make(..., model="smollm2-135m", context_tokens=256)`` on the chat task suite (loaded once, shared by the
    envs check_env makes) passes check_env with no warning; the oracle policy as an agent plays an episode on text
    windows with compact observations."""
    from kvzap_lab.envs.config import clear_shared_models
    from kvzap_lab.gguf_models import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(smollm2_cache))
    policy = get_policy("oracle", rule=Threshold(tau=-6.0, window=32, sinks=4))
    try:
        env = gym.make("kvzap_lab/KVEviction-v0", model="smollm2-135m", context_tokens=256, n_samples=2, policy=policy,
                       render_mode="ansi")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            check_env(env.unwrapped)
        assert env.observation_space["hidden"].shape == (30, 64, 576) and env.observation_space["scores"].shape == (30, 3, 64)
        env.close()
        env = gym.make("kvzap_lab/KVEviction-v0", model="smollm2-135m", samples=windows, chunk_size=64, policy=policy,
                       observation="compact")
        agent, done = PolicyAgent(policy), False
        obs, _ = env.reset(options={"sample": 0})
        while not done:
            obs, reward, done, _, info = env.step(agent.act(obs))
        assert 0 < info["compression"] < 1 and 0 < info["oracle_mass_retained"] <= 1 and len(info["answer_ids"]) == 6
        env.close()
    finally:
        clear_shared_models()


def test_prefill_branches_equal_generate_on_smollm2(smollm2, windows):
    model, _ = smollm2
    prompts = [w.input_ids for w in windows]
    pre = prefill(model, prompts)
    for policy in (get_policy("knorm", rule=TopK(budget=24, window=16, sinks=4)),
                   get_policy("streaming_llm", rule=TopK(budget=0, window=16, sinks=4))):
        branched = pre.branch(policy, 4, eos_token_id=[])
        alone = generate(model, prompts, policy, 4, eos_token_id=[], chunk_size=len(prompts[0]))
        assert branched.tokens == alone.tokens and branched.compression.overall == alone.compression.overall > 0.3
