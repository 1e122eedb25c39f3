"""KVEviction envs: Gymnasium compliance, rewards, caching, equivalence with kvzap_lab.evaluate, vector env."""

from __future__ import annotations

import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env

import kvzap_lab  # noqa: F401  registers the env ids
from kvzap_lab import evaluate, oracle, tasks
from kvzap_lab.engine import DEFAULT_EVICT_EVERY
from kvzap_lab.envs import KVEvictionEnv, KVEvictionVectorEnv, PolicyAgent, text_window_samples
from kvzap_lab.model import load_model
from kvzap_lab.policy import Threshold, TopK, get_policy

WINDOW, CHUNK = 16, 32


@pytest.fixture(scope="module")
def testbed():
    torch.manual_seed(0)
    return load_model("testbed", device="cpu")


@pytest.fixture(scope="module")
def samples(testbed):
    return tasks.make_samples("single_needle", testbed[1], 3, 96, seed=0)


def make_env(testbed, samples, **options):
    model, tokenizer = testbed
    return KVEvictionEnv(model, tokenizer, samples=samples, window=options.pop("window", WINDOW), chunk_size=CHUNK, **options)


def run_episode(env, act, sample: int):
    """Play one episode; returns (rewards, infos)."""
    obs, info = env.reset(options={"sample": sample})
    rewards, infos = [], [info]
    while True:
        obs, reward, terminated, truncated, info = env.step(act(obs))
        assert env.observation_space.contains(obs) and not truncated
        rewards.append(reward)
        infos.append(info)
        if terminated:
            return rewards, infos


@pytest.mark.parametrize("options", [{}, {"policy": "oracle", "action_type": "threshold"}])
def test_check_env_passes_without_warnings(testbed, samples, options):
    model, tokenizer = testbed
    env = gym.make("kvzap_lab/KVEviction-v0", model=model, tokenizer=tokenizer, samples=samples, window=WINDOW,
                   chunk_size=CHUNK, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env.unwrapped)
    env.close()


def test_registered_ids_make_and_make_vec(testbed, samples):
    model, tokenizer = testbed
    env = gym.make("kvzap_lab/KVEvictionThreshold-v0", model=model, tokenizer=tokenizer, samples=samples,
                   policy="oracle", window=WINDOW, chunk_size=CHUNK)
    assert isinstance(env.unwrapped, KVEvictionEnv) and isinstance(env.action_space, gym.spaces.Box)
    assert env.action_space.shape == (4, 2)  # [layers, kv_heads] of the test bed
    venv = gym.make_vec("kvzap_lab/KVEviction-v0", num_envs=3, vectorization_mode="vector_entry_point", model=model,
                        tokenizer=tokenizer, samples=samples, window=WINDOW, chunk_size=CHUNK)
    assert isinstance(venv, KVEvictionVectorEnv) and venv.num_envs == 3
    assert venv.action_space.shape == (3, 4, 2, CHUNK)
    assert venv.metadata["autoreset_mode"] == gym.vector.AutoresetMode.NEXT_STEP


def test_reward_terms_add_up_to_the_documented_episode_totals(testbed, samples):
    env = make_env(testbed, samples, oracle_weight=1.0, fidelity_weight=2.0, memory_weight=0.5)
    rng = np.random.default_rng(0)
    rewards, infos = run_episode(env, lambda obs: rng.integers(0, 2, env.action_space.shape, dtype=np.int8), 1)
    end = infos[-1]
    assert 0 < end["compression"] < 1 and 0 < end["oracle_mass_retained"] < 1 and end["kl"] > 0
    # sum_t r_t = -(oracle mass lost) - w_f mean KL - w_m held / (L H T), and teacher forcing feeds all T tokens
    expected = -(1 - end["oracle_mass_retained"]) - 2.0 * end["kl"] - 0.5 * (1 - end["compression"])
    assert sum(rewards) == pytest.approx(expected, rel=1e-6)
    per_term = {k: sum(i["terms"][k] for i in infos[1:]) for k in ("oracle", "fidelity", "memory")}
    assert per_term["oracle"] == pytest.approx(end["oracle_mass_retained"] - 1)
    assert set(end) >= {"accuracy", "token_accuracy", "answer_ids"}
    assert len(end["answer_ids"]) == len(samples[1].answer_ids)  # teacher forcing predicts every answer token


def test_keeping_everything_matches_the_full_cache(testbed, samples):
    env = make_env(testbed, samples)
    rewards, infos = run_episode(env, lambda obs: np.ones(env.action_space.shape, dtype=np.int8), 0)
    end = infos[-1]
    assert end["compression"] == 0 and end["oracle_mass_retained"] == 1
    assert end["kl"] < 1e-6  # the compressed run's next-token distributions are the full cache's
    assert sum(rewards) == pytest.approx(-1.0, abs=1e-6)  # only the memory term: every pair held
    # evicting everything offered loses oracle mass and fidelity
    _, infos = run_episode(env, lambda obs: np.zeros(env.action_space.shape, dtype=np.int8), 0)
    assert infos[-1]["compression"] > 0.5 and infos[-1]["kl"] > 1e-3 and infos[-1]["oracle_mass_retained"] < 1


def test_observations_describe_the_candidates(testbed, samples):
    env = make_env(testbed, samples, policy="oracle")
    obs, info = env.reset(options={"sample": 0})
    seen = []
    while True:
        n = int(obs["candidate_mask"].sum())
        assert n <= CHUNK and (obs["candidate_mask"][:n] == 1).all() and (obs["candidate_mask"][n:] == 0).all()
        assert (obs["hidden"][:, n:] == 0).all() and (obs["scores"][..., n:] == 0).all()
        if n:
            assert np.abs(obs["hidden"][:, :n]).sum(-1).min() > 0
        seen += list(np.round(obs["positions"][:n] * env.episode.total).astype(int))
        obs, _, terminated, _, _ = env.step(np.ones(env.action_space.shape, dtype=np.int8))
        if terminated:
            break
    # every position outside the final window, sinks excluded, is offered exactly once, in order
    assert seen == list(range(4, env.episode.total - WINDOW))
    assert obs["progress"][0] == 1.0 and (obs["occupancy"] == 1).all()


def test_references_are_computed_once_per_sample(testbed, samples, monkeypatch):
    calls = []
    score_contexts = oracle.score_contexts

    def counting(*args, **kwargs):
        calls.append(len(args[2]))
        return score_contexts(*args, **kwargs)

    monkeypatch.setattr(oracle, "score_contexts", counting)  # what oracle_table calls
    env = make_env(testbed, samples)
    for sample in (0, 0, 2, 0, 2):
        env.reset(options={"sample": sample})
    assert calls == [1, 1]  # one oracle pass per distinct sample; re-running a sample costs none
    venv = KVEvictionVectorEnv(2, *testbed, samples=samples, window=WINDOW, chunk_size=CHUNK,
                               reference_cache=env.config.references)
    venv.reset(seed=0)
    assert calls == [1, 1, 1]  # the vector env prepared the one sample it had not seen, and nothing else
    venv.close()


def test_policy_agent_matches_evaluate(testbed, samples):
    """Same policy, same samples: the env's compression and accuracy are kvzap_lab.evaluate's."""
    model, tokenizer = testbed
    end = tokenizer.convert_tokens_to_ids(tasks.END)
    for name, tau in (("oracle", -6.0), ("knorm", -5.0)):
        policy = get_policy(name, rule=Threshold(tau=tau, window=WINDOW, sinks=4))
        tables = [oracle.oracle_table(model, tokenizer, b) for b in evaluate.batches(samples, 1)] if name == "oracle" else None
        expected = evaluate.run_cell(model, policy, samples, end, 1, CHUNK, tables)
        env = KVEvictionEnv(model, tokenizer, samples=samples, policy=policy, decoding="greedy", chunk_size=CHUNK,
                            evict_every=DEFAULT_EVICT_EVERY)
        agent = PolicyAgent(policy)
        ends = [run_episode(env, agent.act, k)[1][-1] for k in range(len(samples))]
        assert 0 < expected["compression"] < 1
        assert np.mean([e["compression"] for e in ends]) == pytest.approx(expected["compression"], abs=1e-12)
        assert np.mean([e["accuracy"] for e in ends]) == expected["accuracy"]


def test_threshold_variant_equals_policy_agent(testbed, samples):
    tau = np.full((4, 2), -6.0, dtype=np.float32)
    tau[0] = -9.0  # per-layer and per-head thresholds reach the rule
    tau[3, 1] = -4.0
    policy = get_policy("oracle", rule=Threshold(tau=tau.tolist(), window=WINDOW, sinks=4))
    binary = make_env(testbed, samples, policy=policy, window=None)
    threshold = make_env(testbed, samples, policy=policy, window=None, action_type="threshold")
    r_binary, i_binary = run_episode(binary, PolicyAgent(policy).act, 2)
    r_threshold, i_threshold = run_episode(threshold, lambda obs: tau, 2)
    assert r_binary == pytest.approx(r_threshold) and 0 < i_threshold[-1]["compression"] < 1
    assert i_binary[-1]["compression"] == i_threshold[-1]["compression"]


def test_vector_env_batches_rows_like_single_envs_with_next_step_autoreset(testbed, samples):
    policy = get_policy("oracle", rule=Threshold(tau=-6.0, window=WINDOW, sinks=4))
    agent = PolicyAgent(policy)
    single = make_env(testbed, samples, policy=policy, window=None)
    expected = {k: run_episode(single, agent.act, k) for k in (0, 1)}
    venv = KVEvictionVectorEnv(2, *testbed, samples=samples, policy=policy, chunk_size=CHUNK)
    obs, info = venv.reset(options={"sample": [0, 1]})
    rewards, finished = [[], []], [None, None]
    while None in finished:
        obs, reward, terminated, truncated, info = venv.step(agent.act(obs))
        assert venv.observation_space.contains(obs) and not truncated.any()
        for row in range(2):
            if finished[row] is None:
                rewards[row].append(reward[row])
                if terminated[row]:
                    finished[row] = info["compression"][row]
                    after = row
    for row, k in enumerate((0, 1)):  # padding inside the steps does not change a row's episode
        assert rewards[row] == pytest.approx(expected[k][0], rel=1e-4, abs=1e-6)
        assert finished[row] == expected[k][1][-1]["compression"]
    # NEXT_STEP: the row that just terminated restarts on the next step with reward 0, its action ignored
    obs, reward, terminated, _, info = venv.step(np.zeros(venv.action_space.shape, dtype=np.int8))
    assert reward[after] == 0 and not terminated[after] and info["compression"][after] == 0
    assert 0 < obs["progress"][after, 0] < 0.5
    venv.close()


def test_rows_in_different_phases_share_one_forward(testbed, samples):
    venv = KVEvictionVectorEnv(3, *testbed, samples=samples, window=WINDOW, chunk_size=CHUNK)
    obs, _ = venv.reset(seed=3)
    episodes, steps = 0, 0
    while episodes < 7:  # rows restart at different times, so prefill chunks and decode tokens mix
        obs, reward, terminated, _, info = venv.step(np.ones(venv.action_space.shape, dtype=np.int8))
        assert np.isfinite(reward).all() and venv.observation_space.contains(obs)
        assert (info["kl"] < 1e-5).all()  # keeping everything stays exact for every row, whatever its neighbours do
        episodes += int(terminated.sum())
        steps += 1
    assert steps < 7 * 12  # episodes overlap: 3 rows in one forward
    venv.close()


def test_text_window_episodes(testbed):
    model, tokenizer = testbed
    text = " ".join(tasks.filler_sentence(__import__("random").Random(i)) for i in range(60))
    windows = text_window_samples(tokenizer, text, 64, answer_tokens=8)
    env = KVEvictionEnv(model, tokenizer, samples=windows, window=WINDOW, chunk_size=CHUNK)
    _, infos = run_episode(env, lambda obs: np.ones(env.action_space.shape, dtype=np.int8), 0)
    assert 0 <= infos[-1]["token_accuracy"] <= 1 and len(infos[-1]["answer_ids"]) == 8


def test_clear_errors(testbed, samples):
    model, tokenizer = testbed
    env = make_env(testbed, samples)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.ones(env.action_space.shape, dtype=np.int8))
    env.reset(seed=0)
    with pytest.raises(ValueError, match="shape"):
        env.step(np.ones((4, 2, 3), dtype=np.int8))
    with pytest.raises(TypeError, match="dtype"):
        env.step(np.ones(env.action_space.shape, dtype=np.complex64))
    with pytest.raises(ValueError, match="0 .evict. and 1"):
        env.step(np.full(env.action_space.shape, 2, dtype=np.int8))
    with pytest.raises(ValueError, match="0 .evict. and 1"):
        env.step(np.full(env.action_space.shape, 0.5, dtype=np.float32))  # float 0.0 / 1.0 are accepted (SB3)
    with pytest.raises(ValueError, match="seed"):
        env.reset(seed=-1)
    with pytest.raises(ValueError, match="sample indices"):
        env.reset(options={"sample": 3})
    with pytest.raises(RuntimeError, match="reset"):
        KVEvictionEnv(model, tokenizer, samples=samples, window=WINDOW).step(np.ones(env.action_space.shape, dtype=np.int8))
    bad = [
        (dict(window=96), "window=96 is not smaller than the context"),
        (dict(max_candidates=CHUNK - 1), "max_candidates"),
        (dict(evict_every=0), "evict_every"),
        (dict(policy="kvzap_mlp"), "asks for a trained scorer but has none"),
        (dict(action_type="threshold"), "pass policy="),
        (dict(policy=get_policy("oracle", rule=Threshold(window=8))), "contradicts the policy"),
        (dict(decoding="beam"), "decoding"),
        (dict(observation="pixels"), "observation"),
        (dict(policy="oracle", action_type="threshold", threshold_range=(1.0, -1.0)), "threshold_range"),
        (dict(memory_weight=-1.0), "weights"),
    ]
    for options, message in bad:
        with pytest.raises(ValueError, match=message):
            make_env(testbed, samples, **options)
    with pytest.raises(ValueError, match="sample_seed"):
        KVEvictionEnv(model, tokenizer, sample_seed=-3, window=WINDOW)
    with pytest.raises(ValueError, match="device"):
        KVEvictionEnv(model, tokenizer, samples=samples, device="meta")
    with pytest.raises(ValueError, match="TopK"):
        PolicyAgent(get_policy("knorm", rule=TopK(keep_ratio=0.5)))
    threshold = make_env(testbed, samples, policy="oracle", action_type="threshold")
    threshold.reset(seed=0)
    with pytest.raises(ValueError, match="finite log-score thresholds"):
        threshold.step(np.full((4, 2), np.nan, dtype=np.float32))


def test_device_defaults_to_cuda_when_available(testbed, samples):
    env = KVEvictionEnv("testbed", samples=samples, window=WINDOW, chunk_size=CHUNK)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert next(env.config.model.parameters()).device.type == expected


def test_envs_sharing_one_model_take_turns(testbed, samples):
    """Two envs on one loaded model, stepped in turn, play the episodes each plays alone."""
    policy = get_policy("oracle", rule=Threshold(tau=-6.0, window=WINDOW, sinks=4))
    agent = PolicyAgent(policy)
    alone = [run_episode(make_env(testbed, samples, policy=policy, window=None), agent.act, k) for k in (0, 1)]
    envs = [make_env(testbed, samples, policy=policy, window=None) for _ in range(2)]
    obs = [env.reset(options={"sample": k})[0] for k, env in enumerate(envs)]
    rewards, ends = [[], []], [None, None]
    while None in ends:
        for i, env in enumerate(envs):
            if ends[i] is None:
                obs[i], reward, terminated, _, info = env.step(agent.act(obs[i]))
                rewards[i].append(reward)
                ends[i] = info if terminated else None
    for i in range(2):
        assert rewards[i] == pytest.approx(alone[i][0], rel=1e-5, abs=1e-7)
        assert ends[i]["compression"] == alone[i][1][-1]["compression"]
    model = testbed[0]
    assert model.config._attn_implementation == "sdpa" and not model.model._forward_pre_hooks  # plain after the episodes


def test_compact_observations_flat_float_actions_and_ansi_render(testbed, samples):
    """What Stable-Baselines3 needs: a 1-D MultiBinary (float 0/1 accepted), observations without hidden states."""
    model, tokenizer = testbed
    env = gym.make("kvzap_lab/KVEviction-v0", model=model, tokenizer=tokenizer, samples=samples, window=WINDOW,
                   chunk_size=CHUNK, policy="oracle", observation="compact", flat_actions=True, render_mode="ansi")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_env(env.unwrapped)
    assert env.action_space.shape == (4 * 2 * CHUNK,) and "hidden" not in env.observation_space.spaces
    full = make_env(testbed, samples, policy="oracle")
    (obs, _), (full_obs, _) = env.reset(options={"sample": 1}), full.reset(options={"sample": 1})
    while True:
        for key in obs:
            np.testing.assert_array_equal(obs[key], full_obs[key])  # the same observation, hidden states aside
        keep = (full_obs["scores"] >= -6.0).astype(np.int8)
        obs, reward, terminated, _, info = env.step(keep.reshape(-1).astype(np.float32))
        full_obs, full_reward, _, _, full_info = full.step(keep)
        assert reward == full_reward
        text = env.render()
        assert isinstance(text, str) and f"{env.unwrapped.episode.fed}/" in text
        if terminated:
            break
    assert info["compression"] == full_info["compression"] > 0 and "done" in text
    env.close()
